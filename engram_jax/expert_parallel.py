"""Expert parallelism: routed (token, expert) pairs travel to the experts' owners by all-to-all.

Under a mesh whose 'experts' logical axis maps to a mesh axis of size n > 1, each device along
that axis owns E / n experts (their weights stay sharded; no device gathers another's experts).
`routed_pairs` runs inside one explicit `jax.shard_map` over the ambient mesh:

  1. every batch shard sorts its P_s pairs by (expert, padding last) as moe.py does; pairs
     bound for one owner are then one contiguous run;
  2. each owner gets a fixed buffer of Q = S_s * min(k, E / n) pair slots from every device
     (a token sends at most min(k, E / n) pairs to one owner, so nothing can overflow): the
     token rows `[n, Q, D]` and their local expert ids go out in one `all_to_all`;
  3. the owner runs its experts on what it received, in the layout of the dispatch
     ('ragged': pairs sorted by local expert, one grouped matmul per projection; 'capacity':
     slot (e, rank) of an `[E / n, C, D]` buffer, batched einsums), and
  4. the outputs return by the reverse `all_to_all` into pair order.

'capacity' keeps, per expert, the first C pairs in the order of the whole batch (real tokens
in token order, then padding), exactly as the single-device dispatch: each batch shard learns
how many pairs of every expert the earlier shards hold from an all-gather of `[2, E]` counts,
so a pair's rank is global. Gradients flow through the shard_map (the transpose of an
all-to-all is the reverse all-to-all; the expert weights' cotangents stay on their owners).

The pair buffers are sized for the worst case, so each direction moves n * Q rows per device
where the pairs need S_s * k; a capacity-factored buffer would trade that for possible drops.
`jax.lax.ragged_all_to_all` is not used (slow and unreliable on GPUs, see
benchmarks/README.md).

Dimension legend: S tokens, S_s tokens of one batch shard, k experts per token, P_s = S_s*k
pairs of a shard, E routed experts, n expert shards, E_l = E / n local experts, Q pair slots per
(sender, owner), D hidden size, F expert hidden size, C capacity slots per expert.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from pallas_kernels.grouped_matmul import grouped_matmul


def expert_ffn(weights, x, group_sizes_E: Optional[jax.Array], dispatch: str, dtype,
               matmul_implementation: Optional[str] = None):
  """SwiGLU of the experts in `weights` = (gate [E,D,F], up [E,D,F], down [E,F,D]).

  'ragged': `x` [rows, D] sorted by expert, `group_sizes_E` their counts (rows past the sum
  give zeros), each projection one `pallas_kernels.grouped_matmul` (`matmul_implementation`:
  None automatic, 'xla', 'mosaic_gpu'). 'capacity': `x` [E, C, D]. Returns float32 in the
  layout of `x`.
  """
  wg, wu, wd = weights
  if dispatch == "ragged":
    mm = lambda a, w: grouped_matmul(  # noqa: E731
        a, w, group_sizes_E, implementation=matmul_implementation).astype(jnp.float32)
  else:
    mm = lambda a, w: jnp.einsum(  # noqa: E731
        "ecd,edf->ecf", a, w, preferred_element_type=jnp.float32)
  x = x.astype(dtype)
  h = (jax.nn.silu(mm(x, wg)) * mm(x, wu)).astype(dtype)
  return mm(h, wd)


def expert_mesh_axes() -> Optional[tuple[str, tuple[str, ...]]]:
  """(expert mesh axis, batch mesh axes) when the ambient mesh splits the 'experts' logical
  axis over more than one device (the current logical rules decide), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  axis = nn.logical_to_mesh_axes(("experts",))[0]
  if axis is None:
    return None
  if not isinstance(axis, str):
    raise ValueError(f"the 'experts' logical axis must map to one mesh axis, got {axis}")
  if axis not in mesh.axis_names or mesh.shape[axis] == 1:
    return None
  batch = nn.logical_to_mesh_axes(("batch",))[0] or ()
  batch = (batch,) if isinstance(batch, str) else tuple(batch)
  return axis, tuple(a for a in mesh.axis_names if a in batch)


def _ranks(keys_P):
  """Stable sort of pair keys; the rank of each sorted pair within its run of equal keys."""
  order_P = jnp.argsort(keys_P, stable=True).astype(jnp.int32)
  sorted_P = keys_P[order_P]
  first_P = jnp.searchsorted(sorted_P, sorted_P, side="left").astype(jnp.int32)
  return order_P, sorted_P, jnp.arange(keys_P.shape[0], dtype=jnp.int32) - first_P


