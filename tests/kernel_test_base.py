"""Shared base for kernel tests: one body of checks per op, run by reference / interpret / GPU
classes.

A subclass sets how the op is called (`lookup_kwargs`, `gmm_kwargs`) and the shapes it can
afford: interpret-mode grids are slow on CPU, so they use tiny tables, few lookups and few rows.

Tolerances are keyed by dtype and never loosened to make a test pass. Forward gathers are exact
copies (tolerance 0); lookup gradients sum f32 values in a different order from the reference,
and bf16 gradients are rounded once from f32 sums where the reference rounds after every
addition. Grouped matmuls accumulate in f32 and round once to the operand dtype; they are
compared with a float64 NumPy oracle relative to the largest expected magnitude.

Dimension legend: B batch, T time, H heads, E row width, R table rows; M rows, K contraction
width, N output width, G groups.
"""

import functools

import numpy as np
import jax
import jax.numpy as jnp

GRAD_TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2,
                  jnp.dtype(jnp.float16): 2e-3}


def random_case(seed: int, rows_per_head: int, width: int, dtype, batch: int = 2,
                length: int = 8, heads: int = 4):
  """A table, ids with duplicates and the first/last row of every head, and offsets."""
  k_table, k_ids = jax.random.split(jax.random.key(seed))
  offsets_H = jnp.arange(heads, dtype=jnp.int32) * rows_per_head
  table_RxE = jax.random.normal(k_table, (heads * rows_per_head, width), jnp.float32)
  table_RxE = table_RxE.astype(dtype)
  # A small id range forces duplicates; then plant each head's first and last row.
  ids_BxTxH = jax.random.randint(k_ids, (batch, length, heads), 0, min(4, rows_per_head))
  ids_BxTxH = ids_BxTxH.at[0, 0, :].set(0).at[-1, -1, :].set(rows_per_head - 1)
  return table_RxE, ids_BxTxH, offsets_H


def clamped_rows(ids_BxTxH, offsets_H, num_rows: int) -> np.ndarray:
  """NumPy oracle of the global rows: head h owns rows [offsets[h], offsets[h+1]) (the last head
  up to R); its id is clamped into them, in int64, then the offset is added."""
  ids = np.asarray(ids_BxTxH).astype(np.int64)
  starts = [int(o) for o in np.asarray(offsets_H)]
  ends = starts[1:] + [num_rows]
  rows = np.empty(ids.shape, np.int64)
  for h, (start, end) in enumerate(zip(starts, ends)):
    rows[..., h] = start + np.clip(ids[..., h], 0, end - start - 1)
  return rows


OVERFLOW_HEAD_SIZES = (5, 7, 3)
OVERFLOW_IDS = [[[-1, 7, 3], [2**31 - 1, -2**31, 2**31 - 2], [5, 6, 0], [4, 2**31 - 13, 2]]]


def overflow_case(width: int = 16):
  """A table of heads with 5, 7 and 3 rows (R = 15), ids [1, 4, 3] at and past every head's
  range and near int32's limits, and the offsets."""
  offsets_H = np.concatenate([[0], np.cumsum(OVERFLOW_HEAD_SIZES)[:-1]]).astype(np.int32)
  num_rows = sum(OVERFLOW_HEAD_SIZES)
  table_RxE = jnp.arange(num_rows * width, dtype=jnp.float32).reshape(num_rows, width)
  return table_RxE, jnp.asarray(OVERFLOW_IDS, jnp.int32), jnp.asarray(offsets_H)


def reference_lookup(table_RxE, ids_BxTxH, offsets_H):
  """NumPy oracle: rows clamped per head (`clamped_rows`), heads concatenated."""
  table = np.asarray(table_RxE.astype(jnp.float32))
  rows = clamped_rows(ids_BxTxH, offsets_H, table.shape[0])
  b, t, h = rows.shape
  return table[rows].reshape(b, t, h * table.shape[1])


