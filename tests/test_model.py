"""EngramLM: shapes/finiteness, causality by gradient, packing isolation, scan == unrolled,
validation, sharding rules, and a full-size config built with jax.eval_shape."""

import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import sharding
from engram_jax.config import EngramConfig, ModelConfig, MoEConfig
from engram_jax.model import (EngramLM, layer_segments, unstack_scanned_params,
                              with_engram_head_sizes)

# Tiny programs: XLA's CPU optimisation passes cost more than they save here, and the
# counter-based 'unsafe_rbg' keys compile far faster than threefry for parameter init.
FAST = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)
fast_jit = functools.partial(jax.jit, compiler_options=FAST)


V, B, T = 64, 2, 12
ENGRAM = EngramConfig(engram_vocab_size=(53, 59), n_embed_per_ngram=16, n_head_per_ngram=2,
                      layer_ids=(1,), hidden_size=32, hc_mult=4, pad_id=0)
ONE_DOC = jnp.ones((B, T), jnp.int32)
ARANGE = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def tiny_cfg(**kw):
  base = dict(vocab_size=V, num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2,
              head_dim=8, ffn_hidden_size=48, num_dense_layers=1,
              moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_size=16, aux_loss_coef=0.01),
              hc_mult=4, engram=ENGRAM, attention_impl="xla")
  base.update(kw)
  return with_engram_head_sizes(ModelConfig(**base), tokenizer_vocab_size=V, compressed_pad_id=0)


def engram_ids(key, cfg):
  if cfg.engram is None:
    return {}
  keys = jax.random.split(key, len(cfg.engram.layer_ids))
  return {l: jax.random.randint(k, (B, T, cfg.engram.num_heads), 0, 53)
          for l, k in zip(cfg.engram.layer_ids, keys)}


def build(cfg):
  """Initialised variables and one jitted forward shared by the tests (compiles are slow)."""
  x = jax.random.randint(jax.random.key(0), (B, T), 0, V)
  ids = engram_ids(jax.random.key(1), cfg)
  model = EngramLM(cfg)
  variables = nn.unbox(fast_jit(lambda k: model.init(k, x, engram_inputs=ids))(
      jax.random.key(2, impl="unsafe_rbg")))

  @jax.jit
  def fwd(variables, x, seg, pos, ids):
    (logits, aux), new = model.apply(variables, x, segment_ids=seg, positions=pos,
                                     engram_inputs=ids, deterministic=False,
                                     mutable=["moe_stats"])
    return logits, aux, new

  return model, variables, x, ids, fwd


@pytest.fixture(scope="module")
def engram_model():
  return (tiny_cfg(),) + build(tiny_cfg())


def test_segments_split_at_engram_layers_and_moe_boundary():
  segs = layer_segments(tiny_cfg(num_layers=8, num_dense_layers=2,
                                 engram=ENGRAM.replace(layer_ids=(1, 3))))
  assert [(s.start, s.stop, s.use_moe, s.engram) for s in segs] == [
      (0, 1, False, False), (1, 2, False, True), (2, 3, True, False), (3, 4, True, True),
      (4, 8, True, False)]


def test_forward_shapes_stats_and_bias_update(engram_model):
  cfg, model, variables, x, ids, fwd = engram_model
  logits, aux, new = fwd(variables, x, ONE_DOC, ARANGE, ids)
  assert logits.shape == (B, T, V) and logits.dtype == jnp.float32
  assert np.isfinite(logits).all()
  n_moe = len(cfg.moe_layer_ids)
  assert aux["moe"]["tokens_per_expert"].shape == (n_moe, 4)
  np.testing.assert_allclose(aux["moe"]["tokens_per_expert"].sum(-1), B * T * 2)
  assert float(aux["moe_aux_loss"]) > 0
  # The aux-free bias of the last MoE layer moved by rate * sign(mean load - load).
  bias = new["moe_stats"]["layers_2_4"]["moe"]["expert_bias"][-1]
  load = aux["moe"]["tokens_per_expert"][-1]
  np.testing.assert_allclose(bias, cfg.moe.bias_update_rate * np.sign(load.mean() - load),
                             atol=1e-7)


