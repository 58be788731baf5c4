"""Public entry point of the Engram lookup: validation and dispatch.

The model calls only `engram_lookup`; implementations are chosen here.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.engram_lookup import reference


def engram_lookup(table_RxE: jax.Array, ids_BxTxH: jax.Array, offsets_H: jax.Array, *,
                  implementation: Optional[str] = None) -> jax.Array:
  """Gathers one row per (token, head) and concatenates heads: returns `[B, T, H*E]`."""
  if table_RxE.ndim != 2:
    raise ValueError(f"table must be [rows, E], got shape {table_RxE.shape}")
  if ids_BxTxH.ndim != 3:
    raise ValueError(f"ids must be [B, T, H], got shape {ids_BxTxH.shape}")
  if not jnp.issubdtype(ids_BxTxH.dtype, jnp.integer):
    raise TypeError(f"ids must be integers, got {ids_BxTxH.dtype}")
  if offsets_H.shape != (ids_BxTxH.shape[-1],):
    raise ValueError(f"offsets must be [H]={ids_BxTxH.shape[-1]}, got {offsets_H.shape}")
  if implementation not in (None, "xla"):
    raise NotImplementedError(f"implementation={implementation!r} is not available yet")
  return reference.engram_lookup_reference(table_RxE, ids_BxTxH, offsets_H)
