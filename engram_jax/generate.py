"""Decoding: a KV-cached decoder with Engram rows fetched as tokens appear, and text generation
from a training workdir (`python -m experiments.generate`).

`Decoder` runs a `decode_fn(variables, cache, tokens, positions, rows) -> (logits, cache)` once
on the prompt and then on one token per step. For `EngramLM` (`engram_lm_decoder`) the cache
holds every attention layer's KV cache and every Engram ShortConv's history
(`EngramLM(decode=True)`), so a step computes only the new position.

The n-gram ids of position t+1 depend only on the compressed tokens t+2-N .. t+1, so the rows
position t+1 reads are known the moment its token is sampled. The decoder keeps, per sequence,
a rolling history of the last N compressed tokens on the device; after sampling token t+1 it
hashes the history (`NgramHashMapping.hash` on an [B, N] window, last position), turns the H
per-head ids into global rows and fetches exactly those B*H rows per layer. Every step is
asynchronous dispatch; nothing waits for the host until the tokens are read at the end.

How the rows of a table reach the forward of token t (`Decoder(fetch=...)`, 'auto' picks):
- 'direct' (GPUs, and HBM tables everywhere): inside token t's program, from row ids that
  never leave the device. A pinned_host table is read by the GPU itself (`host_memory.direct_rows`:
  pinned host memory is mapped into the GPU's address space, rows cross PCIe one request
  each; no host computation, no device-to-host transfer), an HBM table by `host_memory.fetch_rows`.
- 'step' (pinned_host tables on CPU and TPU, where no kernel reads host memory): the ids go to
  the host by a transfer of their own before token t's program, and inside it XLA's host
  offloader gathers there and copies the rows in. The transfer comes first: a host gather
  reading ids copied to the host inside its own program is not ordered after that copy on
  GPUs. benchmarks/bench_offload.py (`--modes=gen`) times both against HBM tables.

Sampling: temperature 0 is greedy (argmax); otherwise `categorical(logits / temperature)`,
restricted to the `top_k` largest logits when top_k > 0, with the key of position t
`fold_in(key(seed), t)`: the same seed gives the same tokens.

`TextDecoder.load(workdir)` rebuilds the model of any training workdir from its config.json,
restores the latest checkpoint (`train.restore_latest`) and decodes text through the run's
tokenizer on one device: tables in the params ('dense_adam'), in the train state (row-sparse
optimisers, HBM) or in pinned host memory (`engram.placement='pinned_host'`); a model without
Engram layers decodes the same way without rows. `generate_text` is one call of it.

Dimension legend: B batch, P prompt length, N max n-gram order, H hash heads, E row width,
V vocab, R table rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import evaluate as evaluate_lib
from engram_jax import host_memory
from engram_jax import tokenizer as tokenizer_lib
from engram_jax import train
from engram_jax.hashing import NgramHashMapping
from pallas_kernels.engram_lookup.api import global_rows_N
from pallas_kernels.engram_lookup.row_sparse import PrefetchedRows

# (variables, cache, tokens_BxT, positions_BxT, {layer: PrefetchedRows}) -> (logits, cache)
DecodeFn = Callable[[Any, Any, jax.Array, jax.Array, Mapping[int, PrefetchedRows]], tuple]


def buffer_rows(rows_BxTxHxE: jax.Array) -> PrefetchedRows:
  """Rows of every lookup as PrefetchedRows with the identity inverse (one slot per lookup)."""
  b, t, h, e = rows_BxTxHxE.shape
  inverse = jnp.arange(b * t * h, dtype=jnp.int32).reshape(b, t, h)
  return PrefetchedRows(rows_BxTxHxE.reshape(b * t * h, e), inverse,
                        jnp.zeros((b * t * h,), jnp.int32))


def sample(logits_BxV: jax.Array, key: jax.Array, temperature: jax.Array, greedy: jax.Array,
           top_k: int = 0) -> jax.Array:
  """int32[B]: argmax where `greedy`, else a draw from softmax(logits / temperature) over the
  `top_k` largest logits (all when top_k is 0; logits tied with the k-th stay in)."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))[0][:, -1:]
    masked_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, -jnp.inf)
  else:
    masked_BxV = logits_BxV
  sampled_B = jax.random.categorical(key, masked_BxV / temperature)
  return jnp.where(greedy, jnp.argmax(logits_BxV, -1), sampled_B).astype(jnp.int32)


