"""Training Engram tables that live in pinned host memory: `HostTables`.

`HostTables` owns the tables of every Engram layer and their row-sparse optimiser state, all in
pinned host memory (engram_jax/host_memory.py), and builds the training step that reads and
updates them. Only the rows a batch touches move each way; neither a table nor its state ever
leaves host memory as a whole.

  run = host.make_step(model_step)             # model_step(state, inputs, rows)
                                               #   -> (outputs, row grads, learning rate)
  handle = host.prefetch(ids of step 0)        # {layer: [B, T, H]} NumPy hash ids
  for s in steps:
    outputs, handle = run(handle, ids of step s+1 (None at the end), state, inputs_s)

Rows by process: process p of a P-process job keeps rows [p*ceil(R/P), (p+1)*ceil(R/P)) of
every table and of its state (`row_block`; P = 1: the whole table). The ids a process passes
are its part of the global batch; every process exchanges them (`process_allgather`, P > 1
only, before step s is dispatched) and so computes the same sorted unique rows of the global
batch, U = P*B*T*H slots padded with R. Each process gathers the rows of its block (zeros in the
other slots) into a `[D, U, E]` array over the D devices of the mesh, its rows on the device
holding its tables and zeros on its other devices; the step's program sums it over D (an
all-reduce of U rows: the traffic follows the rows a batch touches, not the tables), which
gives every device the same "mini table" of U rows. The batch is split over the mesh as the
caller's `batch_sharding` says; the gradients of the replicated rows are summed over the batch
shards by the compiler, the optimiser updates the U rows identically on every device, and each
process writes back the updated rows it owns.

Step s, as `run` dispatches it:

  device (one program): sum the processes' rows of s, patch them with step s-1's updated rows
          (still on the device), model step s, the optimiser of `engram_jax.table_optim` on the
          U rows (the arithmetic is exactly the HBM placement's) -> new rows of s;
  host (one ordered queue, its tasks split over NumPy worker threads, engram_jax/host_rows.py):
          gather the owned rows of s+1 from writable views of the pinned_host buffers
          (`host_memory.host_view`) into pinned staging buffers and copy them to the device;
          then wait for the new rows of s, copy them to pinned host memory and write the owned
          ones into the tables in place.

The NumPy dedup of s+1 runs on the calling thread after step s is dispatched, so it overlaps
step s; the host gather of s+1 runs while step s computes. The exchange of s+1's ids runs
before step s is dispatched: it is a collective of its own, which on an accelerator waits for
step s-1's program.

Coherence: the gather of s+1 runs after the write of s-1 (queue order) but may predate step s's
update; step s+1's program patches every row that step s updated (sorted-id `searchsorted` on
the device) before the model reads them, so the rows step s+1 reads equal the tables after step
s exactly, as with the HBM placement (tests/test_host_tables.py compares losses, rows and
optimiser state step by step). Reading `tables` / `states`, `flush` and `prefetch` wait for
every host task and re-raise a failed task's error. The last block takes every id from its
first row up, so an id beyond the table fails its gather or write rather than being dropped.

Why the host side is NumPy on threads and not XLA host compute inside the step's program: the
host gather and write then stay off the device's stream (benchmarks/README.md, "Host tables:
training": the GPU stream is as busy per step as with HBM tables), and XLA never writes the
host arrays. Why the optimiser arithmetic runs on the device: the rows travel there for the
forward anyway, and `table_optim`'s padded gathers (mode='fill') need device-resident bound
constants.

`prefetch` (the first step's rows, and rows for evaluation with `for_update=False`) reads the
tables with XLA's host gather (`host_memory.fetch_rows`); it never writes them.

Dimension legend: B batch of one process, T time, H hash heads, E row width, R table rows,
P processes, D devices of the mesh, U = P*B*T*H row slots (sorted unique rows of the global
batch, padded with R), L Engram layers.
"""

from __future__ import annotations

import dataclasses
import functools
from concurrent.futures import Future
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engram_jax import table_optim
from engram_jax.host_memory import (fetch_rows, host_view, init_state, placement_of,
                                    placement_sharding)
from engram_jax.host_rows import HostRowWorker, default_host_threads
from pallas_kernels.engram_lookup import reference as lookup_reference
from pallas_kernels.engram_lookup.row_sparse import PrefetchedRows, RowSparse


