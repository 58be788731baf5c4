"""mHC: Sinkhorn projection, conservation of the residual, and M=4 at init == plain residual."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.config import ModelConfig
from engram_jax.hyper_connections import (HyperConnection, contract_streams, expand_streams,
                                          hc_combine, mix_streams, sinkhorn_knopp)
from engram_jax.model import EngramLM


# Tiny programs: XLA's CPU optimisation passes cost more than they save here, and the
# counter-based 'unsafe_rbg' keys compile far faster than threefry for parameter init.
FAST = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)
fast_jit = functools.partial(jax.jit, compiler_options=FAST)


@pytest.mark.parametrize("scale,iters", [(0.1, 20), (1.0, 20), (3.0, 300)])
def test_sinkhorn_is_doubly_stochastic(scale, iters):
  # Peaked matrices (large logits) converge slowly: the paper's 20 iterations suit the
  # near-identity logits of a trained mHC, not arbitrary ones.
  logits = scale * jax.random.normal(jax.random.key(0), (16, 4, 4))
  p = np.asarray(sinkhorn_knopp(logits, iters))
  assert (p > 0).all()
  np.testing.assert_allclose(p.sum(-2), 1.0, atol=1e-6)  # last step normalises columns
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-3)


def test_sinkhorn_fewer_iterations_are_further_from_doubly_stochastic():
  logits = 3.0 * jax.random.normal(jax.random.key(1), (64, 4, 4))
  err = lambda it: float(jnp.abs(sinkhorn_knopp(logits, it).sum(-1) - 1).max())  # noqa: E731
  assert err(20) < err(1)
  assert err(1) > 1e-2  # so the check above is not vacuous


def test_residual_part_conserves_the_stream_sum():
  """Columns of H_res sum to 1, so sum_i (H_res x)_i = sum_j x_j for every token."""
  x = jax.random.normal(jax.random.key(2), (2, 3, 4, 8))
  hc = HyperConnection(sinkhorn_iters=20)
  params = fast_jit(hc.init)(jax.random.key(3, impl="unsafe_rbg"), x)
  # Make the dynamic part large so that H_res is far from the identity.
  params = nn.unbox(params)
  for name in ("alpha_pre", "alpha_post", "alpha_res"):
    params["params"][name] = jnp.asarray(5.0)
  layer_in, (post, res) = fast_jit(hc.apply)(params, x)
  assert layer_in.shape == (2, 3, 8) and post.shape == (2, 3, 4) and res.shape == (2, 3, 4, 4)
  assert float(jnp.abs(res - jnp.eye(4)).max()) > 0.05
  out = jax.random.normal(jax.random.key(4), (2, 3, 8))
  new = hc_combine(x, out, (post, res))
  residual = new - post[..., None] * out[:, :, None, :]
  np.testing.assert_allclose(residual.sum(2), x.sum(2), rtol=1e-5, atol=1e-5)
  assert ((post > 0) & (post < 2)).all()


def test_expand_contract_roundtrip():
  x = jax.random.normal(jax.random.key(5), (2, 3, 8))
  np.testing.assert_allclose(contract_streams(expand_streams(x, 4)), x, rtol=1e-6)


def test_four_streams_with_zero_gates_equal_plain_residual():
  """Static init: pre = stream mean, post = 1, H_res doubly stochastic on identical streams."""
  base = dict(vocab_size=32, num_layers=2, hidden_size=16, num_heads=2, num_kv_heads=1,
              head_dim=8, ffn_hidden_size=32, num_dense_layers=2, scan_layers=False)
  cfg1, cfg4 = ModelConfig(hc_mult=1, **base), ModelConfig(hc_mult=4, **base)
  x = jax.random.randint(jax.random.key(6), (2, 6), 0, 32)
  p4 = nn.unbox(fast_jit(EngramLM(cfg4).init)(jax.random.key(7, impl="unsafe_rbg"), x))["params"]
  p1 = {}
  for k, v in p4.items():
    if k.startswith("layer_"):
      v = {n: s for n, s in v.items() if not n.startswith("hc_")}
      for n in ("hc_attn", "hc_ffn"):
        for g in ("alpha_pre", "alpha_post", "alpha_res"):
          p4[k][n][g] = jnp.zeros(())
    p1[k] = v
  l4, _ = fast_jit(EngramLM(cfg4).apply)({"params": p4}, x)
  l1, _ = fast_jit(EngramLM(cfg1).apply)({"params": p1}, x)
  np.testing.assert_allclose(l4, l1, rtol=1e-4, atol=1e-4)


def _numpy_mhc(p, x, out, iters, eps=1e-6):
  """The module docstring's formulas in float64 NumPy: (layer input, x_{l+1})."""
  f = lambda k: np.asarray(p[k], np.float64)  # noqa: E731
  b, t, m, d = x.shape
  x = np.asarray(x, np.float64)
  inv_rms = 1 / np.sqrt(np.mean(x ** 2, axis=(2, 3)) + eps)
  xn = (x * inv_rms[:, :, None, None] * f("norm_scale")).reshape(b, t, m * d)
  sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
  pre = sig(f("alpha_pre") * xn @ f("phi_pre").reshape(m * d, m) + f("bias_pre"))
  post = 2 * sig(f("alpha_post") * xn @ f("phi_post").reshape(m * d, m) + f("bias_post"))
  logits = (f("alpha_res") * xn @ f("phi_res").reshape(m * d, m * m)).reshape(b, t, m, m)
  logits = logits + f("bias_res")
  r = np.exp(logits - logits.max(axis=(-2, -1), keepdims=True))
  for _ in range(iters):
    r = r / r.sum(-1, keepdims=True)
    r = r / r.sum(-2, keepdims=True)
  layer_in = np.einsum("btm,btmd->btd", pre, x)
  new = np.einsum("btij,btjd->btid", r, x) + post[..., None] * np.asarray(out)[:, :, None, :]
  return layer_in, new


@pytest.mark.parametrize("how", ["einsum", "elementwise"])
def test_hyper_connection_and_combine_match_the_formulas(how):
  """HyperConnection + hc_combine == the docstring's equations (NumPy, float64), with gates and
  biases far from their init so that every term matters; both stream-mixing formulations."""
  x = jax.random.normal(jax.random.key(8), (2, 5, 4, 16))
  out = jax.random.normal(jax.random.key(9), (2, 5, 16))
  hc = HyperConnection(sinkhorn_iters=7)
  params = nn.unbox(fast_jit(hc.init)(jax.random.key(10, impl="unsafe_rbg"), x))
  keys = jax.random.split(jax.random.key(11), 16)
  p = {}
  for i, (name, v) in enumerate(sorted(params["params"].items())):
    p[name] = v + 0.5 * jax.random.normal(keys[i], v.shape)
  for name in ("alpha_pre", "alpha_post", "alpha_res"):
    p[name] = jnp.asarray(3.0 + len(name) / 10)
  layer_in, coeffs = fast_jit(hc.apply)({"params": p}, x)
  new = hc_combine(x, out, coeffs, how)
  want_in, want_new = _numpy_mhc({k: np.asarray(v) for k, v in p.items()}, x, out, 7)
  np.testing.assert_allclose(layer_in, want_in, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(new, want_new, rtol=2e-5, atol=2e-5)
  assert float(np.abs(want_new - np.asarray(x) - np.asarray(out)[:, :, None, :]).max()) > 0.1


def test_mix_streams_rejects_an_unknown_formulation():
  with pytest.raises(ValueError, match="how must be"):
    mix_streams(jnp.ones((1, 1, 2, 2)), jnp.ones((1, 1, 2, 3)), "matmul")
