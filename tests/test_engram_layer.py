"""The Engram layer against the NumPy float64 oracle of the demo, plus causality and checks."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.config import EngramConfig
from engram_jax.convert import from_torch_state_dict, to_torch_state_dict
from engram_jax.engram_layer import Engram
from engram_jax.memory import MultiHeadMemory
from pallas_kernels.engram_lookup import prefetch_rows
from tests import numpy_layer_reference as ref
from tests.jaxpr_util import jaxpr_eqns

HEAD_SIZES = (11, 13, 17, 19)  # H = 2 orders x 2 heads, distinct small primes
B, T = 2, 12


def tiny_config(**overrides):
  kw = dict(engram_vocab_size=(10, 10), max_ngram_size=3, n_embed_per_ngram=8,
            n_head_per_ngram=2, layer_ids=(0,), hidden_size=8, hc_mult=2, kernel_size=4)
  kw.update(overrides)
  return EngramConfig(**kw)


def random_inputs(cfg, seed=0, t=T):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, np.array(HEAD_SIZES), size=(B, t, len(HEAD_SIZES))).astype(np.int32)
  hidden = rng.normal(size=(B, t, cfg.hc_mult, cfg.hidden_size)).astype(np.float32)
  return hidden, ids


def random_sd(cfg, seed=1):
  return ref.random_state_dict(np.random.default_rng(seed), head_sizes=HEAD_SIZES,
                               head_dim=cfg.head_dim, hidden_size=cfg.hidden_size,
                               hc_mult=cfg.hc_mult, kernel_size=cfg.kernel_size)


def reference(cfg, sd, hidden, ids):
  return ref.engram_forward(sd, hidden, ids, HEAD_SIZES, kernel_size=cfg.kernel_size,
                            dilation=cfg.dilation, norm_eps=cfg.norm_eps,
                            conv_norm_eps=cfg.conv_norm_eps,
                            signed_sqrt_gate=cfg.signed_sqrt_gate)


@pytest.mark.parametrize("overrides", [
    {},
    {"signed_sqrt_gate": False},
    {"hc_mult": 1},
    {"conv_dilation": 1, "kernel_size": 3},
])
def test_f32_forward_and_gate_match_numpy_reference(overrides):
  cfg = tiny_config(**overrides)
  hidden, ids = random_inputs(cfg)
  sd = random_sd(cfg)
  params = from_torch_state_dict(sd, cfg, HEAD_SIZES)
  out, state = Engram(cfg, HEAD_SIZES).apply({"params": params}, hidden, ids,
                                             mutable=["intermediates"])
  want, want_gate = reference(cfg, sd, hidden, ids)
  assert out.dtype == jnp.float32 and out.shape == hidden.shape
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)
  (gate,) = state["intermediates"]["gate"]
  np.testing.assert_allclose(np.asarray(gate), want_gate, rtol=1e-5, atol=1e-7)
  # The conv branch must change the output here, or this test would not cover it.
  sd_no_conv = dict(sd, **{"short_conv.conv.weight": np.zeros_like(sd["short_conv.conv.weight"])})
  assert np.abs(reference(cfg, sd_no_conv, hidden, ids)[0] - want).max() > 1e-2


def test_bf16_compute_f32_params_matches_reference():
  cfg = tiny_config()
  hidden, ids = random_inputs(cfg)
  sd = random_sd(cfg)
  params = from_torch_state_dict(sd, cfg, HEAD_SIZES)
  out = Engram(cfg, HEAD_SIZES, dtype=jnp.bfloat16).apply(
      {"params": params}, jnp.asarray(hidden, jnp.bfloat16), ids)
  assert out.dtype == jnp.bfloat16
  want, _ = reference(cfg, sd, hidden, ids)
  # bf16 keeps 8 mantissa bits (relative step 2^-8 ~ 4e-3); inputs, weights and the output are
  # rounded to it, so a few steps of error is expected.
  np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=2e-2, atol=2e-2)


def test_bf16_layer_runs_its_matmuls_and_their_backward_in_bf16():
  """bf16 compute: the projections return bf16 (as torch's autocast Linear), so every matmul of
  the forward and of the backward takes bf16 operands (f32 cotangents would make the backward's
  matmuls f32: TF32 on a GPU, 1.95 vs 1.07 ms for the projections on the H200), and the conv's
  normalised input is rounded to bf16 (its taps multiply-add in f32)."""
  cfg = tiny_config()
  hidden, ids = random_inputs(cfg)
  layer = Engram(cfg, HEAD_SIZES, dtype=jnp.bfloat16)
  params = nn.unbox(layer.init(jax.random.key(0), jnp.asarray(hidden, jnp.bfloat16), ids))

  def loss(params, hidden):
    return jnp.sum(layer.apply(params, hidden, ids).astype(jnp.float32))
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params,
                                                        jnp.asarray(hidden, jnp.bfloat16))
  dots = [e for e in jaxpr_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  assert len(dots) >= 6, len(dots)       # 2 forward + 2 x 2 backward
  for e in dots:
    types = [v.aval.dtype for v in e.invars] + [v.aval.dtype for v in e.outvars]
    assert all(t == jnp.bfloat16 for t in types), (e, types)
  f32_pads = [e for e in jaxpr_eqns(jaxpr.jaxpr) if e.primitive.name == "pad"
              and e.outvars[0].aval.ndim == 4 and e.outvars[0].aval.dtype == jnp.float32]
  assert not f32_pads, f32_pads          # the conv pads its bf16 input


def test_zero_init_conv_gives_gated_value_exactly():
  cfg = tiny_config(zero_init_conv=True)
  hidden, ids = random_inputs(cfg)
  model = Engram(cfg, HEAD_SIZES)
  variables = model.init(jax.random.key(0), hidden, ids)
  params = nn.unbox(variables["params"])
  assert not np.any(np.asarray(params["short_conv"]["kernel"]))
  out, state = model.apply(
      {"params": params}, hidden, ids, mutable=["intermediates"],
      capture_intermediates=lambda mdl, _: isinstance(mdl, (Engram,)) or mdl.name == "short_conv")
  # The conv branch contributes exactly zero, so y is the gated value bit for bit ...
  conv_out = state["intermediates"]["short_conv"]["__call__"][0]
  assert np.all(np.asarray(conv_out) == 0.0)
  # ... and that value is the demo's alpha * (W_V e + b) with the initialised weights.
  sd = to_torch_state_dict(params, cfg)
  want, _ = reference(cfg, sd, hidden, ids)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)


def test_default_conv_init_is_torch_uniform():
  cfg = tiny_config(zero_init_conv=False)
  hidden, ids = random_inputs(cfg)
  params = nn.unbox(Engram(cfg, HEAD_SIZES).init(jax.random.key(0), hidden, ids)["params"])
  kernel = np.asarray(params["short_conv"]["kernel"])
  bound = 1 / math.sqrt(cfg.kernel_size)
  assert np.all(np.abs(kernel) <= bound) and np.abs(kernel).max() > 0.5 * bound
  for name in ("key_norm", "query_norm"):
    np.testing.assert_array_equal(params[name]["scale"], 1.0)
  np.testing.assert_array_equal(params["short_conv"]["norm"]["scale"], 1.0)


def _engram_fn(cfg, sd):
  params = from_torch_state_dict(sd, cfg, HEAD_SIZES)
  model = Engram(cfg, HEAD_SIZES)
  return lambda p, h, i: model.apply({"params": p}, h, i), params


def test_causal_in_hidden_states():
  cfg = tiny_config()
  hidden, ids = random_inputs(cfg)
  fn, params = _engram_fn(cfg, random_sd(cfg))
  t0 = 10  # >= (K-1)*dilation so the whole receptive field is inside the sequence
  grad = jax.grad(lambda h: fn(params, h, ids)[:, t0].sum())(jnp.asarray(hidden))
  per_step = np.abs(np.asarray(grad)).sum(axis=(0, 2, 3))
  assert np.all(per_step[t0 + 1:] == 0.0)
  # The conv reaches back in steps of the dilation; those positions must see a gradient.
  for back in range(cfg.kernel_size):
    assert per_step[t0 - back * cfg.dilation] > 0, back


def test_causal_in_looked_up_rows():
  # Every (b, t, h) reads its own row, so a table row's gradient belongs to one position.
  cfg = tiny_config()
  sizes = (B * T,) * len(HEAD_SIZES)
  pos_ids = (np.arange(B)[:, None] * T + np.arange(T)[None, :]).astype(np.int32)
  ids = np.repeat(pos_ids[..., None], len(sizes), axis=-1)
  rng = np.random.default_rng(3)
  sd = ref.random_state_dict(rng, head_sizes=sizes, head_dim=cfg.head_dim,
                             hidden_size=cfg.hidden_size, hc_mult=cfg.hc_mult,
                             kernel_size=cfg.kernel_size)
  params = from_torch_state_dict(sd, cfg, sizes)
  hidden = rng.normal(size=(B, T, cfg.hc_mult, cfg.hidden_size)).astype(np.float32)
  model = Engram(cfg, sizes)
  t0 = 10

  def loss(table):
    p = dict(params, memory={"table": table})
    return model.apply({"params": p}, hidden, ids)[:, t0].sum()

  grad_RxE = np.asarray(jax.grad(loss)(jnp.asarray(params["memory"]["table"])))
  # Row of head h for (b, t) is h * B*T + b*T + t; sum the gradient per time step.
  per_step = np.abs(grad_RxE.reshape(len(sizes), B, T, -1)).sum(axis=(0, 1, 3))
  assert np.all(per_step[t0 + 1:] == 0.0)
  for back in range(cfg.kernel_size):
    assert per_step[t0 - back * cfg.dilation] > 0, back


def test_every_param_has_logical_axes():
  cfg = tiny_config()
  hidden, ids = random_inputs(cfg)
  params = Engram(cfg, HEAD_SIZES).init(jax.random.key(0), hidden, ids)["params"]
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert len(leaves) == 9
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), type(leaf)
    assert len(leaf.names) == leaf.value.ndim
  specs = nn.get_partition_spec(params)
  assert specs["memory"]["table"] == jax.sharding.PartitionSpec("engram_rows", "engram_dim")
  assert specs["key_kernel"] == jax.sharding.PartitionSpec("streams", "engram_mem", "embed")


def test_gate_is_in_unit_interval_and_per_stream():
  cfg = tiny_config(hc_mult=4)
  hidden, ids = random_inputs(cfg)
  model = Engram(cfg, HEAD_SIZES)
  variables = model.init(jax.random.key(0), hidden, ids)
  _, state = model.apply(variables, hidden, ids, mutable=["intermediates"])
  (gate,) = state["intermediates"]["gate"]
  assert gate.shape == (B, T, 4) and gate.dtype == jnp.float32
  assert np.all((np.asarray(gate) > 0) & (np.asarray(gate) < 1))


@pytest.mark.parametrize("make_hidden, match", [
    (lambda cfg: np.zeros((B, T, 3, cfg.hidden_size), np.float32), "streams"),
    (lambda cfg: np.zeros((B, T, cfg.hc_mult * cfg.hidden_size), np.float32), "rank 4"),
    (lambda cfg: np.zeros((B, T, cfg.hc_mult, 5), np.float32), "hidden_size"),
    (lambda cfg: np.zeros((B, T, cfg.hc_mult, cfg.hidden_size), np.int32), "floating"),
])
def test_bad_hidden_raises(make_hidden, match):
  cfg = tiny_config()
  _, ids = random_inputs(cfg)
  with pytest.raises(ValueError, match=match):
    Engram(cfg, HEAD_SIZES).init(jax.random.key(0), make_hidden(cfg), ids)


@pytest.mark.parametrize("make_ids, match", [
    (lambda ids: ids.astype(np.float32), "integer dtype"),
    (lambda ids: ids[..., 0], "rank 3"),
    (lambda ids: ids[..., :3], "H=3"),
    (lambda ids: ids[:, :5], r"\[B, T\]"),
])
def test_bad_ids_raise(make_ids, match):
  cfg = tiny_config()
  hidden, ids = random_inputs(cfg)
  with pytest.raises(ValueError, match=match):
    Engram(cfg, HEAD_SIZES).init(jax.random.key(0), hidden, make_ids(ids))


def test_wrong_number_of_head_sizes_raises():
  cfg = tiny_config()
  hidden, ids = random_inputs(cfg)
  with pytest.raises(ValueError, match="head_sizes"):
    Engram(cfg, HEAD_SIZES[:3]).init(jax.random.key(0), hidden, ids[..., :3])


def test_external_placement_under_jit_matches_param_placement():
  cfg = tiny_config()
  hidden, ids = random_inputs(cfg)
  params = from_torch_state_dict(random_sd(cfg), cfg, HEAD_SIZES)
  offsets = np.concatenate([[0], np.cumsum(HEAD_SIZES)[:-1]])
  pre = prefetch_rows(jnp.asarray(params["memory"]["table"]), ids, offsets)
  ext_params = {k: v for k, v in params.items() if k != "memory"}
  ext = jax.jit(Engram(cfg, HEAD_SIZES, table_placement="external").apply)(
      {"params": ext_params}, hidden, pre)
  dense = jax.jit(Engram(cfg, HEAD_SIZES).apply)({"params": params}, hidden, ids)
  np.testing.assert_array_equal(np.asarray(ext), np.asarray(dense))


# ---- ablation switches: gate='shared' | 'none', use_short_conv=False ---------------------------


def variant_params(cfg, sd):
  """The demo state dict mapped onto a variant's params: stream 0's key projection and norms
  for gate='shared', none of them for gate='none', no conv without use_short_conv."""
  p = dict(from_torch_state_dict(sd, cfg.replace(gate="multi", use_short_conv=True), HEAD_SIZES))
  if cfg.gate == "shared":
    p["key_kernel"], p["key_bias"] = p["key_kernel"][:1], p["key_bias"][:1]
    for name in ("key_norm", "query_norm"):
      p[name] = {"scale": p[name]["scale"][:1]}
  if cfg.gate == "none":
    for name in ("key_kernel", "key_bias", "key_norm", "query_norm"):
      del p[name]
  if not cfg.use_short_conv:
    del p["short_conv"]
  return p


@pytest.mark.parametrize("overrides", [
    {"gate": "shared"},
    {"gate": "shared", "hc_mult": 4, "signed_sqrt_gate": False},
    {"gate": "none"},
    {"use_short_conv": False},
    {"gate": "none", "use_short_conv": False},
])
def test_ablation_switches_match_numpy_reference(overrides):
  cfg = tiny_config(**overrides)
  hidden, ids = random_inputs(cfg)
  sd = random_sd(cfg)
  params = variant_params(cfg, sd)
  model = Engram(cfg, HEAD_SIZES)
  # The variant creates exactly the parameters it uses, nothing else.
  init_shapes = jax.tree.map(np.shape, nn.unbox(model.init(jax.random.key(0), hidden, ids))["params"])
  assert init_shapes == jax.tree.map(np.shape, params)
  out, state = model.apply({"params": params}, hidden, ids, mutable=["intermediates"])
  want, want_gate = ref.engram_forward(
      sd, hidden, ids, HEAD_SIZES, kernel_size=cfg.kernel_size, dilation=cfg.dilation,
      norm_eps=cfg.norm_eps, conv_norm_eps=cfg.conv_norm_eps,
      signed_sqrt_gate=cfg.signed_sqrt_gate, gate=cfg.gate, use_short_conv=cfg.use_short_conv)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)
  if cfg.gate == "none":
    assert "gate" not in state.get("intermediates", {})
  else:
    (gate,) = state["intermediates"]["gate"]
    np.testing.assert_allclose(np.asarray(gate), want_gate, rtol=1e-5, atol=1e-7)
  # Each switch changes the output: the default layer on the same weights differs.
  default, _ = reference(tiny_config(hc_mult=cfg.hc_mult, signed_sqrt_gate=cfg.signed_sqrt_gate),
                         sd, hidden, ids)
  assert np.abs(default - want).max() > 1e-2


def test_shared_gate_is_one_value_for_all_streams():
  cfg = tiny_config(gate="shared", hc_mult=4)
  hidden, ids = random_inputs(cfg)
  model = Engram(cfg, HEAD_SIZES)
  variables = model.init(jax.random.key(0), hidden, ids)
  assert variables["params"]["key_kernel"].value.shape == (1, cfg.memory_dim, cfg.hidden_size)
  _, state = model.apply(variables, hidden, ids, mutable=["intermediates"])
  (gate,) = np.asarray(state["intermediates"]["gate"])
  assert gate.shape == (B, T, 4)
  np.testing.assert_array_equal(gate, np.broadcast_to(gate[..., :1], gate.shape))
  assert gate.std() > 0


def test_no_gate_no_conv_is_the_value_projection_exactly():
  """gate='none' is alpha = 1 exactly: without the conv, every stream gets e W_V + b bit for bit."""
  cfg = tiny_config(gate="none", use_short_conv=False)
  hidden, ids = random_inputs(cfg)
  params = variant_params(cfg, random_sd(cfg))
  out = np.asarray(Engram(cfg, HEAD_SIZES).apply({"params": params}, hidden, ids))
  e = np.asarray(MultiHeadMemory(cfg, HEAD_SIZES).apply(
      {"params": params["memory"]}, ids))
  value = np.asarray(jnp.einsum("btf,fd->btd", e, params["value_kernel"],
                                preferred_element_type=jnp.float32) + params["value_bias"])
  for m in range(cfg.hc_mult):
    np.testing.assert_array_equal(out[:, :, m], value)


def test_no_conv_removes_exactly_the_conv_branch():
  """use_short_conv=False changes nothing but the conv: the default output minus its conv
  branch (captured) equals the variant's output on the same weights."""
  cfg = tiny_config()
  hidden, ids = random_inputs(cfg)
  params = from_torch_state_dict(random_sd(cfg), cfg, HEAD_SIZES)
  out, state = Engram(cfg, HEAD_SIZES).apply(
      {"params": params}, hidden, ids, mutable=["intermediates"],
      capture_intermediates=lambda mdl, _: mdl.name == "short_conv")
  conv = np.asarray(state["intermediates"]["short_conv"]["__call__"][0])
  assert np.abs(conv).max() > 1e-2
  no_conv_cfg = cfg.replace(use_short_conv=False)
  no_conv = Engram(no_conv_cfg, HEAD_SIZES).apply(
      {"params": {k: v for k, v in params.items() if k != "short_conv"}}, hidden, ids)
  np.testing.assert_allclose(np.asarray(out) - conv, np.asarray(no_conv), rtol=1e-6, atol=1e-6)


def test_demo_state_dict_conversion_refuses_ablation_variants():
  cfg = tiny_config()
  params = from_torch_state_dict(random_sd(cfg), cfg, HEAD_SIZES)
  for overrides in ({"gate": "shared"}, {"gate": "none"}, {"use_short_conv": False}):
    with pytest.raises(ValueError, match="gate='multi' and use_short_conv=True"):
      from_torch_state_dict(random_sd(cfg), cfg.replace(**overrides), HEAD_SIZES)
    with pytest.raises(ValueError, match="gate='multi' and use_short_conv=True"):
      to_torch_state_dict(params, cfg.replace(**overrides))
