"""Block sizes of the Engram lookup kernels, one frozen config per backend.

The GPU defaults are the fastest configs of `benchmarks/bench_lookup.py`'s sweeps on an H200
(the gather's block sweep; the segment-sum's methods and segment counts): benchmarks/README.md,
"Lookup forward" and "Segment-sum alone". The TPU defaults follow the tiling rules only; they
are unmeasured on hardware.

Dimension legend: N = B*T*H lookups, E row width, U unique-row slots.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class GpuLookupConfig:
  """Pallas-Triton gather: each program copies `block_rows` lookups (rows) of width E.

  block_rows: lookups per program; more rows per program keep more 16-byte loads in flight.
  num_warps, num_stages: Triton launch parameters.
  """
  block_rows: int = 256
  num_warps: int = 8
  num_stages: int = 1

  def __post_init__(self):
    _check_pow2("block_rows", self.block_rows)
    _check_pow2("num_warps", self.num_warps)


@dataclasses.dataclass(frozen=True)
class GpuSegmentSumConfig:
  """Pallas-Triton sorted segment-sum: each program owns `block_segments` output rows.

  method 'onehot': walks the sorted lookups of its rows `block_lookups` at a time, adding a
    one-hot [S, L] x [L, E] fp32 product (cost independent of how lookups spread over rows).
  method 'walk': step j adds the j-th lookup of every owned row (a masked [S, E] gather);
    as many steps as the longest segment among its rows.
  """
  method: str = "onehot"
  block_segments: int = 32
  block_lookups: int = 64
  num_warps: int = 4

  def __post_init__(self):
    if self.method not in ("onehot", "walk"):
      raise ValueError(f"method must be 'onehot' or 'walk', got {self.method!r}")
    _check_pow2("block_segments", self.block_segments)
    _check_pow2("block_lookups", self.block_lookups)
    if self.block_segments < 16 or self.block_lookups < 16:
      raise ValueError("Triton dots need block_segments and block_lookups >= 16")


@dataclasses.dataclass(frozen=True)
class TpuLookupConfig:
  """Mosaic-TPU gather: a grid step fills one `[block_rows, E]` VMEM block with `block_rows`
  row DMAs in flight; at most `max_rows_per_call` row ids sit in SMEM (scalar prefetch) per
  pallas_call, larger batches are split into several calls writing one aliased output.

  block_rows must be a multiple of 16 so bf16 blocks fill whole packed (16, 128) tiles.
  """
  block_rows: int = 256
  max_rows_per_call: int = 65536

  def __post_init__(self):
    if self.block_rows % 16:
      raise ValueError(f"block_rows must be a multiple of 16, got {self.block_rows}")
    if self.max_rows_per_call % self.block_rows:
      raise ValueError("max_rows_per_call must be a multiple of block_rows, got "
                       f"{self.max_rows_per_call} and {self.block_rows}")


def _check_pow2(name: str, value: int):
  if value <= 0 or value & (value - 1):
    raise ValueError(f"{name} must be a positive power of two, got {value}")


def padded_width(e: int) -> int:
  """Triton blocks need power-of-two extents: E=80 is read as a masked 128-wide block."""
  return 1 << max(0, (e - 1).bit_length())
