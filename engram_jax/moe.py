"""Mixture-of-experts FFN: shared experts + top-k routed experts, dropless grouped matmuls.

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
routed slots taken by e, P_e: mean normalised affinity) is returned in the stats.

Dispatch: the S*k (token, expert) pairs are sorted by expert, rows gathered in that order and
multiplied with `jax.lax.ragged_dot` (one grouped matmul per projection); outputs go back to
pair order by the inverse permutation and are summed with the routing weights. Nothing of size
[tokens, experts, capacity] is built and no token is dropped.

Dimension legend: B batch, T length, S = B*T tokens, D hidden size, E routed experts,
k experts per token, P = S*k routed pairs, F expert hidden size.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

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


class RoutedExperts(nn.Module):
  """E SwiGLU experts applied to expert-sorted rows with `jax.lax.ragged_dot`."""

  num_experts: int
  hidden_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_PxD: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    e, d, f = self.num_experts, x_PxD.shape[-1], self.hidden_size
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2,
                                            out_axis=-1, batch_axis=(0,))
    p = lambda name, shape, axes: self.param(  # noqa: E731
        name, nn.with_logical_partitioning(init, axes), shape,
        self.param_dtype).astype(self.dtype)
    wg_ExDxF = p("gate", (e, d, f), ("experts", "embed", "mlp"))
    wu_ExDxF = p("up", (e, d, f), ("experts", "embed", "mlp"))
    wd_ExFxD = p("down", (e, f, d), ("experts", "mlp", "embed"))
    x = x_PxD.astype(self.dtype)
    rd = lambda a, w: jax.lax.ragged_dot(  # noqa: E731
        a, w, group_sizes_E, preferred_element_type=jnp.float32)
    h_PxF = (jax.nn.silu(rd(x, wg_ExDxF)) * rd(x, wu_ExDxF)).astype(self.dtype)
    return rd(h_PxF, wd_ExFxD)


class MoE(nn.Module):
  """Shared + routed experts. `__call__(x_BxTxD, mask_BxT=None, deterministic=True)`.

  Returns `(y_BxTxD, stats)`; stats: `tokens_per_expert` [E] (non-padding tokens routed to
  each expert), `max_over_mean_load` [], `aux_loss` [] (0 when aux_loss_coef == 0).
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

    # Dropless dispatch: sort the S*k pairs by expert (stable, so ties keep token order).
    experts_P = experts_Sxk.reshape(s * k)
    order_P = jnp.argsort(experts_P, stable=True)
    token_P = order_P // k
    group_sizes_E = jnp.bincount(experts_P, length=e).astype(jnp.int32)
    y_sorted_PxD = RoutedExperts(e, cfg.expert_hidden_size, self.dtype, self.param_dtype,
                                 name="experts")(x_SxD[token_P], group_sizes_E)
    y_pairs_PxD = jnp.zeros_like(y_sorted_PxD).at[order_P].set(y_sorted_PxD,
                                                                unique_indices=True)
    y_SxD = jnp.einsum("skd,sk->sd", y_pairs_PxD.reshape(s, k, d), weights_Sxk)

    if cfg.num_shared_experts:
      y_SxD = y_SxD + SwiGLU(cfg.num_shared_experts * cfg.expert_hidden_size, self.dtype,
                             self.param_dtype, name="shared")(x_SxD).astype(jnp.float32)

    # Load statistics over non-padding tokens; they drive the bias and the logs.
    load_E = jnp.bincount(experts_P, weights=jnp.repeat(mask_S, k), length=e)
    n_valid = jnp.maximum(jnp.sum(mask_S), 1.0)
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
             "aux_loss": aux_loss}
    return y_SxD.reshape(b, t, d).astype(self.dtype), stats