class LookupTestBase:
  """Forward, clamping, gradient and error checks of `engram_lookup`."""

  lookup_kwargs: dict = {}
  widths = (64, 80, 128)
  dtypes = (jnp.float32, jnp.bfloat16)
  rows_per_head = 24
  grad_widths = (64, 80)

  def lookup(self, table_RxE, ids_BxTxH, offsets_H):
    from pallas_kernels.engram_lookup import engram_lookup
    return engram_lookup(table_RxE, ids_BxTxH, offsets_H, **self.lookup_kwargs)

  def test_forward_matches_reference_exactly(self):
    for width in self.widths:
      for dtype in self.dtypes:
        table, ids, offsets = random_case(width, self.rows_per_head, width, dtype)
        out = self.lookup(table, ids, offsets)
        assert out.shape == (*ids.shape[:2], ids.shape[2] * width)
        assert out.dtype == table.dtype
        np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)),
                                      reference_lookup(table, ids, offsets),
                                      err_msg=f"E={width} {jnp.dtype(dtype).name}")

  def test_out_of_range_ids_are_clamped(self):
    table, ids, offsets = random_case(1, self.rows_per_head, 64, jnp.float32)
    num_rows = table.shape[0]
    ids = ids.at[0, 1, 0].set(-5).at[1, 2, -1].set(10 * num_rows)
    out = np.asarray(self.lookup(table, ids, offsets))
    np.testing.assert_array_equal(out[0, 1, :64], np.asarray(table[0]))
    np.testing.assert_array_equal(out[1, 2, -64:], np.asarray(table[num_rows - 1]))

  def test_grad_matches_grad_of_reference(self):
    from pallas_kernels.engram_lookup import reference
    for width in self.grad_widths:
      for dtype in self.dtypes:
        table, ids, offsets = random_case(7 + width, self.rows_per_head, width, dtype)
        ids = ids.at[1, 3, 2].set(-1)  # A clamped id's gradient lands on the clamped row.
        cot = jax.random.normal(jax.random.key(3), (*ids.shape[:2], ids.shape[2] * width))
        loss = lambda t: jnp.vdot(self.lookup(t, ids, offsets).astype(jnp.float32), cot)
        loss_ref = lambda t: jnp.vdot(
            reference.engram_lookup_reference(t.astype(jnp.float32), ids, offsets), cot)
        grad = jax.grad(loss)(table)
        assert grad.shape == table.shape and grad.dtype == table.dtype
        want = np.asarray(jax.grad(loss_ref)(table))
        tol = GRAD_TOLERANCE[jnp.dtype(dtype)]
        np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), want, rtol=tol,
                                   atol=tol, err_msg=f"E={width} {jnp.dtype(dtype).name}")
        # Rows no lookup reads get exactly zero.
        touched = np.zeros(table.shape[0], bool)
        touched[clamped_rows(ids, offsets, table.shape[0]).ravel()] = True
        assert not np.asarray(grad.astype(jnp.float32))[~touched].any()

  def test_grad_is_deterministic(self):
    table, ids, offsets = random_case(5, self.rows_per_head, 64, jnp.float32)
    cot = jax.random.normal(jax.random.key(4), (*ids.shape[:2], ids.shape[2] * 64))
    grad_fn = jax.jit(jax.grad(lambda t: jnp.vdot(self.lookup(t, ids, offsets), cot)))
    np.testing.assert_array_equal(np.asarray(grad_fn(table)), np.asarray(grad_fn(table)))


MATMUL_TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2e-2,
                    jnp.dtype(jnp.float16): 2e-3}
# Rows past the last group hold this: finite, large enough that any leak breaks a tolerance.
PAST_GROUPS_VALUE = 1e3