class Decoder:
  """KV-cached decoding with the Engram rows of each new position fetched from its table.

  Args:
    decode_fn: `(variables, cache, tokens_BxT, positions_BxT, {layer: PrefetchedRows}) ->
      (logits_BxTxV, cache)`; called with T = P (the prompt) and then T = 1.
    init_cache: `(variables, batch, max_len) -> cache`, empty, for sequences up to `max_len`.
    variables: the model's weights, an argument of every program (never a baked-in constant).
    tables: {layer: [R, E] table} in 'device' or 'pinned_host' memory of one device; empty for
      a model without Engram layers.
    mapping: the hash mapping (its layer_ids must cover `tables`); None without tables.
    compression: int[V] raw -> compressed id lookup (CompressedTokenizer.lookup_table), or None
      if the inputs are already compressed-vocabulary ids.
    fetch: 'direct', 'step' or 'auto' (module docstring); the choice is `self.fetch`.
    interpret: run 'direct''s GPU kernel in the Pallas interpreter (tests on CPU).
    device: where to decode without tables (default: the first device).
  The windowed decoder (tests/windowed_decoder.py: the full causal forward at every step) is
  its oracle (tests/test_generate.py).
  """

  FETCHES = ("direct", "step")

  def __init__(self, decode_fn: DecodeFn, init_cache: Callable[[Any, int, int], Any],
               variables: Any, tables: Mapping[int, jax.Array],
               mapping: Optional[NgramHashMapping], compression: Optional[np.ndarray] = None,
               *, fetch: str = "auto", interpret: bool = False,
               device: Optional[jax.Device] = None):
    tables = dict(tables)
    if tables and mapping is None:
      raise ValueError("tables need the hash mapping that addresses their rows")
    missing = set(tables) - set(mapping.layer_ids if mapping else ())
    if missing:
      raise ValueError(f"tables for layers {sorted(missing)} the mapping does not hash")
    self.decode_fn, self.init_cache, self.variables = decode_fn, init_cache, variables
    self.tables, self.mapping = tables, mapping
    self.layers = tuple(sorted(tables))
    self.n = mapping.max_ngram_size if mapping else 1
    self.placements = {l: host_memory.placement_of(t) for l, t in tables.items()}
    devices = {d for t in tables.values() for d in t.sharding.device_set}
    if len(devices) > 1 or (device is not None and devices - {device}):
      raise ValueError(f"the tables must live on the decoding device, got "
                       f"{sorted(map(str, devices))}")
    self.device = device or (devices.pop() if devices else jax.devices()[0])
    self.dev = host_memory.placement_sharding("device", self.device)
    self.home = {l: host_memory.placement_sharding(p, self.device)
                 for l, p in self.placements.items()}
    # NumPy, not device arrays: the jitted steps close over these, and a closed-over device
    # array becomes a program constant read back from the device (on a GPU a device-to-host
    # copy, which jax.transfer_guard("disallow") refuses).
    self.offsets = {l: np.asarray(mapping.offsets(l), np.int32) for l in self.layers}
    for l in self.layers:
      if tables[l].shape[0] != mapping.num_rows(l):
        raise ValueError(f"layer {l}: table has {tables[l].shape[0]} rows, mapping "
                         f"{mapping.num_rows(l)}")
    self.compression = None if compression is None else np.asarray(compression, np.int32)

    host = "pinned_host" in self.placements.values()
    on_gpu = self.device.platform == "gpu"
    if fetch == "auto":
      fetch = "direct" if on_gpu or not host else "step"
    if fetch not in self.FETCHES:
      raise ValueError(f"fetch must be 'auto' or one of {self.FETCHES}, got {fetch!r}")
    if fetch == "direct" and host and not on_gpu and not interpret:
      raise ValueError(f"fetch='direct' reads pinned_host tables from a GPU kernel; on "
                       f"{self.device.platform} use fetch='step' (or interpret=True in tests)")
    self.fetch, self.interpret = fetch, interpret
    # cache and history updated in place; top_k shapes the program (static).
    self._prefill = jax.jit(self._prefill_fn, donate_argnums=0, static_argnames="top_k")
    self._decode_direct = jax.jit(self._decode_direct_fn, donate_argnums=(0, 3),
                                  static_argnames="top_k")
    self._decode_step = jax.jit(self._decode_step_fn, donate_argnums=(0, 3),
                                static_argnames="top_k")
    self._read_direct = jax.jit(self._read_direct_fn)

  # -- row fetches ---------------------------------------------------------------------------

  def _ids_home(self, rows_BxTxH: dict) -> dict:
    """Each layer's row ids (device or NumPy), flat, moved to where its table lives by an
    explicit transfer of their own (async), outside any program ('step')."""
    return {l: jax.device_put(rows_BxTxH[l].reshape(-1), self.home[l]) for l in self.layers}

  def _gather_home(self, ids_home: dict, batch: int, tables: Mapping) -> dict:
    """The rows of `_ids_home`'s flat ids, `[B, T, H, E]` per layer. Inside a jitted step pass
    the tables as that step's arguments, so they are operands, not constants."""
    out = {}
    for l in self.layers:
      rows = host_memory.fetch_rows(tables[l], ids_home[l])
      out[l] = rows.reshape(batch, -1, self.offsets[l].shape[0], rows.shape[-1])
    return out

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

  # -- programs ------------------------------------------------------------------------------

  def _advance(self, tok_B, hist_BxN):
    """The history with the new token appended, and that token's global rows per layer."""
    if not self.layers:
      return hist_BxN, {}
    comp_B = tok_B if self.compression is None else jnp.asarray(self.compression)[tok_B]
    hist_BxN = jnp.concatenate([hist_BxN[:, 1:], comp_B[:, None]], axis=1)
    ids = self.mapping.hash(hist_BxN)
    rows = {l: global_rows_N(ids[l][:, -1:, :], self.offsets[l], self.tables[l].shape[0]
                             ).reshape(ids[l].shape[0], 1, -1) for l in self.layers}
    return hist_BxN, rows

  def _next(self, logits_BxTxV, hist_BxN, t, seed, temperature, greedy, top_k):
    """Samples token t+1 from the last logits; advances the history; rows of t+1."""
    key = jax.random.fold_in(jax.random.key(seed), t)
    tok_B = sample(logits_BxTxV[:, -1], key, temperature, greedy, top_k)
    return (tok_B,) + self._advance(tok_B, hist_BxN)

  def _prefill_fn(self, cache, variables, prompt_BxP, rows, hist_BxN, seed, temperature,
                  greedy, *, top_k):
    b, p = prompt_BxP.shape
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    logits, cache = self.decode_fn(variables, cache, prompt_BxP, positions,
                                   {l: buffer_rows(r) for l, r in rows.items()})
    return (cache,) + self._next(logits, hist_BxN, p - 1, seed, temperature, greedy, top_k)

  def _decode_fn(self, cache, variables, tok_B, hist_BxN, rows, t, seed, temperature, greedy,
                 top_k):
    """Forward of token t on its fetched rows, sample token t+1."""
    b = tok_B.shape[0]
    positions = jnp.full((b, 1), t, jnp.int32)
    logits, cache = self.decode_fn(variables, cache, tok_B[:, None], positions,
                                   {l: buffer_rows(r) for l, r in rows.items()})
    return (cache,) + self._next(logits, hist_BxN, t, seed, temperature, greedy, top_k)

  def _decode_direct_fn(self, cache, variables, tok_B, hist_BxN, rows, t, seed, temperature,
                        greedy, tables, *, top_k):
    """`_decode_fn` reading token t's rows inside the program from its row ids on the device
    (`rows`: {layer: [B, 1, H] global ids}, an output of the previous program)."""
    return self._decode_fn(cache, variables, tok_B, hist_BxN,
                           self._read_direct_fn(rows, tables), t, seed, temperature, greedy,
                           top_k)

  def _decode_step_fn(self, cache, variables, tok_B, hist_BxN, ids_home, t, seed, temperature,
                      greedy, tables, *, top_k):
    """`_decode_fn` with the gather of token t's rows inside the program (`ids_home`: its row
    ids, already where the tables live; only B*H rows per layer move)."""
    return self._decode_fn(cache, variables, tok_B, hist_BxN,
                           self._gather_home(ids_home, tok_B.shape[0], tables), t, seed,
                           temperature, greedy, top_k)

  # -- driver --------------------------------------------------------------------------------

  def _start(self, prompt_BxP, max_new_tokens, temperature, top_k, seed):
    """Validates the call; the prompt, its rows (global ids hashed on the host, NumPy), the
    rolling history of the last N compressed tokens (compressed pad left of the sequence) and
    the sampling scalars, the last two put on the device explicitly (transfer_guard)."""
    prompt = np.asarray(prompt_BxP, np.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
      raise ValueError(f"prompt must be int[B, P>=1], got shape {prompt.shape}")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = all tokens), got {top_k}")
    b, p = prompt.shape
    put = lambda x: jax.device_put(x, self.dev)  # noqa: E731
    hist = np.zeros((b, self.n), np.int32)
    rows = {}
    if self.layers:
      comp = prompt if self.compression is None else self.compression[prompt]
      ids = self.mapping.hash_numpy(comp)
      rows = {l: np.clip(ids[l] + self.offsets[l], 0, self.tables[l].shape[0] - 1
                         ).astype(np.int32) for l in self.layers}
      hist[:] = self.mapping.pad_id
      k = min(self.n, p)
      hist[:, self.n - k:] = comp[:, p - k:]
    sampling = (put(np.int32(seed)), put(np.float32(max(temperature, 1e-6))),
                put(np.bool_(temperature == 0)))
    return prompt, rows, put(hist), sampling

  def __call__(self, prompt_BxP: np.ndarray, max_new_tokens: int, *, temperature: float = 0.0,
               top_k: int = 0, seed: int = 0) -> np.ndarray:
    """Returns int32[B, P + max_new_tokens]: the prompt followed by the sampled tokens."""
    prompt, prompt_rows, hist, sampling = self._start(prompt_BxP, max_new_tokens, temperature,
                                                      top_k, seed)
    b, p = prompt.shape
    put = lambda x: jax.device_put(x, self.dev)  # noqa: E731  explicit (transfer_guard)
    cache = self.init_cache(self.variables, b, p + max_new_tokens)
    if self.fetch == "direct":
      first = self._read_direct({l: put(r) for l, r in prompt_rows.items()}, self.tables)
    else:
      first = self._gather_home(self._ids_home(prompt_rows), b, self.tables)
    cache, tok, hist, rows = self._prefill(cache, self.variables, put(prompt), first, hist,
                                           *sampling, top_k=int(top_k))
    out = [tok]
    for t in range(p, p + max_new_tokens - 1):
      # Token t is known (on the device): its rows are fetched inside its program.
      if self.fetch == "direct":
        cache, tok, hist, rows = self._decode_direct(cache, self.variables, tok, hist, rows,
                                                     put(np.int32(t)), *sampling, self.tables,
                                                     top_k=int(top_k))
      else:
        cache, tok, hist, rows = self._decode_step(cache, self.variables, tok, hist,
                                                   self._ids_home(rows), put(np.int32(t)),
                                                   *sampling, self.tables, top_k=int(top_k))
      out.append(tok)
    new = np.stack([np.asarray(jax.device_get(x)) for x in out], axis=1)
    return np.concatenate([prompt, new], axis=1)


