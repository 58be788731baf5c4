"""Multiplicative-XOR n-gram hashing of compressed token ids into per-head table rows.

For every Engram layer and order n = 2..N, position t mixes the n most recent compressed ids,
  mix_n[t] = XOR_{k<n} (x[t-k] * m_k)     (int64; x[t-k] = pad_id left of the sequence),
with odd per-layer multipliers m drawn from `np.random.default_rng(seed + 10007 * layer_id)`,
and head j of order n reads row `mix_n mod p_{n,j}` of its own table, whose size p is a prime.
Primes are searched upwards from `engram_vocab_size[n-2] - 1`, each strictly above the previous
head's, skipping primes already taken by any layer, so every head of the model has a distinct
table size. All of this follows the official demo bit for bit.

Two implementations give identical ids:
  * `hash_numpy`: int64 NumPy on the host (the input pipeline; checks every id);
  * `hash`: jit-able JAX that never needs `jax_enable_x64`. The 64-bit products, XORs and the
    floor-mod are emulated on (hi, lo) uint32 pairs. Concrete ids are checked as in
    `hash_numpy`; traced ids are trusted.

Optional `segment_ids` make packed documents independent: a shifted token from another segment
than the current position is replaced by `pad_id`, so each document's n-grams start from padding
exactly as if it began its own sequence. Without them the ids equal the reference.

Dimension legend:
  B batch, T sequence length, N max n-gram order, K heads per order,
  H = (N-1)*K heads of a layer (2-gram heads first), V' compressed vocabulary size.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.config import EngramConfig
from engram_jax.memory import head_offsets

_INT64_MAX = int(np.iinfo(np.int64).max)
# Ids must be < 2**31: they travel as int32 and the uint32 emulation relies on x < 2**32.
_MAX_TOKENIZER_VOCAB = 2**31
# Hash ids are int32 and the chunked mod needs r << 1 to fit in uint32.
_MAX_PRIME = 2**31 - 1
_LAYER_SEED_STRIDE = 10007
_U32 = 0xFFFFFFFF
# Deterministic Miller-Rabin witnesses for every n < 3.3e24 (covers all 64-bit integers).
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime(n: int) -> bool:
  """Deterministic primality test for 0 <= n < 2**64 (Miller-Rabin, fixed bases)."""
  if n < 2:
    return False
  for p in _MR_BASES:
    if n % p == 0:
      return n == p
  d, s = n - 1, 0
  while d % 2 == 0:
    d //= 2
    s += 1
  for a in _MR_BASES:
    x = pow(a, d, n)
    if x in (1, n - 1):
      continue
    for _ in range(s - 1):
      x = x * x % n
      if x == n - 1:
        break
    else:
      return False
  return True


def _next_unseen_prime(after: int, seen: set[int]) -> int:
  candidate = after + 1
  while candidate in seen or not is_prime(candidate):
    candidate += 1
  return candidate


# ---- 64-bit arithmetic on (hi, lo) uint32 pairs, for the device path -------------------------


def _mul_u32_by_const(x: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
  """(x * m) mod 2**64 as (hi, lo) uint32, for uint32 x and a constant 0 <= m < 2**64."""
  m_lo, m_hi = m & _U32, (m >> 32) & _U32
  x0, x1 = x & 0xFFFF, x >> 16
  b0, b1 = jnp.uint32(m_lo & 0xFFFF), jnp.uint32(m_lo >> 16)
  # 16-bit limbs: every partial product is below 2**32, so no uint32 product loses bits.
  p00, p01, p10, p11 = x0 * b0, x0 * b1, x1 * b0, x1 * b1
  mid = (p00 >> 16) + (p01 & 0xFFFF) + (p10 & 0xFFFF)  # < 3 * 2**16
  lo = (p00 & 0xFFFF) | (mid << 16)
  hi = p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16)
  # The x * m_hi term only reaches bits >= 32; uint32 multiplication wraps like int64 would.
  hi = hi + x * jnp.uint32(m_hi)
  return hi, lo


def _floor_mod_i64(hi: jax.Array, lo: jax.Array, primes: Sequence[int]) -> jax.Array:
  """NumPy's int64 `v % p` for v given as two's-complement (hi, lo) uint32; p along the last axis.

  hi, lo: uint32[..., P]; primes: P static values in [2, 2**31). Returns uint32[..., P] in [0, p).
  """
  bits = max(int(p).bit_length() for p in primes)
  step = 32 - bits  # r < 2**bits, so r << step still fits in uint32
  p_P = jnp.asarray(np.asarray(primes, dtype=np.uint32))
  r = hi % p_P
  consumed = 0
  while consumed < 32:  # static unroll: ceil(32 / step) steps
    width = min(step, 32 - consumed)
    chunk = (lo >> (32 - consumed - width)) & ((1 << width) - 1)
    r = ((r << width) | chunk) % p_P
    consumed += width
  # r is now the mod of the unsigned value u; a negative v = u - 2**64 needs that term removed.
  corr_P = jnp.asarray(np.asarray([(1 << 64) % int(p) for p in primes], dtype=np.uint32))
  negative = (hi >> 31) == 1
  fixed = jnp.where(r >= corr_P, r - corr_P, r + p_P - corr_P)
  return jnp.where(negative, fixed, r)


class NgramHashMapping:
  """Per-layer multipliers and prime table sizes, and the hash from ids to per-head rows."""

  def __init__(self, engram_vocab_size: Sequence[int], max_ngram_size: int,
               n_head_per_ngram: int, layer_ids: Sequence[int], pad_id: int, seed: int,
               tokenizer_vocab_size: int):
    self.engram_vocab_size = tuple(int(v) for v in engram_vocab_size)
    self.max_ngram_size = int(max_ngram_size)
    self.n_head_per_ngram = int(n_head_per_ngram)
    self.layer_ids = tuple(int(l) for l in layer_ids)
    self.pad_id = int(pad_id)
    self.seed = int(seed)
    self.tokenizer_vocab_size = int(tokenizer_vocab_size)
    self._validate()
    self.multipliers = self._draw_multipliers()
    self._primes = self._search_primes()

  @classmethod
  def from_config(cls, cfg: EngramConfig, tokenizer_vocab_size: int,
                  compressed_pad_id: int) -> "NgramHashMapping":
    return cls(cfg.engram_vocab_size, cfg.max_ngram_size, cfg.n_head_per_ngram, cfg.layer_ids,
               compressed_pad_id, cfg.seed, tokenizer_vocab_size)

  def _validate(self):
    n, v = self.max_ngram_size, self.tokenizer_vocab_size
    if n < 2:
      raise ValueError(f"max_ngram_size: must be >= 2, got {n}")
    if len(self.engram_vocab_size) != n - 1 or min(self.engram_vocab_size) < 2:
      raise ValueError(f"engram_vocab_size: needs {n - 1} entries >= 2 (orders 2..{n}), "
                       f"got {self.engram_vocab_size}")
    if self.n_head_per_ngram < 1:
      raise ValueError(f"n_head_per_ngram: must be >= 1, got {self.n_head_per_ngram}")
    if not self.layer_ids or len(set(self.layer_ids)) != len(self.layer_ids):
      raise ValueError(f"layer_ids: must be non-empty and distinct, got {self.layer_ids}")
    if min(self.layer_ids) < 0:
      raise ValueError(f"layer_ids: must be >= 0, got {self.layer_ids}")
    if not 1 <= v <= _MAX_TOKENIZER_VOCAB:
      raise ValueError(
          f"tokenizer_vocab_size: must be in [1, 2**31] so ids fit in int32 and x * m cannot "
          f"overflow int64, got {v}")
    if not 0 <= self.pad_id < v:
      raise ValueError(f"pad_id: the compressed pad id must be in [0, {v}), got {self.pad_id}")

  def _draw_multipliers(self) -> dict[int, np.ndarray]:
    half_bound = max(1, (_INT64_MAX // self.tokenizer_vocab_size) // 2)
    out = {}
    for layer_id in self.layer_ids:
      rng = np.random.default_rng(self.seed + _LAYER_SEED_STRIDE * layer_id)
      m_N = rng.integers(0, half_bound, size=self.max_ngram_size, dtype=np.int64) * 2 + 1
      # The bound makes this impossible; checked so that a future change cannot wrap silently.
      if (self.tokenizer_vocab_size - 1) * int(m_N.max()) > _INT64_MAX:
        raise ValueError(f"tokenizer_vocab_size: {self.tokenizer_vocab_size} lets id * "
                         "multiplier overflow int64")
      m_N.setflags(write=False)
      out[layer_id] = m_N
    return out

  def _search_primes(self) -> dict[int, tuple[int, ...]]:
    seen: set[int] = set()
    out = {}
    for layer_id in self.layer_ids:
      primes_H = []
      for base in self.engram_vocab_size:
        previous = base - 1
        for _ in range(self.n_head_per_ngram):
          previous = _next_unseen_prime(previous, seen)
          seen.add(previous)
          primes_H.append(previous)
      if max(primes_H) > _MAX_PRIME:
        raise ValueError(f"engram_vocab_size: head table sizes must stay below 2**31 so hash ids "
                         f"fit in int32; layer {layer_id} needs prime {max(primes_H)}")
      out[layer_id] = tuple(primes_H)
    return out

  # ---- table geometry -------------------------------------------------------------------------

  def _check_layer(self, layer_id: int) -> int:
    if layer_id not in self._primes:
      raise ValueError(f"layer_id: {layer_id} is not an Engram layer ({self.layer_ids})")
    return layer_id

  def head_sizes(self, layer_id: int) -> tuple[int, ...]:
    """The H prime table sizes of a layer, 2-gram heads first."""
    return self._primes[self._check_layer(layer_id)]

  def offsets(self, layer_id: int) -> np.ndarray:
    """int64[H]: first global row of each head (exclusive cumulative sum of head sizes)."""
    return head_offsets(self.head_sizes(layer_id))

  def num_rows(self, layer_id: int) -> int:
    """R: rows of the layer's table."""
    return int(sum(self.head_sizes(layer_id)))

  @property
  def num_heads(self) -> int:
    return (self.max_ngram_size - 1) * self.n_head_per_ngram

  # ---- hashing --------------------------------------------------------------------------------

  def _check_inputs(self, ids, segment_ids, check_values: bool):
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise TypeError(f"ids: expected integer compressed ids, got dtype {ids.dtype}")
    if ids.ndim != 2:
      raise ValueError(f"ids: expected rank 2 [B, T], got shape {ids.shape}")
    if check_values and ids.size:
      # An explicit fetch of two scalars for a device array (allowed under transfer_guard).
      lo, hi = (int(v) for v in jax.device_get((ids.min(), ids.max())))
      if lo < 0:
        raise ValueError(f"ids: negative id {lo}; hash compressed ids, not padding markers")
      if hi >= self.tokenizer_vocab_size:
        raise ValueError(f"ids: id {hi} >= tokenizer_vocab_size {self.tokenizer_vocab_size}; "
                         "were the ids compressed?")
    if segment_ids is not None:
      if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"segment_ids: expected integers, got dtype {segment_ids.dtype}")
      if segment_ids.shape != ids.shape:
        raise ValueError(f"segment_ids: shape {segment_ids.shape} != ids shape {ids.shape}")

  def hash_numpy(self, ids, segment_ids=None) -> dict[int, np.ndarray]:
    """Host path: {layer_id: int64[B, T, H]} from compressed ids int[B, T]."""
    ids_BxT = np.asarray(ids)
    seg_BxT = None if segment_ids is None else np.asarray(segment_ids)
    self._check_inputs(ids_BxT, seg_BxT, check_values=True)
    ids_BxT = ids_BxT.astype(np.int64)
    T = ids_BxT.shape[1]
    shifted = [ids_BxT]
    for k in range(1, self.max_ngram_size):
      tok_BxT = np.full_like(ids_BxT, self.pad_id)
      if k < T:  # otherwise every position looks past the start and sees only padding
        tok_BxT[:, k:] = ids_BxT[:, :T - k]
      if seg_BxT is not None:
        same_BxT = np.zeros(ids_BxT.shape, dtype=bool)
        if k < T:
          same_BxT[:, k:] = seg_BxT[:, k:] == seg_BxT[:, :T - k]
        tok_BxT = np.where(same_BxT, tok_BxT, self.pad_id)
      shifted.append(tok_BxT)
    out = {}
    for layer_id in self.layer_ids:
      m_N, primes = self.multipliers[layer_id], self._primes[layer_id]
      mix_BxT = shifted[0] * m_N[0]
      heads = []
      for order in range(2, self.max_ngram_size + 1):
        mix_BxT = mix_BxT ^ (shifted[order - 1] * m_N[order - 1])
        p_K = np.asarray(primes[(order - 2) * self.n_head_per_ngram:
                                (order - 1) * self.n_head_per_ngram], dtype=np.int64)
        heads.append(mix_BxT[..., None] % p_K)
      out[layer_id] = np.concatenate(heads, axis=-1)
    return out

  def hash(self, ids, segment_ids=None) -> dict[int, jax.Array]:
    """Device path: {layer_id: int32[B, T, H]}, equal to `hash_numpy`; jit-able, 32-bit only.

    Concrete ids (NumPy or a committed `jax.Array`) are range-checked as in `hash_numpy`: a
    negative id or one >= the tokenizer vocabulary raises. Traced ids (under jit) are trusted:
    checking them would need a host round trip inside the program, and an out-of-range id only
    gives in-range but meaningless rows.
    """
    if not isinstance(ids, (np.ndarray, jax.Array)):
      ids = np.asarray(ids)
    if segment_ids is not None and not isinstance(segment_ids, (np.ndarray, jax.Array)):
      segment_ids = np.asarray(segment_ids)
    self._check_inputs(ids, segment_ids, check_values=not isinstance(ids, jax.core.Tracer))
    if isinstance(ids, np.ndarray):
      ids = ids.astype(np.int32)  # values checked above; avoids the int64 -> int32 warning
    x_BxT = jnp.asarray(ids).astype(jnp.uint32)
    pad = jnp.uint32(self.pad_id)
    seg_BxT = None if segment_ids is None else jnp.asarray(segment_ids)
    shifted = [x_BxT]
    for k in range(1, self.max_ngram_size):
      tok_BxT = jnp.pad(x_BxT, ((0, 0), (k, 0)), constant_values=pad)[:, :x_BxT.shape[1]]
      if seg_BxT is not None:
        # Left of the sequence the token is already pad, so the padded segment value is moot.
        prev_BxT = jnp.pad(seg_BxT, ((0, 0), (k, 0)))[:, :seg_BxT.shape[1]]
        tok_BxT = jnp.where(prev_BxT == seg_BxT, tok_BxT, pad)
      shifted.append(tok_BxT)
    K = self.n_head_per_ngram
    out = {}
    for layer_id in self.layer_ids:
      m_N = [int(m) for m in self.multipliers[layer_id]]
      mix_hi, mix_lo = _mul_u32_by_const(shifted[0], m_N[0])
      his, los = [], []
      for order in range(2, self.max_ngram_size + 1):
        term_hi, term_lo = _mul_u32_by_const(shifted[order - 1], m_N[order - 1])
        mix_hi, mix_lo = mix_hi ^ term_hi, mix_lo ^ term_lo
        his.append(jnp.broadcast_to(mix_hi[..., None], mix_hi.shape + (K,)))
        los.append(jnp.broadcast_to(mix_lo[..., None], mix_lo.shape + (K,)))
      rows_BxTxH = _floor_mod_i64(jnp.concatenate(his, -1), jnp.concatenate(los, -1),
                                  self._primes[layer_id])
      out[layer_id] = rows_BxTxH.astype(jnp.int32)
    return out

  # ---- identity -------------------------------------------------------------------------------

  def fingerprint(self) -> dict:
    """JSON-able description of everything that determines the hash ids."""
    return {
        "engram_vocab_size": list(self.engram_vocab_size),
        "max_ngram_size": self.max_ngram_size,
        "n_head_per_ngram": self.n_head_per_ngram,
        "layer_ids": list(self.layer_ids),
        "pad_id": self.pad_id,
        "seed": self.seed,
        "tokenizer_vocab_size": self.tokenizer_vocab_size,
        "multipliers": {str(l): [int(m) for m in self.multipliers[l]] for l in self.layer_ids},
        "primes": {str(l): list(self._primes[l]) for l in self.layer_ids},
    }

  def check_fingerprint(self, saved: Mapping) -> None:
    """Raises ValueError naming every field where `saved` (e.g. from a checkpoint) differs."""
    current = self.fingerprint()
    differing = sorted(k for k in set(current) | set(saved) if current.get(k) != saved.get(k))
    if differing:
      details = "; ".join(f"{k}: saved {saved.get(k)!r} != current {current.get(k)!r}"
                          for k in differing if k not in ("multipliers", "primes"))
      raise ValueError(f"hash fingerprint mismatch in {differing}"
                       + (f" ({details})" if details else "")
                       + "; the checkpoint's table rows would be read with different ids")

  def matches(self, saved: Mapping) -> bool:
    """True when `saved` describes the same hash as this mapping."""
    return self.fingerprint() == dict(saved)
