"""TPU forward of the Engram lookup: a Mosaic-TPU gather by row DMAs (paged-attention pattern).

The global row ids (head offsets + ids clamped into their heads, by XLA before the call) are
scalar-prefetched into SMEM. The table stays in HBM (`memory_space=pl.ANY`). Grid step i owns
the output block `[block_rows, E]` in VMEM: it starts one async DMA per row, HBM row ->
block row, all on one DMA semaphore so `block_rows` copies are in flight at once, then waits
for all of them; Pallas writes the finished block back to HBM while the next step's DMAs run.

SMEM is small, so one call holds at most `max_rows_per_call` row ids; longer batches are split
into several calls that write disjoint blocks of a single output buffer, threaded through
`input_output_aliases` (no concatenation copy).

Tiling: the output block's last dim is the full E (allowed for any E; 64 and 80 occupy a
128-lane tile, so VMEM holds up to 2x the bytes), and block_rows is a multiple of 16 so bf16
blocks are whole packed (16, 128) tiles.

Verified only in interpret mode on CPU (`interpret=pltpu.InterpretParams()`). Unverified on
hardware: that Mosaic accepts single-row DMAs into a sublane-packed bf16 VMEM block (if not,
gather into a `[block_rows, 1, E]` scratch or DMA pairs of rows); the DMA issue rate and the
best block_rows (unmeasured); that 256 outstanding DMAs on one semaphore
are within the DMA queue limits of every TPU generation.

Dimension legend: N = B*T*H lookups, M lookups in one call, R table rows, E row width,
K rows per grid step.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.engram_lookup.configs import TpuLookupConfig


def _dma_gather_kernel(rows_ref, table_hbm_ref, previous_ref, out_KxE_ref, sem, *,
                       block_rows: int):
  del previous_ref  # Only aliased into the output so earlier calls' blocks survive.
  base = pl.program_id(0) * block_rows

  def copy(k):
    row = rows_ref[base + k]
    return pltpu.make_async_copy(table_hbm_ref.at[pl.ds(row, 1)],
                                 out_KxE_ref.at[pl.ds(k, 1)], sem)

  # All K row DMAs go out before the first wait: the copies overlap, as paged attention does
  # with its pages. Each wait consumes one row's worth of the shared semaphore.
  @pl.loop(0, block_rows)
  def _(k):
    copy(k).start()

  @pl.loop(0, block_rows)
  def _(k):
    copy(k).wait()


def _gather_call(rows_M, table_RxE, out_NxE, *, first_block: int, block_rows: int,
                 interpret):
  """One pallas_call writing `table[rows_M]` into the M/K blocks of `out_NxE` that start at
  block `first_block`; the other blocks keep their values (aliased output)."""
  num_steps = rows_M.shape[0] // block_rows
  kernel = functools.partial(_dma_gather_kernel, block_rows=block_rows)
  width = table_RxE.shape[1]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1,
      grid=(num_steps,),
      in_specs=[pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((block_rows, width), lambda i, rows: (first_block + i, 0)),
      scratch_shapes=[pltpu.SemaphoreType.DMA(())],
  )
  return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct(out_NxE.shape, out_NxE.dtype),
      # Operand 2 (after the scalar-prefetched rows and the table) is the output so far.
      input_output_aliases={2: 0},
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      interpret=interpret,
      name="engram_dma_gather",
  )(rows_M, table_RxE, out_NxE)


def gather(table_RxE: jax.Array, ids_N: jax.Array, offsets_H: jax.Array, *,
           config: TpuLookupConfig = TpuLookupConfig(), interpret=False) -> jax.Array:
  """`table[clip(ids_N + offsets[n % H])]` as `[N, E]`; ids_N are int32 local ids, already
  clamped into their heads by `api` (the clip into `[0, R)` is a bounds guard).

  `interpret`: False on TPU; `pltpu.InterpretParams()` (or True) to run on CPU.
  """
  num_rows, width = table_RxE.shape
  n = ids_N.shape[0]
  num_heads = offsets_H.shape[0]
  heads_N = jnp.arange(n, dtype=jnp.int32) % num_heads
  rows_N = jnp.clip(ids_N.astype(jnp.int32) + offsets_H.astype(jnp.int32)[heads_N], 0,
                    num_rows - 1)
  block_rows = config.block_rows
  padded = pl.cdiv(n, block_rows) * block_rows
  if padded != n:
    rows_N = jnp.pad(rows_N, (0, padded - n))  # Row 0 is valid; padded outputs are dropped.
  out_NxE = jnp.zeros((padded, width), table_RxE.dtype)
  per_call = config.max_rows_per_call
  for first_row in range(0, padded, per_call):
    # Each call scalar-prefetches only its own row ids: SMEM holds `per_call` int32 at most.
    rows_M = rows_N[first_row:first_row + per_call]
    out_NxE = _gather_call(rows_M, table_RxE, out_NxE, first_block=first_row // block_rows,
                           block_rows=block_rows, interpret=interpret)
  return out_NxE[:n] if padded != n else out_NxE