def engram_lm_decoder(model_config):
  """(init_cache, decode_fn) of an `EngramLM` whose tables are external (row-sparse training
  or host tables), for `Decoder(decode_fn, init_cache, variables, tables, mapping, ...)` with
  `variables` the model's params and moe_stats (no tables). The cache comes from the model's
  sizing call on a [B, max_len] input with zero Engram rows (its outputs are unused).
  """
  from engram_jax.model import EngramLM
  if model_config.engram is not None and model_config.engram_table_placement != "external":
    raise ValueError("engram_lm_decoder needs engram_table_placement='external' (tables passed "
                     "to the decoder, in HBM or pinned_host)")
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


# ---- text from a training workdir ------------------------------------------------------------


def _split_tables(params: Mapping, layer_ids) -> tuple[dict, dict]:
  """(params without the Engram tables, {layer: table}) of a 'dense_adam' param tree, whose
  tables are params at `layer_{l}/engram/memory/table`."""
  params, tables = dict(params), {}
  for l in layer_ids:
    layer = dict(params[f"layer_{l}"])
    engram = dict(layer["engram"])
    memory = dict(engram["memory"])
    tables[l] = memory.pop("table")
    engram["memory"], layer["engram"], params[f"layer_{l}"] = memory, engram, layer
  return params, tables


