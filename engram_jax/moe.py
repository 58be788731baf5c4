"""Mixture-of-experts FFN: shared experts + top-k routed experts, dropless or capacity dispatch.

Routing (DeepSeek-V3): affinities `s = sigmoid(x W_r)` (or a softmax over the routed experts);
the k experts are chosen by `s + b`, where `b` is a per-expert bias used *only* for selection;
the mixing weights are the chosen affinities, normalised to sum to one (sigmoid only; softmax
weights are already a distribution and are left as they are) and scaled by
`routed_scaling_factor`.

Auxiliary-loss-free balancing: `b` is the variable `moe_stats/expert_bias` (float32, outside
'params', so optimisers never see it). When the model is applied with `mutable=['moe_stats']`
and `deterministic=False`, every MoE layer adds `bias_update_rate * sign(mean_load - load_e)`
to its bias from the load it just observed (padding excluded), i.e. the step-t routing uses the
bias of step t-1, as in V3. The trainer stores the returned 'moe_stats' collection with the
state. An optional batch-level balance loss `coef * E * sum_e f_e P_e` (f_e: fraction of
routed slots taken by e, P_e: mean normalised affinity) is returned in the stats. Loads, bias
and loss count every routed pair, dropped or not.

Dispatch: the P (token, expert) pairs are stably sorted by expert, real tokens in token order
ahead of padding, so each expert's pairs form one contiguous group.
  'ragged' (`MoEConfig.dispatch`, the default): rows are gathered in that order and multiplied
    with `pallas_kernels.grouped_matmul` (one grouped matmul per projection: JAX's Mosaic GPU
    kernels on Hopper GPUs, `jax.lax.ragged_dot` elsewhere; `MoEConfig.matmul_implementation`
    forces one). Dropless; nothing of size [experts, capacity] is built.
  'capacity' (explicit option only): expert e takes the first C pairs of its group
    (C = `expert_capacity`, static) into slots [E, C]; empty slots read a zero row, which the
    bias-free SwiGLU maps to zero. The experts run as batched einsums over E: E*C rows of
    dense FLOPs. Pairs past slot C are dropped: they add zero (the shared experts still apply)
    and `dropped_fraction` reports their share (the train log always shows it). Padding sorts
    last, so it only fills slots that real tokens left empty.
In both modes the expert outputs go back to pair order and are summed with the routing weights.
Both modes use the same parameters ('experts/gate|up|down'), so checkpoints are interchangeable.
Under a mesh whose 'experts' logical axis spans more than one device, both run expert-parallel:
pairs travel to the experts' owners by all-to-all (engram_jax/expert_parallel.py), with the
same results.

Dimension legend: B batch, T length, S = B*T tokens, D hidden size, E routed experts,
k experts per token, P = S*k routed pairs, F expert hidden size, C slots per expert.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax import expert_parallel
from engram_jax.config import MoEConfig
from engram_jax.layers import SwiGLU

Dtype = Any


def route(logits_SxE: jax.Array, bias_E: Optional[jax.Array], cfg: MoEConfig):
  """Top-k selection. Returns (expert ids [S,k] int32, weights [S,k] f32, affinities [S,E])."""
  logits_SxE = logits_SxE.astype(jnp.float32)
  if cfg.score_func == "sigmoid":
    scores_SxE = jax.nn.sigmoid(logits_SxE)
  else:
    scores_SxE = jax.nn.softmax(logits_SxE, axis=-1)
  select_SxE = scores_SxE if bias_E is None else scores_SxE + bias_E
  _, experts_Sxk = jax.lax.top_k(select_SxE, cfg.top_k)
  weights_Sxk = jnp.take_along_axis(scores_SxE, experts_Sxk, axis=-1)
  if cfg.score_func == "sigmoid":
    weights_Sxk = weights_Sxk / (jnp.sum(weights_Sxk, axis=-1, keepdims=True) + 1e-20)
  return experts_Sxk.astype(jnp.int32), weights_Sxk * cfg.routed_scaling_factor, scores_SxE


def balance_bias_delta(load_E: jax.Array, rate: float) -> jax.Array:
  """Aux-free update: raise the bias of under-loaded experts, lower over-loaded ones."""
  return rate * jnp.sign(jnp.mean(load_E) - load_E)


def expert_capacity(cfg: MoEConfig, num_tokens: int) -> int:
  """C of 'capacity' dispatch: ceil(capacity_factor * S * k / E), rounded up to 8, at most S."""
  c = math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts)
  # A multiple of 8 keeps the [E, C, D] operands aligned to GPU matmul tiles; an expert never
  # receives more than S pairs (k distinct experts per token), so C = S already drops nothing.
  return min(-(-c // 8) * 8, num_tokens)


class RoutedExperts(nn.Module):
  """E SwiGLU experts; one parameter set, applied in the layout of `dispatch`.

  'ragged': `x` is [P, D], rows sorted by expert, `group_sizes_E` their counts; each projection
  is one `grouped_matmul` (`matmul_implementation`: None automatic, 'xla', 'mosaic_gpu').
  'capacity': `x` is [E, C, D] (expert e's slots in row e,
  `group_sizes_E` unused); each projection is one batched einsum over E. Returns the same
  layout with D columns, in float32. `weights()` gives the (gate, up, down) arrays in the
  compute dtype, for the expert-parallel dispatch (engram_jax/expert_parallel.py).
  """

  num_experts: int
  embed_size: int
  hidden_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dispatch: str = "ragged"
  matmul_implementation: Optional[str] = None

  def setup(self):
    e, d, f = self.num_experts, self.embed_size, self.hidden_size
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2,
                                            out_axis=-1, batch_axis=(0,))
    p = lambda name, shape, axes: self.param(  # noqa: E731
        name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)
    self.gate = p("gate", (e, d, f), ("experts", "embed", "mlp"))
    self.up = p("up", (e, d, f), ("experts", "embed", "mlp"))
    self.down = p("down", (e, f, d), ("experts", "mlp", "embed"))

  def weights(self):
    return tuple(w.astype(self.dtype) for w in (self.gate, self.up, self.down))

  def __call__(self, x: jax.Array, group_sizes_E: Optional[jax.Array] = None) -> jax.Array:
    return expert_parallel.expert_ffn(self.weights(), x, group_sizes_E, self.dispatch,
                                      self.dtype, self.matmul_implementation)


class MoE(nn.Module):
  """Shared + routed experts. `__call__(x_BxTxD, mask_BxT=None, deterministic=True)`.

  Returns `(y_BxTxD, stats)`; stats: `tokens_per_expert` [E] (non-padding tokens routed to
  each expert), `max_over_mean_load` [], `aux_loss` [] (0 when aux_loss_coef == 0),
  `dropped_fraction` [] (share of non-padding routed pairs that found no capacity slot; 0 under
  'ragged' dispatch).
  """

  config: MoEConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, mask_BxT: Optional[jax.Array] = None,
               deterministic: bool = True):
    cfg = self.config
    b, t, d = x_BxTxD.shape
    s, k, e = b * t, cfg.top_k, cfg.num_experts
    x_SxD = x_BxTxD.reshape(s, d)
    mask_S = (jnp.ones((s,), jnp.float32) if mask_BxT is None
              else mask_BxT.reshape(s).astype(jnp.float32))

    router_DxE = self.param(
        "router", nn.with_logical_partitioning(nn.initializers.normal(d ** -0.5),
                                               ("embed", None)), (d, e), self.param_dtype)
    # Routing decisions are made in float32: bf16 ties would flip the top-k.
    logits_SxE = jnp.einsum("sd,de->se", x_SxD.astype(jnp.float32),
                            router_DxE.astype(jnp.float32))
    bias_var = None
    if cfg.routing == "aux_free":
      bias_var = self.variable("moe_stats", "expert_bias", jnp.zeros, (e,), jnp.float32)
    bias_E = None if bias_var is None else jax.lax.stop_gradient(bias_var.value)
    experts_Sxk, weights_Sxk, scores_SxE = route(logits_SxE, bias_E, cfg)

    experts_P = experts_Sxk.reshape(s * k)
    mask_P = jnp.repeat(mask_S, k)
    n_valid = jnp.maximum(jnp.sum(mask_S), 1.0)
    # Stable sort by (expert, padding last): each expert's pairs stay one contiguous group
    # (what the grouped matmul needs) and, within it, real tokens keep token order ahead of padding,
    # so under 'capacity' padding can only take slots that real tokens left empty.
    order_P = jnp.argsort(2 * experts_P + (mask_P == 0), stable=True)
    group_sizes_E = jnp.bincount(experts_P, length=e).astype(jnp.int32)
    routed = RoutedExperts(e, d, cfg.expert_hidden_size, self.dtype, self.param_dtype,
                           dispatch=cfg.dispatch,
                           matmul_implementation=cfg.matmul_implementation, name="experts")
    ep_axes = expert_parallel.expert_mesh_axes()
    if ep_axes is not None:
      y_pairs_PxD, kept_P = expert_parallel.routed_pairs(
          routed.weights(), x_SxD, experts_Sxk, mask_S, num_experts=e, dispatch=cfg.dispatch,
          capacity=expert_capacity(cfg, s), dtype=self.dtype, axes=ep_axes)
      dropped_fraction = jnp.sum(jnp.where(kept_P, 0.0, mask_P)) / (k * n_valid)
    elif cfg.dispatch == "ragged":
      y_sorted_PxD = routed(x_SxD[order_P // k], group_sizes_E)
      y_pairs_PxD = jnp.zeros_like(y_sorted_PxD).at[order_P].set(y_sorted_PxD,
                                                                  unique_indices=True)
      dropped_fraction = jnp.zeros((), jnp.float32)
    else:
      p, c = s * k, expert_capacity(cfg, s)
      start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
      rank_C = jnp.arange(c, dtype=jnp.int32)
      filled_ExC = rank_C < group_sizes_E[:, None]
      # Empty slots name pair P, i.e. token S: a zero row on the way in, dropped on the way out.
      pair_ExC = jnp.where(filled_ExC, order_P[jnp.minimum(start_E[:, None] + rank_C, p - 1)],
                           p)
      x_pad_SxD = jnp.concatenate([x_SxD, jnp.zeros((1, d), x_SxD.dtype)])
      y_ExCxD = routed(x_pad_SxD[pair_ExC // k])
      y_pairs_PxD = jnp.zeros((p, d), y_ExCxD.dtype).at[pair_ExC].set(y_ExCxD, mode="drop")
      # Rank of each sorted pair within its expert: past C it found no slot.
      rank_sorted_P = jnp.arange(p, dtype=jnp.int32) - start_E[experts_P[order_P]]
      dropped_fraction = jnp.sum(jnp.where(rank_sorted_P >= c, mask_P[order_P], 0.0)) / (
          k * n_valid)
    y_SxD = jnp.einsum("skd,sk->sd", y_pairs_PxD.reshape(s, k, d), weights_Sxk)

    if cfg.num_shared_experts:
      y_SxD = y_SxD + SwiGLU(cfg.num_shared_experts * cfg.expert_hidden_size, self.dtype,
                             self.param_dtype, name="shared")(x_SxD).astype(jnp.float32)

    # Load statistics over non-padding tokens; they drive the bias and the logs.
    load_E = jnp.bincount(experts_P, weights=mask_P, length=e)
    aux_loss = jnp.zeros((), jnp.float32)
    if cfg.aux_loss_coef > 0:
      frac_E = load_E * e / (k * n_valid)
      probs_SxE = scores_SxE / jnp.sum(scores_SxE, axis=-1, keepdims=True)
      mean_prob_E = jnp.einsum("se,s->e", probs_SxE, mask_S) / n_valid
      aux_loss = cfg.aux_loss_coef * jnp.sum(jax.lax.stop_gradient(frac_E) * mean_prob_E)
    if (bias_var is not None and not deterministic and self.is_mutable_collection("moe_stats")
        and not self.is_initializing()):
      bias_var.value = bias_var.value + balance_bias_delta(jax.lax.stop_gradient(load_E),
                                                           cfg.bias_update_rate)
    mean_load = jnp.maximum(jnp.mean(load_E), 1e-9)
    stats = {"tokens_per_expert": load_E, "max_over_mean_load": jnp.max(load_E) / mean_load,
             "aux_loss": aux_loss, "dropped_fraction": dropped_fraction}
    return y_SxD.reshape(b, t, d).astype(self.dtype), stats
