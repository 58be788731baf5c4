"""Kernels for engram-jax. One folder per op; each has `reference.py` (the spec) and `api.py`."""
