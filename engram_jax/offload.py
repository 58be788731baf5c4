"""Engram tables in pinned host memory: placement, deterministic prefetch, row-sparse updates.

Engram addresses depend only on input tokens, so the rows a step reads are known as soon as its
batch exists. A table (and its row-sparse optimiser state) can therefore live in host memory
(`memory_kind='pinned_host'`) and only the rows of a batch cross PCIe.

Placement, per Engram layer: 'device' (HBM) or 'pinned_host'. `create_table` allocates a table
directly in its memory and fills it in row chunks, so a table larger than HBM never passes
through the device; `check_host_allocation` refuses a request larger than the host can give
(MemAvailable, and on GPU the pinned pool, 64 GiB unless `XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB`
raises it) with a ValueError *before* anything is allocated.

Training (`HostTableTrainer`), one step s:

  rows = trainer.rows(h_s)                     # {layer: PrefetchedRows} on the device
  params, grads = model_step(params, rows, batch_s)   # dispatched, runs asynchronously
  h_next = trainer.prefetch(ids of step s+1)   # NumPy unique on the CPU while step s runs,
                                               # then host gather -> HBM (queued)
  trainer.apply_grad(h_s, grads, lr)           # rows update on device, host scatter in place
  h_s = h_next

(`prefetch(s+1)` may also be called before the step; any order before `apply_grad(s)` is
correct, see Coherence.)

`prefetch` gathers the U touched rows of the table *and of its optimiser state* inside one jit
whose operands are the pinned_host arrays and host row ids (`arr.at[ids].get(mode=
'promise_in_bounds')`; XLA's host offloader runs the gather on the CPU) and whose outputs are
device arrays (an async copy-start/copy-done). `apply_grad` runs the optimiser of
`engram_jax.table_optim` on the device over the U gathered rows (a "mini table" of U rows: the
arithmetic is exactly the HBM placement's), then scatters the new rows back into the host arrays
in a second jit with those arrays donated (`set(mode='drop')` under host compute, in place).
Neither a table nor its state ever leaves host memory as a whole: only U rows move each way.

Why the optimiser arithmetic runs on the device: in jax 0.11.2 a gather with mode='fill' (what
table_optim uses for padding) needs device-resident bound constants and fails on host operands,
`compute_on('device_host')` gathers/scatters measured 30-200x slower than the host offloader's
plain gather/scatter on the H200, and the U-row arithmetic is free on the GPU. The rows already
travel to the device for the forward, so only the moments' rows are extra traffic.

Threaded steps (`make_threaded_step`, the trainer's default `engram.host_step='threads'`): the
same arithmetic, but XLA never touches the host arrays during training. Each step is one device
program (patch the rows with the previous step's update, model step, row update); NumPy worker
threads gather the next step's rows from writable views of the pinned_host buffers
(`host_view`) into pinned staging buffers and copy them to the device, then write the step's
updated rows (copied to pinned host memory as the step ends) back in place, all while the
device computes. On the H200 it is the fastest host pipeline and the only one whose rows agree
with the HBM placement's at the end of bench_offload's runs (~3.5B stand-in, 32 GB of tables:
+0.6% per step over HBM, fused +4.6-4.8%; 0.5B stand-in, 1 GB: +7.8%, fused +25.1%).

Direct reads (`direct_rows`): on a GPU, a Pallas-Triton gather takes a pinned_host table as an
operand and reads its rows in place over PCIe (the buffer is mapped into the GPU's address
space); the ids stay on the device and the CPU does nothing. Decoding uses it for each token's
few thousand rows (engram_jax/generate.py). Training does not: random host rows cost per row
(~30-40M rows/s on the H200), so a step's 262,144 rows would take ~7 ms on the GPU stream,
while the threaded step gathers them off the stream.

Coherence: `prefetch(s+1)` is dispatched before `apply_grad(s)`, so its rows may predate step s's
update. `apply_grad` patches every outstanding handle with the rows it just updated (sorted-id
`searchsorted` on the device), so the rows step s+1 reads equal the table after step s exactly,
as with the HBM placement (tests/test_offload.py checks losses and updated rows step by step).

Overlap: all of the above is asynchronous dispatch; the NumPy `unique` of step s+1 runs on the
Python thread while the device executes step s. On the H200 with jax 0.11.2 separate programs
execute in order on the device's stream, so a separate host gather or scatter adds its time to
the step (`experiments/bench_offload.py --probe`: a 48.29 ms matmul program followed by a
3.60 ms host gather program took 50.71 ms). Inside ONE program XLA's host offloader overlaps
part of it (the same matmul and gather as one program: 49.86 ms). `make_fused_step` therefore
builds one program per training step: scatter of step s-1's update and gather of step s+1's
rows (host), model step s and its row update (device), patch of s+1's rows. Its update stays
pending until the next program or a read of `tables` / `states` (which flushes it).

Dimension legend: B batch, T time, H hash heads, E row width, R table rows, U = B*T*H row slots
(sorted unique rows of a batch, padded with R), L Engram layers.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from engram_jax import table_optim
from pallas_kernels.engram_lookup import gpu as lookup_gpu
from pallas_kernels.engram_lookup import reference as lookup_reference
from pallas_kernels.engram_lookup.api import current_platform
from pallas_kernels.engram_lookup.configs import GpuLookupConfig
from pallas_kernels.engram_lookup.row_sparse import PrefetchedRows, RowSparse

PLACEMENTS = ("device", "pinned_host")
_MEMORY_KIND = {"device": "device", "pinned_host": "pinned_host"}
GPU_PINNED_POOL_DEFAULT_GB = 64
DEFAULT_CHUNK_BYTES = 256 * 2**20


# ---- host memory accounting ---------------------------------------------------------------------

def mem_available_bytes() -> int:
  """MemAvailable of /proc/meminfo (what can be allocated without swapping)."""
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  raise RuntimeError("/proc/meminfo has no MemAvailable line")


def host_memory_limit_bytes(device: Optional[jax.Device] = None) -> tuple[int, str]:
  """The most pinned host memory one more allocation may take, and why."""
  device = device or jax.devices()[0]
  avail = mem_available_bytes()
  limit, why = avail, f"MemAvailable {avail / 2**30:.1f} GiB"
  if device.platform == "gpu":
    gb = float(os.environ.get("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", GPU_PINNED_POOL_DEFAULT_GB))
    pool = int(gb * 2**30)
    if pool < limit:
      limit, why = pool, (f"the GPU pinned host pool of {gb:g} GiB "
                          "(raise XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB before jax starts)")
  return limit, why


def check_host_allocation(nbytes: int, *, what: str = "host allocation",
                          already_allocated: int = 0,
                          device: Optional[jax.Device] = None) -> None:
  """Raises ValueError if `nbytes` more pinned host bytes cannot be had; allocates nothing.

  `already_allocated` counts pinned bytes this process holds (they are inside the GPU pool cap
  but no longer in MemAvailable, so they only count against the pool).
  """
  limit, why = host_memory_limit_bytes(device)
  is_pool = "pool" in why
  need = nbytes + (already_allocated if is_pool else 0)
  if need > limit:
    raise ValueError(f"{what}: needs {nbytes / 2**30:.2f} GiB of pinned host memory"
                     f"{f' (+{already_allocated / 2**30:.2f} GiB held)' if is_pool else ''} "
                     f"but the limit is {why}; use a smaller table, fewer layers on the host, "
                     "bfloat16 moments, or a machine with more memory")


# ---- placement and creation ---------------------------------------------------------------------

def placement_sharding(placement: str, device: Optional[jax.Device] = None
                       ) -> SingleDeviceSharding:
  """The sharding of a table with this placement (one device; see module docstring)."""
  if placement not in PLACEMENTS:
    raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
  return SingleDeviceSharding(device or jax.devices()[0], memory_kind=_MEMORY_KIND[placement])


def placement_of(x: jax.Array) -> str:
  kind = x.sharding.memory_kind
  for p, k in _MEMORY_KIND.items():
    if kind == k:
      return p
  raise ValueError(f"array has memory kind {kind!r}, not one of {PLACEMENTS}")


def _space(placement: str):
  return jax.memory.Space.Host if placement == "pinned_host" else jax.memory.Space.Device


def zeros(shape, dtype, placement: str, device: Optional[jax.Device] = None) -> jax.Array:
  """A zero array allocated directly in `placement`'s memory.

  Host: a calloc'd NumPy buffer (untouched pages read as the shared zero page, so it costs no
  memory) is copied into a pinned buffer; nothing goes through HBM. The request is checked
  against `check_host_allocation` first.
  """
  shape, dtype = tuple(int(s) for s in shape), np.dtype(dtype)
  sharding = placement_sharding(placement, device)
  if placement == "pinned_host":
    check_host_allocation(int(np.prod(shape)) * dtype.itemsize, what=f"zeros{shape} {dtype}",
                          device=sharding._device)
    return jax.device_put(np.zeros(shape, dtype), sharding)
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


def chunk_rows_for(row_bytes: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
  return max(1, chunk_bytes // max(1, row_bytes))


def _fill_chunk_fn(placement: str, chunk_rows: int):
  space = _space(placement)

  def fill(table_RxE, key, chunk_index, start, std):
    chunk = std * jax.random.normal(jax.random.fold_in(key, chunk_index),
                                    (chunk_rows, table_RxE.shape[1]), jnp.float32)
    # Drawn on the device (one chunk of HBM), written into the table where it lives.
    chunk = jax.device_put(chunk.astype(table_RxE.dtype), space)
    return jax.lax.dynamic_update_slice(table_RxE, chunk, (start, 0))
  return fill


def create_table(num_rows: int, width: int, dtype, placement: str, *, std: float = 1.0,
                 seed: int = 0, chunk_rows: int = 65536,
                 device: Optional[jax.Device] = None) -> jax.Array:
  """An `[R, E]` table ~ N(0, std^2), allocated in `placement` and filled chunk by chunk.

  Chunk c (rows [c*chunk_rows, ...)) is drawn on the device from `fold_in(key(seed), c)` and
  written in place (donated dynamic_update_slice), so HBM holds one chunk at a time and the
  values depend on (seed, chunk_rows) but not on the placement: a host table equals the device
  table made with the same arguments. The last chunk is drawn in full and clipped by starting it
  at R - chunk_rows (its overlap is overwritten with the same-chunk values' tail, so it is
  deterministic too).
  """
  if num_rows < 1 or width < 1:
    raise ValueError(f"create_table: need num_rows, width >= 1, got {num_rows}, {width}")
  chunk_rows = int(min(chunk_rows, num_rows))
  table = zeros((num_rows, width), dtype, placement, device)
  sharding = placement_sharding(placement, device)
  fill_jit = jax.jit(_fill_chunk_fn(placement, chunk_rows), donate_argnums=0,
                     out_shardings=sharding)
  key = jax.random.key(seed)
  for c, start in enumerate(range(0, num_rows, chunk_rows)):
    start = min(start, num_rows - chunk_rows)
    table = fill_jit(table, key, np.int32(c), np.int32(start), np.float32(std))
  return table


def place_state(state: table_optim.TableOptState, placement: str,
                device: Optional[jax.Device] = None) -> table_optim.TableOptState:
  """Zero optimiser state in `placement` (shapes from `state`, usually init_table_state_shapes)."""
  return table_optim.TableOptState(
      *(None if s is None else zeros(*s, placement, device) for s in state))


def init_state(cfg: table_optim.TableOptimizerConfig, table_RxE: jax.Array
               ) -> table_optim.TableOptState:
  """`table_optim.init_table_state`, allocated directly where `table_RxE` lives."""
  shapes = table_optim.init_table_state_shapes(cfg, *table_RxE.shape)
  return place_state(shapes, placement_of(table_RxE), table_RxE.sharding._device)


# ---- unique rows on the host --------------------------------------------------------------------

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


@jax.jit
def fetch_rows(table_RxE: jax.Array, ids_N: jax.Array) -> jax.Array:
  """`table[ids]` as a device array, from a table in any placement. `ids` must be in bounds
  and live where the table lives (a pinned_host table is gathered by host compute, then the
  rows are copied to the device). The trainer's gathers, the generators' fetches and the
  benchmarks' row reads all go through it."""
  return jax.device_put(table_RxE.at[ids_N].get(mode="promise_in_bounds"),
                        jax.memory.Space.Device)