def test_backward_finite_and_causal_by_gradient(engram_model):
  """Parameter gradients are finite and reach the table and the experts; and
  d logits[t] / d embedding[s] == 0 for every s > t, != 0 for every s <= t."""
  cfg, model, variables, x, ids, fwd = engram_model
  t = 5

  def loss(params, delta_BxTxD):
    def add_delta(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, nn.Embed) and context.method_name == "__call__":
        out = out + delta_BxTxD
      return out
    with nn.intercept_methods(add_delta):
      logits, _ = model.apply({**variables, "params": params}, x, engram_inputs=ids)
    # No aux loss here: the batch-level balance loss couples all tokens on purpose.
    return logits[:, t].sum()

  g_params, g_delta = fast_jit(jax.grad(loss, argnums=(0, 1)))(
      variables["params"], jnp.zeros((B, T, cfg.hidden_size)))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(g_params))
  assert float(jnp.abs(g_params["layer_1"]["engram"]["memory"]["table"]).sum()) > 0
  assert float(jnp.abs(g_params["layers_2_4"]["moe"]["experts"]["down"]).sum()) > 0
  per_pos = np.abs(np.asarray(g_delta)).sum(axis=(0, 2))
  assert (per_pos[t + 1:] == 0).all()
  assert (per_pos[:t + 1] > 0).all()
  # Engram ids after t cannot matter either (its conv is causal).
  ids2 = {l: a.at[:, t + 1:].set((a[:, t + 1:] + 7) % 53) for l, a in ids.items()}
  np.testing.assert_array_equal(fwd(variables, x, ONE_DOC, ARANGE, ids)[0][:, :t + 1],
                                fwd(variables, x, ONE_DOC, ARANGE, ids2)[0][:, :t + 1])


SEG = jnp.array([[1] * 5 + [2] * 7, [1] * 8 + [0] * 4], jnp.int32)
POS = jnp.array([list(range(5)) + list(range(7)), list(range(8)) + list(range(4))], jnp.int32)


def test_packed_segments_do_not_leak_with_engram(engram_model):
  cfg, model, variables, x, ids, fwd = engram_model
  base = fwd(variables, x, SEG, POS, ids)[0]
  # Segment 2 of row 0 (tokens and Engram ids) changes: segment 1 is untouched.
  x2 = x.at[0, 5:].set((x[0, 5:] + 1) % V)
  ids2 = {l: a.at[0, 5:].set((a[0, 5:] + 3) % 53) for l, a in ids.items()}
  np.testing.assert_array_equal(fwd(variables, x2, SEG, POS, ids2)[0][0, :5], base[0, :5])


def test_segment_reset_isolates_later_documents_with_engram():
  """With segment_reset the ShortConv drops taps into the previous document, so changing
  document 1 (tokens and its Engram ids) leaves document 2 unchanged; without it the conv
  leaks forward, as in the reference."""
  outs = {}
  for reset in (True, False):
    cfg = tiny_cfg(engram=ENGRAM.replace(segment_reset=reset, zero_init_conv=False))
    model, variables, x, ids, fwd = build(cfg)
    base = fwd(variables, x, SEG, POS, ids)[0]
    x3 = x.at[0, :5].set((x[0, :5] + 1) % V)
    ids3 = {l: a.at[0, :5].set((a[0, :5] + 3) % 53) for l, a in ids.items()}
    outs[reset] = (fwd(variables, x3, SEG, POS, ids3)[0][0, 5:], base[0, 5:])
  np.testing.assert_array_equal(*outs[True])
  assert not np.array_equal(*outs[False])


def test_packed_segments_are_isolated_without_engram():
  """Without Engram (whose n-grams and conv read across documents, like the reference),
  a packed document is blind to the other documents of its row and equals the document
  run alone; padding (segment 0) changes nothing."""
  cfg = tiny_cfg(engram=None, moe=None)  # mHC on; MoE is per token and costs compile time
  model, variables, x, ids, fwd = build(cfg)
  base = fwd(variables, x, SEG, POS, ids)[0]
  x3 = x.at[0, :5].set((x[0, :5] + 1) % V)
  np.testing.assert_array_equal(fwd(variables, x3, SEG, POS, ids)[0][0, 5:], base[0, 5:])
  x4 = x.at[1, 8:].set((x[1, 8:] + 1) % V)
  np.testing.assert_array_equal(fwd(variables, x4, SEG, POS, ids)[0][1, :8], base[1, :8])
  # Segment 2 moved to the start of a row, followed by another document.
  alone = x.at[0, :7].set(x[0, 5:])
  seg_alone = jnp.array([[1] * 7 + [2] * 5] * B, jnp.int32)
  pos_alone = jnp.array([list(range(7)) + list(range(5))] * B, jnp.int32)
  out = fwd(variables, alone, seg_alone, pos_alone, ids)[0]
  np.testing.assert_allclose(out[0, :7], base[0, 5:], rtol=2e-5, atol=2e-5)


