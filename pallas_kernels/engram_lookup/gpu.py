"""GPU forward of the Engram lookup: a Pallas-Triton gather.

Each program copies `block_rows` lookups: it reads their local ids, adds the head offset
(`offsets[n % H]`), clamps into `[0, R)` and copies the rows `[block_rows, E]` to the output,
which is `[N, E]` = `[B, T, H*E]` in memory, so no reshuffle follows.

Why Triton (deprecated in jax 0.11) and not Mosaic GPU: a gather of independent 64-320 byte
rows needs a per-row address in every thread, which Triton expresses directly (pointer tensors,
16-byte vector loads). Mosaic GPU moves global memory through TMA, and Hopper has no TMA
gather (Blackwell only), so a Mosaic kernel would issue one bulk copy per row from one thread.
For 128-byte bf16 rows this kernel runs at a same-size device copy's speed, the ceiling for any
backend; for E=80 (two column chunks) and f32 rows `jnp.take` is faster, so `engram_lookup`
picks `jnp.take` for non-power-of-two E on GPUs (benchmarks/README.md, "Lookup forward").

Widths: Triton blocks need power-of-two extents. E is read as power-of-two column chunks,
widest first (at most 128): E=64 -> one chunk, E=80 -> 64 + 16. Every index stays in bounds,
so no masks are needed; `gather` pads N to a multiple of `block_rows`.

Large tables: the Triton lowering switches to 64-bit pointer offsets when the table exceeds
2^32 bytes, and offsets below that fit in int32 elements, so byte offsets never overflow.

Dimension legend: N = B*T*H lookups, H heads, R table rows, E row width, C column chunk.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels.engram_lookup.configs import GpuLookupConfig


def column_chunks(e: int) -> list[tuple[int, int]]:
  """(start, width) power-of-two chunks covering E, widest first: 80 -> (0, 64), (64, 16)."""
  chunks, start = [], 0
  while start < e:
    width = min(1 << ((e - start).bit_length() - 1), 128)
    chunks.append((start, width))
    start += width
  return chunks


def _gather_kernel(ids_ref, offsets_ref, table_ref, out_ref, *, num_heads: int,
                   num_rows: int, width: int, block_rows: int):
  first = pl.program_id(0) * block_rows
  n_R = first + jax.lax.iota(jnp.int32, block_rows)
  ids_R = ids_ref[pl.ds(first, block_rows)]
  offsets_R = offsets_ref[n_R % num_heads]
  rows_R = jnp.clip(ids_R + offsets_R, 0, num_rows - 1)
  # One load per column chunk; each is [block_rows, C] and every thread keeps several 16-byte
  # loads in flight before its stores.
  for start, chunk in column_chunks(width):
    cols = start + jax.lax.iota(jnp.int32, chunk)[None, :]
    out_ref[n_R[:, None], cols] = table_ref[rows_R[:, None], cols]


def gather(table_RxE: jax.Array, ids_N: jax.Array, offsets_H: jax.Array, *,
           config: GpuLookupConfig = GpuLookupConfig(), interpret: bool = False) -> jax.Array:
  """`table[clip(ids_N + offsets[n % H])]` as `[N, E]`; ids_N are int32 local ids, already
  clamped into their heads by `api` (the clip into `[0, R)` is a bounds guard)."""
  num_rows, width = table_RxE.shape
  n = ids_N.shape[0]
  block_rows = config.block_rows
  padded = pl.cdiv(n, block_rows) * block_rows
  if padded != n:
    # Padding keeps the kernel free of masks; it costs one slice of the output.
    ids_N = jnp.pad(ids_N, (0, padded - n))
  kernel = functools.partial(_gather_kernel, num_heads=offsets_H.shape[0], num_rows=num_rows,
                             width=width, block_rows=block_rows)
  out_NxE = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((padded, width), table_RxE.dtype),
      grid=(padded // block_rows,),
      compiler_params=pl_triton.CompilerParams(num_warps=config.num_warps,
                                               num_stages=config.num_stages),
      interpret=interpret,
      name="engram_gather",
  )(ids_N.astype(jnp.int32), offsets_H.astype(jnp.int32), table_RxE)
  return out_NxE[:n] if padded != n else out_NxE
