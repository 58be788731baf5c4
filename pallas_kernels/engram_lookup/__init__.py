"""Fused multi-head Engram row lookup."""
from pallas_kernels.engram_lookup.api import engram_lookup

__all__ = ["engram_lookup"]
