"""engram-jax: DeepSeek's Engram (conditional memory via scalable lookup) in JAX/Flax."""

from engram_jax.config import EngramConfig

__all__ = ["EngramConfig"]
