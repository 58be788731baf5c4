"""Token-by-token generation with Engram rows fetched (from host or HBM tables) as tokens appear.

The n-gram ids of position t+1 depend only on the compressed tokens t+2-N .. t+1, so the rows
position t+1 reads are known the moment its token is sampled. `generate` keeps, per sequence, a
rolling history of the last N compressed tokens on the device; after sampling token t+1 it
hashes the history (`NgramHashMapping.hash` on an [B, N] window, last position), turns the H
per-head ids into global rows and fetches exactly those B*H rows per layer. Every step is
asynchronous dispatch; nothing waits for the host until the tokens are read at the end.

Rows already fetched are kept on the device in a per-layer buffer rows_BxTmaxxHxE, and the model
sees them as `PrefetchedRows(rows = buffer, inverse = identity)`: the prefix is never fetched
again.

Two drivers. `Generator` calls a stateless `logits_fn` on a fixed [B, T_max] window every step
(static shapes: one compilation) and reads the logits of position t; `logits_fn` must be
causal. That is O(T_max) work per token: simple, for any model, not fast. `CachedGenerator`
calls a `decode_fn(variables, cache, tokens, positions, rows) -> (logits, cache)` on the prompt
once and then on one token per step (`EngramLM(decode=True)` keeps attention KV caches and ShortConv
histories; `engram_lm_decoder` wraps it), so each step fetches and reads only the new position's
B*H rows per layer.

How the rows of a pinned_host table reach the forward (`CachedGenerator(fetch=...)`):
- 'direct' (default on GPUs): inside the token's program, from row ids that never leave the
  device: `host_memory.direct_rows`, a Pallas-Triton gather that the GPU runs on the host table
  in place (pinned host memory is mapped into the GPU's address space; rows cross PCIe one
  request each). No host computation, no device-to-host transfer.
- 'step' (default on CPU and TPU): the ids go to the host by a transfer of their own before the
  token's program, and inside it XLA's host offloader gathers there, then copies the rows in.
  The transfer comes first because a host gather reading ids copied to the host inside its own
  program decoded different tokens from call to call on the H200.
- 'program': the 'step' gather as a program of its own.
`ThreadedGenerator` gathers each token's rows with NumPy on a worker thread, started by a host
callback as soon as the token is sampled, and a second callback hands them to the program: correct
but slower than the others on the H200 (its class docstring).

Measured on the H200 (experiments/bench_offload.py, 32 GB of pinned_host tables, d=4096, 24
blocks; README), overhead over HBM tables (HBM tok/s / host tok/s - 1), decoders timed in turns:
'direct' +1.7% with 512 sequences and +3.0-3.4% with 64; 'step' +5.8% / +11.4-11.8%
(XLA runs the host gather as a host function on the GPU stream, so it cannot overlap the
device's work); ThreadedGenerator +21% / +100% (earlier runs).

Sampling: temperature 0 is greedy (argmax); otherwise `categorical(logits / temperature)` with
a key folded per position.

Dimension legend: B batch, P prompt length, T_max prompt + new tokens, N max n-gram order,
H hash heads, E row width, V vocab, L Engram layers.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import Future
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from engram_jax import host_memory
from engram_jax import host_tables
from engram_jax.hashing import NgramHashMapping
from pallas_kernels.engram_lookup.api import global_rows_N
from pallas_kernels.engram_lookup.reference import global_rows_numpy
from pallas_kernels.engram_lookup.row_sparse import PrefetchedRows

LogitsFn = Callable[[jax.Array, Mapping[int, PrefetchedRows]], jax.Array]
# (variables, cache, tokens_BxT, positions_BxT, {layer: PrefetchedRows}) -> (logits, cache)
DecodeFn = Callable[[Any, jax.Array, jax.Array, Mapping[int, PrefetchedRows]], tuple]


def buffer_rows(buffer_BxTxHxE: jax.Array) -> PrefetchedRows:
  """The whole row buffer as PrefetchedRows with the identity inverse (one slot per lookup)."""
  b, t, h, e = buffer_BxTxHxE.shape
  inverse = jnp.arange(b * t * h, dtype=jnp.int32).reshape(b, t, h)
  return PrefetchedRows(buffer_BxTxHxE.reshape(b * t * h, e), inverse,
                        jnp.zeros((b * t * h,), jnp.int32))


def _sample(logits_BxV, key, temperature, greedy):
  sampled = jax.random.categorical(key, logits_BxV / temperature)
  return jnp.where(greedy, jnp.argmax(logits_BxV, -1), sampled).astype(jnp.int32)


class Generator:
  """Greedy / temperature sampling over `logits_fn` with Engram rows fetched per position.

  Args:
    logits_fn: `(inputs_BxT int32, {layer: PrefetchedRows}) -> logits_BxTxV`, causal.
    tables: {layer: [R, E] table} in 'device' or 'pinned_host' memory.
    mapping: the hash mapping (its layer_ids must cover `tables`).
    compression: int[V] raw -> compressed id lookup (CompressedTokenizer.lookup_table), or None
      if the inputs are already compressed-vocabulary ids.

  The windowed reference for `CachedGenerator`. Whatever `logits_fn` closes over (e.g. model
  params) becomes a constant of the jitted step: device arrays are then read back from the
  device at compile time, which a GPU refuses under `jax.transfer_guard("disallow")`; close
  over NumPy copies, or use `CachedGenerator`, which takes the variables as an argument.
  """

  def __init__(self, logits_fn: LogitsFn, tables: Mapping[int, jax.Array],
               mapping: NgramHashMapping, compression: Optional[np.ndarray] = None):
    missing = set(tables) - set(mapping.layer_ids)
    if missing:
      raise ValueError(f"tables for layers {sorted(missing)} the mapping does not hash")
    self.logits_fn = logits_fn
    self.tables = dict(tables)
    self.layers = tuple(sorted(tables))
    self.mapping = mapping
    self.n = mapping.max_ngram_size
    self.placements = {l: host_memory.placement_of(t) for l, t in tables.items()}
    device = self.device = next(iter(tables.values())).sharding._device
    self.dev = host_memory.placement_sharding("device", device)
    self.home = {l: host_memory.placement_sharding(p, device) for l, p in self.placements.items()}
    # NumPy, not device arrays: the jitted steps close over these, and a closed-over device
    # array becomes a program constant read back from the device (on a GPU a device-to-host
    # copy, which jax.transfer_guard("disallow") refuses).
    self.offsets = {l: np.asarray(mapping.offsets(l), np.int32) for l in self.layers}
    for l in self.layers:
      if tables[l].shape[0] != mapping.num_rows(l):
        raise ValueError(f"layer {l}: table has {tables[l].shape[0]} rows, mapping "
                         f"{mapping.num_rows(l)}")
    self.compression = None if compression is None else np.asarray(compression, np.int32)
    self._step = jax.jit(self._step_fn, donate_argnums=(0, 2))  # tokens, history in place
    self._write = jax.jit(self._write_fn, donate_argnums=0)

  # -- pieces ----------------------------------------------------------------------------------------

  def _compress(self, tokens):
    return tokens if self.compression is None else jnp.asarray(self.compression)[tokens]

  def _ids_home(self, rows_BxTxH: dict) -> dict:
    """Each layer's row ids (device or NumPy), flat, moved to where its table lives by an
    explicit transfer of their own (async). Outside any program: a program whose host
    computation reads a value copied to the host inside that same program is what gives wrong
    rows on the H200 (experiments/check_host_rows.py, README "Host tables")."""
    return {l: jax.device_put(rows_BxTxH[l].reshape(-1), self.home[l]) for l in self.layers}

  def _gather_home(self, ids_home: dict, batch: int, tables: Mapping) -> dict:
    """The rows of `_ids_home`'s flat ids, `[B, T, H, E]` per layer. Inside a jitted step pass
    the tables as that step's arguments, so they are operands, not constants."""
    out = {}
    for l in self.layers:
      rows = host_memory.fetch_rows(tables[l], ids_home[l])
      out[l] = rows.reshape(batch, -1, self.offsets[l].shape[0], rows.shape[-1])
    return out

  def _fetch_rows(self, rows_BxTxH: dict) -> dict:
    """Starts the fetch of `rows` (device or NumPy ids, [B, T, H]) for every layer (explicit
    puts; async)."""
    batch = next(iter(rows_BxTxH.values())).shape[0]
    return self._gather_home(self._ids_home(rows_BxTxH), batch, self.tables)

  def _step_fn(self, tokens_BxT, t, hist_BxN, buffers, seed, temperature, greedy):
    """Forward at the fixed window, sample token t+1, advance history, rows of t+1."""
    pre = {l: buffer_rows(buffers[l]) for l in self.layers}
    logits_BxTxV = self.logits_fn(tokens_BxT, pre)
    logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxTxV, t, axis=1, keepdims=False)
    logits_BxV = logits_BxV.astype(jnp.float32)
    tok_B = _sample(logits_BxV, jax.random.fold_in(jax.random.key(seed), t), temperature,
                    greedy)
    tokens_BxT = jax.lax.dynamic_update_slice(tokens_BxT, tok_B[:, None], (0, t + 1))
    return (tokens_BxT,) + self._advance(tok_B, hist_BxN)

  def _advance(self, tok_B, hist_BxN):
    """The history with the new token appended, and that token's global rows per layer."""
    hist_BxN = jnp.concatenate([hist_BxN[:, 1:], self._compress(tok_B)[:, None]], axis=1)
    ids = self.mapping.hash(hist_BxN)
    rows = {l: global_rows_N(ids[l][:, -1:, :], self.offsets[l], self.tables[l].shape[0]
                             ).reshape(ids[l].shape[0], 1, -1) for l in self.layers}
    return hist_BxN, rows

  @staticmethod
  def _write_fn(buffers, new_rows, t):
    return {l: jax.lax.dynamic_update_slice(b, new_rows[l].astype(b.dtype), (0, t, 0, 0))
            for l, b in buffers.items()}

  # -- driver ----------------------------------------------------------------------------------------

  def _start(self, prompt_BxP, max_new_tokens, temperature, seed):
    """Validates the call; the prompt, its rows (global ids hashed on the host, NumPy: the
    fetch puts them where each table lives), the rolling history of the last N compressed
    tokens (compressed pad left of the sequence) and the sampling scalars, the last two put on
    the device explicitly (transfer_guard)."""
    prompt = np.asarray(prompt_BxP, np.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
      raise ValueError(f"prompt must be int[B, P>=1], got shape {prompt.shape}")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {temperature}")
    b, p = prompt.shape
    comp = prompt if self.compression is None else self.compression[prompt]
    ids = self.mapping.hash_numpy(comp)
    put = lambda x: jax.device_put(x, self.dev)  # noqa: E731
    rows = {l: global_rows_numpy(ids[l], self.offsets[l], self.tables[l].shape[0]
                                 ).astype(np.int32) for l in self.layers}
    hist = np.full((b, self.n), self.mapping.pad_id, np.int32)
    k = min(self.n, p)
    hist[:, self.n - k:] = comp[:, p - k:]
    sampling = (put(np.int32(seed)), put(np.float32(max(temperature, 1e-6))),
                put(np.bool_(temperature == 0)))
    return prompt, rows, put(hist), sampling

  def __call__(self, prompt_BxP: np.ndarray, max_new_tokens: int, *, temperature: float = 0.0,
               seed: int = 0, pad_id: int = 0) -> np.ndarray:
    """Returns int32[B, P + max_new_tokens]: the prompt followed by the sampled tokens."""
    prompt, rows, hist, (seed_dev, temp, greedy) = self._start(prompt_BxP, max_new_tokens,
                                                               temperature, seed)
    b, p = prompt.shape
    t_max = p + max_new_tokens
    tokens = np.full((b, t_max), pad_id, np.int32)
    tokens[:, :p] = prompt
    tokens = jax.device_put(tokens, self.dev)
    buffers = {l: jax.device_put(np.zeros((b, t_max) + rows[l].shape[2:] +
                                          (self.tables[l].shape[1],), self.tables[l].dtype),
                                 self.dev) for l in self.layers}
    buffers = self._write(buffers, self._fetch_rows(rows), jax.device_put(np.int32(0), self.dev))
    for t in range(p - 1, t_max - 1):
      t_dev = jax.device_put(np.int32(t), self.dev)
      tokens, hist, rows = self._step(tokens, t_dev, hist, buffers, seed_dev, temp, greedy)
      # Token t+1 is known (on the device): fetch its rows now, before the next forward.
      buffers = self._write(buffers, self._fetch_rows(rows),
                            jax.device_put(np.int32(t + 1), self.dev))
    return np.asarray(jax.device_get(tokens))


class CachedGenerator(Generator):
  """`Generator` for a model with a decode cache: the prompt in one call, then one token per call.

  Args:
    decode_fn: `(variables, cache, tokens_BxT, positions_BxT, {layer: PrefetchedRows}) ->
      (logits_BxTxV, cache)`; called with T = P (the prompt) and then T = 1.
    init_cache: `(variables, batch, max_len) -> cache`, empty, for sequences up to `max_len`.
    variables: the model's weights, passed to both (arguments of the jitted steps, not
      constants baked into them).
    tables, mapping, compression: as `Generator`.
    fetch: how token t's rows reach its forward.
      'direct': read inside the program of token t's forward from row ids that never leave
        the device; a pinned_host table is read by the GPU itself over PCIe
        (`host_memory.direct_rows`), an HBM table by `host_memory.fetch_rows`. The prompt's
        rows too.
      'step': also inside that program, but the row ids are first moved to the table's memory
        by a transfer of their own and XLA's host offloader gathers there (a host function on
        the GPU stream), then copies the rows to the device.
      'program': the 'step' gather as a program of its own, dispatched before the forward.
      'auto' (default): 'direct' on a GPU, or when no table is in pinned_host; else 'step'
        (CPU and TPU, where the GPU kernel cannot read host memory). The choice is `self.fetch`.
    interpret: run 'direct''s kernel in the Pallas interpreter (tests on CPU).
  Same tokens as `Generator` over the same model, every way (tests/test_generate.py).
  """

  FETCHES = ("direct", "step", "program")

  def __init__(self, decode_fn: DecodeFn, init_cache: Callable[[Any, int, int], Any],
               variables: Any, tables: Mapping[int, jax.Array], mapping: NgramHashMapping,
               compression: Optional[np.ndarray] = None, *, fetch: str = "auto",
               interpret: bool = False):
    super().__init__(None, tables, mapping, compression)
    self.decode_fn, self.init_cache, self.variables = decode_fn, init_cache, variables
    host = any(p == "pinned_host" for p in self.placements.values())
    on_gpu = self.device.platform == "gpu"
    if fetch == "auto":
      fetch = "direct" if on_gpu or not host else "step"
    if fetch not in self.FETCHES:
      raise ValueError(f"fetch must be 'auto' or one of {self.FETCHES}, got {fetch!r}")
    if fetch == "direct" and host and not on_gpu and not interpret:
      raise ValueError(f"fetch='direct' reads pinned_host tables from a GPU kernel; on "
                       f"{self.device.platform} use fetch='step' (or interpret=True in tests)")
    self.fetch, self.interpret = fetch, interpret
    self._prefill = jax.jit(self._prefill_fn, donate_argnums=0)
    self._decode = jax.jit(self._decode_fn, donate_argnums=(0, 3))  # cache, history in place
    self._decode_fetching = jax.jit(self._decode_fetching_fn, donate_argnums=(0, 3))
    self._decode_direct = jax.jit(self._decode_direct_fn, donate_argnums=(0, 3))
    self._read_direct = jax.jit(self._read_direct_fn)

  def _read_direct_fn(self, rows_BxTxH: dict, tables: Mapping) -> dict:
    """Each layer's rows `[B, T, H, E]` for global row ids on the device: pinned_host tables
    read by the GPU over PCIe, HBM tables by `host_memory.fetch_rows`; nothing touches the host."""
    out = {}
    for l in self.layers:
      b, t, h = rows_BxTxH[l].shape
      ids_N = rows_BxTxH[l].reshape(-1)
      if self.placements[l] == "pinned_host":
        rows = host_memory.direct_rows(tables[l], ids_N, interpret=self.interpret)
      else:
        rows = host_memory.fetch_rows(tables[l], ids_N)
      out[l] = rows.reshape(b, t, h, rows.shape[-1])
    return out

  def _decode_direct_fn(self, cache, variables, tok_B, hist_BxN, rows, t, seed, temperature,
                        greedy, tables):
    """`_decode_fn` reading token t's rows inside the program from its row ids on the device
    (`rows`: {layer: [B, 1, H] global ids}, an output of the previous program)."""
    return self._decode_fn(cache, variables, tok_B, hist_BxN,
                           self._read_direct_fn(rows, tables), t, seed, temperature, greedy)

  def _next(self, logits_BxTxV, hist_BxN, t, seed, temperature, greedy):
    """Samples token t+1 from the last logits; advances the history; rows of t+1."""
    key = jax.random.fold_in(jax.random.key(seed), t)
    tok_B = _sample(logits_BxTxV[:, -1].astype(jnp.float32), key, temperature, greedy)
    return (tok_B,) + self._advance(tok_B, hist_BxN)

  def _prefill_fn(self, cache, variables, prompt_BxP, rows, hist_BxN, seed, temperature,
                  greedy):
    b, p = prompt_BxP.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    logits, cache = self.decode_fn(variables, cache, prompt_BxP, positions,
                                   {l: buffer_rows(r) for l, r in rows.items()})
    return (cache,) + self._next(logits, hist_BxN, p - 1, seed, temperature, greedy)

  def _decode_fn(self, cache, variables, tok_B, hist_BxN, rows, t, seed, temperature, greedy):
    """Forward of token t (its rows fetched), sample token t+1."""
    b = tok_B.shape[0]
    positions = jnp.full((b, 1), t, jnp.int32)
    logits, cache = self.decode_fn(variables, cache, tok_B[:, None], positions,
                                   {l: buffer_rows(r) for l, r in rows.items()})
    return (cache,) + self._next(logits, hist_BxN, t, seed, temperature, greedy)

  def _decode_fetching_fn(self, cache, variables, tok_B, hist_BxN, ids_home, t, seed,
                          temperature, greedy, tables):
    """`_decode_fn` with the gather of token t's rows inside the program (tables are
    arguments: host tables stay where they are, only B*H rows per layer move; `ids_home`:
    token t's row ids, already moved where the tables live by a transfer before this
    program)."""
    return self._decode_fn(cache, variables, tok_B, hist_BxN,
                           self._gather_home(ids_home, tok_B.shape[0], tables), t, seed,
                           temperature, greedy)

  def __call__(self, prompt_BxP: np.ndarray, max_new_tokens: int, *, temperature: float = 0.0,
               seed: int = 0, pad_id: int = 0) -> np.ndarray:
    """Returns int32[B, P + max_new_tokens]: the prompt followed by the sampled tokens."""
    del pad_id  # no window to pad
    prompt, prompt_rows, hist, (seed_dev, temp, greedy) = self._start(
        prompt_BxP, max_new_tokens, temperature, seed)
    b, p = prompt.shape
    put = lambda x: jax.device_put(x, self.dev)  # noqa: E731  explicit (transfer_guard)
    cache = self.init_cache(self.variables, b, p + max_new_tokens)
    if self.fetch == "direct":
      first = self._read_direct({l: put(r) for l, r in prompt_rows.items()}, self.tables)
    else:
      first = self._fetch_rows(prompt_rows)
    cache, tok, hist, rows = self._prefill(cache, self.variables, put(prompt), first, hist,
                                           seed_dev, temp, greedy)
    out = [tok]
    for t in range(p, p + max_new_tokens - 1):
      # Token t is known (on the device): its rows are fetched before the forward reads them,
      # inside its program or just before it.
      if self.fetch == "direct":
        cache, tok, hist, rows = self._decode_direct(cache, self.variables, tok, hist, rows,
                                                     put(np.int32(t)), seed_dev, temp, greedy,
                                                     self.tables)
      elif self.fetch == "step":
        cache, tok, hist, rows = self._decode_fetching(cache, self.variables, tok, hist,
                                                       self._ids_home(rows), put(np.int32(t)),
                                                       seed_dev, temp, greedy, self.tables)
      else:
        cache, tok, hist, rows = self._decode(cache, self.variables, tok, hist,
                                              self._fetch_rows(rows), put(np.int32(t)),
                                              seed_dev, temp, greedy)
      out.append(tok)
    new = np.stack([np.asarray(jax.device_get(x)) for x in out], axis=1)
    return np.concatenate([prompt, new], axis=1)


# (variables, cache, tokens_BxT, positions_BxT, hidden, {layer: PrefetchedRows}, stage) ->
# (hidden or, for the last stage, logits; cache)
StageFn = Callable[..., tuple]


def chain_stages(stage_fn: StageFn, layers) -> DecodeFn:
  """The `decode_fn` that runs every stage of `stage_fn` in one call."""
  def decode_fn(variables, cache, tokens_BxT, positions_BxT, rows):
    h, cache = stage_fn(variables, cache, tokens_BxT, positions_BxT, None, {}, 0)
    for k, l in enumerate(layers, 1):
      h, cache = stage_fn(variables, cache, tokens_BxT, positions_BxT, h, {l: rows[l]}, k)
    return h, cache
  return decode_fn


class ThreadedGenerator(CachedGenerator):
  """`CachedGenerator` for pinned_host tables whose per-token rows are gathered by a host thread
  while the device runs the blocks before the first Engram layer; one program per token.

  The forward of one token is split at the Engram layers (`stage_fn`, static `stage`):
    stage 0          the blocks before the first Engram layer (no rows),
    stage k (1..L)   from the k-th Engram layer (sorted layer ids, the order the forward reaches
                     them; it reads that layer's rows) to the next one; stage L returns logits.
  The program of token t runs: stage 0; a host callback that takes token t's rows (waiting for
  their gather if it is still running); stages 1..L; the sampling of token t+1; and a host
  callback that hands token t+1's row ids to a worker thread, which starts gathering them from
  NumPy views of the pinned_host tables (`host_memory.host_view`) at once. So that gather runs
  while the device finishes token t's program and runs token t+1's stage 0, and the Python
  loop only dispatches programs, ahead of the device (no host round trip per token).

  Slower than CachedGenerator on the H200 (bench_offload, 32 GB, d=4096, 24 blocks): 10,065 vs
  17,980 tok/s with 64 sequences (HBM 20,152), 27,254 vs 31,093 with 512 (HBM 33,053). The
  gathers are not what costs (126 / 1,637 us per token, and the rows callback waited 8 / 14 us
  for them): a host callback costs the device ~220-270 us wherever it sits in a program (a
  probe: 3.24 vs 3.02 ms for a program of 16 matmuls with one callback in the middle), and
  each token has two. Kept because its tokens are exact and its staged forward
  (`engram_lm_stages`) is what a faster hand-over would build on. The first version (a796a2e:
  the Python loop waited for each token's ids, then dispatched a program per stage) measured
  15,681 vs 17,558 tok/s (64 sequences) for the same reason: host time per token while the
  device waited.

  Row ids come from `global_rows_N`, which clamps them into the table, so the NumPy gather uses
  mode='clip' (2x faster than the default bounds check; same rows). The prompt's rows are
  gathered by `threads` threads into pinned staging buffers before the prefill.

  Args:
    stage_fn: `(variables, cache, tokens_BxT, positions_BxT, hidden, {layer: PrefetchedRows},
      stage) -> (hidden or logits_BxTxV, cache)`, as above (`engram_lm_stages` for EngramLM).
    init_cache, variables, tables, mapping, compression: as `CachedGenerator`; every table in
      'pinned_host' on one device.
    threads: threads of the prompt's gathers (default `host_tables.default_host_threads()`).
  Same tokens as `CachedGenerator` over the same model (tests/test_generate.py). One call at a
  time per generator. After a call, `host_us_per_token` holds the worker's gather time and how
  long the program's rows callback waited for it, per new token.
  """

  def __init__(self, stage_fn: StageFn, init_cache: Callable[[Any, int, int], Any],
               variables: Any, tables: Mapping[int, jax.Array], mapping: NgramHashMapping,
               compression: Optional[np.ndarray] = None, *, threads: Optional[int] = None):
    layers = tuple(sorted(tables))
    super().__init__(chain_stages(stage_fn, layers), init_cache, variables, tables, mapping,
                     compression)
    bad = {l: p for l, p in self.placements.items() if p != "pinned_host"}
    if bad:
      raise ValueError(f"ThreadedGenerator gathers rows from pinned_host tables with NumPy; "
                       f"tables {bad} are not (use CachedGenerator)")
    self.stage_fn = stage_fn
    # Its ordered queue gathers each token's rows; its pool, the prompt's.
    self._worker = host_tables.HostRowWorker(threads or host_tables.default_host_threads())
    self._pending: dict[int, Future] = {}
    self._views: Optional[dict] = None
    self._spent = {"gather": 0.0, "rows callback waited": 0.0}
    self._prefill_gathering = jax.jit(self._prefill_gathering_fn, donate_argnums=0)
    self._decode_gathering = jax.jit(self._decode_gathering_fn, donate_argnums=(0, 3))

  # -- host side (called by the programs' callbacks) ---------------------------------------------

  def _gather_all(self, ids: dict) -> tuple:
    t0 = time.perf_counter()
    out = tuple(np.take(self._views[l], ids[l].reshape(-1), axis=0, mode="clip")
                for l in self.layers)
    self._spent["gather"] += time.perf_counter() - t0
    return out

  def _start_gather(self, t, *ids):
    """Callback at the end of token t-1's program: token t's ids -> a gather on the worker."""
    ids = {l: np.array(a) for l, a in zip(self.layers, ids)}
    self._pending[int(t)] = self._worker.submit(self._gather_all, ids)
    return ()

  def _take_rows(self, t, _):
    """Callback after token t's stage 0: its rows (waits for their gather if needed)."""
    fut = self._pending.pop(int(t))
    t0 = time.perf_counter()
    rows = self._worker.result(fut)
    self._spent["rows callback waited"] += time.perf_counter() - t0
    return rows

  # -- programs ------------------------------------------------------------------------------------

  def _hand_over(self, t_next, rows_ids):
    """Inside a program: token t_next's row ids to the host worker (a side-effecting callback)."""
    io_callback(self._start_gather, (), t_next, *[rows_ids[l] for l in self.layers])

  def _prefill_gathering_fn(self, cache, variables, prompt_BxP, rows, hist_BxN, seed,
                            temperature, greedy):
    cache, tok, hist, rows_ids = self._prefill_fn(cache, variables, prompt_BxP, rows, hist_BxN,
                                                  seed, temperature, greedy)
    self._hand_over(jnp.int32(prompt_BxP.shape[1]), rows_ids)
    return cache, tok, hist

  def _decode_gathering_fn(self, cache, variables, tok_B, hist_BxN, t, seed, temperature,
                           greedy):
    """Token t's forward (its rows from the worker, after stage 0), token t+1 sampled and its
    ids handed over."""
    b = tok_B.shape[0]
    tokens, positions = tok_B[:, None], jnp.full((b, 1), t, jnp.int32)
    hidden, cache = self.stage_fn(variables, cache, tokens, positions, None, {}, 0)
    # The callback takes one element of stage 0's output, so it runs after stage 0.
    after = jax.tree.leaves(hidden)[0].reshape(-1)[0]
    shapes = tuple(jax.ShapeDtypeStruct((b * self.offsets[l].shape[0], self.tables[l].shape[1]),
                                        self.tables[l].dtype) for l in self.layers)
    rows = io_callback(self._take_rows, shapes, t, after)
    for k, l in enumerate(self.layers, 1):
      pre = buffer_rows(rows[k - 1].reshape(b, 1, -1, rows[k - 1].shape[-1]))
      hidden, cache = self.stage_fn(variables, cache, tokens, positions, hidden, {l: pre}, k)
    tok, hist, rows_ids = self._next(hidden, hist_BxN, t, seed, temperature, greedy)
    self._hand_over(t + 1, rows_ids)
    return cache, tok, hist, t + 1

  def _stage_rows(self, key, l, ids: np.ndarray, view: np.ndarray):
    """table[ids] gathered by the thread pool into a pinned staging slot (the prompt's rows)."""
    ids = np.asarray(ids).reshape(-1)
    slot = self._worker.staging.take((key, l), (ids.size, view.shape[1]), view.dtype,
                                     self.dev._device)
    self._worker.gather(view, ids, slot.view)
    return slot

  def close(self) -> None:
    """Stops the gather threads (also at garbage collection)."""
    self._worker.shutdown()

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001  interpreter shutdown
      pass

  def __call__(self, prompt_BxP: np.ndarray, max_new_tokens: int, *, temperature: float = 0.0,
               seed: int = 0, pad_id: int = 0) -> np.ndarray:
    """Returns int32[B, P + max_new_tokens]: the prompt followed by the sampled tokens."""
    del pad_id
    prompt, prompt_ids, hist, (seed_dev, temp, greedy) = self._start(prompt_BxP, max_new_tokens,
                                                                     temperature, seed)
    b, p = prompt.shape
    put = lambda x: jax.device_put(x, self.dev)  # noqa: E731
    self._views = {l: host_memory.host_view(self.tables[l]) for l in self.layers}
    self._pending.clear()
    self._spent = dict.fromkeys(self._spent, 0.0)
    prompt_rows = {}
    for l, ids in prompt_ids.items():
      prompt_rows[l] = self._stage_rows("prompt", l, ids, self._views[l]).send(self.dev).reshape(
          ids.shape + (-1,))
    cache = self.init_cache(self.variables, b, p + max_new_tokens)
    cache, tok, hist = self._prefill_gathering(cache, self.variables, put(prompt), prompt_rows,
                                               hist, seed_dev, temp, greedy)
    out, t_dev = [tok], put(np.int32(p))
    for _ in range(p, p + max_new_tokens - 1):
      # Dispatch only: the rows of token t are gathered by the worker, handed over in-program.
      cache, tok, hist, t_dev = self._decode_gathering(cache, self.variables, tok, hist, t_dev,
                                                       seed_dev, temp, greedy)
      out.append(tok)
    new = np.stack([np.asarray(jax.device_get(x)) for x in out], axis=1)
    n = max(1, max_new_tokens - 1)
    self.host_us_per_token = {k: v / n * 1e6 for k, v in self._spent.items()}
    self._pending.clear()   # the last token's rows (gathered, never read)
    return np.concatenate([prompt, new], axis=1)


def engram_lm_stages(model_config):
  """(init_cache, stage_fn) of an `EngramLM` with external tables, split at its Engram layers:
  `ThreadedGenerator(stage_fn, init_cache, variables, tables, mapping, ...)`. Needs at
  least one block before the first Engram layer (the gather of its rows overlaps them)."""
  from engram_jax.model import EngramLM
  init_cache, _ = engram_lm_decoder(model_config)
  layer_ids = tuple(sorted(model_config.engram_layer_ids))
  if not layer_ids:
    raise ValueError("engram_lm_stages needs Engram layers (use engram_lm_decoder)")
  if layer_ids[0] == 0:
    raise ValueError("engram_lm_stages: the first Engram layer is block 0, so no block runs "
                     "while its rows are gathered; use engram_lm_decoder + CachedGenerator")
  bounds = (0,) + layer_ids + (model_config.num_layers,)
  decoder = EngramLM(model_config, decode=True)

  def stage_fn(variables, cache, tokens_BxT, positions_BxT, hidden, rows, stage):
    (out, _), new = decoder.apply({**variables, "cache": cache}, tokens_BxT,
                                  positions=positions_BxT, engram_inputs=rows,
                                  layers=(bounds[stage], bounds[stage + 1]),
                                  hidden_BxTxMxD=hidden, mutable=["cache"])
    return out, new["cache"]
  return init_cache, stage_fn


def engram_lm_decoder(model_config):
  """(init_cache, decode_fn) of an `EngramLM` whose tables are external (row-sparse training
  or host tables): `CachedGenerator(decode_fn, init_cache, variables, tables, mapping, ...)`
  with `variables` the model's params and moe_stats (no tables). The cache comes from the
  model's sizing call on a [B, max_len] input with zero Engram rows (its outputs are unused).
  """
  from engram_jax.model import EngramLM
  if model_config.engram is not None and model_config.engram_table_placement != "external":
    raise ValueError("engram_lm_decoder needs engram_table_placement='external' (tables passed "
                     "to the generator, in HBM or pinned_host)")
  decoder = EngramLM(model_config, decode=True)
  layer_ids = tuple(model_config.engram_layer_ids)
  eng = model_config.engram

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def init_cache(variables, batch: int, max_len: int):
    tokens = jnp.zeros((batch, max_len), jnp.int32)
    rows = {l: buffer_rows(jnp.zeros((batch, max_len, eng.num_heads, eng.head_dim),
                                     jnp.float32)) for l in layer_ids}
    _, new = decoder.apply(variables, tokens, engram_inputs=rows, mutable=["cache"])
    return new["cache"]

  def decode_fn(variables, cache, tokens_BxT, positions_BxT, rows):
    (logits, _), new = decoder.apply({**variables, "cache": cache}, tokens_BxT,
                                     positions=positions_BxT, engram_inputs=rows,
                                     mutable=["cache"])
    return logits, new["cache"]
  return init_cache, decode_fn
