"""Training Engram tables that live in pinned host memory: `HostTables`.

`HostTables` owns the tables of every Engram layer and their row-sparse optimiser state, all in
pinned host memory (engram_jax/host_memory.py), and builds the training step that reads and
updates them. Only the U rows a batch touches move each way; neither a table nor its state ever
leaves host memory as a whole.

  run = host.make_step(model_step)             # model_step(state, inputs, rows)
                                               #   -> (outputs, row grads, learning rate)
  handle = host.prefetch(ids of step 0)        # {layer: [B, T, H]} NumPy hash ids
  for s in steps:
    outputs, handle = run(handle, ids of step s+1 (None at the end), state, inputs_s)

Step s, as `run` dispatches it:

  device (one program): patch s's rows with step s-1's updated rows (still on the device),
          model step s, the optimiser of `engram_jax.table_optim` on its U rows (a "mini
          table" of U rows: the arithmetic is exactly the HBM placement's) -> new rows of s;
  host (one ordered queue, its tasks split over NumPy worker threads): gather the rows of s+1
          from writable views of the pinned_host buffers (`host_memory.host_view`) into pinned
          staging buffers and copy them to the device; then wait for the new rows of s, copy
          them to pinned host memory and write them into the tables in place.

The NumPy dedup of s+1 runs on the calling thread after step s is dispatched, so it overlaps
step s; the host gather of s+1 runs while step s computes.

Coherence: the gather of s+1 runs after the write of s-1 (queue order) but may predate step s's
update; step s+1's program patches every row that step s updated (sorted-id `searchsorted` on
the device) before the model reads them, so the rows step s+1 reads equal the tables after step
s exactly, as with the HBM placement (tests/test_host_tables.py compares losses, rows and
optimiser state step by step). Reading `tables` / `states`, `flush` and `prefetch` wait for
every host task and re-raise a failed task's error.

Why the host side is NumPy on threads and not XLA host compute inside the step's program: the
host gather and write then stay off the device's stream (benchmarks/README.md, "Host tables:
training": the GPU stream is as busy per step as with HBM tables), and XLA never writes the
host arrays. Why the optimiser arithmetic runs on the device: the rows travel there for the
forward anyway, and `table_optim`'s padded gathers (mode='fill') need device-resident bound
constants.

`prefetch` (the first step's rows, and rows for evaluation with `for_update=False`) reads the
tables with XLA's host gather (`host_memory.fetch_rows`); it never writes them.

Dimension legend: B batch, T time, H hash heads, E row width, R table rows, U = B*T*H row slots
(sorted unique rows of a batch, padded with R), L Engram layers.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import table_optim
from engram_jax.host_memory import (fetch_rows, host_view, init_state, placement_of,
                                    placement_sharding, zeros)
from pallas_kernels.engram_lookup import reference as lookup_reference
from pallas_kernels.engram_lookup.row_sparse import PrefetchedRows, RowSparse


def unique_rows_numpy(ids_BxTxH: np.ndarray, offsets_H: np.ndarray,
                      num_rows: int) -> tuple[np.ndarray, np.ndarray, int]:
  """NumPy twin of `row_sparse.unique_rows`: (row_ids_U int32 padded with R, inverse, count)."""
  ids = np.asarray(ids_BxTxH)
  if ids.ndim != 3 or ids.shape[-1] != len(offsets_H):
    raise ValueError(f"ids must be [B, T, H={len(offsets_H)}], got shape {ids.shape}")
  rows_N = lookup_reference.global_rows_numpy(ids, offsets_H, num_rows)  # clamped per head
  uniq, inverse = np.unique(rows_N.reshape(-1), return_inverse=True)
  row_ids_U = np.full(rows_N.size, num_rows, np.int32)
  row_ids_U[:uniq.size] = uniq
  return row_ids_U, inverse.reshape(ids.shape).astype(np.int32), int(uniq.size)


# ---- NumPy row traffic on worker threads ----------------------------------------------------------

def default_host_threads() -> int:
  """Row-chunk threads of the host side: half the CPUs, at most 8 (the other half keeps feeding
  the device; `bench_offload --probe` times 1, 8 and all threads, benchmarks/README.md)."""
  return max(1, min(8, (os.cpu_count() or 2) // 2))


class _StagingSlot:
  """A pinned_host buffer (and its NumPy view) that rows are gathered into, then sent to the
  device by DMA; it is written again only after that copy is done."""

  def __init__(self, shape, dtype, device):
    self.array = zeros(shape, dtype, "pinned_host", device)
    self.view = host_view(self.array)
    self.in_flight: Optional[jax.Array] = None

  def send(self, sharding) -> jax.Array:
    self.in_flight = jax.device_put(self.array, sharding)
    return self.in_flight


class _Staging:
  """Two staging slots per key, used in turn (one can be in flight while the other fills)."""

  def __init__(self):
    self._slots: dict = {}

  def take(self, key, shape, dtype, device) -> _StagingSlot:
    pair, turn = self._slots.get(key, (None, 0))
    if pair is None or pair[0].array.shape != tuple(shape) or pair[0].array.dtype != dtype:
      pair = (_StagingSlot(shape, dtype, device), _StagingSlot(shape, dtype, device))
    self._slots[key] = (pair, 1 - turn)
    slot = pair[turn]
    if slot.in_flight is not None:
      slot.in_flight.block_until_ready()   # its last copy to the device has been read
    return slot


class HostRowWorker:
  """One ordered queue (its own thread) whose tasks split each gather / scatter into row chunks
  run by a pool of `threads` (NumPy's take and fancy assignment release the GIL), and the pinned
  staging buffers of the gathers. `drain` waits for every task and re-raises the first error."""

  MIN_CHUNK_ROWS = 4096

  def __init__(self, threads: int):
    self.threads = int(threads)
    if self.threads < 1:
      raise ValueError(f"threads must be >= 1, got {threads}")
    self._queue = ThreadPoolExecutor(1, thread_name_prefix="engram-host-queue")
    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="engram-host-rows")
    self._futures: list[Future] = []
    self.staging = _Staging()

  def submit(self, fn, *args) -> Future:
    self._futures = [f for f in self._futures if not f.done() or f.exception() is not None]
    fut = self._queue.submit(fn, *args)
    self._futures.append(fut)
    return fut

  def result(self, fut: Future):
    """`fut.result()`; its error, if any, is then not raised again by `drain`."""
    if fut in self._futures:
      self._futures.remove(fut)
    return fut.result()

  def drain(self) -> None:
    futures, self._futures = self._futures, []
    for f in futures:
      f.result()

  def shutdown(self) -> None:
    """Waits for every task (re-raising the first error) and stops the threads."""
    try:
      self.drain()
    finally:
      self._queue.shutdown()
      self._pool.shutdown()

  def _chunks(self, n: int):
    k = max(1, min(self.threads, n // self.MIN_CHUNK_ROWS))
    bounds = np.linspace(0, n, k + 1).astype(np.int64)
    return list(zip(bounds[:-1], bounds[1:]))

  def gather(self, src: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
    """out[:len(ids)] = src[ids] in row chunks."""
    def part(ab):
      a, b = ab
      np.take(src, ids[a:b], axis=0, out=out[a:b])
    list(self._pool.map(part, self._chunks(ids.shape[0])))

  def scatter(self, dst: np.ndarray, ids: np.ndarray, values: np.ndarray) -> None:
    """dst[ids] = values[:len(ids)] in row chunks (ids unique, so chunks never collide)."""
    def part(ab):
      a, b = ab
      dst[ids[a:b]] = values[a:b]
    list(self._pool.map(part, self._chunks(ids.shape[0])))


# ---- the row store and its training step ----------------------------------------------------------

@dataclasses.dataclass(eq=False)  # handles are compared by identity (fields hold arrays)
class PrefetchHandle:
  """Rows (and optimiser-state rows) of one step, on the device, for every layer.

  leaves: {layer: (table rows, state rows...)} device arrays, U = B*T*H rows each (padding
    slots hold row R-1 or zeros: they are masked in `rows` and never written back); for a
    handle made by a step, a Future of them until the next `run` takes it.
  row_ids: {layer: int32[U] device}; inverse: {layer: int32[B, T, H] device}.
  host_ids: {layer: (int32[U] NumPy row ids, unique count)}, what the host write uses.
  patch: (row_ids, new leaves) of the update the next program patches in first (handles made by
    a step). from_step: made by a step (then only that chain's `run` may take it).
  """
  leaves: Any
  row_ids: dict
  inverse: dict
  host_ids: dict
  consumed: bool = False
  patch: Optional[tuple] = None
  from_step: bool = False


class HostTables:
  """Engram tables in pinned host memory, their row-sparse optimiser state, and the training
  step that updates them (module docstring).

  Args:
    cfg: a sparse `TableOptimizerConfig` ('lazy_adam' or 'adagrad').
    tables: {layer_id: [R, E] pinned_host array}.
    offsets: {layer_id: int[H] per-head first rows} (`NgramHashMapping.offsets`).
    states: optional {layer_id: TableOptState} in pinned host memory (zeros if None).
  """

  def __init__(self, cfg: table_optim.TableOptimizerConfig, tables: Mapping[int, jax.Array],
               offsets: Mapping[int, Any], states: Optional[Mapping] = None):
    if cfg.kind not in table_optim.SPARSE_KINDS:
      raise ValueError(f"HostTables needs a sparse optimiser kind "
                       f"{table_optim.SPARSE_KINDS}, got {cfg.kind!r}")
    self.cfg = cfg
    self.layers = tuple(sorted(tables))
    if set(offsets) != set(self.layers):
      raise ValueError(f"offsets layers {sorted(offsets)} != tables layers {list(self.layers)}")
    self._tables = dict(tables)
    for l in self.layers:
      if placement_of(self._tables[l]) != "pinned_host":
        raise ValueError(f"HostTables: layer {l}'s table is in {placement_of(self._tables[l])}; "
                         "every table must be in pinned_host (HBM tables train in the train "
                         "state, engram_jax/train_step.py)")
    self.offsets = {l: np.asarray(offsets[l], np.int64) for l in self.layers}
    self._states = dict(states) if states is not None else {
        l: init_state(cfg, self._tables[l]) for l in self.layers}
    for l in self.layers:
      for leaf in jax.tree.leaves(self._states[l]):
        if placement_of(leaf) != "pinned_host":
          raise ValueError(f"layer {l}: optimiser state in {placement_of(leaf)}; it must live "
                           "with its table in pinned_host")
    self._outstanding: list[PrefetchHandle] = []
    self._gather = jax.jit(self._gather_fn)
    self._device = next(iter(self._tables.values())).sharding._device
    self._worker: Optional[HostRowWorker] = None  # made by make_step

  # -- arrays ---------------------------------------------------------------------------------------

  @property
  def tables(self) -> dict:
    """{layer: table}, with every update written."""
    self.flush()
    return self._tables

  @property
  def states(self) -> dict:
    """{layer: TableOptState}, with every update written."""
    self.flush()
    return self._states

  def num_rows(self, l) -> int:
    return self._tables[l].shape[0]

  def _arrays(self, l):
    return (self._tables[l],) + tuple(x for x in self._states[l] if x is not None)

  def flush(self) -> None:
    """Waits for the host tasks of every step (re-raising a failed task's error)."""
    if self._worker is not None:
      self._worker.drain()

  # -- prefetch ------------------------------------------------------------------------------------

  @staticmethod
  def _gather_fn(arrays, gather_ids):
    """Device copies of `arr[ids]` for every array; host gathers run as host compute."""
    return {l: tuple(fetch_rows(a, gather_ids[l]) for a in arrs) for l, arrs in arrays.items()}

  def prefetch(self, ids: Mapping[int, np.ndarray], *, for_update: bool = True
               ) -> PrefetchHandle:
    """The rows a batch reads; `ids` are its host hash ids {layer: [B, T, H]}.

    `for_update=True`: table and optimiser-state rows, the first handle of a chain of `run`
    calls (later handles come from `run`). `for_update=False` (evaluation): table rows only,
    not tracked; the handle is never patched, so read its rows before the next step.
    """
    self.flush()  # the gather must see every update
    if for_update:
      self._refuse_step_handle("prefetch")
    handle, gather_ids = self._plan(ids, "prefetch", gather=True)
    arrays = {l: self._arrays(l) if for_update else self._arrays(l)[:1] for l in self.layers}
    handle.leaves = self._gather(arrays, gather_ids)
    if for_update:
      self._outstanding.append(handle)
    return handle

  def _plan(self, ids: Mapping[int, np.ndarray], what: str, gather: bool = False
            ) -> tuple[PrefetchHandle, Optional[dict]]:
    """NumPy dedup of a batch's ids and their device copies; a handle without leaves, and with
    `gather` the in-bounds ids (padding -> R-1) in host memory for `_gather`."""
    if set(ids) != set(self.layers):
      raise ValueError(f"{what}: ids for layers {sorted(ids)}, HostTables has "
                       f"{list(self.layers)}")
    dev = placement_sharding("device", self._device)
    host = placement_sharding("pinned_host", self._device)
    gather_ids, row_ids, inverse, host_ids = {}, {}, {}, {}
    for l in self.layers:
      if isinstance(ids[l], jax.Array):
        raise ValueError(f"{what}: pass the batch's hash ids as NumPy (the pipeline's host "
                         "copy); rows are deduplicated on the host while the device computes")
      rid, inv, count = unique_rows_numpy(ids[l], self.offsets[l], self.num_rows(l))
      host_ids[l] = (rid, count)
      if gather:
        gather_ids[l] = jax.device_put(np.minimum(rid, self.num_rows(l) - 1), host)
      row_ids[l] = jax.device_put(rid, dev)
      inverse[l] = jax.device_put(inv, dev)
    return PrefetchHandle(None, row_ids, inverse, host_ids), (gather_ids if gather else None)

  def rows(self, handle: PrefetchHandle) -> dict[int, PrefetchedRows]:
    """{layer: PrefetchedRows} on the device (padding slots zero), for the model."""
    return {l: _masked_rows(handle.leaves[l][0], handle.row_ids[l], handle.inverse[l],
                            num_rows=self.num_rows(l)) for l in self.layers}

  def _check_chain_handle(self, handle: PrefetchHandle) -> None:
    """A step takes the one outstanding handle: from `prefetch` or the previous step, not
    applied yet."""
    if handle.consumed or handle not in self._outstanding:
      raise ValueError("host-table step: handle must come from this HostTables' prefetch (or "
                       "the previous step) and not be applied yet")
    if len(self._outstanding) != 1:
      raise ValueError("host-table step: another prefetched handle is outstanding; a step only "
                       "keeps the next step's rows coherent")

  def _refuse_step_handle(self, what: str) -> None:
    """A step's next handle is patched by its consumer only (module docstring, Coherence)."""
    if any(h.from_step for h in self._outstanding):
      raise ValueError(f"{what}: the handle returned by a host-table step is outstanding; pass "
                       "it to that step's `run` (with next_ids=None to end the chain) first")

  # -- update --------------------------------------------------------------------------------------

  def _update_fn(self, leaves, row_ids, grads, lr, step, has_step):
    """Optimiser on the U rows of every layer (a mini table of U rows); the new leaves."""
    new_leaves = {}
    for l in self.layers:
      w_UxE, *state_rows = leaves[l]
      rid = row_ids[l]
      u = rid.shape[0]
      local_U = jnp.where(rid < self.num_rows(l), jnp.arange(u, dtype=jnp.int32), u)
      it = iter(state_rows)
      mini_state = table_optim.TableOptState(
          *[None if x is None else next(it) for x in self._states[l]])
      new_w, new_state = table_optim.apply_row_sparse_update(
          self.cfg, w_UxE, mini_state, RowSparse(local_U, grads[l]), lr,
          step=step if has_step else None)
      new_leaves[l] = (new_w,) + tuple(x for x in new_state if x is not None)
    return new_leaves

  def _as_stored(self, new_leaves):
    """The updated rows in the dtypes of the arrays they belong to (tables, state)."""
    return {l: tuple(v.astype(a.dtype) for a, v in zip(self._arrays(l), new_leaves[l]))
            for l in self.layers}

  def _row_grads_f32(self, grads):
    """{layer: f32 [U, E]} from a model's row gradients (arrays or RowSparse)."""
    return {l: (grads[l].values_UxE if isinstance(grads[l], RowSparse) else grads[l]
                ).astype(jnp.float32) for l in self.layers}

  def make_step(self, model_step: Callable, *, donate_state: bool = False,
                threads: Optional[int] = None) -> Callable:
    """The training step: one device program per call, the host gathers and scatters in NumPy
    on worker threads beside it (module docstring).

    `model_step(state, inputs, rows) -> (outputs, grads, learning_rate)`: `rows` is
    {layer: PrefetchedRows} as from `rows(handle)`, `grads` {layer: f32 [U, E] or RowSparse}
    w.r.t. `rows[l].rows_UxE`, `learning_rate` the base LR of this step (a scalar; the table
    optimiser applies its multiplier), so a schedule computed inside the step needs no round
    trip. Returns `run(handle, next_ids, state, inputs, step=None) -> (outputs, next_handle)`:
    the first handle comes from `prefetch`, later ones from `run`; `next_ids` are the next
    batch's NumPy hash ids (None for the last step, then `next_handle` is None); `step` is the
    number of updates applied before this one (for bias correction; None: 0); `state` is
    donated if `donate_state`. `run` blocks only to take the previous gather's device arrays;
    the write of step s overlaps step s+1. `threads`: the NumPy row-chunk pool
    (`default_host_threads`). Extra pinned host memory: two staging buffers of U rows per table
    and state array, plus the step's updated rows in transit.

    `run.trace(...)` traces the program a call with the same arguments would dispatch (tests
    read its constants and compiled HLO); `run.programs` holds the jitted programs by
    (has_patch, has_step).
    """
    if self._worker is None or (threads is not None and self._worker.threads != threads):
      self.flush()
      if self._worker is not None:
        self._worker.shutdown()
      self._worker = HostRowWorker(default_host_threads() if threads is None else threads)
    worker = self._worker
    cache = {}
    dev = placement_sharding("device", self._device)

    def program(model_state, inputs, leaves, row_ids, inverse, patch, step, *, has_patch,
                has_step):
      if has_patch:
        p_rid, p_leaves = patch
        leaves = {l: _patch(row_ids[l], leaves[l], p_rid[l], p_leaves[l], self.num_rows(l))
                  for l in self.layers}
      rows = {l: _masked_rows_fn(leaves[l][0], row_ids[l], inverse[l], self.num_rows(l))
              for l in self.layers}
      outputs, grads, lr = model_step(model_state, inputs, rows)
      g = self._row_grads_f32(grads)
      new_leaves = self._update_fn(leaves, row_ids, g, jnp.asarray(lr, jnp.float32), step,
                                   has_step)
      # Stored as the host arrays store them, so the patch equals a write then a gather.
      return outputs, self._as_stored(new_leaves)

    def gather_task(views, host_ids):
      leaves = {}
      for l in self.layers:
        rid, count = host_ids[l]
        out = []
        for i, view in enumerate(views[l]):
          # Into a pinned staging buffer, so the copy to the device is one DMA (a pageable
          # NumPy source is copied far slower: `bench_offload --probe`).
          slot = worker.staging.take((l, i), (rid.shape[0],) + view.shape[1:], view.dtype,
                                     self._device)
          worker.gather(view, rid[:count], slot.view)
          slot.view[count:] = 0  # padding slots: masked in `rows`, never written back
          out.append(slot.send(dev))
        leaves[l] = tuple(out)
      return leaves

    def scatter_task(views, host_ids, new_leaves_host):
      # Pinned copies of the new rows (DMA, issued by `run`); ready once the program is done.
      jax.block_until_ready(new_leaves_host)
      for l in self.layers:
        rid, count = host_ids[l]
        for view, rows in zip(views[l], new_leaves_host[l]):
          worker.scatter(view, rid[:count], host_view(rows))

    def prepare(handle, model_state, inputs, step):
      self._check_chain_handle(handle)
      if isinstance(handle.leaves, Future):
        handle.leaves = worker.result(handle.leaves)
      step_arr = _step_array(step, dev)
      flags = (handle.patch is not None, step is not None)
      if flags not in cache:
        cache[flags] = jax.jit(functools.partial(
            program, has_patch=flags[0], has_step=flags[1]),
            donate_argnums=(0,) if donate_state else ())
      args = (model_state, inputs, handle.leaves, handle.row_ids, handle.inverse, handle.patch,
              step_arr)
      return cache[flags], args

    def run(handle: PrefetchHandle, next_ids, state, inputs, step=None):
      fn, args = prepare(handle, state, inputs, step)
      outputs, new_leaves = fn(*args)
      # After the dispatch: the dedup of s+1 runs while step s computes.
      nxt = None if next_ids is None else self._plan(next_ids, "host-table step")[0]
      self._outstanding.remove(handle)
      handle.consumed = True
      views = {l: tuple(host_view(a) for a in self._arrays(l)) for l in self.layers}
      if nxt is not None:   # queued before this step's write: it runs while this step computes
        nxt.leaves = worker.submit(gather_task, views, nxt.host_ids)
        nxt.patch = (handle.row_ids, new_leaves)
        nxt.from_step = True
        self._outstanding.append(nxt)
      pinned = placement_sharding("pinned_host", self._device)
      worker.submit(scatter_task, views, handle.host_ids, jax.device_put(new_leaves, pinned))
      return outputs, nxt

    def trace(handle, next_ids, state, inputs, step=None):
      del next_ids  # the host side's: not part of the program
      fn, args = prepare(handle, state, inputs, step)
      return fn.trace(*args)

    run.trace = trace
    run.programs = cache  # {(has_patch, has_step): jitted program}, for tests
    return run

  def compiled_gather_text(self, ids: Mapping[int, np.ndarray]) -> str:
    """Optimised HLO of `prefetch`'s gather program for these ids (tests look for table-sized
    copies)."""
    _, gather_ids = self._plan(ids, "compiled_gather_text", gather=True)
    arrays = {l: self._arrays(l) for l in self.layers}
    return self._gather.lower(arrays, gather_ids).compile().as_text()


def _step_array(step, sharding) -> jax.Array:
  """The optimiser's step count as a device int32 (0 for None): an explicit put, since a Python
  scalar would be an implicit transfer (transfer_guard)."""
  return step if isinstance(step, jax.Array) else jax.device_put(
      np.int32(0 if step is None else step), sharding)


def _masked_rows_fn(w_UxE, row_ids_U, inverse_BxTxH, num_rows):
  valid_U1 = (row_ids_U < num_rows)[:, None]
  return PrefetchedRows(jnp.where(valid_U1, w_UxE, 0).astype(w_UxE.dtype), inverse_BxTxH,
                        row_ids_U)


_masked_rows = jax.jit(_masked_rows_fn, static_argnames="num_rows")


def _patch(row_ids_V, leaves_V, row_ids_U, new_leaves_U, num_rows):
  """Replaces rows of a prefetched handle (ids V) that an update (ids U, sorted) just changed."""
  pos_V = jnp.clip(jnp.searchsorted(row_ids_U, row_ids_V), 0, row_ids_U.shape[0] - 1)
  hit_V = (row_ids_U[pos_V] == row_ids_V) & (row_ids_V < num_rows)
  out = []
  for old, new in zip(leaves_V, new_leaves_U):
    hit = hit_V.reshape(hit_V.shape + (1,) * (old.ndim - 1))
    out.append(jnp.where(hit, new[pos_V].astype(old.dtype), old))
  return tuple(out)