def test_scan_equals_unrolled_with_remat(engram_model):
  cfg, model, variables, x, ids, fwd = engram_model
  seg = SEG
  ref, ref_aux, _ = fwd(variables, x, SEG, POS, ids)
  unrolled_cfg = cfg.replace(scan_layers=False, remat_policy="dots_saveable")
  unrolled = {c: unstack_scanned_params(t, cfg) for c, t in variables.items()}
  fresh = jax.eval_shape(lambda: EngramLM(unrolled_cfg).init(jax.random.key(0), x,
                                                             engram_inputs=ids))
  assert jax.tree.structure(nn.unbox(fresh)) == jax.tree.structure(unrolled)
  out, out_aux = fast_jit(lambda v: EngramLM(unrolled_cfg).apply(
      v, x, segment_ids=seg, positions=POS, engram_inputs=ids))(unrolled)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out_aux["moe"]["tokens_per_expert"],
                                ref_aux["moe"]["tokens_per_expert"])


def test_external_table_placement_matches_param_placement(engram_model):
  """Rows prefetched from the same table (PrefetchedRows) give the same logits."""
  from engram_jax.memory import head_offsets
  from pallas_kernels.engram_lookup import prefetch_rows
  cfg, model, variables, x, ids, fwd = engram_model
  ext_cfg = cfg.replace(engram_table_placement="external")
  params = jax.tree.map(lambda a: a, variables["params"])
  table = params["layer_1"]["engram"].pop("memory")["table"]
  rows = {1: prefetch_rows(table, ids[1], jnp.asarray(head_offsets(cfg.engram_head_sizes[0])))}
  out, _ = fast_jit(lambda v, r: EngramLM(ext_cfg).apply(v, x, engram_inputs=r))(
      {**variables, "params": params}, rows)
  ref = fwd(variables, x, ONE_DOC, ARANGE, ids)[0]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_validation_errors():
  with pytest.raises(ValueError, match="hc_mult"):
    ModelConfig(hidden_size=32, hc_mult=1, engram=ENGRAM)
  with pytest.raises(ValueError, match="hidden_size"):
    ModelConfig(hidden_size=64, hc_mult=4, engram=ENGRAM)
  with pytest.raises(ValueError, match="num_kv_heads"):
    ModelConfig(num_heads=4, num_kv_heads=3)
  with pytest.raises(ValueError, match="top_k"):
    MoEConfig(num_experts=2, top_k=3)
  cfg = tiny_cfg()
  x = jnp.zeros((B, T), jnp.int32)
  with pytest.raises(ValueError, match="engram_inputs lacks Engram layers"):
    jax.eval_shape(lambda: EngramLM(cfg).init(jax.random.key(0), x))
  with pytest.raises(ValueError, match="engram_head_sizes is empty"):
    jax.eval_shape(lambda: EngramLM(cfg.replace(engram_head_sizes=())).init(
        jax.random.key(0), x, engram_inputs=engram_ids(jax.random.key(0), cfg)))