@dataclasses.dataclass
class TextDecoder:
  """A `Decoder` of a trained model with its tokenizer: text in, continuation text out.

  max_len: the longest sequence (prompt + new tokens) decoded, the run's `data.seq_len` (the
  positions it was trained on). step: the checkpoint's step.
  """

  decoder: Decoder
  tokenizer: Any
  max_len: int
  step: int

  @classmethod
  def load(cls, workdir: str) -> "TextDecoder":
    """The latest checkpoint of a training workdir, on its first device (tables where the run
    kept them: HBM, or pinned host memory)."""
    config = evaluate_lib.load_workdir_config(workdir)
    trainer, _, state, step = train.restore_latest(config, workdir)
    exp = trainer.exp
    device = jax.devices()[0]
    dev = host_memory.placement_sharding("device", device)
    params, tables = dict(state.params), {}
    if exp.model.engram is not None:
      if exp.table_placement == "pinned_host":
        tables = dict(trainer.host.tables)
      elif exp.sparse_tables:
        tables = {int(k): jax.device_put(t, dev) for k, t in state.tables.items()}
      else:
        params, tables = _split_tables(params, exp.model.engram_layer_ids)
        tables = {l: jax.device_put(t, dev) for l, t in tables.items()}
    model = (exp.model if exp.model.engram is None
             else exp.model.replace(engram_table_placement="external"))
    variables = jax.device_put({"params": params, **state.model_state}, dev)
    init_cache, decode_fn = engram_lm_decoder(model)
    compression = None if exp.compressor is None else exp.compressor.lookup_table
    decoder = Decoder(decode_fn, init_cache, variables, tables,
                      exp.hashing if tables else None, compression, device=device)
    return cls(decoder, tokenizer_lib.load_tokenizer(exp.tokenizer_path),
               int(config.data.seq_len), int(step))

  def continuation_ids(self, prompt: str, *, max_new_tokens: int = 64,
                       temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> np.ndarray:
    """int32[<= max_new_tokens]: the tokens sampled after `prompt`, up to the first `<eos>`
    (the end of a training document) excluded."""
    ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
    if not ids:
      raise ValueError("the prompt is empty: give some text to continue")
    if len(ids) >= self.max_len:
      raise ValueError(f"the prompt is {len(ids)} tokens; the model decodes at most "
                       f"{self.max_len} (data.seq_len of its training run), prompt included")
    if len(ids) + max_new_tokens > self.max_len:
      raise ValueError(f"{len(ids)} prompt tokens + max_new_tokens={max_new_tokens} exceed the "
                       f"model's {self.max_len} positions (data.seq_len of its training run); "
                       f"use max_new_tokens <= {self.max_len - len(ids)}")
    out = self.decoder(np.asarray([ids], np.int32), max_new_tokens, temperature=temperature,
                       top_k=top_k, seed=seed)[0, len(ids):]
    eos = np.flatnonzero(out == tokenizer_lib.EOS_ID)
    return out[:eos[0]] if eos.size else out

  def __call__(self, prompt: str, **kw) -> str:
    """The continuation of `prompt` as text (`continuation_ids`' keywords)."""
    return self.tokenizer.decode(self.continuation_ids(prompt, **kw).tolist(),
                                 skip_special_tokens=True)


def generate_text(workdir: str, prompt: str, *, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> str:
  """The continuation of `prompt` by the latest checkpoint of a training workdir."""
  return TextDecoder.load(workdir)(prompt, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, seed=seed)