def routed_pairs(weights, x_SxD: jax.Array, experts_Sxk: jax.Array, mask_S: jax.Array, *,
                 num_experts: int, dispatch: str, capacity: int, dtype,
                 axes: tuple[str, tuple[str, ...]]):
  """Expert outputs of every routed pair, `[S*k, D]` f32 in pair order (token-major), and
  bool `[S*k]` kept (False: dropped by 'capacity'). `axes` from `expert_mesh_axes()`."""
  expert_axis, batch_axes = axes
  mesh = jax.sharding.get_abstract_mesh()
  n = mesh.shape[expert_axis]
  if num_experts % n:
    raise ValueError(f"num_experts={num_experts} must be divisible by the '{expert_axis}' mesh "
                     f"axis ({n} devices) for expert parallelism")
  e_l, k = num_experts // n, experts_Sxk.shape[1]
  batch_shards = int(np.prod([mesh.shape[a] for a in batch_axes]))
  if x_SxD.shape[0] % batch_shards:
    raise ValueError(f"{x_SxD.shape[0]} tokens cannot be split over the {batch_shards} batch "
                     f"shards of {batch_axes}")
  s_s = x_SxD.shape[0] // batch_shards
  q = s_s * min(k, e_l)

  def body(wg, wu, wd, x_SxD, experts_Sxk, mask_S):
    d = x_SxD.shape[-1]
    experts_P = experts_Sxk.reshape(-1)
    pad_P = (jnp.repeat(mask_S, k) == 0).astype(jnp.int32)
    order_P, key_P, rank_P = _ranks(2 * experts_P + pad_P)
    expert_sorted_P = key_P // 2
    kept_sorted_P = jnp.ones_like(rank_P, bool)
    rank_sorted_P = rank_P
    if dispatch == "capacity":
      # Ranks over the whole batch: pairs of earlier batch shards come first, all real pairs
      # ahead of all padding (the single-device order).
      counts_2xE = jnp.stack([jnp.bincount(experts_P, weights=1 - pad_P, length=num_experts),
                              jnp.bincount(experts_P, weights=pad_P, length=num_experts)]
                             ).astype(jnp.int32)
      shard = jax.lax.axis_index(batch_axes) if batch_axes else 0
      all_Bx2xE = (jax.lax.all_gather(counts_2xE, batch_axes) if batch_axes
                   else counts_2xE[None])
      earlier_B = (jnp.arange(all_Bx2xE.shape[0]) < shard)[:, None, None]
      before_2xE = jnp.sum(jnp.where(earlier_B, all_Bx2xE, 0), axis=0)
      total_real_E = jnp.sum(all_Bx2xE[:, 0], axis=0)
      pad_sorted_P = key_P % 2
      base_P = jnp.where(pad_sorted_P == 0, before_2xE[0][expert_sorted_P],
                         total_real_E[expert_sorted_P] + before_2xE[1][expert_sorted_P])
      rank_sorted_P = base_P + rank_P
      kept_sorted_P = rank_sorted_P < capacity
    # Pairs bound for owner o are the sorted positions [start_o, start_o + count_o).
    owner_first_n1 = jnp.arange(n + 1, dtype=jnp.int32) * e_l
    edges_n1 = jnp.searchsorted(expert_sorted_P, owner_first_n1, side="left").astype(jnp.int32)
    slot_nxQ = edges_n1[:-1, None] + jnp.arange(q, dtype=jnp.int32)
    valid_nxQ = jnp.arange(q) < (edges_n1[1:] - edges_n1[:-1])[:, None]
    at = lambda a, fill: a.at[slot_nxQ].get(mode="fill", fill_value=fill)  # noqa: E731
    valid_nxQ = valid_nxQ & at(kept_sorted_P, False)
    local_nxQ = jnp.where(valid_nxQ, at(expert_sorted_P, 0) - owner_first_n1[:-1, None], e_l)
    token_nxQ = at(order_P, 0) // k
    send_nxQxD = jnp.where(valid_nxQ[..., None], x_SxD[token_nxQ], 0).astype(x_SxD.dtype)
    a2a = lambda v: jax.lax.all_to_all(v, expert_axis, 0, 0, tiled=True)  # noqa: E731
    got_M = a2a(local_nxQ).reshape(-1)
    got_MxD = a2a(send_nxQxD).reshape(-1, d)
    if dispatch == "ragged":
      order_M = jnp.argsort(got_M, stable=True)
      sizes_E = jnp.bincount(got_M, length=e_l + 1)[:e_l].astype(jnp.int32)
      y_sorted_MxD = expert_ffn((wg, wu, wd), got_MxD[order_M], sizes_E, dispatch, dtype)
      y_MxD = jnp.zeros_like(y_sorted_MxD).at[order_M].set(y_sorted_MxD, unique_indices=True)
    else:
      got_rank_M = a2a(jnp.where(valid_nxQ, at(rank_sorted_P, 0), 0)).reshape(-1)
      slot_M = jnp.where(got_M < e_l, got_M * capacity + got_rank_M, e_l * capacity)
      x_slots = jnp.zeros((e_l * capacity + 1, d), got_MxD.dtype).at[slot_M].set(got_MxD)
      y_slots = expert_ffn((wg, wu, wd), x_slots[:-1].reshape(e_l, capacity, d), None,
                           dispatch, dtype).reshape(-1, d)
      y_MxD = y_slots.at[slot_M].get(mode="fill", fill_value=0)
    back_nxQxD = a2a(y_MxD.reshape(n, q, d))
    pair_nxQ = jnp.where(valid_nxQ, at(order_P, 0), experts_P.shape[0])
    y_PxD = jnp.zeros((experts_P.shape[0], d), jnp.float32).at[pair_nxQ.reshape(-1)].set(
        back_nxQxD.reshape(-1, d), mode="drop")
    kept_P = jnp.zeros(experts_P.shape, bool).at[order_P].set(kept_sorted_P)
    return y_PxD, kept_P

  batch = P(batch_axes)
  wspec = P(expert_axis)
  return jax.shard_map(body, in_specs=(wspec, wspec, wspec, batch, batch, batch),
                       out_specs=(batch, batch))(*weights, x_SxD, experts_Sxk, mask_S)