DIRECT_SORT_MIN_ROWS = 4096


def direct_rows(table_RxE: jax.Array, rows_N: jax.Array, *, interpret: bool = False,
                config: Optional[GpuLookupConfig] = None,
                sort: Optional[bool] = None) -> jax.Array:
  """`table[rows]` as a device array, read by the GPU straight out of a pinned_host table.

  The Pallas-Triton gather (`pallas_kernels/engram_lookup/gpu.py`) takes the pinned_host table
  as an operand: XLA hands the kernel the host buffer's address (the operand stays in memory
  space S(5), nothing copies it), and since pinned host memory is mapped into the GPU's unified
  virtual address space the kernel's loads travel over PCIe, one request per row. The row ids
  stay on the device: no device-to-host transfer, no host computation, nothing on the CPU.
  Row ids are global and clamped into [0, R) by the kernel (a wild id can never read outside
  the table). Use inside jit with the table as an argument (not a closed-over constant).

  sort: read the rows in ascending id order (one `lax.sort` of the ids with their positions,
  then a scatter of the rows back into place, both on the device). Default: for N >=
  DIRECT_SORT_MIN_ROWS. Random host rows cost per row, not per byte: each touches a new
  4 KiB page, so what limits the read is the translation of page addresses, and neighbouring
  ids share it.

  Measured on the H200 (GPU kernel time of the read alone, tables of 8-16 GiB, uniformly random
  rows, each id set read once): 1,024 rows 9.0 us (f32) / 6.2 us (bf16); 8,192 rows 83 us
  (sorted 58); 65,536 rows 1.87 ms (sorted 1.67); 1,835,008 rows (a 512 x 112 prompt's, two
  layers) 57.3 ms, sorted 9.1 ms, against 54.4 ms of wall time for XLA's host gather and copy.
  bf16 rows take as long as f32 ones; the block config hardly matters (8-256 rows per program
  within 3%). So per-token decoding reads are cheap and a whole training batch is not.

  GPU only; `interpret=True` runs the kernel in the Pallas interpreter (tests on CPU).
  """
  space = jax.typeof(table_RxE).memory_space
  if space != jax.memory.Space.Host:
    raise ValueError(f"direct_rows reads pinned_host tables; this one is in {space} memory "
                     "(gather it with jnp.take)")
  if isinstance(table_RxE, jax.core.Tracer):
    platform = current_platform()
  else:
    platform = next(iter(table_RxE.sharding.device_set)).platform
  if platform != "gpu" and not interpret:
    raise ValueError(f"direct_rows: the GPU reads host memory directly; on {platform} pass "
                     "interpret=True (tests) or gather with fetch_rows")
  rows_N = rows_N.astype(jnp.int32)
  read = functools.partial(lookup_gpu.gather, table_RxE, offsets_H=jnp.zeros((1,), jnp.int32),
                           config=config or GpuLookupConfig(), interpret=interpret)
  if not (rows_N.shape[0] >= DIRECT_SORT_MIN_ROWS if sort is None else sort):
    return read(rows_N)
  sorted_N, position_N = jax.lax.sort_key_val(
      rows_N, jax.lax.iota(jnp.int32, rows_N.shape[0]))
  got_NxE = read(sorted_N)
  return jnp.zeros_like(got_NxE).at[position_N].set(got_NxE, unique_indices=True)


