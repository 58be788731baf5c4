"""The Engram layer's gated ShortConv branch, fused (see api.py and reference.py)."""
from pallas_kernels.short_conv.api import gated_short_conv
from pallas_kernels.short_conv.configs import GpuShortConvConfig

__all__ = ["gated_short_conv", "GpuShortConvConfig"]
