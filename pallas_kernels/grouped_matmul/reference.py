"""Pure-jnp specification of the grouped matmul: rows of x in consecutive groups, one weight
matrix per group.

Group g owns rows `[start_g, end_g)` of x, with `end_g = min(group_sizes[0] + ... +
group_sizes[g], M)` (negative sizes count as 0, rows past M do not exist) and `start_g =
end_{g-1}`. Row m of a group g gives `x[m] @ w[g]`, accumulated in float32 and returned in
x's dtype. Rows past the last group (`m >= end_{G-1}`) give zero, and their gradients (of x,
and their contribution to the gradient of w) are zero. Empty groups are allowed; their weight
gradient is zero.

Every faster implementation is tested against `grouped_matmul_reference`, and it is the
fallback (`implementation='xla'`) wherever no kernel applies; its gradient is JAX's transpose
of `jax.lax.ragged_dot`.

Dimension legend: M rows of x, K contraction width, N output width, G groups.
"""

import jax
import jax.numpy as jnp


def clip_group_sizes(group_sizes_G: jax.Array, num_rows: int) -> jax.Array:
  """int32 sizes whose groups end at `min(cumulative size, num_rows)`; negatives count as 0."""
  ends_G = jnp.minimum(jnp.cumsum(jnp.maximum(group_sizes_G.astype(jnp.int32), 0)), num_rows)
  return jnp.diff(ends_G, prepend=jnp.zeros((1,), jnp.int32))


def grouped_rows_M(group_sizes_G: jax.Array, num_rows: int) -> jax.Array:
  """True for the rows some group owns (`group_sizes_G` already clipped)."""
  return jnp.arange(num_rows, dtype=jnp.int32) < jnp.sum(group_sizes_G)


def grouped_matmul_reference(x_MxK: jax.Array, w_GxKxN: jax.Array,
                             group_sizes_G: jax.Array) -> jax.Array:
  """`[M, N]`: `x[m] @ w[group of m]`, zero for rows past the last group (module docstring)."""
  m = x_MxK.shape[0]
  sizes_G = clip_group_sizes(group_sizes_G, m)
  out_MxN = jax.lax.ragged_dot(x_MxK, w_GxKxN, sizes_G, preferred_element_type=jnp.float32)
  return jnp.where(grouped_rows_M(sizes_G, m)[:, None], out_MxN, 0.0).astype(x_MxK.dtype)
