"""Row-sparse lookup: prefetch + expand equals the dense lookup, and its gradient is the dense
table gradient restricted to the touched rows, summed deterministically.

Dimension legend: B batch, T time, H heads, E row width, U unique-row slots, R table rows.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from pallas_kernels.engram_lookup import (RowSparse, densify, expand_rows, prefetch_rows,
                                          reference, row_sparse_grad, unique_rows)
from pallas_kernels.engram_lookup.row_sparse import segment_sum_sorted
from tests.jaxpr_util import jaxpr_eqns
from tests.kernel_test_base import GRAD_TOLERANCE, clamped_rows, overflow_case, random_case


def test_unique_rows_sorted_padded_and_inverse():
  table, ids, offsets = random_case(0, 16, 64, jnp.float32)
  ids = ids.at[0, 2, 1].set(999)  # Clamped to the last row of its head (1).
  num_rows = table.shape[0]
  row_ids_U, inverse_BxTxH = unique_rows(ids, offsets, num_rows)
  rows = clamped_rows(ids, offsets, num_rows)
  assert rows[0, 2, 1] == 2 * 16 - 1
  want = np.unique(rows)
  got = np.asarray(row_ids_U)
  assert got.shape == (rows.size,)
  np.testing.assert_array_equal(got[:want.size], want)
  assert (got[want.size:] == num_rows).all(), "padding slots hold num_rows"
  np.testing.assert_array_equal(got[np.asarray(inverse_BxTxH)], rows)


@pytest.mark.parametrize("backward", ["xla", "scan"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_expand_equals_dense_lookup_and_grad_is_row_sparse(dtype, backward):
  table, ids, offsets = random_case(3, 16, 80, dtype)
  cot = jax.random.normal(jax.random.key(9), (*ids.shape[:2], ids.shape[2] * 80))
  prefetched = prefetch_rows(table, ids, offsets)
  out = expand_rows(prefetched.rows_UxE, prefetched.inverse_BxTxH)
  np.testing.assert_array_equal(np.asarray(out),
                                np.asarray(reference.engram_lookup_reference(table, ids, offsets)))
  grad_rows = jax.grad(lambda r: jnp.vdot(
      expand_rows(r, prefetched.inverse_BxTxH, backward=backward).astype(jnp.float32),
      cot))(prefetched.rows_UxE)
  sparse = row_sparse_grad(prefetched, grad_rows)
  assert isinstance(sparse, RowSparse) and sparse.values_UxE.dtype == jnp.float32
  dense_want = jax.grad(lambda t: jnp.vdot(
      reference.engram_lookup_reference(t, ids, offsets), cot))(table.astype(jnp.float32))
  tol = GRAD_TOLERANCE[jnp.dtype(dtype)]
  np.testing.assert_allclose(np.asarray(densify(sparse, table.shape[0])),
                             np.asarray(dense_want), rtol=tol, atol=tol)
  padding = np.asarray(sparse.rows_U) == table.shape[0]
  assert padding.any() and not np.asarray(sparse.values_UxE)[padding].any()


def test_segment_sum_adds_in_lookup_order():
  """Deterministic order: the f32 sum of a segment equals a left-to-right sum."""
  g_NxE = jnp.array([[1e8], [1.0], [-1e8], [1.0]], jnp.float32)
  got = segment_sum_sorted(g_NxE, jnp.array([0, 0, 0, 1]), 2)
  left_to_right = np.float32(np.float32(np.float32(1e8) + np.float32(1.0)) - np.float32(1e8))
  np.testing.assert_array_equal(np.asarray(got)[:, 0], [left_to_right, 1.0])


def test_expand_rejects_unknown_backward():
  with pytest.raises(ValueError, match="backward must be"):
    expand_rows(jnp.zeros((4, 64)), jnp.zeros((1, 2, 2), jnp.int32), backward="atomic")


def test_scan_segment_sum_equals_the_sums():
  """The segmented scan, read at segment ends: exact on integer-valued f32 (any order is exact),
  with one long segment, singletons, a segment at each end, unused slots and a first segment
  that starts at position 0; and reproducible bit for bit."""
  from pallas_kernels.engram_lookup import segment_sum
  rng = np.random.default_rng(0)
  keys_N = np.concatenate([np.full(300, 7), rng.integers(0, 50, 200), [0, 99]]).astype(np.int32)
  rng.shuffle(keys_N)
  g_NxE = rng.integers(-64, 64, (keys_N.size, 16)).astype(np.float32)
  plan = segment_sum.sort_segments(jnp.asarray(keys_N), fill=100)
  got = np.asarray(segment_sum.segment_sum(jnp.asarray(g_NxE), plan, implementation="scan"))
  want = np.zeros((keys_N.size, 16), np.float32)
  np.add.at(want, np.asarray(plan.segment_N), g_NxE[np.asarray(plan.order_N)])
  np.testing.assert_array_equal(got, want)
  assert got.shape == (keys_N.size, 16) and not got[np.unique(keys_N).size:].any()
  again = segment_sum.segment_sum(jnp.asarray(g_NxE), plan, implementation="scan")
  np.testing.assert_array_equal(np.asarray(again), got)
  # Random f32 values: within f32 rounding of the float64 sums.
  g = rng.normal(size=g_NxE.shape).astype(np.float32)
  got = np.asarray(segment_sum.segment_sum(jnp.asarray(g), plan, implementation="scan"))
  want64 = np.zeros(g.shape, np.float64)
  np.add.at(want64, np.asarray(plan.segment_N), g.astype(np.float64)[np.asarray(plan.order_N)])
  np.testing.assert_allclose(got, want64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backward", ["xla", "scan"])
def test_prefetch_plan_skips_the_backward_sort_with_equal_sums(backward):
  """`expand_rows(..., plan=prefetched.plan)`: the gradient is bit-identical to sorting the
  inverse index again, and the forward+backward program sorts once instead of twice."""
  table, ids, offsets = random_case(5, 16, 64, jnp.float32)
  cot = jax.random.normal(jax.random.key(2), (*ids.shape[:2], ids.shape[2] * 64))

  def grad(use_plan):
    def f(t):
      pre = prefetch_rows(t, ids, offsets)
      return jax.grad(lambda r: jnp.vdot(expand_rows(
          r, pre.inverse_BxTxH, backward=backward, plan=pre.plan if use_plan else None),
          cot))(pre.rows_UxE)
    return f

  sorts = {p: sum(e.primitive.name == "sort"
                  for e in jaxpr_eqns(jax.make_jaxpr(grad(p))(table).jaxpr))
           for p in (False, True)}
  assert sorts == {False: 2, True: 1}, sorts
  np.testing.assert_array_equal(np.asarray(jax.jit(grad(True))(table)),
                                np.asarray(jax.jit(grad(False))(table)))
  pre = prefetch_rows(table, ids, offsets)
  with pytest.raises(ValueError, match="plan describes"):
    expand_rows(pre.rows_UxE[:-1], pre.inverse_BxTxH, plan=pre.plan)


def test_row_sparse_path_clamps_each_id_into_its_own_head_at_int32_limits():
  """prefetch_rows / expand_rows and the host pipeline's NumPy twin read the rows of the dense
  lookup's per-head rule, with ids near 2**31 and past their head's rows."""
  from engram_jax import host_tables
  table, ids, offsets = overflow_case()
  want = clamped_rows(ids, offsets, table.shape[0])
  pre = prefetch_rows(table, ids, offsets)
  np.testing.assert_array_equal(np.asarray(pre.row_ids_U)[np.asarray(pre.inverse_BxTxH)], want)
  out = expand_rows(pre.rows_UxE, pre.inverse_BxTxH, plan=pre.plan)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(table)[want].reshape(1, 4, -1))
  row_ids_U, inverse, _ = host_tables.unique_rows_numpy(np.asarray(ids, np.int64), offsets,
                                                        table.shape[0])
  np.testing.assert_array_equal(row_ids_U[inverse], want)
