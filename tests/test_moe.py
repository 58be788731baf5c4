"""MoE: top-k routing, dropless grouped dispatch == dense reference, capacity dispatch == ragged
when nothing drops and drops exactly the overflow in token order, aux-free balancing, the
grouped-matmul choice reaching pallas_kernels.grouped_matmul."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import experiment_config
from engram_jax.config import MoEConfig
from engram_jax.moe import MoE, expert_capacity, route
from experiments.configs import base

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


def _ranks_in_token_order(experts_Sxk, valid_S):
  """NumPy oracle: rank of each pair within its expert, real tokens first, then padding."""
  ranks = np.zeros(experts_Sxk.shape, np.int64)
  seen = {}
  for real in (True, False):
    for i in np.flatnonzero(valid_S == real):
      for j, ex in enumerate(experts_Sxk[i]):
        ranks[i, j] = seen.get(ex, 0)
        seen[ex] = ranks[i, j] + 1
  return ranks


def test_capacity_without_drops_matches_ragged_outputs_and_gradients():
  cfg = MoEConfig(num_experts=E, top_k=K, expert_hidden_size=4, num_shared_experts=1)
  cap_cfg = cfg.replace(dispatch="capacity", capacity_factor=E / K)
  x = jax.random.normal(jax.random.key(11), (2, 5, D))
  mask = jnp.ones((2, 5), bool).at[0, :2].set(False)
  assert expert_capacity(cap_cfg, 10) == 10  # C = S: no expert can overflow
  key = jax.random.key(12, impl="unsafe_rbg")
  boxed = fast_jit(MoE(cfg).init)(key, x)
  # Same names, shapes, logical axes and initial values: params move between modes.
  assert jax.tree.structure(boxed) == jax.tree.structure(fast_jit(MoE(cap_cfg).init)(key, x))
  jax.tree.map(np.testing.assert_array_equal, boxed, fast_jit(MoE(cap_cfg).init)(key, x))
  variables = nn.unbox(boxed)
  cot = jax.random.normal(jax.random.key(13), x.shape)

  def run(c):
    def loss(params, x):
      y, stats = MoE(c).apply({**variables, "params": params}, x, mask)
      return jnp.sum(y * cot), stats
    return fast_jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        variables["params"], x)

  (out_r, stats_r), grads_r = run(cfg)
  (out_c, stats_c), grads_c = run(cap_cfg)
  np.testing.assert_allclose(out_c, out_r, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads_c, grads_r)
  assert float(jnp.abs(grads_c[0]["experts"]["down"]).sum()) > 0
  np.testing.assert_array_equal(stats_c["tokens_per_expert"], stats_r["tokens_per_expert"])
  assert float(stats_c["dropped_fraction"]) == 0.0 == float(stats_r["dropped_fraction"])


def test_capacity_drops_overflow_in_token_order_and_padding_last():
  cfg = MoEConfig(num_experts=E, top_k=K, expert_hidden_size=4, num_shared_experts=1)
  cap_cfg = cfg.replace(dispatch="capacity", capacity_factor=0.75)
  b, t = 3, 16
  x = jax.random.normal(jax.random.key(21), (b, t, D))
  # Padding at the start of row 0: in plain token order it would take slots from real tokens.
  mask = jnp.ones((b, t), bool).at[0, :6].set(False)
  c = expert_capacity(cap_cfg, b * t)
  assert c == 16  # ceil(0.75 * 48 * 2 / 6) = 12, rounded up to 16
  variables = nn.unbox(fast_jit(MoE(cfg).init)(jax.random.key(22, impl="unsafe_rbg"), x))
  y_r, _ = fast_jit(MoE(cfg).apply)(variables, x, mask)
  y_c, stats = fast_jit(MoE(cap_cfg).apply)(variables, x, mask)

  x_SxD = x.reshape(-1, D)
  experts, weights, _ = route(x_SxD @ variables["params"]["router"],
                              variables["moe_stats"]["expert_bias"], cfg)
  valid_S = np.asarray(mask).reshape(-1)
  ranks_Sxk = _ranks_in_token_order(np.asarray(experts), valid_S)
  kept_Sxk = ranks_Sxk < c
  n_dropped = int((~kept_Sxk[valid_S]).sum())
  assert n_dropped > 0
  np.testing.assert_allclose(float(stats["dropped_fraction"]), n_dropped / (K * valid_S.sum()),
                             rtol=1e-6)
  naive_ranks_Sxk = _ranks_in_token_order(np.asarray(experts), np.ones_like(valid_S))
  assert int((naive_ranks_Sxk[valid_S] >= c).sum()) != n_dropped  # padding-last matters here
  # Every token: the dense reference with the dropped pairs' weights set to zero.
  ref = _dense_reference(variables, x_SxD, experts, weights * kept_Sxk)
  np.testing.assert_allclose(y_c.reshape(-1, D), ref, rtol=1e-5, atol=1e-5)
  # Tokens whose pairs all found a slot are untouched by the capacity limit.
  whole_S = kept_Sxk.all(axis=1)
  assert 0 < whole_S.sum() < len(whole_S)
  np.testing.assert_allclose(y_c.reshape(-1, D)[whole_S], y_r.reshape(-1, D)[whole_S],
                             rtol=1e-5, atol=1e-6)
  # Loads count every routed pair, dropped or not.
  np.testing.assert_array_equal(stats["tokens_per_expert"], np.bincount(
      np.asarray(experts)[valid_S].ravel(), minlength=E))


def test_capacity_config_validation_and_plumbing():
  for bad in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="capacity_factor"):
      MoEConfig(capacity_factor=bad)
  with pytest.raises(ValueError, match="dispatch"):
    MoEConfig(dispatch="dense")
  cfg = MoEConfig(num_experts=6, top_k=2, dispatch="capacity", capacity_factor=1.25)
  assert expert_capacity(cfg, 48) == 24      # ceil(20) -> 24
  assert expert_capacity(cfg, 10) == 8       # ceil(4.17) = 5 -> 8
  assert expert_capacity(cfg.replace(capacity_factor=100.0), 10) == 10  # capped at S
  c = base.get_config()
  assert c.model.moe.dispatch == "ragged"
  assert experiment_config.model_config(c, 1000).moe.dispatch == "ragged"
  c.model.moe.dispatch, c.model.moe.capacity_factor = "capacity", 2.0
  moe = experiment_config.model_config(c, 1000).moe
  assert (moe.dispatch, moe.capacity_factor) == ("capacity", 2.0)


def test_grouped_matmul_implementation_plumbing():
  with pytest.raises(ValueError, match="matmul_implementation"):
    MoEConfig(matmul_implementation="triton")
  c = base.get_config()
  assert experiment_config.model_config(c, 1000).moe.matmul_implementation is None
  c.model.moe.matmul_implementation = "mosaic_gpu"
  cfg = experiment_config.model_config(c, 1000).moe
  assert cfg.matmul_implementation == "mosaic_gpu"
  # The choice reaches the kernel API: on CPU the Hopper kernels refuse with a clear error.
  x = jnp.zeros((1, 64, D), jnp.bfloat16)
  moe = MoE(cfg.replace(num_experts=E, top_k=K, expert_hidden_size=64), dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match="needs a Hopper GPU"):
    jax.eval_shape(moe.init, jax.random.key(0), x)


@pytest.mark.parametrize("dispatch,capacity_factor", [("ragged", 1.0), ("capacity", 0.75)])
def test_expert_parallel_dispatch_equals_one_device(dispatch, capacity_factor):
  # 8 fake devices: experts split 2 ways over 'expert', tokens over data x fsdp x expert. The
  # all-to-all dispatch must give the one-device outputs, drops, loads and gradients.
  from engram_jax import sharding
  cfg = MoEConfig(num_experts=4, top_k=K, expert_hidden_size=4, num_shared_experts=1,
                  dispatch=dispatch, capacity_factor=capacity_factor)
  b, t = 8, 6
  x = jax.random.normal(jax.random.key(31), (b, t, D))
  mask = jnp.ones((b, t), bool).at[1, :4].set(False).at[6, 2:].set(False)
  variables = nn.unbox(fast_jit(MoE(cfg).init)(jax.random.key(32, impl="unsafe_rbg"), x))
  cot = jax.random.normal(jax.random.key(33), x.shape)

  def loss(params, x):
    (y, stats), new = MoE(cfg).apply({**variables, "params": params}, x, mask,
                                     deterministic=False, mutable=["moe_stats"])
    return jnp.sum(y * cot), (y, stats, new)

  grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  (_, want), want_grads = fast_jit(grad_fn)(variables["params"], x)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "expert": 2})
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    params = jax.device_put(variables["params"], sharding.logical_to_sharding(
        fast_jit(MoE(cfg).init)(jax.random.key(32, impl="unsafe_rbg"), x)["params"], mesh))
    xs = jax.device_put(x, sharding.batch_sharding(mesh, ndim=3))
    lowered = jax.jit(grad_fn).lower(params, xs)
    (_, got), got_grads = lowered.compile()(params, xs)
  hlo = lowered.compile().as_text()
  assert "all-to-all" in hlo
  # Expert weights stay with their owners: no collective carries all E experts' weights.
  whole = [l for l in hlo.splitlines() if re.search(r"(all-gather|all-reduce)\S*\(", l)
           and re.search(rf"f32\[{cfg.num_experts},\d+,\d+\]", l)]
  assert whole == []
  y, stats, new = got
  np.testing.assert_allclose(y, want[0], rtol=1e-5, atol=1e-5)
  for key in ("tokens_per_expert", "dropped_fraction", "max_over_mean_load"):
    np.testing.assert_allclose(stats[key], want[1][key], rtol=1e-6)
  if dispatch == "capacity":
    assert float(stats["dropped_fraction"]) > 0
  np.testing.assert_array_equal(new["moe_stats"]["expert_bias"],
                                want[2]["moe_stats"]["expert_bias"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               got_grads, want_grads)