def unique_rows_numpy(ids_BxTxH: np.ndarray, offsets_H: np.ndarray, num_rows: int,
                      batch_ids: Optional[np.ndarray] = None
                      ) -> tuple[np.ndarray, np.ndarray, int]:
  """NumPy twin of `row_sparse.unique_rows`: (row_ids_U int32 padded with R, inverse, count).

  `batch_ids` [N, T, H]: the global batch that `ids_BxTxH` is one process's part of; the row
  ids are then its unique rows (U = N*T*H slots) and the inverse indexes them. Default: the
  batch is `ids_BxTxH`.
  """
  ids = np.asarray(ids_BxTxH)
  if ids.ndim != 3 or ids.shape[-1] != len(offsets_H):
    raise ValueError(f"ids must be [B, T, H={len(offsets_H)}], got shape {ids.shape}")
  rows_BxTxH = lookup_reference.global_rows_numpy(ids, offsets_H, num_rows)  # clamped per head
  all_rows = rows_BxTxH if batch_ids is None else lookup_reference.global_rows_numpy(
      np.asarray(batch_ids), offsets_H, num_rows)
  uniq = np.unique(all_rows.reshape(-1))
  row_ids_U = np.full(all_rows.size, num_rows, np.int32)
  row_ids_U[:uniq.size] = uniq
  inverse = np.searchsorted(uniq, rows_BxTxH).astype(np.int32)
  return row_ids_U, inverse, int(uniq.size)


