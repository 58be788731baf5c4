"""engram-jax: DeepSeek's Engram (conditional memory via scalable lookup) in JAX/Flax.

Only the layer-level API is imported here; the data pipeline (grain) and the trainer are imported
from their modules (`engram_jax.data`, `engram_jax.train`) so kernels and benchmarks run where
grain is not installed.
"""

from engram_jax.config import EngramConfig
from engram_jax.engram_layer import Engram
from engram_jax.memory import MultiHeadMemory

__all__ = ["EngramConfig", "Engram", "MultiHeadMemory"]
