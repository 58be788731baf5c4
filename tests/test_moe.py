"""MoE: top-k routing, dropless grouped dispatch == dense reference, aux-free balancing."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.config import MoEConfig
from engram_jax.moe import MoE, route

# Tiny programs: XLA's CPU optimisation passes cost more than they save here, and the
# counter-based 'unsafe_rbg' keys compile far faster than threefry for parameter init.
FAST = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)
fast_jit = functools.partial(jax.jit, compiler_options=FAST)


D, E, K = 8, 6, 2


def _dense_reference(params, x_SxD, experts_Sxk, weights_Sxk):
  """Every expert on every token, then the routing weights: no sorting, no ragged_dot."""
  p = params["params"]["experts"]
  g = jnp.einsum("sd,edf->esf", x_SxD, p["gate"])
  u = jnp.einsum("sd,edf->esf", x_SxD, p["up"])
  y_ExSxD = jnp.einsum("esf,efd->esd", jax.nn.silu(g) * u, p["down"])
  comb_SxE = jnp.zeros((x_SxD.shape[0], E)).at[
      jnp.arange(x_SxD.shape[0])[:, None], experts_Sxk].add(weights_Sxk)
  out = jnp.einsum("se,esd->sd", comb_SxE, y_ExSxD)
  sh = params["params"]["shared"]
  return out + (jax.nn.silu(x_SxD @ sh["gate"]) * (x_SxD @ sh["up"])) @ sh["down"]


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_route_picks_k_distinct_experts_and_normalises(score_func):
  cfg = MoEConfig(num_experts=E, top_k=K, score_func=score_func, routed_scaling_factor=2.0)
  logits = jax.random.normal(jax.random.key(0), (32, E))
  bias = jnp.zeros((E,)).at[3].set(10.0)  # bias only changes *which* experts are picked
  experts, weights, scores = route(logits, bias, cfg)
  ex = np.asarray(experts)
  assert ex.shape == (32, K)
  assert all(len(set(row)) == K for row in ex)
  assert (ex == 3).any(axis=1).all()
  np.testing.assert_allclose(weights, 2.0 * np.take_along_axis(
      np.asarray(scores), ex, 1) / (np.take_along_axis(np.asarray(scores), ex, 1).sum(
          1, keepdims=True) if score_func == "sigmoid" else 1.0), rtol=1e-5)


def test_dropless_dispatch_matches_dense_reference_and_counts_k_per_token():
  cfg = MoEConfig(num_experts=E, top_k=K, expert_hidden_size=4, num_shared_experts=1)
  moe = MoE(cfg)
  x = jax.random.normal(jax.random.key(1), (2, 5, D))
  mask = jnp.ones((2, 5), bool).at[1, 3:].set(False)
  variables = nn.unbox(fast_jit(moe.init)(jax.random.key(2, impl="unsafe_rbg"), x))
  y, stats = fast_jit(moe.apply)(variables, x, mask)
  x_SxD = x.reshape(-1, D)
  logits = x_SxD @ variables["params"]["router"]
  experts, weights, _ = route(logits, variables["moe_stats"]["expert_bias"], cfg)
  ref = _dense_reference(variables, x_SxD, experts, weights)
  np.testing.assert_allclose(y.reshape(-1, D), ref, rtol=1e-5, atol=1e-5)
  load = np.asarray(stats["tokens_per_expert"])
  assert load.sum() == K * 8  # 8 non-padding tokens, each in exactly k experts
  routed = np.asarray(experts).reshape(2, 5, K)[np.asarray(mask)]
  np.testing.assert_array_equal(load, np.bincount(routed.ravel(), minlength=E))


def test_aux_free_bias_moves_load_toward_underused_experts():
  cfg = MoEConfig(num_experts=E, top_k=1, expert_hidden_size=4, num_shared_experts=0,
                  bias_update_rate=0.02)
  moe = MoE(cfg)
  common_D = jax.random.normal(jax.random.key(7), (D,))
  x = jax.random.normal(jax.random.key(3), (4, 16, D)) + common_D
  variables = nn.unbox(fast_jit(moe.init)(jax.random.key(4, impl="unsafe_rbg"), x))
  # Skew the router so that expert 0 wins most tokens: they all share `common_D`.
  variables["params"]["router"] = (0.2 * variables["params"]["router"]).at[:, 0].add(
      common_D * 0.3)

  @jax.jit
  def step(variables):
    (_, stats), new = moe.apply(variables, x, deterministic=False, mutable=["moe_stats"])
    return {**variables, **new}, stats

  variables, first = step(variables)
  bias1 = np.asarray(variables["moe_stats"]["expert_bias"])
  load0 = np.asarray(first["tokens_per_expert"])
  assert load0[0] == load0.max() and load0[0] > 2 * load0.mean()
  assert bias1[0] < 0 and (bias1[load0 < load0.mean()] > 0).all()
  for _ in range(40):
    variables, stats = step(variables)
  assert float(stats["max_over_mean_load"]) < float(first["max_over_mean_load"])
  assert stats["tokens_per_expert"][0] < load0[0]
  # Deterministic / non-mutable application leaves the bias alone.
  _, still = moe.apply(variables, x, deterministic=True, mutable=["moe_stats"])
  np.testing.assert_array_equal(still["moe_stats"]["expert_bias"],
                                variables["moe_stats"]["expert_bias"])


def test_aux_loss_is_reported_and_trains_the_router():
  cfg = MoEConfig(num_experts=E, top_k=K, expert_hidden_size=4, aux_loss_coef=0.1,
                  routing="plain")
  moe = MoE(cfg)
  x = jax.random.normal(jax.random.key(5), (2, 4, D))
  variables = nn.unbox(fast_jit(moe.init)(jax.random.key(6, impl="unsafe_rbg"), x))
  assert "moe_stats" not in variables  # plain routing keeps no bias
  grad = fast_jit(jax.grad(lambda p: moe.apply({"params": p}, x)[1]["aux_loss"]))(
      variables["params"])
  assert float(moe.apply(variables, x)[1]["aux_loss"]) > 0
  assert float(jnp.abs(grad["router"]).sum()) > 0
  assert float(jnp.abs(grad["experts"]["gate"]).sum()) == 0
