"""Grouped (ragged) matmul: rows of x in consecutive groups, one weight matrix per group."""
from pallas_kernels.grouped_matmul.api import grouped_matmul
from pallas_kernels.grouped_matmul.configs import GpuGroupedMatmulConfig, MosaicBlocks

__all__ = ["grouped_matmul", "GpuGroupedMatmulConfig", "MosaicBlocks"]
