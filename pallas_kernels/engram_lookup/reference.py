"""Pure-jnp specification of the fused multi-head Engram lookup.

Every faster implementation is tested against `engram_lookup_reference`, and it is also the
fallback used where no kernel applies.

Dimension legend: B batch, T time, H hash heads, E row width, R table rows.
"""

import jax
import jax.numpy as jnp


def engram_lookup_reference(table_RxE: jax.Array, ids_BxTxH: jax.Array,
                            offsets_H: jax.Array) -> jax.Array:
  """Returns `table[ids + offsets]` flattened over heads: `[B, T, H*E]`.

  `ids_BxTxH` are per-head local row ids in `[0, rows of that head)`; `offsets_H` the first row
  of each head in the table. Global row ids outside `[0, R)` are clamped to the nearest valid
  row (XLA gather semantics), so a wrong id can never read outside the table.
  """
  rows_BxTxH = ids_BxTxH.astype(jnp.int32) + offsets_H.astype(jnp.int32)
  emb_BxTxHxE = jnp.take(table_RxE, rows_BxTxH, axis=0, mode="clip")
  b, t, h = ids_BxTxH.shape
  return emb_BxTxHxE.reshape(b, t, h * table_RxE.shape[-1])
