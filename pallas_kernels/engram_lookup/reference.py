"""Pure-jnp specification of the fused multi-head Engram lookup.

Every faster implementation is tested against `engram_lookup_reference`, and it is also the
fallback used where no kernel applies.

Heads own consecutive blocks of the table: head h owns rows `[offsets[h], offsets[h+1])` and the
last head `[offsets[H-1], R)` (`engram_jax.memory.head_offsets`). A per-head id is clamped into
its own head's rows, `[0, rows_h - 1]`, *before* the head's offset is added: an out-of-range id
reads its own head's first or last row, never another head's, and no sum can pass 2**31
(offsets[h] + rows_h - 1 <= R - 1). Ids are 32-bit or narrower integers; 64-bit ids are
refused, since global rows are int32 and, without `jax_enable_x64`, jnp would wrap them to
int32 before any clamp could see them.

Dimension legend: B batch, T time, H hash heads, E row width, R table rows.
"""

import jax
import jax.numpy as jnp
import numpy as np

_MAX_ROW = 2**31 - 1


def check_id_dtype(dtype, what: str = "ids") -> None:
  """Raises TypeError unless `dtype` is an integer type of at most 32 bits."""
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"{what} must be integers, got {dtype}")
  if jnp.dtype(dtype).itemsize > 4:
    raise TypeError(f"{what} must be 32-bit (or narrower) integers, got {jnp.dtype(dtype)}: "
                    "global rows are int32, and 64-bit ids would wrap before being clamped; "
                    "check their range and cast them to int32")


def head_last_rows_H(offsets_H: jax.Array, num_rows: int) -> jax.Array:
  """int32 `rows_h - 1`: the largest local id of every head (see the module docstring)."""
  offsets_H = jnp.asarray(offsets_H).astype(jnp.int32)
  ends_H = jnp.concatenate([offsets_H[1:], jnp.full((1,), num_rows, jnp.int32)])
  return ends_H - offsets_H - 1


def clamp_to_heads(ids_BxTxH: jax.Array, offsets_H: jax.Array, num_rows: int) -> jax.Array:
  """int32 local ids, each clamped into its own head's rows `[0, rows_h - 1]`."""
  check_id_dtype(ids_BxTxH.dtype)
  if ids_BxTxH.dtype == jnp.uint32:  # above int32: clamp where it still fits, same result
    ids_BxTxH = jnp.minimum(ids_BxTxH, jnp.uint32(_MAX_ROW))
  return jnp.clip(ids_BxTxH.astype(jnp.int32), 0, head_last_rows_H(offsets_H, num_rows))


def global_rows(ids_BxTxH: jax.Array, offsets_H: jax.Array, num_rows: int) -> jax.Array:
  """int32 global rows `offsets[h] + clamp(ids)`; offsets that do not form consecutive head
  blocks are not checked (they are traced constants), so the sum is clipped into `[0, R)` too
  and never reads outside the table."""
  rows_BxTxH = (clamp_to_heads(ids_BxTxH, offsets_H, num_rows)
                + jnp.asarray(offsets_H).astype(jnp.int32))
  return jnp.clip(rows_BxTxH, 0, num_rows - 1)


def global_rows_numpy(ids_BxTxH: np.ndarray, offsets_H: np.ndarray,
                      num_rows: int) -> np.ndarray:
  """NumPy twin of `global_rows` for host pipelines (int64 arithmetic, any integer ids)."""
  offsets_H = np.asarray(offsets_H, np.int64)
  last_H = np.append(offsets_H[1:], num_rows) - offsets_H - 1
  rows = np.clip(np.asarray(ids_BxTxH).astype(np.int64), 0, last_H) + offsets_H
  return np.clip(rows, 0, num_rows - 1)


def engram_lookup_reference(table_RxE: jax.Array, ids_BxTxH: jax.Array,
                            offsets_H: jax.Array) -> jax.Array:
  """Returns `table[offsets + clamp(ids)]` flattened over heads: `[B, T, H*E]`.

  `ids_BxTxH` are per-head local row ids in `[0, rows of that head)`; `offsets_H` the first row
  of each head in the table. An id outside its head's rows is clamped to the nearest valid row
  of that head (see the module docstring).
  """
  rows_BxTxH = global_rows(ids_BxTxH, offsets_H, table_RxE.shape[0])
  emb_BxTxHxE = jnp.take(table_RxE, rows_BxTxH, axis=0, mode="clip")
  b, t, h = ids_BxTxH.shape
  return emb_BxTxHxE.reshape(b, t, h * table_RxE.shape[-1])
