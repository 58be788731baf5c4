"""Block sizes of the gated ShortConv kernels (GPU only; TPU runs the XLA reference).

Defaults from `python -m experiments.bench_layer --conv-sweep` on one H200 (see gpu.py).

Dimension legend: T time, D hidden.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class GpuShortConvConfig:
  """Pallas-Triton gated ShortConv.

  block_t, block_d: the [time, hidden] tile of a forward program (all M streams per program).
  bwd_block_t: the time tile of one backward step; a backward program walks up to
    `bwd_chunks` consecutive tiles, accumulating its kernel and scale gradients in registers
    (fewer partial sums to add afterwards).
  block_d is capped at the largest power of two dividing D.
  """
  block_t: int = 16
  block_d: int = 128
  num_warps: int = 4
  bwd_block_t: int = 16
  bwd_chunks: int = 16
  bwd_num_warps: int = 8

  def __post_init__(self):
    for name in ("block_t", "block_d", "num_warps", "bwd_block_t", "bwd_chunks",
                 "bwd_num_warps"):
      value = getattr(self, name)
      if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
