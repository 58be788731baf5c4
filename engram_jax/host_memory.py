"""Engram tables in host memory: placement, allocation checks, creation and row reads.

Engram addresses depend only on input tokens, so the rows a step reads are known as soon as its
batch exists. A table (and its row-sparse optimiser state) can therefore live in host memory
(`memory_kind='pinned_host'`) and only the rows of a batch cross PCIe
(engram_jax/host_tables.py trains such tables, engram_jax/generate.py decodes from them).

Placement, per Engram table: 'device' (HBM) or 'pinned_host'. `create_table` allocates a table
directly in its memory and fills it in row chunks, so a table larger than HBM never passes
through the device; `check_host_allocation` refuses a request larger than the host can give
(MemAvailable, and on GPU the pinned pool, 64 GiB unless `XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB`
raises it) with a ValueError *before* anything is allocated.

Row reads, three ways:
  fetch_rows   `table[ids]` inside jit, ids in the table's memory; for a pinned_host table XLA's
               host offloader gathers on the CPU and copies the rows to the device.
  direct_rows  GPU only: a Pallas-Triton gather reads the pinned_host table in place over PCIe
               (the buffer is mapped into the GPU's address space); the ids stay on the device.
               Random host rows cost per row, so it suits decoding's few rows per token, not a
               training batch's (benchmarks/README.md, "Host tables").
  host_view    a writable NumPy view of a pinned_host buffer: NumPy threads gather and scatter
               rows outside XLA (the host-table training step).

Dimension legend: R table rows, E row width, N rows read.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

from engram_jax import table_optim
from pallas_kernels.engram_lookup import gpu as lookup_gpu
from pallas_kernels.engram_lookup.api import current_platform
from pallas_kernels.engram_lookup.configs import GpuLookupConfig

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
  device = device or jax.local_devices()[0]
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
  """The sharding of a table with this placement (one device; default this process's first)."""
  if placement not in PLACEMENTS:
    raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
  return SingleDeviceSharding(device or jax.local_devices()[0],
                              memory_kind=_MEMORY_KIND[placement])


def placement_of(x: jax.Array) -> str:
  kind = x.sharding.memory_kind
  for p, k in _MEMORY_KIND.items():
    if kind == k:
      return p
  raise ValueError(f"array has memory kind {kind!r}, not one of {PLACEMENTS}")


def memory_space(placement: str):
  """The `jax.memory.Space` of a placement (the target of an in-program `device_put`)."""
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
  space = memory_space(placement)

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


# ---- row reads ----------------------------------------------------------------------------------

@jax.jit
def fetch_rows(table_RxE: jax.Array, ids_N: jax.Array) -> jax.Array:
  """`table[ids]` as a device array, from a table in any placement. `ids` must be in bounds
  and live where the table lives (a pinned_host table is gathered by host compute, then the
  rows are copied to the device)."""
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


def host_view(x: jax.Array) -> np.ndarray:
  """A writable NumPy view of a one-device pinned_host array's buffer (no copy).

  The view aliases memory XLA owns: a write through it is seen by every later program that reads
  `x`, and nothing orders it against programs already dispatched, so the caller must (the
  host-table step writes rows only after the programs that read them have finished, and reading
  `HostTables.tables` waits for those writes). Blocks until `x` is ready first: an array just
  made by `device_put` (or a program) may still be being written, and a view taken earlier
  would see that write land late. Raises ValueError for other placements, several shards or a
  buffer that is not one dense row-major block.
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