def grouped_case(seed: int, m: int, k: int, n: int, group_sizes, dtype):
  """x [M, K], w [G, K, N], a cotangent dy [M, N] and int32 group sizes; the rows past the
  last group of x and dy hold PAST_GROUPS_VALUE. NumPy draws: no per-shape compiles."""
  rng = np.random.default_rng(seed)
  past_M = np.arange(m) >= min(int(np.maximum(np.asarray(group_sizes), 0).sum()), m)
  x_MxK, dy_MxN = rng.standard_normal((m, k)), rng.standard_normal((m, n))
  x_MxK[past_M] = dy_MxN[past_M] = PAST_GROUPS_VALUE
  w_GxKxN = rng.standard_normal((len(group_sizes), k, n))
  return (jnp.asarray(x_MxK, dtype), jnp.asarray(w_GxKxN, dtype),
          jnp.asarray(group_sizes, jnp.int32), jnp.asarray(dy_MxN, dtype))


def _f32(a) -> np.ndarray:
  return np.asarray(a).astype(np.float32)


def grouped_matmul_oracle(x_MxK, w_GxKxN, group_sizes_G, dy_MxN):
  """NumPy float64 (y, dx, dw) of reference.py's specification, one group at a time."""
  x, w, dy = (_f32(a).astype(np.float64) for a in (x_MxK, w_GxKxN, dy_MxN))
  ends = np.minimum(np.cumsum(np.maximum(np.asarray(group_sizes_G), 0)), x.shape[0])
  y, dx, dw = np.zeros(dy.shape), np.zeros(x.shape), np.zeros(w.shape)
  for g, (start, end) in enumerate(zip(np.concatenate([[0], ends[:-1]]), ends)):
    y[start:end] = x[start:end] @ w[g]
    dx[start:end] = dy[start:end] @ w[g].T
    dw[g] = x[start:end].T @ dy[start:end]
  return y, dx, dw


@functools.partial(jax.jit, static_argnums=0)
def _forward_and_vjp(gmm, x_MxK, w_GxKxN, sizes_G, dy_MxN):
  y_MxN, vjp = jax.vjp(lambda x, w: gmm(x, w, sizes_G), x_MxK, w_GxKxN)
  return (y_MxN, *vjp(dy_MxN))


class GroupedMatmulTestBase:
  """Forward, both gradients, rows past the last group and empty groups of `grouped_matmul`."""

  gmm_kwargs: dict = {}
  dtypes = (jnp.float32, jnp.bfloat16)
  # (M, K, N, group sizes): uneven groups, empty ones (first, middle, last), rows past the last
  # group, and sizes summing past M (the last groups end at row M).
  cases = ((24, 16, 8, (5, 0, 9, 3)), (16, 8, 12, (0, 7, 0)), (16, 8, 4, (6, 20, 3)))

  def gmm(self, x_MxK, w_GxKxN, group_sizes_G):
    from pallas_kernels.grouped_matmul import grouped_matmul
    return grouped_matmul(x_MxK, w_GxKxN, group_sizes_G, **self.gmm_kwargs)

  def test_forward_and_gradients_match_oracle(self):
    for i, (m, k, n, sizes) in enumerate(self.cases):
      for dtype in self.dtypes:
        x, w, sizes_G, dy = grouped_case(i, m, k, n, sizes, dtype)
        y, dx, dw = _forward_and_vjp(self.gmm, x, w, sizes_G, dy)
        assert (y.shape, y.dtype, dx.dtype, dw.dtype) == ((m, n), x.dtype, x.dtype, w.dtype)
        tol = MATMUL_TOLERANCE[jnp.dtype(dtype)]
        for name, got, want in zip(("y", "dx", "dw"), (y, dx, dw),
                                   grouped_matmul_oracle(x, w, sizes_G, dy)):
          np.testing.assert_allclose(_f32(got), want, rtol=tol,
                                     atol=tol * np.abs(want).max(),
                                     err_msg=f"{name} case {i} {jnp.dtype(dtype).name}")
        # Exactly zero: outputs and input gradients of rows past the last group, and the
        # weight gradients of empty groups.
        owned = min(int(np.maximum(np.asarray(sizes), 0).sum()), m)
        assert not _f32(y)[owned:].any()
        assert not _f32(dx)[owned:].any()
        ends = np.minimum(np.cumsum(np.maximum(sizes, 0)), m)
        empty = np.diff(np.concatenate([[0], ends])) == 0
        assert not _f32(dw)[empty].any()
