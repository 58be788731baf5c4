"""Kernels for engram-jax. One folder per op; each has `reference.py` (the spec) and `api.py`:
engram_lookup (multi-head Engram row lookup), grouped_matmul (the MoE experts' ragged matmul)."""
