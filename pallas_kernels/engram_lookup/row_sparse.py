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
     The sums are deterministic: each unique row adds its lookups in batch order (a stable
     sort); on GPU the Triton segment-sum of segment_sum.py does it without atomics.

U is static (= B*T*H) so everything jits. Unused slots at the end of `row_ids_U` hold
`num_rows` (one past the last row): gathers fill them with zeros and optimiser scatters must use
`mode='drop'`, so padding never touches the table. Each id is clamped into its own head's rows
first, the same rule as the dense reference lookup (reference.py).

Dimension legend: B batch, T time, H hash heads, E row width, U = B*T*H lookup slots, R rows.
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.engram_lookup import api, segment_sum


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
  plan: optional `segment_sum.SortedSegments` of the lookups by slot, from the sort that made
    `row_ids_U` (`prefetch_rows` fills it): `expand_rows(..., plan=...)` then reuses it in the
    backward instead of sorting the inverse index again. None when the rows come from elsewhere
    (host tables, generation buffers).
  """
  rows_UxE: jax.Array
  inverse_BxTxH: jax.Array
  row_ids_U: jax.Array
  plan: Optional[segment_sum.SortedSegments] = None


def _unique_rows_plan(ids_BxTxH, offsets_H, num_rows):
  rows_N = api.global_rows_N(ids_BxTxH, offsets_H, num_rows)
  plan = segment_sum.sort_segments(rows_N, fill=num_rows)
  # order_N is a permutation, so this scatter writes every slot exactly once.
  inverse_N = jnp.zeros_like(rows_N).at[plan.order_N].set(plan.segment_N,
                                                          unique_indices=True)
  return plan.keys_U, inverse_N.reshape(ids_BxTxH.shape), plan


def unique_rows(ids_BxTxH: jax.Array, offsets_H: jax.Array,
                num_rows: int) -> tuple[jax.Array, jax.Array]:
  """Returns `(row_ids_U, inverse_BxTxH)`: sorted unique global rows and the inverse index."""
  row_ids_U, inverse_BxTxH, _ = _unique_rows_plan(ids_BxTxH, offsets_H, num_rows)
  return row_ids_U, inverse_BxTxH


def gather_rows(table_RxE: jax.Array, row_ids_U: jax.Array) -> jax.Array:
  """`table[row_ids]` with zeros for padding slots (ids == num_rows)."""
  return table_RxE.at[row_ids_U].get(mode="fill", fill_value=0)


def prefetch_rows(table_RxE: jax.Array, ids_BxTxH: jax.Array,
                  offsets_H: jax.Array) -> PrefetchedRows:
  """Gathers the unique rows a batch reads (step 1 above), with the sort's plan (the lookups
  ordered by slot: same order, segments and starts as sorting the inverse index), which
  `expand_rows(..., plan=prefetched.plan)` reuses in its backward."""
  row_ids_U, inverse_BxTxH, plan = _unique_rows_plan(ids_BxTxH, offsets_H, table_RxE.shape[0])
  return PrefetchedRows(gather_rows(table_RxE, row_ids_U), inverse_BxTxH, row_ids_U, plan)


def _default_backward(width: int) -> str:
  return "pallas" if api.current_platform() == "gpu" and width % 16 == 0 else "xla"


def _expand(backward, rows_UxE, inverse_BxTxH, plan):
  b, t, h = inverse_BxTxH.shape
  del backward, plan
  # The inverse index is always in range; the forward is the same gather as the dense lookup
  # (the Pallas kernel on GPU), over one "head" that owns all U rows.
  width = rows_UxE.shape[-1]
  plan = api.resolve_plan(width, implementation=None if width % 8 == 0 else "xla",
                          backward="xla")
  out_NxE = api.gather_flat(rows_UxE, inverse_BxTxH.reshape(-1).astype(jnp.int32),
                            jnp.zeros((1,), jnp.int32), plan)
  return out_NxE.reshape(b, t, h * rows_UxE.shape[-1])


def _expand_fwd(backward, rows_UxE, inverse_BxTxH, plan):
  # Residuals: the inverse index, the plan (or None) and an empty [U, 0] witness of the rows'
  # count and dtype.
  witness_Ux0 = jnp.zeros((rows_UxE.shape[0], 0), rows_UxE.dtype)
  return (_expand(backward, rows_UxE, inverse_BxTxH, plan),
          (inverse_BxTxH, plan, witness_Ux0))


def segment_sum_sorted(g_NxE: jax.Array, inverse_N: jax.Array, num_segments: int, *,
                       backward: str = "xla", interpret: bool = False) -> jax.Array:
  """Sums rows of `g` per segment id in float32, each segment in lookup order."""
  plan = segment_sum.segments_of_sorted_ids(inverse_N.astype(jnp.int32), num_segments)
  return segment_sum.segment_sum(g_NxE, plan, implementation=backward, interpret=interpret)


def _expand_bwd(backward, res, g_BxTxHE):
  inverse_BxTxH, plan, witness_Ux0 = res
  e = g_BxTxHE.shape[-1] // inverse_BxTxH.shape[-1]
  g_NxE = g_BxTxHE.reshape(-1, e)
  if plan is None:
    summed_UxE = segment_sum_sorted(g_NxE, inverse_BxTxH.reshape(-1), witness_Ux0.shape[0],
                                    backward=backward)
  else:
    summed_UxE = segment_sum.segment_sum(g_NxE, plan, implementation=backward)
  # Integer inputs take a float0 cotangent.
  float0 = lambda x: jnp.zeros(x.shape, dtype=jax.dtypes.float0)  # noqa: E731
  return (summed_UxE.astype(witness_Ux0.dtype), float0(inverse_BxTxH),
          None if plan is None else jax.tree.map(float0, plan))


_expand_rows = jax.custom_vjp(_expand, nondiff_argnums=(0,))
_expand_rows.defvjp(_expand_fwd, _expand_bwd)


def expand_rows(rows_UxE: jax.Array, inverse_BxTxH: jax.Array, *,
                backward: Optional[str] = None,
                plan: Optional[segment_sum.SortedSegments] = None) -> jax.Array:
  """`rows[inverse]` flattened over heads to `[B, T, H*E]` (step 2 above).

  Its gradient w.r.t. `rows_UxE` is the f32 sorted segment-sum of the lookups' cotangents,
  cast to the rows' dtype (prefetch f32 rows to keep f32 sums). `backward`: 'pallas' (Triton,
  atomic-free, default on GPU when E % 16 == 0), 'xla' (sorted segment_sum) or 'scan'
  (segmented associative scan, reproducible everywhere; segment_sum.py). `plan`: the
  `PrefetchedRows.plan` of these rows (from `prefetch_rows`): the backward then skips sorting
  the inverse index (same sums, bit for bit); it must describe `inverse_BxTxH` over U slots.
  """
  backward = backward or _default_backward(rows_UxE.shape[-1])
  segment_sum.check_backward(backward)
  if plan is not None and (plan.order_N.shape != (inverse_BxTxH.size,)
                           or plan.starts_U1.shape != (rows_UxE.shape[0] + 1,)):
    raise ValueError(f"plan describes {plan.order_N.shape[0]} lookups over "
                     f"{plan.starts_U1.shape[0] - 1} slots; the rows have "
                     f"{inverse_BxTxH.size} lookups over {rows_UxE.shape[0]} slots")
  return _expand_rows(backward, rows_UxE, inverse_BxTxH, plan)


def row_sparse_grad(prefetched: PrefetchedRows, grad_rows_UxE: jax.Array) -> RowSparse:
  """Pairs the gradient w.r.t. `prefetched.rows_UxE` with its row ids."""
  return RowSparse(prefetched.row_ids_U, grad_rows_UxE.astype(jnp.float32))


def densify(grad: RowSparse, num_rows: int) -> jax.Array:
  """Dense `[R, E]` table gradient of a `RowSparse` (for tests and small tables)."""
  dense = jnp.zeros((num_rows, grad.values_UxE.shape[-1]), jnp.float32)
  return dense.at[grad.rows_U].add(grad.values_UxE, mode="drop")