def bucketed_slots(count: int, slots: int, buckets: int) -> int:
  """Row slots a step with `count` unique rows (out of `slots` = B*T*H) is given: `slots` when
  `buckets` <= 0, else `count` rounded up to a multiple of ceil(slots / buckets) (so at most
  `buckets` distinct shapes, hence compiles, and at most slots / buckets padding)."""
  if buckets <= 0:
    return slots
  step = -(-slots // buckets)
  return min(slots, max(step, -(-count // step) * step))


# ---- NumPy access to host tables (threaded steps) ----------------------------------------------

def host_view(x: jax.Array) -> np.ndarray:
  """A writable NumPy view of a one-device pinned_host array's buffer (no copy).

  The view aliases memory XLA owns: a write through it is seen by every later program that reads
  `x`, and nothing orders it against programs already dispatched. The caller must (the threaded
  step writes only after the programs that read the rows have finished, and reading
  `HostTableTrainer.tables` waits for those writes). Blocks until `x` is ready first: an array
  just made by `device_put` (or a program) may still be being written, and on the H200 a view
  taken before that showed the late write (zeros over gathered rows: `check_host_rows`, threaded
  steps, max |diff| 1.7e7 before this wait). Raises ValueError for other placements, several
  shards or a buffer that is not one dense row-major block.
  """
  if placement_of(x) != "pinned_host":
    raise ValueError(f"host_view: needs a pinned_host array, got {x.sharding.memory_kind!r}")
  if len(x.addressable_shards) != 1 or len(x.sharding.device_set) != 1:
    raise ValueError("host_view: needs a single-device array")
  layout = x.format.layout
  if tuple(layout.major_to_minor) != tuple(range(x.ndim)) or tuple(layout.tiling):
    raise ValueError(f"host_view: the buffer is not dense row-major ({layout})")
  nbytes = int(x.size) * x.dtype.itemsize
  x.block_until_ready()
  ptr = x.addressable_data(0).unsafe_buffer_pointer()
  return np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), x.dtype).reshape(x.shape)


def default_host_threads() -> int:
  """Row-chunk threads of a threaded step: half the CPUs, at most 8 (the other half keeps
  feeding the device). `bench_offload --probe` on the H200's host (16 CPUs), 262,144 random
  256-byte rows of a 4 GiB pinned_host table: gather 45.20 / 6.44 / 4.61 ms and scatter
  23.89 / 5.82 / 4.33 ms with 1 / 8 / 16 threads."""
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


class _HostWorker:
  """The host side of threaded steps: one ordered queue (its own thread) whose tasks split each
  gather / scatter into row chunks run by a pool of `threads` (NumPy's take and fancy
  assignment release the GIL), and the pinned staging buffers of the gathers. `drain` waits
  for every task and re-raises the first error."""

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


# ---- the trainer ---------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)  # handles are compared by identity (fields hold arrays)
class PrefetchHandle:
  """Rows (and optimiser-state rows) of one step, on the device, for every layer.

  leaves: {layer: (table rows, state rows...)} device arrays, U rows each (padding slots hold
    row R-1 or stale values: they are masked in `rows` and dropped by every scatter). U is
    B*T*H, or with `row_buckets` the step's unique-row count rounded up to a bucket.
  row_ids: {layer: int32[U] device}; row_ids_home: {layer: int32[U]} in the table's memory
    (host ids for host tables: host gathers and scatters need every operand in host memory).
  inverse: {layer: int32[B, T, H] device}.
  """
  leaves: dict
  row_ids: dict
  row_ids_home: dict
  inverse: dict
  consumed: bool = False
  # host_ids: {layer: (int32[U] NumPy row ids, unique count)}, what the NumPy scatter of a
  # threaded step writes. patch, threaded: a handle made by a threaded step (`leaves` then is a
  # Future until that step's `run` takes it) and the (row_ids, new leaves) of the update its
  # program patches in first.
  host_ids: Optional[dict] = None
  patch: Optional[tuple] = None
  threaded: bool = False


class HostTableTrainer:
  """Owns the Engram tables (any mix of 'device' and 'pinned_host') and their row-sparse state.

  Three pipelines train them (module docstring): `prefetch` + `apply_grad` (separate programs),
  `make_fused_step` (one program with XLA host compute) and `make_threaded_step` (one device
  program; NumPy threads do the host side; pinned_host tables only; the fastest on the H200
  and the trainer's default).

  Args:
    cfg: a sparse `TableOptimizerConfig` ('lazy_adam' or 'adagrad').
    tables: {layer_id: [R, E] array}; each table's memory kind is its placement.
    offsets: {layer_id: int[H] per-head first rows} (`NgramHashMapping.offsets`).
    states: optional {layer_id: TableOptState} in the same memory as the table (zeros if None).
    row_buckets: 0 (default): every step moves U = B*T*H row slots per layer, whatever its
      unique-row count. k > 0: a step moves its largest per-layer unique count rounded up to a
      multiple of ceil(U / k), so gathers, transfers and scatters shrink with the batch's
      repetition (`bench_offload --tokens corpus`, B=8, T=2048, H=16: 198,349 of 262,144 slots
      unique on the shipped corpus, 243,628 with Zipf tokens) at the cost of up to k shapes
      of every program that takes the rows (jitted code recompiles per shape; a step
      compiled ahead of time for U rows cannot take them). Settable as an attribute.
      Measured slower on the H200 (jax 0.11.2), cause unknown: `bench_offload --d 4096
      --blocks 24 --remat`, Zipf tokens, 16 buckets at 8 GB: +59.5% (separate) / +39.3%
      (fused) per step over HBM, against +5.8% / +4.4% at 32 GB without buckets. No program
      recompiles in the timed steps (checked on CPU with jax_log_compiles).
    allow_xla_host_writes: on a GPU with pinned_host tables, `apply_grad` and
      `make_fused_step` raise RuntimeError unless this is True (they then warn once): there
      they wrote wrong rows over multi-step chains (`_check_xla_host_writes`). No effect on
      other platforms (the CPU backend's results are exact, tests/test_offload.py). Keeping
      the host operands of the scatters alive longer does not fix it (check_host_rows at
      f518b64, H200), so it is not a buffer freed early.
  """

  def __init__(self, cfg: table_optim.TableOptimizerConfig, tables: Mapping[int, jax.Array],
               offsets: Mapping[int, Any], states: Optional[Mapping] = None,
               row_buckets: int = 0, allow_xla_host_writes: bool = False):
    if cfg.kind not in table_optim.SPARSE_KINDS:
      raise ValueError(f"HostTableTrainer needs a sparse optimiser kind "
                       f"{table_optim.SPARSE_KINDS}, got {cfg.kind!r}")
    self.cfg = cfg
    self.row_buckets = int(row_buckets)
    self.layers = tuple(sorted(tables))
    if set(offsets) != set(self.layers):
      raise ValueError(f"offsets layers {sorted(offsets)} != tables layers {list(self.layers)}")
    self._tables = dict(tables)
    self.offsets = {l: np.asarray(offsets[l], np.int64) for l in self.layers}
    self.placements = {l: placement_of(self._tables[l]) for l in self.layers}
    self._states = dict(states) if states is not None else {
        l: init_state(cfg, self._tables[l]) for l in self.layers}
    for l in self.layers:
      for leaf in jax.tree.leaves(self._states[l]):
        if placement_of(leaf) != self.placements[l]:
          raise ValueError(f"layer {l}: optimiser state in {placement_of(leaf)} but table in "
                           f"{self.placements[l]}; state must live with its table")
    self._outstanding: list[PrefetchHandle] = []
    # (row_ids_home, new leaves) of the last fused step, scattered by the next program.
    self._pending: Optional[tuple[dict, dict]] = None
    self._gather = jax.jit(self._gather_fn)
    self._update = jax.jit(self._update_home_fn, static_argnames=("has_step",))
    self._scatter = jax.jit(self._scatter_fn, donate_argnums=0)
    self._device = next(iter(self._tables.values())).sharding._device
    self._worker: Optional[_HostWorker] = None  # made by make_threaded_step
    self.allow_xla_host_writes = bool(allow_xla_host_writes)
    self._warned = False

  # -- arrays ---------------------------------------------------------------------------------------

  @property
  def tables(self) -> dict:
    """{layer: table}, with every update applied (a fused step's last update is flushed)."""
    self.flush()
    return self._tables

  @property
  def states(self) -> dict:
    """{layer: TableOptState}, with every update applied."""
    self.flush()
    return self._states

  def num_rows(self, l) -> int:
    return self._tables[l].shape[0]

  def _arrays(self, l):
    return (self._tables[l],) + tuple(x for x in self._states[l] if x is not None)

  def _set_arrays(self, l, arrays):
    self._tables[l] = arrays[0]
    it = iter(arrays[1:])
    self._states[l] = table_optim.TableOptState(
        *[None if x is None else next(it) for x in self._states[l]])

  def flush(self) -> None:
    """Scatters the update a fused step left pending into the tables, and waits for a threaded
    step's host work (re-raising its errors); a no-op if there is none."""
    if self._worker is not None:
      self._worker.drain()
    if self._pending is None:
      return
    row_ids_home, new_leaves = self._pending
    self._pending = None
    out = self._scatter({l: self._arrays(l) for l in self.layers}, row_ids_home, new_leaves)
    for l in self.layers:
      self._set_arrays(l, out[l])

  # -- prefetch ------------------------------------------------------------------------------------

  @staticmethod
  def _gather_fn(arrays, gather_ids):
    """Device copies of `arr[ids]` for every array; host gathers run as host compute."""
    return {l: tuple(fetch_rows(a, gather_ids[l]) for a in arrs) for l, arrs in arrays.items()}

  def prefetch(self, ids: Mapping[int, np.ndarray], *, for_update: bool = True,
               bucketed: bool = True) -> PrefetchHandle:
    """Starts fetching the rows a batch will read; `ids` are host hash ids {layer: [B, T, H]}.

    The NumPy dedup runs on the calling thread; the gather is dispatched asynchronously. Call it
    for step s+1 after dispatching step s (the dedup then overlaps step s) and before
    `apply_grad(s)`; the handle is patched by every `apply_grad` issued after it.
    `for_update=False` (evaluation): table rows only, no optimiser-state rows, and the handle is
    not tracked, so it is neither patched nor accepted by `apply_grad`; read its rows before the
    next `apply_grad`. `bucketed=False`: U = B*T*H slots even with `row_buckets` (for a step
    compiled ahead of time for that shape).
    """
    self.flush()  # the gather must see every update
    if for_update:
      self._refuse_threaded("prefetch")
    handle, gather_ids = self._plan(ids, "prefetch", bucketed)
    arrays = {l: self._arrays(l) if for_update else self._arrays(l)[:1] for l in self.layers}
    handle.leaves = self._gather(arrays, gather_ids)
    if for_update:
      self._outstanding.append(handle)
    return handle

  def _plan(self, ids: Mapping[int, np.ndarray], what: str, bucketed: bool = True,
            home: bool = True) -> tuple[PrefetchHandle, Optional[dict]]:
    """NumPy dedup of a batch's ids and their device/host copies; a handle without leaves.
    `home=False` (threaded steps, whose host side is NumPy): no copies of the ids into the
    tables' memory, and no gather ids (None)."""
    if set(ids) != set(self.layers):
      raise ValueError(f"{what}: ids for layers {sorted(ids)}, trainer has {list(self.layers)}")
    dev = placement_sharding("device", self._device)
    gather_ids, row_ids, row_ids_home, inverse, host_ids = {}, {}, {}, {}, {}
    planned = {}
    for l in self.layers:
      if isinstance(ids[l], jax.Array):
        raise ValueError(f"{what}: pass the batch's hash ids as NumPy (the pipeline's host "
                         "copy); rows are deduplicated on the host while the device computes")
      planned[l] = unique_rows_numpy(ids[l], self.offsets[l], self.num_rows(l))
    # One U for all layers (the programs take every layer's rows): the largest count's bucket.
    u = bucketed_slots(max(n for _, _, n in planned.values()),
                       min(rid.shape[0] for rid, _, _ in planned.values()),
                       self.row_buckets if bucketed else 0)
    for l in self.layers:
      num_rows = self.num_rows(l)
      rid, inv, count = planned[l]
      rid = rid[:u]  # sorted unique ids first, then padding R: the count fits in u
      host_ids[l] = (rid, count)
      if home:
        place = placement_sharding(self.placements[l], self._device)
        # The gather reads in-bounds ids (padding -> R-1); scatters use `rid` (padding R,
        # dropped).
        gather_ids[l] = jax.device_put(np.minimum(rid, num_rows - 1), place)
        row_ids_home[l] = jax.device_put(rid, place)
      row_ids[l] = jax.device_put(rid, dev)
      inverse[l] = jax.device_put(inv, dev)
    handle = PrefetchHandle(None, row_ids, row_ids_home if home else None, inverse,
                            host_ids=host_ids)
    return handle, (gather_ids if home else None)

  def rows(self, handle: PrefetchHandle) -> dict[int, PrefetchedRows]:
    """{layer: PrefetchedRows} on the device (padding slots zero), for the model."""
    out = {}
    for l in self.layers:
      out[l] = _masked_rows(handle.leaves[l][0], handle.row_ids[l], handle.inverse[l],
                            num_rows=self.num_rows(l))
    return out

  def _check_xla_host_writes(self, what: str) -> None:
    """On a GPU with host tables, the XLA host-compute write paths are refused unless the
    trainer was made with `allow_xla_host_writes=True` (then they warn once)."""
    if self._device.platform != "gpu" or "pinned_host" not in self.placements.values():
      return
    msg = (f"{what}: on the H200 (jax 0.11.2) host tables updated through XLA host compute "
           "(apply_grad, make_fused_step) come out wrong: experiments/check_host_rows finds "
           "rows up to 1.7e7 from the HBM placement's after 8 separate or fused steps in some "
           "runs (which chains differ changes from run to run), while make_threaded_step "
           "stays exact; the cause is not found. Use "
           "make_threaded_step (engram.host_step='threads')")
    if not self.allow_xla_host_writes:
      raise RuntimeError(msg + ", or pass HostTableTrainer(allow_xla_host_writes=True) to run "
                         "them anyway (benchmarks, diagnosis).")
    if not self._warned:
      self._warned = True
      warnings.warn(msg + ".", RuntimeWarning, stacklevel=3)

  def _check_chain_handle(self, handle: PrefetchHandle, what: str) -> None:
    """A fused / threaded step takes the one outstanding handle: from `prefetch` or its own
    previous call, not applied yet."""
    if handle.consumed or handle not in self._outstanding:
      raise ValueError(f"{what}: handle must come from this trainer's prefetch (or the "
                       f"previous {what}) and not be applied yet")
    if len(self._outstanding) != 1:
      raise ValueError(f"{what}: another prefetched handle is outstanding; a {what} only keeps "
                       "the next step's rows coherent")

  def _refuse_threaded(self, what: str) -> None:
    """A threaded step's next handle is patched by its consumer only (see make_threaded_step)."""
    if any(h.threaded for h in self._outstanding):
      raise ValueError(f"{what}: the handle returned by a threaded step is outstanding; pass it "
                       "to that step's `run` (with next_ids=None to end the chain) first")

  # -- update --------------------------------------------------------------------------------------

  def _update_fn(self, leaves, row_ids, grads, pending, lr, step, has_step):
    """Optimiser on the U gathered rows of every layer; patches `pending` handles' leaves."""
    new_leaves, patched = {}, [{} for _ in pending]
    for l in self.layers:
      num_rows = self.num_rows(l)
      w_UxE, *state_rows = leaves[l]
      rid = row_ids[l]
      u = rid.shape[0]
      local_U = jnp.where(rid < num_rows, jnp.arange(u, dtype=jnp.int32), u)
      it = iter(state_rows)
      mini_state = table_optim.TableOptState(
          *[None if x is None else next(it) for x in self._states[l]])
      g = grads[l]
      new_w, new_state = table_optim.apply_row_sparse_update(
          self.cfg, w_UxE, mini_state, RowSparse(local_U, g), lr,
          step=step if has_step else None)
      new_leaves[l] = (new_w,) + tuple(x for x in new_state if x is not None)
      for p, out in zip(pending, patched):
        p_rid, p_leaves = p[l]
        out[l] = _patch(p_rid, p_leaves, rid, new_leaves[l], num_rows)
    return new_leaves, patched

  def _update_home_fn(self, *args, **kw):
    """`_update_fn` whose new rows are output in the tables' memory (for `_scatter_fn`)."""
    new_leaves, patched = self._update_fn(*args, **kw)
    return self._to_home(new_leaves), patched

  @staticmethod
  def _scatter_fn(arrays, row_ids_home, new_leaves):
    """`arr[rid] = new` for every array, in place (donated); padding ids (R) are dropped.

    `new_leaves` must already be in the arrays' memory, put there by an earlier program (the
    update's own output, `_to_home` inside it) or transfer: on the H200 (jax 0.11.2) a
    device-to-host copy of the new rows inside the same program as the host scatter that reads
    them raced with it, and some rows were written with values that had not arrived
    (`python -m experiments.check_host_rows`: max |diff| 320, 64, 64 and 832 in four runs,
    262,144 rows of a 16.8M-row table; 0 when the rows reached the host before the scatter's
    program, as they do here).
    """
    out = {}
    for l, arrs in arrays.items():
      rid = row_ids_home[l]
      space = jax.typeof(arrs[0]).memory_space
      for v in new_leaves[l]:
        if jax.typeof(v).memory_space != space:
          raise ValueError(f"layer {l}: scatter values in {jax.typeof(v).memory_space}, table "
                           f"in {space}; move them with _to_home first")
      out[l] = tuple(a.at[rid].set(v.astype(a.dtype), mode="drop")
                     for a, v in zip(arrs, new_leaves[l]))
    return out

  def _as_stored(self, new_leaves):
    """The updated rows in the dtypes of the arrays they belong to (tables, state)."""
    return {l: tuple(v.astype(a.dtype) for a, v in zip(self._arrays(l), new_leaves[l]))
            for l in self.layers}

  def _row_grads_f32(self, grads):
    """{layer: f32 [U, E]} from a model's row gradients (arrays or RowSparse)."""
    return {l: (grads[l].values_UxE if isinstance(grads[l], RowSparse) else grads[l]
                ).astype(jnp.float32) for l in self.layers}

  def _to_home(self, new_leaves):
    """The updated rows placed in each table's memory. Called at the end of the programs that
    compute them (the update, the fused step), so the copy leaves with their outputs and the
    host scatter of a later program reads rows that have arrived."""
    return {l: tuple(jax.device_put(v, placement_sharding(self.placements[l], self._device))
                     for v in stored)
            for l, stored in self._as_stored(new_leaves).items()}

  def apply_grad(self, handle: PrefetchHandle, grads: Mapping[int, Any], learning_rate,
                 step=None) -> None:
    """Applies the row-sparse gradient of `handle`'s step; tables/state update in place.

    `grads`: {layer: RowSparse (row ids must be handle's) or the f32 [U, E] gradient w.r.t.
    `rows(handle)[layer].rows_UxE`}. Outstanding handles (prefetched before this call) are
    patched with the new rows.
    """
    if handle.consumed:
      raise ValueError("apply_grad: this handle's gradient was already applied")
    if handle not in self._outstanding:
      raise ValueError("apply_grad: handle was not produced by this trainer's prefetch "
                       "(or was prefetched with for_update=False)")
    self._refuse_threaded("apply_grad")
    self._check_xla_host_writes("apply_grad")
    g = self._row_grads_f32(grads)
    self.flush()
    self._outstanding.remove(handle)
    handle.consumed = True
    pending = [{l: (p.row_ids[l], p.leaves[l]) for l in self.layers} for p in self._outstanding]
    dev = placement_sharding("device", self._device)
    # Explicit puts: scalars from Python would be implicit transfers (transfer_guard).
    lr = jax.device_put(np.float32(learning_rate), dev) if not isinstance(
        learning_rate, jax.Array) else learning_rate
    step_arr = _step_array(step, dev)
    new_home, patched = self._update(handle.leaves, handle.row_ids, g, pending,
                                     lr.astype(jnp.float32), step_arr,
                                     has_step=step is not None)
    for p, leaves in zip(self._outstanding, patched):
      p.leaves = leaves
    arrays = {l: self._arrays(l) for l in self.layers}
    out = self._scatter(arrays, handle.row_ids_home, new_home)
    for l in self.layers:
      self._set_arrays(l, out[l])

  # -- fused steps ----------------------------------------------------------------------------------

  def make_fused_step(self, model_step: Callable, *, donate_state: bool = False) -> Callable:
    """One program per training step, with the host traffic of the neighbouring steps inside it.

    `model_step(state, inputs, rows) -> (outputs, grads, learning_rate)`: `rows` is
    {layer: PrefetchedRows} as from `rows(handle)`, `grads` {layer: f32 [U, E] or RowSparse}
    w.r.t. `rows[l].rows_UxE`, `learning_rate` the base LR of this step (a scalar; the table
    optimiser applies its multiplier), so a schedule computed inside the step needs no round
    trip. Returns `run(handle, next_ids, state, inputs, step=None) -> (outputs, next_handle)`;
    `next_ids` are the next batch's NumPy hash ids (None for the last step, then `next_handle`
    is None); `step` as in `apply_grad`; `state` is donated if `donate_state`. One call
    dispatches one jitted program that

      host:   scatters the update of the previous fused step into the tables and state
              (donated, in place), then gathers the rows of `next_ids` into HBM;
      device: runs `model_step` on `handle`'s rows, the optimiser on those U rows, and patches
              the next rows with the rows it just updated (so they equal the table after
              this step, as in `apply_grad`).

    This step's own update leaves the program in the tables' memory (it is not scattered by the
    program that computes it: `_scatter_fn` says why) and stays pending until the next program,
    `flush()`, or any read of `tables` / `states` / `prefetch` / `apply_grad`, so a run equals
    the separate `prefetch` / `apply_grad` pipeline and the HBM placement (to f32 rounding: the
    gradient and the update share one XLA program). `run.compiled_text(...)` returns the
    optimised HLO of the program a call with the same arguments would dispatch.

    Why one program: XLA runs programs in order on the device's stream, so a separate gather or
    scatter program adds its whole time to the step; inside one program the host offloader's
    transfers and host compute run partly beside the model's kernels (H200 probe,
    `bench_offload --probe`: a 48.3 ms matmul + 3.6 ms host gather took 50.7 ms as two programs
    and 49.9 ms as one; + 4.3 ms host scatter: 53.2 ms vs 50.5 ms). On a GPU prefer
    `make_threaded_step`: faster there, and its rows agree with the HBM placement's where this
    step's did not (`_check_xla_host_writes`).
    """
    self._check_xla_host_writes("make_fused_step")
    cache = {}

    def program(model_state, inputs, arrays, pending, leaves, row_ids, inverse, next_gather_ids,
                next_row_ids, step, *, has_pending, has_next, has_step):
      if has_pending:
        arrays = self._scatter_fn(arrays, *pending)
      next_leaves = self._gather_fn(arrays, next_gather_ids) if has_next else None
      rows = {l: _masked_rows_fn(leaves[l][0], row_ids[l], inverse[l], self.num_rows(l))
              for l in self.layers}
      outputs, grads, lr = model_step(model_state, inputs, rows)
      lr = jnp.asarray(lr, jnp.float32)
      g = self._row_grads_f32(grads)
      nxt = [{l: (next_row_ids[l], next_leaves[l]) for l in self.layers}] if has_next else []
      new_leaves, patched = self._update_fn(leaves, row_ids, g, nxt, lr, step, has_step)
      # The update leaves this program already in the tables' memory; the next program's host
      # scatter reads it (never this program's: `_scatter_fn` says why).
      return (outputs, arrays, self._to_home(new_leaves),
              (patched[0] if has_next else None))

    def prepare(handle, next_ids, model_state, inputs, step):
      self._check_chain_handle(handle, "fused step")
      self._refuse_threaded("fused step")
      nxt, next_gather_ids = (None, None) if next_ids is None else self._plan(next_ids,
                                                                             "fused step")
      dev = placement_sharding("device", self._device)
      step_arr = _step_array(step, dev)
      flags = (self._pending is not None, nxt is not None, step is not None)
      if flags not in cache:
        cache[flags] = jax.jit(functools.partial(
            program, has_pending=flags[0], has_next=flags[1], has_step=flags[2]),
            donate_argnums=(0, 2) if donate_state else (2,))
      args = (model_state, inputs, {l: self._arrays(l) for l in self.layers}, self._pending,
              handle.leaves, handle.row_ids, handle.inverse, next_gather_ids,
              None if nxt is None else nxt.row_ids, step_arr)
      return cache[flags], args, nxt

    def run(handle: PrefetchHandle, next_ids, state, inputs, step=None):
      fn, args, nxt = prepare(handle, next_ids, state, inputs, step)
      outputs, arrays, new_home, next_leaves = fn(*args)
      for l in self.layers:
        self._set_arrays(l, arrays[l])
      self._pending = (handle.row_ids_home, new_home)
      self._outstanding.remove(handle)
      handle.consumed = True
      if nxt is not None:
        nxt.leaves = next_leaves
        self._outstanding.append(nxt)
      return outputs, nxt

    def compiled_text(handle, next_ids, state, inputs, step=None) -> str:
      fn, args, _ = prepare(handle, next_ids, state, inputs, step)
      return fn.lower(*args).compile().as_text()

    run.compiled_text = compiled_text
    run.programs = cache  # {(has_pending, has_next, has_step): jitted program}, for tests
    return run

  def make_threaded_step(self, model_step: Callable, *, donate_state: bool = False,
                         threads: Optional[int] = None) -> Callable:
    """One device program per training step; the host gathers and scatters run in NumPy on
    worker threads beside it, outside XLA.

    Same contract as `make_fused_step`: `model_step(state, inputs, rows) -> (outputs, grads,
    learning_rate)` and `run(handle, next_ids, state, inputs, step=None) -> (outputs,
    next_handle)`; the first handle comes from `prefetch`, later ones from `run`. Every table
    must be in pinned_host. `threads`: the NumPy row-chunk pool (`default_host_threads`).
    Extra pinned host memory: two staging buffers of U rows per table and state array (for
    the 0.5-3.5B stand-ins of bench_offload, 2 x 64 MiB per table), plus the step's updated
    rows in transit.

    Step s, as `run` dispatches it:

      device (one program): patch s's rows with step s-1's updated rows (still on the device),
              model step s, the optimiser on its U rows -> new rows of s (device outputs);
      host (a queue of tasks on threads, in order): gather the rows of s+1 from the host
              arrays (NumPy views of the pinned_host buffers, `host_view`) and copy them to the
              device; then wait for the new rows of s, copy them to the host and write them
              into the arrays in place.

    The gather of s+1 runs while step s computes, after the write of s-1 (queue order), so the
    rows step s+1 reads are the tables after step s once its program patches in s's update:
    exactly the separate and fused pipelines' arithmetic (tests compare all three with the HBM
    placement). `run` blocks only to take the previous gather's device arrays; the write of s
    overlaps step s+1. Reading `tables` / `states`, `flush`, `prefetch` wait for every host task
    (and re-raise a failed task's error).

    Why: XLA runs host compute of pinned_host operands inside the programs, and on the H200
    (jax 0.11.2) a fused step's host gather / scatter did not hide behind its kernels
    (`bench_offload --trace_steps 3`, ~3.5B stand-in, 32 GB: GPU stream busy 620.80 ms per
    fused step vs 602.36 with HBM tables); a threaded step's stream was busy 611.85 vs 613.40
    (its host work is off the stream), and the step took +0.6% over HBM against +4.6% fused.
    Its rows also agree with the HBM placement's where the XLA paths' did not
    (`_check_xla_host_writes`).
    """
    for l in self.layers:
      if self.placements[l] != "pinned_host":
        raise ValueError(f"threaded step: layer {l}'s table is in {self.placements[l]}; every "
                         "table must be in pinned_host (use make_fused_step for a mix)")
    if self._worker is None or (threads is not None and self._worker.threads != threads):
      self.flush()
      if self._worker is not None:
        self._worker.shutdown()
      self._worker = _HostWorker(default_host_threads() if threads is None else threads)
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
      new_leaves, _ = self._update_fn(leaves, row_ids, g, [], jnp.asarray(lr, jnp.float32),
                                      step, has_step)
      # Stored as the host arrays store them, so the patch equals a write then a gather.
      return outputs, self._as_stored(new_leaves)

    def gather_task(views, host_ids):
      leaves = {}
      for l in self.layers:
        rid, count = host_ids[l]
        out = []
        for i, view in enumerate(views[l]):
          # Into a pinned staging buffer, so the copy to the device is one DMA (51-54 GB/s;
          # from pageable NumPy memory `bench_offload --probe` measured 30.39 ms for 64 MiB).
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

    def prepare(handle, next_ids, model_state, inputs, step):
      self._check_chain_handle(handle, "threaded step")
      if self._pending is not None:
        self.flush()           # a fused step's update, scattered by XLA before NumPy writes
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
      fn, args = prepare(handle, next_ids, state, inputs, step)
      outputs, new_leaves = fn(*args)
      # After the dispatch: the dedup of s+1 runs while step s computes.
      nxt = None if next_ids is None else self._plan(next_ids, "threaded step", home=False)[0]
      self._outstanding.remove(handle)
      handle.consumed = True
      views = {l: tuple(host_view(a) for a in self._arrays(l)) for l in self.layers}
      if nxt is not None:   # queued before this step's write: it runs while this step computes
        nxt.leaves = worker.submit(gather_task, views, nxt.host_ids)
        nxt.patch = (handle.row_ids, new_leaves)
        nxt.threaded = True
        self._outstanding.append(nxt)
      pinned = placement_sharding("pinned_host", self._device)
      worker.submit(scatter_task, views, handle.host_ids, jax.device_put(new_leaves, pinned))
      return outputs, nxt

    def compiled_text(handle, next_ids, state, inputs, step=None) -> str:
      fn, args = prepare(handle, next_ids, state, inputs, step)
      return fn.lower(*args).compile().as_text()

    run.compiled_text = compiled_text
    run.programs = cache  # {(has_patch, has_step): jitted program}, for tests
    return run

  def compiled_texts(self, handle: PrefetchHandle, grads) -> dict[str, str]:
    """Optimised HLO of the gather and scatter programs (tests look for table-sized copies)."""
    arrays = {l: self._arrays(l) for l in self.layers}
    gather_ids = {l: handle.row_ids_home[l] for l in self.layers}
    new_leaves = self._to_home({l: handle.leaves[l] for l in self.layers})
    return {"gather": self._gather.lower(arrays, gather_ids).compile().as_text(),
            "scatter": self._scatter.lower(arrays, handle.row_ids_home,
                                           new_leaves).compile().as_text()}


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


# ---- checkpoints that stream row chunks -----------------------------------------------------------
#
# orbax copies every array to host before writing (a second full copy of a host table). Here a
# table is written chunk by chunk: a dynamic_slice of `chunk_rows` rows is copied to the device
# (the host offloader's supported DS-from-host pattern; one chunk of HBM), fetched into NumPy and
# written into a memory-mapped .npy. Peak extra memory of a save: one chunk in HBM + one chunk of
# NumPy host memory (DEFAULT_CHUNK_BYTES = 256 MiB), plus the kernel's reclaimable page cache;
# the table itself is never copied. A restore allocates the destination (one table, checked by
# `check_host_allocation`) and fills it chunk by chunk from the memmap in place (donated
# dynamic_update_slice): peak = table + one chunk on the host + one chunk in HBM.

_MANIFEST = "manifest.json"


def _raw_dtype(dtype: np.dtype) -> np.dtype:
  # .npy cannot describe bfloat16; store the bits as unsigned ints of the same width.
  return np.dtype(f"u{np.dtype(dtype).itemsize}")


def _rows_chunk(x_shape, itemsize, chunk_bytes):
  row_bytes = int(np.prod(x_shape[1:], dtype=np.int64)) * itemsize if len(x_shape) > 1 \
      else itemsize
  return int(min(x_shape[0], chunk_rows_for(row_bytes, chunk_bytes)))


def save_arrays(directory: str, arrays: Mapping[str, jax.Array], *,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
  """Writes `{name: [R, ...] array}` (any placement) as `<name>.npy` + a manifest, in row chunks."""
  os.makedirs(directory, exist_ok=True)
  manifest = {}
  dev = jax.memory.Space.Device
  for name, x in arrays.items():
    if "/" in name or name == _MANIFEST:
      raise ValueError(f"save_arrays: bad array name {name!r}")
    dtype = np.dtype(x.dtype)
    chunk = _rows_chunk(x.shape, dtype.itemsize, chunk_bytes)
    out = np.lib.format.open_memmap(os.path.join(directory, f"{name}.npy"), mode="w+",
                                    dtype=_raw_dtype(dtype), shape=tuple(x.shape))
    take = jax.jit(lambda a, start, c=chunk: jax.device_put(
        jax.lax.dynamic_slice_in_dim(a, start, c, axis=0), dev))
    for start in range(0, x.shape[0], chunk):
      start = min(start, x.shape[0] - chunk)
      part = np.asarray(jax.device_get(take(x, np.int32(start))))
      out[start:start + chunk] = part.view(_raw_dtype(dtype))
    out.flush()
    del out
    manifest[name] = {"shape": list(x.shape), "dtype": dtype.name}
  with open(os.path.join(directory, _MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)


def restore_arrays(directory: str, placement: str = "pinned_host", *,
                   names: Optional[list] = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                   device: Optional[jax.Device] = None) -> dict[str, jax.Array]:
  """Reads arrays written by `save_arrays` into `placement`, chunk by chunk."""
  with open(os.path.join(directory, _MANIFEST)) as f:
    manifest = json.load(f)
  names = list(manifest) if names is None else names
  sharding = placement_sharding(placement, device)
  dev = placement_sharding("device", device)
  space = _space(placement)
  out = {}
  for name in names:
    if name not in manifest:
      raise ValueError(f"restore_arrays: {name!r} not in {directory} (has {sorted(manifest)})")
    shape, dtype = tuple(manifest[name]["shape"]), jnp.dtype(manifest[name]["dtype"])
    src = np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r")
    if src.shape != shape:
      raise ValueError(f"restore_arrays: {name}.npy has shape {src.shape}, manifest {shape}")
    x = zeros(shape, dtype, placement, device)
    chunk = _rows_chunk(shape, dtype.itemsize, chunk_bytes)
    put = jax.jit(lambda a, c, start: jax.lax.dynamic_update_slice_in_dim(
        a, jax.device_put(c, space), start, axis=0), donate_argnums=0, out_shardings=sharding)
    for start in range(0, shape[0], chunk):
      start = min(start, shape[0] - chunk)
      part = np.ascontiguousarray(src[start:start + chunk]).view(dtype)
      x = put(x, jax.device_put(part, dev), np.int32(start))
    out[name] = x
  return out


def _state_names(l, state):
  return {f"layer{l}.{k}": v for k, v in state._asdict().items() if v is not None}


def save_trainer(directory: str, trainer: HostTableTrainer, **kw) -> None:
  """Tables and optimiser states of every layer (no outstanding prefetch is saved)."""
  arrays = {}
  for l in trainer.layers:
    arrays[f"layer{l}.table"] = trainer.tables[l]
    arrays.update(_state_names(l, trainer.states[l]))
  save_arrays(directory, arrays, **kw)


def restore_trainer(directory: str, cfg: table_optim.TableOptimizerConfig,
                    offsets: Mapping[int, Any], placements: Mapping[int, str],
                    **kw) -> HostTableTrainer:
  """A `HostTableTrainer` whose tables/states are read from `directory` into `placements`."""
  tables, states = {}, {}
  for l, placement in placements.items():
    table = restore_arrays(directory, placement, names=[f"layer{l}.table"], **kw)
    tables[l] = table[f"layer{l}.table"]
    shapes = table_optim.init_table_state_shapes(cfg, *tables[l].shape)
    names = [f"layer{l}.{k}" for k, v in shapes._asdict().items() if v is not None]
    got = restore_arrays(directory, placement, names=names, **kw)
    states[l] = table_optim.TableOptState(
        **{k: got.get(f"layer{l}.{k}") for k in shapes._asdict()})
  return HostTableTrainer(cfg, tables, offsets, states)
