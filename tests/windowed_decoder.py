"""The oracle of `engram_jax.generate.Decoder`: decoding by the full causal forward at every step.

`WindowedDecoder` keeps no cache and no history: each step hashes the whole [B, T_max] window
of tokens (`NgramHashMapping.hash`), fetches every position's rows from the tables
(`host_memory.fetch_rows`), runs a stateless `logits_fn` on the window (static shapes: one
compilation; `logits_fn` must be causal, so the pad right of position t changes nothing) and
samples token t+1 from the logits of position t with the same rule as the decoder:
argmax at temperature 0, else `categorical` over the `top_k` largest logits / temperature with
the key `fold_in(key(seed), t)`. O(T_max) work per token: simple, for any model, not fast.

Whatever `logits_fn` closes over (e.g. model params) becomes a constant of the jitted step: a
device array is then read back from the device at compile time, which a GPU refuses under
`jax.transfer_guard("disallow")`; close over NumPy copies.

Dimension legend: B batch, P prompt length, T_max prompt + new tokens, H hash heads, E row
width, V vocab.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import host_memory
from engram_jax.hashing import NgramHashMapping
from pallas_kernels.engram_lookup.api import global_rows_N
from pallas_kernels.engram_lookup.row_sparse import PrefetchedRows

LogitsFn = Callable[[jax.Array, Mapping[int, PrefetchedRows]], jax.Array]


class WindowedDecoder:
  """`(prompt_BxP, max_new_tokens, *, temperature, top_k, seed) -> int32[B, P + new]`.

  Args:
    logits_fn: `(inputs_BxT int32, {layer: PrefetchedRows}) -> logits_BxTxV`, causal.
    tables: {layer: [R, E] table} in 'device' or 'pinned_host' memory; {} without Engram.
    mapping: the hash mapping (its layer_ids must cover `tables`); None without tables.
    compression: int[V] raw -> compressed id lookup, or None for compressed inputs.
  """

  def __init__(self, logits_fn: LogitsFn, tables: Mapping[int, jax.Array],
               mapping: NgramHashMapping, compression: Optional[np.ndarray] = None):
    self.logits_fn, self.tables, self.mapping = logits_fn, dict(tables), mapping
    self.layers = tuple(sorted(tables))
    devices = {d for t in tables.values() for d in t.sharding.device_set}
    device = devices.pop() if devices else jax.devices()[0]
    self.dev = host_memory.placement_sharding("device", device)
    self.home = {l: host_memory.placement_sharding(host_memory.placement_of(t), device)
                 for l, t in tables.items()}
    self.offsets = {l: np.asarray(mapping.offsets(l), np.int32) for l in self.layers}
    self.compression = None if compression is None else np.asarray(compression, np.int32)
    self._ids = jax.jit(self._ids_fn)
    self._step = jax.jit(self._step_fn, static_argnames="top_k")

  def _ids_fn(self, tokens_BxT):
    """Every position's global rows per layer, flat."""
    if not self.layers:
      return {}
    comp_BxT = tokens_BxT if self.compression is None else jnp.asarray(self.compression)[tokens_BxT]
    ids = self.mapping.hash(comp_BxT)
    return {l: global_rows_N(ids[l], self.offsets[l], self.tables[l].shape[0]).reshape(-1)
            for l in self.layers}

  def _step_fn(self, tokens_BxT, rows, t, seed, temperature, greedy, *, top_k):
    b, t_max = tokens_BxT.shape
    pre = {}
    for l in self.layers:
      r = rows[l].reshape(b * t_max * self.offsets[l].shape[0], -1)
      pre[l] = PrefetchedRows(r, jnp.arange(r.shape[0], dtype=jnp.int32).reshape(b, t_max, -1),
                              jnp.zeros((r.shape[0],), jnp.int32))
    logits_BxV = jax.lax.dynamic_index_in_dim(self.logits_fn(tokens_BxT, pre), t, axis=1,
                                              keepdims=False).astype(jnp.float32)
    masked_BxV = logits_BxV
    if top_k:
      kth_Bx1 = jax.lax.top_k(logits_BxV, min(top_k, logits_BxV.shape[-1]))[0][:, -1:]
      masked_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, -jnp.inf)
    key = jax.random.fold_in(jax.random.key(seed), t)
    sampled_B = jax.random.categorical(key, masked_BxV / temperature)
    tok_B = jnp.where(greedy, jnp.argmax(logits_BxV, -1), sampled_B).astype(jnp.int32)
    return jax.lax.dynamic_update_slice(tokens_BxT, tok_B[:, None], (0, t + 1))

  def __call__(self, prompt_BxP: np.ndarray, max_new_tokens: int, *, temperature: float = 0.0,
               top_k: int = 0, seed: int = 0, pad_id: int = 0) -> np.ndarray:
    prompt = np.asarray(prompt_BxP, np.int32)
    b, p = prompt.shape
    put = lambda x: jax.device_put(x, self.dev)  # noqa: E731  explicit (transfer_guard)
    tokens = np.full((b, p + max_new_tokens), pad_id, np.int32)
    tokens[:, :p] = prompt
    tokens = put(tokens)
    sampling = (put(np.int32(seed)), put(np.float32(max(temperature, 1e-6))),
                put(np.bool_(temperature == 0)))
    for t in range(p - 1, p + max_new_tokens - 1):
      ids = self._ids(tokens)
      # Outside the step, each table's ids moved to its memory by a transfer of their own.
      rows = {l: host_memory.fetch_rows(self.tables[l], jax.device_put(ids[l], self.home[l]))
              for l in self.layers}
      tokens = self._step(tokens, rows, put(np.int32(t)), *sampling, top_k=int(top_k))
    return np.asarray(jax.device_get(tokens))
