"""Row-sparse lookup: the representation shared by kernels, sparse optimisers and offload.

A step touches at most B*T*H rows of a table with millions to billions of rows. Instead of
differentiating `table[ids]` (whose cotangent is a dense, table-sized scatter-add), the training
step splits the lookup in two:

  1. `prefetch_rows(table, ids, offsets)` -> `PrefetchedRows`: the sorted unique global rows the
     batch reads, gathered once (from HBM, or from a pinned_host table for offload), plus the
     inverse index of every (b, t, h) into them. No gradient flows through this part.
  2. `expand_rows(rows_UxE, inverse_BxTxH)` -> `[B, T, H*E]`, a `custom_vjp` whose backward is a
     sorted segment-sum in float32: the gradient w.r.t. `rows_UxE` is the summed gradient of
     every unique row, i.e. the row-sparse table gradient `RowSparse(row_ids_U, values_UxE)`.

U is static (= B*T*H) so everything jits. Unused slots at the end of `row_ids_U` hold
`num_rows` (one past the last row): gathers fill them with zeros and optimiser scatters must use
`mode='drop'`, so padding never touches the table. Rows are clamped into `[0, num_rows)` first,
the same rule as the dense reference lookup.

Dimension legend: B batch, T time, H hash heads, E row width, U = B*T*H lookup slots, R rows.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RowSparse(NamedTuple):
  """A row-sparse table gradient (or update).

  rows_U: int32 sorted unique global row ids; padding slots hold `num_rows` (out of range).
  values_UxE: float32 summed gradient of each row; zero in padding slots.
  """
  rows_U: jax.Array
  values_UxE: jax.Array


class PrefetchedRows(NamedTuple):
  """The rows one batch reads from one Engram table, gathered ahead of the model.

  rows_UxE: the gathered rows (zeros in padding slots), in the table's dtype.
  inverse_BxTxH: int32 index of every lookup into `rows_UxE`.
  row_ids_U: int32 global row ids of `rows_UxE` (sorted, padded with `num_rows`).
  """
  rows_UxE: jax.Array
  inverse_BxTxH: jax.Array
  row_ids_U: jax.Array


def global_rows(ids_BxTxH: jax.Array, offsets_H: jax.Array, num_rows: int) -> jax.Array:
  """Per-head local ids -> global table rows, clamped into `[0, num_rows)`."""
  rows = ids_BxTxH.astype(jnp.int32) + jnp.asarray(offsets_H, jnp.int32)
  return jnp.clip(rows, 0, num_rows - 1)


def unique_rows(ids_BxTxH: jax.Array, offsets_H: jax.Array,
                num_rows: int) -> tuple[jax.Array, jax.Array]:
  """Returns `(row_ids_U, inverse_BxTxH)`: sorted unique global rows and the inverse index."""
  rows_N = global_rows(ids_BxTxH, offsets_H, num_rows).reshape(-1)
  row_ids_U, inverse_N = jnp.unique(rows_N, return_inverse=True, size=rows_N.shape[0],
                                    fill_value=num_rows)
  return row_ids_U.astype(jnp.int32), inverse_N.reshape(ids_BxTxH.shape).astype(jnp.int32)


def gather_rows(table_RxE: jax.Array, row_ids_U: jax.Array) -> jax.Array:
  """`table[row_ids]` with zeros for padding slots (ids == num_rows)."""
  return table_RxE.at[row_ids_U].get(mode="fill", fill_value=0)


def prefetch_rows(table_RxE: jax.Array, ids_BxTxH: jax.Array,
                  offsets_H: jax.Array) -> PrefetchedRows:
  """Gathers the unique rows a batch reads (step 1 above)."""
  row_ids_U, inverse_BxTxH = unique_rows(ids_BxTxH, offsets_H, table_RxE.shape[0])
  return PrefetchedRows(gather_rows(table_RxE, row_ids_U), inverse_BxTxH, row_ids_U)


def _expand(rows_UxE, inverse_BxTxH):
  b, t, h = inverse_BxTxH.shape
  return rows_UxE[inverse_BxTxH].reshape(b, t, h * rows_UxE.shape[-1])


@jax.custom_vjp
def expand_rows(rows_UxE: jax.Array, inverse_BxTxH: jax.Array) -> jax.Array:
  """`rows[inverse]` flattened over heads to `[B, T, H*E]` (step 2 above)."""
  return _expand(rows_UxE, inverse_BxTxH)


def _expand_fwd(rows_UxE, inverse_BxTxH):
  # Residuals: the inverse index and an empty [U, 0] witness of the rows' count and dtype.
  witness_Ux0 = jnp.zeros((rows_UxE.shape[0], 0), rows_UxE.dtype)
  return _expand(rows_UxE, inverse_BxTxH), (inverse_BxTxH, witness_Ux0)


def segment_sum_sorted(g_NxE: jax.Array, inverse_N: jax.Array, num_segments: int) -> jax.Array:
  """Sums rows of `g` per segment id in float32, visiting ids in sorted order."""
  order_N = jnp.argsort(inverse_N, stable=True)
  return jax.ops.segment_sum(g_NxE.astype(jnp.float32)[order_N], inverse_N[order_N],
                             num_segments=num_segments, indices_are_sorted=True)


def _expand_bwd(res, g_BxTxHE):
  inverse_BxTxH, witness_Ux0 = res
  e = g_BxTxHE.shape[-1] // inverse_BxTxH.shape[-1]
  g_NxE = g_BxTxHE.reshape(-1, e)
  summed_UxE = segment_sum_sorted(g_NxE, inverse_BxTxH.reshape(-1), witness_Ux0.shape[0])
  # Integer inputs take a float0 cotangent.
  zero_inv = jnp.zeros(inverse_BxTxH.shape, dtype=jax.dtypes.float0)
  return summed_UxE.astype(witness_Ux0.dtype), zero_inv


expand_rows.defvjp(_expand_fwd, _expand_bwd)


def row_sparse_grad(prefetched: PrefetchedRows, grad_rows_UxE: jax.Array) -> RowSparse:
  """Pairs the gradient w.r.t. `prefetched.rows_UxE` with its row ids."""
  return RowSparse(prefetched.row_ids_U, grad_rows_UxE.astype(jnp.float32))


def densify(grad: RowSparse, num_rows: int) -> jax.Array:
  """Dense `[R, E]` table gradient of a `RowSparse` (for tests and small tables)."""
  dense = jnp.zeros((num_rows, grad.values_UxE.shape[-1]), jnp.float32)
  return dense.at[grad.rows_U].add(grad.values_UxE, mode="drop")