def row_block(num_rows: int, index: int, count: int) -> tuple[int, int]:
  """Rows [start, stop) of a table that process `index` of `count` keeps: contiguous blocks of
  ceil(R / count) rows, the last one shorter."""
  per = -(-num_rows // count)
  start = index * per
  if start >= num_rows:
    raise ValueError(f"a table of {num_rows} rows cannot give each of {count} processes a "
                     "block of rows")
  return start, min(start + per, num_rows)


# ---- the row store and its training step ----------------------------------------------------------

@dataclasses.dataclass(eq=False)  # handles are compared by identity (fields hold arrays)
class PrefetchHandle:
  """Rows (and optimiser-state rows) of one step, on the device, for every layer.

  leaves: {layer: (table rows, state rows...)}, each a [D, U, ...] array over the mesh that
    sums to the rows (this process's rows on its table device, zeros elsewhere; padding slots
    are masked in `rows` and never written back); for a handle made by a step, a Future of
    them until the next `run` takes it.
  row_ids: {layer: int32[U], replicated}; inverse: {layer: int32[P*B, T, H], batch sharding}.
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
    tables: {layer_id: pinned_host array}: this process's block of rows of every table
      (`row_block`; one process: the whole [R, E] tables), all on one of its devices.
    offsets: {layer_id: int[H] per-head first rows} (`NgramHashMapping.offsets`).
    states: optional {layer_id: TableOptState} of the same rows in pinned host memory (zeros
      if None).
    num_rows: {layer_id: R} rows of the whole tables; default the blocks' rows (one process).
    batch_sharding: the sharding of the [P*B, T, H] inverse indices (the batch's, over the
      mesh the step runs on); default one replicated device, the tables'.
    process: (index, count) of this process in the job; default JAX's.
  """

  def __init__(self, cfg: table_optim.TableOptimizerConfig, tables: Mapping[int, jax.Array],
               offsets: Mapping[int, Any], states: Optional[Mapping] = None, *,
               num_rows: Optional[Mapping[int, int]] = None,
               batch_sharding: Optional[NamedSharding] = None,
               process: Optional[tuple[int, int]] = None):
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
    devices = {self._tables[l].sharding._device for l in self.layers}
    if len(devices) != 1:
      raise ValueError(f"HostTables: every table must be on one device, got {devices}")
    self._device = devices.pop()
    self.process = process or (jax.process_index(), jax.process_count())
    if num_rows is None and self.process[1] > 1:
      raise ValueError("HostTables: pass num_rows (the whole tables' rows) in a job of "
                       f"{self.process[1]} processes")
    self._num_rows = {l: int(self._tables[l].shape[0] if num_rows is None else num_rows[l])
                      for l in self.layers}
    self.blocks = {l: row_block(self._num_rows[l], *self.process) for l in self.layers}
    for l in self.layers:
      start, stop = self.blocks[l]
      if self._tables[l].shape[0] != stop - start:
        raise ValueError(f"HostTables: layer {l}'s block has {self._tables[l].shape[0]} rows; "
                         f"process {self.process[0]} of {self.process[1]} keeps rows "
                         f"[{start}, {stop}) of {self._num_rows[l]}")
    if batch_sharding is None:
      batch_sharding = NamedSharding(Mesh(np.array([self._device]), ("rows",)), PartitionSpec())
    self.batch_sharding = batch_sharding
    self.mesh = batch_sharding.mesh
    if self._device not in self.mesh.local_devices:
      raise ValueError(f"HostTables: the tables' device {self._device} is not in the mesh")
    self._replicated = NamedSharding(self.mesh, PartitionSpec())
    self._partial = NamedSharding(self.mesh, PartitionSpec(self.mesh.axis_names))
    self._zeros: dict = {}
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
    """Rows R of the whole table of layer `l` (this process keeps `blocks[l]` of them)."""
    return self._num_rows[l]

  def host_bytes(self) -> int:
    """Bytes of this process's blocks of the tables and their optimiser state."""
    return sum(a.nbytes for l in self.layers for a in self._arrays(l))

  def _owned(self, l, rid: np.ndarray, count: int) -> tuple[int, int]:
    """Slots [a, b) of the sorted row ids `rid[:count]` in this process's block; the last
    block takes every id from its start up (an id beyond R then fails loudly)."""
    start, stop = self.blocks[l]
    a = int(np.searchsorted(rid[:count], start))
    b = count if stop == self._num_rows[l] else int(np.searchsorted(rid[:count], stop))
    return a, b

  def _as_partial(self, x_1xU: jax.Array) -> jax.Array:
    """[D, U, ...] over the mesh from this process's [1, U, ...] rows on its table device:
    zeros on its other devices (cached: they are never donated)."""
    shape = (self.mesh.size,) + tuple(x_1xU.shape[1:])
    arrays = []
    for d in self._partial.addressable_devices_indices_map(shape):
      if d == self._device:
        arrays.append(x_1xU)
        continue
      key = (d, x_1xU.shape, x_1xU.dtype)
      if key not in self._zeros:
        self._zeros[key] = jax.device_put(np.zeros(x_1xU.shape, x_1xU.dtype), d)
      arrays.append(self._zeros[key])
    return jax.make_array_from_single_device_arrays(shape, self._partial, arrays)

  def _arrays(self, l):
    return (self._tables[l],) + tuple(x for x in self._states[l] if x is not None)

  def flush(self) -> None:
    """Waits for the host tasks of every step (re-raising a failed task's error)."""
    if self._worker is not None:
      self._worker.drain()

  # -- prefetch ------------------------------------------------------------------------------------

  @staticmethod
  def _gather_fn(arrays, gather_ids, owned):
    """[1, U, ...] device copies of `arr[ids]` where `owned`, zeros elsewhere, for every
    array; host gathers run as host compute."""
    def take(a, ids, own):
      rows = fetch_rows(a, ids)
      return jnp.where(own.reshape(own.shape + (1,) * (rows.ndim - 1)), rows, 0)[None]
    return {l: tuple(take(a, gather_ids[l], owned[l]) for a in arrs)
            for l, arrs in arrays.items()}

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
    handle, gathers = self._plan(ids, "prefetch", self._exchange(ids, "prefetch"), gather=True)
    arrays = {l: self._arrays(l) if for_update else self._arrays(l)[:1] for l in self.layers}
    handle.leaves = jax.tree.map(self._as_partial, self._gather(arrays, *gathers))
    if for_update:
      self._outstanding.append(handle)
    return handle

  def _exchange(self, ids: Mapping[int, np.ndarray], what: str) -> Optional[dict]:
    """{layer: [P*B, T, H]} the global batch's ids (every process's, in process order), or
    None in a one-process job."""
    if set(ids) != set(self.layers):
      raise ValueError(f"{what}: ids for layers {sorted(ids)}, HostTables has "
                       f"{list(self.layers)}")
    for l in self.layers:
      if isinstance(ids[l], jax.Array):
        raise ValueError(f"{what}: pass the batch's hash ids as NumPy (the pipeline's host "
                         "copy); rows are deduplicated on the host while the device computes")
    if self.process[1] == 1:
      return None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    got = multihost_utils.process_allgather({l: np.asarray(ids[l]) for l in self.layers})
    return {l: got[l].reshape((-1,) + got[l].shape[2:]) for l in self.layers}

  def _plan(self, ids: Mapping[int, np.ndarray], what: str, batch_ids: Optional[dict],
            gather: bool = False) -> tuple[PrefetchHandle, Optional[tuple]]:
    """NumPy dedup of the global batch (this process's `ids`, every process's `batch_ids`
    from `_exchange`) and the device copies of its row ids and this process's inverse; a
    handle without leaves, and with `gather` the in-block ids (others -> 0) in host memory
    and their ownership mask for `_gather`."""
    host = placement_sharding("pinned_host", self._device)
    dev = placement_sharding("device", self._device)
    gather_ids, owned, row_ids, inverse, host_ids = {}, {}, {}, {}, {}
    for l in self.layers:
      rid, inv, count = unique_rows_numpy(
          ids[l], self.offsets[l], self.num_rows(l),
          None if batch_ids is None else batch_ids[l])
      host_ids[l] = (rid, count)
      if gather:
        a, b = self._owned(l, rid, count)
        start, stop = self.blocks[l]
        gather_ids[l] = jax.device_put(np.clip(rid - start, 0, stop - start - 1), host)
        mask = np.zeros(rid.shape, bool)
        mask[a:b] = True
        owned[l] = jax.device_put(mask, dev)
      with _explicit_puts():
        row_ids[l] = jax.make_array_from_callback(rid.shape, self._replicated,
                                                  lambda idx, x=rid: x[idx])
        inverse[l] = jax.make_array_from_process_local_data(
            self.batch_sharding, inv, (inv.shape[0] * self.process[1],) + inv.shape[1:])
    handle = PrefetchHandle(None, row_ids, inverse, host_ids)
    return handle, ((gather_ids, owned) if gather else None)

  def rows(self, handle: PrefetchHandle) -> dict[int, PrefetchedRows]:
    """{layer: PrefetchedRows} on every device of the mesh (padding slots zero), for the
    model."""
    return {l: self._masked_rows(handle.leaves[l][0], handle.row_ids[l], handle.inverse[l],
                                 num_rows=self.num_rows(l)) for l in self.layers}

  @functools.cached_property
  def _masked_rows(self):
    out = PrefetchedRows(self._replicated, self.batch_sharding, self._replicated)
    return jax.jit(lambda w, rid, inv, num_rows: _masked_rows_fn(_summed(w), rid, inv, num_rows),
                   static_argnames="num_rows", out_shardings=out)

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
                threads: Optional[int] = None, out_shardings: Any = None) -> Callable:
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
    (`default_host_threads`). `out_shardings`: of the model step's outputs (None: the
    compiler's choice). Extra pinned host memory: two staging buffers of U rows per table
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
    pinned = placement_sharding("pinned_host", self._device)

    def program(model_state, inputs, leaves, row_ids, inverse, patch, step, *, has_patch,
                has_step):
      leaves = {l: tuple(jax.lax.with_sharding_constraint(_summed(x), self._replicated)
                         for x in leaves[l]) for l in self.layers}
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
        a, b = self._owned(l, rid, count)
        local = rid[a:b] - self.blocks[l][0]
        out = []
        for i, view in enumerate(views[l]):
          # Into a pinned staging buffer, so the copy to the device is one DMA (a pageable
          # NumPy source is copied far slower: `bench_offload --probe`).
          slot = worker.staging.take((l, i), (1, rid.shape[0]) + view.shape[1:], view.dtype,
                                     self._device)
          worker.gather(view, local, slot.view[0, a:b])
          slot.view[0, :a] = 0  # other blocks' rows (summed in on the device) and padding
          slot.view[0, b:] = 0  # slots (masked in `rows`, never written back)
          out.append(self._as_partial(slot.send(dev)))
        leaves[l] = tuple(out)
      return leaves

    def scatter_task(views, host_ids, new_leaves_host):
      # Pinned copies of the new rows (DMA, issued by `run`); ready once the program is done.
      jax.block_until_ready(new_leaves_host)
      for l in self.layers:
        rid, count = host_ids[l]
        a, b = self._owned(l, rid, count)
        local = rid[a:b] - self.blocks[l][0]
        for view, rows in zip(views[l], new_leaves_host[l]):
          worker.scatter(view, local, host_view(rows)[a:b])

    def prepare(handle, model_state, inputs, step):
      self._check_chain_handle(handle)
      if isinstance(handle.leaves, Future):
        handle.leaves = worker.result(handle.leaves)
      step_arr = _step_array(step, self._replicated)
      flags = (handle.patch is not None, step is not None)
      if flags not in cache:
        cache[flags] = jax.jit(functools.partial(
            program, has_patch=flags[0], has_step=flags[1]),
            donate_argnums=(0,) if donate_state else (),
            out_shardings=(out_shardings, self._replicated))
      args = (model_state, inputs, handle.leaves, handle.row_ids, handle.inverse, handle.patch,
              step_arr)
      return cache[flags], args

    def run(handle: PrefetchHandle, next_ids, state, inputs, step=None):
      fn, args = prepare(handle, state, inputs, step)
      batch_ids = None if next_ids is None else self._exchange(next_ids, "host-table step")
      outputs, new_leaves = fn(*args)
      # After the dispatch: the dedup of s+1 runs while step s computes.
      nxt = None if next_ids is None else self._plan(next_ids, "host-table step", batch_ids)[0]
      self._outstanding.remove(handle)
      handle.consumed = True
      views = {l: tuple(host_view(a) for a in self._arrays(l)) for l in self.layers}
      if nxt is not None:   # queued before this step's write: it runs while this step computes
        nxt.leaves = worker.submit(gather_task, views, nxt.host_ids)
        nxt.patch = (handle.row_ids, new_leaves)
        nxt.from_step = True
        self._outstanding.append(nxt)
      # Every device holds the new rows; this process writes its own from its table device.
      mine = jax.tree.map(lambda x: jax.device_put(self._local_shard(x), pinned), new_leaves)
      worker.submit(scatter_task, views, handle.host_ids, mine)
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
    _, gathers = self._plan(ids, "compiled_gather_text",
                            self._exchange(ids, "compiled_gather_text"), gather=True)
    arrays = {l: self._arrays(l) for l in self.layers}
    return self._gather.lower(arrays, *gathers).compile().as_text()

  def _local_shard(self, x: jax.Array) -> jax.Array:
    """The copy of a replicated array on this process's table device."""
    return next(s.data for s in x.addressable_shards if s.device == self._device)