def test_sharded_forward_matches_single_device(engram_model):
  """Variables placed by the rules on a 2x2 (fsdp x tensor) mesh give the same logits."""
  cfg, model, variables, x, ids, fwd = engram_model
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
  init = lambda k: model.init(k, x, engram_inputs=ids)  # noqa: E731
  shardings = sharding.logical_to_sharding(jax.eval_shape(init, jax.random.key(2)), mesh)
  P = jax.sharding.PartitionSpec
  assert shardings["params"]["embed"]["embedding"].spec == P("tensor", "fsdp")
  assert shardings["params"]["layers_2_4"]["moe"]["experts"]["gate"].spec == P(
      None, "expert", "fsdp", "tensor")
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    sharded = jax.jit(lambda v: v, out_shardings=shardings)(variables)
    out, _ = fast_jit(lambda v, xx: model.apply(v, xx, engram_inputs=ids))(
        nn.unbox(sharded), jax.device_put(x, sharding.batch_sharding(mesh)))
  ref = fwd(variables, x, ONE_DOC, ARANGE, ids)[0]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_full_size_config_builds_abstractly():
  """Paper-scale backbone (30 blocks, D=2560, MoE, mHC 4, Engram at 2 layers): shapes only."""
  eng = EngramConfig(engram_vocab_size=(2_262_400, 2_262_400), n_embed_per_ngram=640,
                     n_head_per_ngram=8, layer_ids=(1, 15), hidden_size=2560, hc_mult=4)
  sizes = tuple(tuple(2_262_400 + 2 * i + 1 for i in range(16)) for _ in range(2))
  cfg = ModelConfig(vocab_size=129280, num_layers=30, hidden_size=2560, num_heads=32,
                    num_kv_heads=8, head_dim=80, ffn_hidden_size=10240, num_dense_layers=1,
                    moe=MoEConfig(num_experts=55, num_shared_experts=2, top_k=6,
                                  expert_hidden_size=1280),
                    hc_mult=4, engram=eng, engram_head_sizes=sizes, dtype="bfloat16",
                    remat_policy="full")
  x = jax.ShapeDtypeStruct((1, 64), jnp.int32)
  ids = {l: jax.ShapeDtypeStruct((1, 64, 16), jnp.int32) for l in eng.layer_ids}
  start = time.perf_counter()
  shapes = jax.eval_shape(lambda: EngramLM(cfg).init(jax.random.key(0), jnp.zeros(x.shape,
                                                                                  jnp.int32),
                                                     engram_inputs={l: jnp.zeros(s.shape,
                                                                                 jnp.int32)
                                                                    for l, s in ids.items()}))
  assert time.perf_counter() - start < 20
  from engram_jax.param_count import count_params, tree_param_count
  assert tree_param_count(shapes["params"]) == count_params(cfg)["total"]
  assert shapes["params"]["layers_16_30"]["moe"]["experts"]["gate"].value.shape == (
      14, 55, 2560, 1280)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_decode_with_caches_equals_the_full_forward(engram_model, scan_layers):
  """A prompt of P tokens, then one token at a time through the KV caches and the ShortConv
  history, gives the full causal forward's logits at every position."""
  cfg, model, variables, x, ids, _ = engram_model
  # The ShortConv kernel starts at zero (as in the demo); give it values so that its history
  # matters.
  conv = variables["params"]["layer_1"]["engram"]["short_conv"]
  kernel = jax.random.normal(jax.random.key(7), conv["kernel"].shape) * 0.5
  variables = {**variables, "params": {
      **variables["params"], "layer_1": {**variables["params"]["layer_1"], "engram": {
          **variables["params"]["layer_1"]["engram"], "short_conv": {**conv, "kernel": kernel}}}}}
  if not scan_layers:
    cfg = cfg.replace(scan_layers=False)
    model = EngramLM(cfg)
    variables = {k: unstack_scanned_params(v, cfg) for k, v in variables.items()}
  full, _ = jax.jit(lambda v: model.apply(v, x, engram_inputs=ids))(variables)
  decoder = EngramLM(cfg, decode=True)
  # The sizing call (inputs of the maximum length) creates the caches; its values are unused.
  _, created = jax.jit(lambda v: decoder.apply(v, x, engram_inputs=ids, mutable=["cache"]))(
      variables)
  assert created["cache"], "decode=True created no cache"

  @jax.jit
  def step(cache, tokens, positions, step_ids):
    (logits, _), new = decoder.apply({**variables, "cache": cache}, tokens, positions=positions,
                                     engram_inputs=step_ids, mutable=["cache"])
    return logits, new["cache"]

  prompt = 5
  spans = [(0, prompt)] + [(t, t + 1) for t in range(prompt, T)]
  cache, outs = created["cache"], []
  for a, b in spans:
    logits, cache = step(cache, x[:, a:b], ARANGE[:, a:b], {l: v[:, a:b] for l, v in ids.items()})
    outs.append(logits)
  np.testing.assert_allclose(np.concatenate(outs, axis=1), np.asarray(full), rtol=2e-5,
                             atol=2e-5)
  with pytest.raises(ValueError, match="one document per row"):
    decoder.apply({**variables, "cache": cache}, x[:, :1], segment_ids=ONE_DOC[:, :1],
                  positions=ARANGE[:, :1], engram_inputs={l: v[:, :1] for l, v in ids.items()},
                  mutable=["cache"])


def test_attention_impl_automatic_choice():
  from engram_jax.layers import resolve_attention_impl
  assert resolve_attention_impl(None, jnp.bfloat16, False, backend="gpu") == "cudnn"
  assert resolve_attention_impl(None, jnp.float32, False, backend="gpu") == "xla"
  assert resolve_attention_impl(None, jnp.bfloat16, True, backend="gpu") == "xla"
  assert resolve_attention_impl(None, jnp.bfloat16, False, backend="cpu") == "xla"
  assert resolve_attention_impl(None, jnp.bfloat16, False, backend="tpu") == "xla"
  assert resolve_attention_impl("xla", jnp.bfloat16, False, backend="gpu") == "xla"


@pytest.mark.gpu
def test_cudnn_attention_matches_xla_with_packed_documents():
  """cuDNN flash attention (the automatic GPU choice in bf16) == the XLA path, including the
  same-segment mask of packed documents."""
  _, variables, x, ids, fwd = build(tiny_cfg(dtype="bfloat16", head_dim=16,
                                              attention_impl="xla"))
  seg = jnp.where(jnp.arange(T) < T // 2, 1, 2)[None].repeat(B, 0).astype(jnp.int32)
  ref = fwd(variables, x, seg, ARANGE, ids)[0]
  fwd_cudnn = build(tiny_cfg(dtype="bfloat16", head_dim=16, attention_impl="cudnn"))[-1]
  got = fwd_cudnn(variables, x, seg, ARANGE, ids)[0]
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                             atol=0.05, rtol=0.05)
