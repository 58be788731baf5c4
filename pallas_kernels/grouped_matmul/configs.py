"""Tile sizes of the Mosaic GPU grouped matmul: one `MosaicBlocks` per kernel call.

A training step runs three kernels per grouped matmul (gpu.py): the forward `ragged_dot`, the
input gradient `ragged_dot(..., transpose_rhs=True)` and the weight gradient
`transposed_ragged_dot`. `for_shape(m, k, n, g)` picks their tiles from the shape:

  * block_k = 64: 64 bf16/f16 values are one 128-byte swizzled TMA row, the widest the
    kernels' shared-memory layout takes.
  * block_n (and the weight gradient's block_m, which tiles K): 128 where the dimension is a
    multiple of 128, else 64. A 128 x 128 f32 accumulator is 128 registers per thread of the
    warpgroup; 4 pipeline stages of 128 x 64 operand tiles plus the output tile use ~160 KB
    of the H100/H200's 227 KB of shared memory.
  * block_m (rows of x per tile): a tile holds rows of one group only, so each group costs up
    to one partly filled tile; 128 rows where groups average at least 256 rows, else 64.
  * max_concurrent_steps = 4, grid_block_n = 1 (no tile-order swizzle).
These follow the kernels' constraints and resource budget; they were not tuned by a sweep on
this model's shapes. `benchmarks/bench_moe.py --sweep` times alternatives on a GPU, and
`grouped_matmul(..., gpu_config=...)` takes any of them.

Dimension legend: M rows of x, K contraction width, N output width, G groups.
"""

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
  """Arguments of one `jax.experimental.pallas.ops.gpu` ragged-dot kernel call.

  block_m, block_n: output tile; block_k: contraction step (for the weight gradient, the step
  over the grouped rows). max_concurrent_steps: pipeline depth. grid_block_n: width of the
  tile-order swizzle.
  """
  block_m: int
  block_n: int
  block_k: int = 64
  max_concurrent_steps: int = 4
  grid_block_n: int = 1

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k"):
      value = getattr(self, name)
      if value <= 0 or value % 64:
        raise ValueError(f"MosaicBlocks.{name} must be a positive multiple of 64 (one "
                         f"warpgroup tile / one 128-byte swizzle row), got {value}")
    if self.max_concurrent_steps < 1:
      raise ValueError(f"MosaicBlocks.max_concurrent_steps must be >= 1, got "
                       f"{self.max_concurrent_steps}")
    if self.grid_block_n < 1:
      raise ValueError(f"MosaicBlocks.grid_block_n must be >= 1, got {self.grid_block_n}")


@dataclasses.dataclass(frozen=True)
class GpuGroupedMatmulConfig:
  """Tiles of the three kernels: `forward` (x @ w, [M, N]), `grad_x` (dy @ w^T, [M, K]) and
  `grad_w` (x^T dy per group, [G, K, N]; its block_m tiles K, block_k steps over rows)."""
  forward: MosaicBlocks
  grad_x: MosaicBlocks
  grad_w: MosaicBlocks

  def unsupported(self, m: int, k: int, n: int) -> Optional[str]:
    """Why the kernels cannot take x [M, K] @ w [G, K, N] with these tiles, or None."""
    f, gx, gw = self.forward, self.grad_x, self.grad_w
    checks = (("K", k, f.block_k, "forward.block_k"), ("N", n, f.block_n, "forward.block_n"),
              ("N", n, gx.block_k, "grad_x.block_k"), ("K", k, gx.block_n, "grad_x.block_n"),
              ("K", k, gw.block_m, "grad_w.block_m"), ("N", n, gw.block_n, "grad_w.block_n"),
              # The weight-gradient kernel reads each group's rows in whole block_k steps.
              ("M", m, gw.block_k, "grad_w.block_k"))
    for dim, size, block, field in checks:
      if size % block:
        return f"{dim}={size} is not a multiple of {field}={block}"
    return None


def _tile(size: int) -> int:
  return 128 if size % 128 == 0 else 64


def for_shape(m: int, k: int, n: int, g: int) -> GpuGroupedMatmulConfig:
  """The default tiles for x [M, K] @ w [G, K, N] (see the module docstring)."""
  block_m = 128 if m >= 256 * g else 64
  return GpuGroupedMatmulConfig(
      forward=MosaicBlocks(block_m=block_m, block_n=_tile(n)),
      grad_x=MosaicBlocks(block_m=block_m, block_n=_tile(k)),
      grad_w=MosaicBlocks(block_m=_tile(k), block_n=_tile(n)))