def _summed(x_DxU: jax.Array) -> jax.Array:
  """The rows of a [D, U, ...] array of the processes' parts, on every device: each row is
  non-zero in one part only, so the sum is exact."""
  return jnp.sum(x_DxU, axis=0, dtype=x_DxU.dtype)


def _step_array(step, sharding) -> jax.Array:
  """The optimiser's step count as an int32 on `sharding` (0 for None): an explicit put, since a
  Python scalar would be an implicit transfer (transfer_guard)."""
  if isinstance(step, jax.Array):
    return step
  value = np.asarray(0 if step is None else step, np.int32)
  with _explicit_puts():
    return jax.make_array_from_callback((), sharding, lambda idx: value[idx])


def _explicit_puts():
  """These global-array constructors copy NumPy shards to their devices on purpose; a
  `transfer_guard('disallow')` around a step must not take them for implicit transfers."""
  return jax.transfer_guard_host_to_device("allow")


def _masked_rows_fn(w_UxE, row_ids_U, inverse_BxTxH, num_rows):
  valid_U1 = (row_ids_U < num_rows)[:, None]
  return PrefetchedRows(jnp.where(valid_U1, w_UxE, 0).astype(w_UxE.dtype), inverse_BxTxH,
                        row_ids_U)


def _patch(row_ids_V, leaves_V, row_ids_U, new_leaves_U, num_rows):
  """Replaces rows of a prefetched handle (ids V) that an update (ids U, sorted) just changed."""
  pos_V = jnp.clip(jnp.searchsorted(row_ids_U, row_ids_V), 0, row_ids_U.shape[0] - 1)
  hit_V = (row_ids_U[pos_V] == row_ids_V) & (row_ids_V < num_rows)
  out = []
  for old, new in zip(leaves_V, new_leaves_U):
    hit = hit_V.reshape(hit_V.shape + (1,) * (old.ndim - 1))
    out.append(jnp.where(hit, new[pos_V].astype(old.dtype), old))
  return tuple(out)
