"""Gated ShortConv: reference, interpret-mode Triton kernels (CPU) and GPU kernels.

The forward is checked against a float64 NumPy oracle that normalises the M gated copies
directly (not through the folded factor the implementations use); gradients against
`jax.grad` of the reference. Tolerances keyed by dtype (kernel_test_base.GRAD_TOLERANCE).

Dimension legend: B batch, T time, M streams, D hidden, K taps.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from pallas_kernels.short_conv import GpuShortConvConfig, gated_short_conv
from tests.kernel_test_base import GRAD_TOLERANCE

EPS, DILATION, TAPS = 1e-5, 3, 4


def random_case(seed, batch, length, streams, width, with_segments):
  ks = jax.random.split(jax.random.key(seed), 5)
  value_BxTxD = jax.random.normal(ks[0], (batch, length, width))
  gate_BxTxM = jax.nn.sigmoid(2 * jax.random.normal(ks[1], (batch, length, streams)))
  scale_MxD = 1 + 0.2 * jax.random.normal(ks[2], (streams, width))
  kernel_KxMxD = 0.5 * jax.random.normal(ks[3], (TAPS, streams, width))
  seg_BxT = None
  if with_segments:  # Documents of different lengths per row, the boundary mid-tile.
    seg_BxT = (jnp.arange(length)[None, :] >= jnp.array([[length // 3], [length // 2 + 1]])
               [:batch]).astype(jnp.int32)
  return value_BxTxD, gate_BxTxM, scale_MxD, kernel_KxMxD, seg_BxT


def numpy_oracle(value, gate, scale, kernel, seg, dtype):
  """float64: x_m = g_m v, xn = RMSNorm_m(x) rounded to dtype, y = x + SiLU(causal conv)."""
  v, g = np.float64(value), np.float64(gate)
  x = g[..., None] * v[:, :, None, :]
  xn = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * np.float64(scale)
  xn = np.float64(jnp.asarray(xn, jnp.float32).astype(dtype).astype(jnp.float32))
  t = v.shape[1]
  seg = np.zeros(v.shape[:2], np.int64) if seg is None else np.asarray(seg)
  z = np.zeros_like(x)
  for j in range(kernel.shape[0]):
    s = (kernel.shape[0] - 1 - j) * DILATION
    if s >= t:
      continue
    same = (seg[:, s:] == seg[:, :t - s])[:, :, None, None]
    z[:, s:] += np.float64(kernel[j]) * xn[:, :t - s] * same
  return x + z / (1 + np.exp(-z))


class ShortConvTestBase:
  conv_kwargs: dict = {}
  shapes = ((2, 40, 2, 32),)  # (B, T, M, D); T=40 is not a multiple of the 16-step tile
  dtypes = (jnp.float32, jnp.bfloat16)

  def conv(self, value, gate, scale, kernel, seg, dtype):
    return gated_short_conv(value, gate, scale, kernel, seg, dilation=DILATION, eps=EPS,
                            dtype=dtype, **self.conv_kwargs)

  def test_forward_matches_numpy_oracle(self):
    for b, t, m, d in self.shapes:
      for dtype in self.dtypes:
        for with_segments in (False, True):
          value, gate, scale, kernel, seg = random_case(t + d, b, t, m, d, with_segments)
          out = self.conv(value, gate, scale, kernel, seg, dtype)
          assert out.shape == (b, t, m, d) and out.dtype == dtype
          want = numpy_oracle(value, gate, scale, kernel, seg, dtype)
          tol = GRAD_TOLERANCE[jnp.dtype(dtype)]
          np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), want, rtol=tol,
                                     atol=tol * np.abs(want).max(),
                                     err_msg=f"{(b, t, m, d)} {jnp.dtype(dtype).name} "
                                             f"segments={with_segments}")

  def test_grad_matches_grad_of_reference(self):
    for b, t, m, d in self.shapes:
      for dtype in self.dtypes:
        for with_segments in (False, True):
          value, gate, scale, kernel, seg = random_case(7 + t, b, t, m, d, with_segments)
          cot = jax.random.normal(jax.random.key(9), (b, t, m, d))

          def loss(value, gate, scale, kernel, kwargs):
            out = gated_short_conv(value, gate, scale, kernel, seg, dilation=DILATION,
                                   eps=EPS, dtype=dtype, **kwargs)
            return jnp.vdot(out.astype(jnp.float32), cot)

          grads = jax.grad(loss, argnums=(0, 1, 2, 3))(value, gate, scale, kernel,
                                                       self.conv_kwargs)
          wants = jax.grad(loss, argnums=(0, 1, 2, 3))(value, gate, scale, kernel,
                                                       dict(implementation="xla"))
          tol = GRAD_TOLERANCE[jnp.dtype(dtype)]
          for name, got, want in zip(("value", "gate", "scale", "kernel"), grads, wants):
            want = np.asarray(want)
            np.testing.assert_allclose(np.asarray(got), want, rtol=tol,
                                       atol=tol * np.abs(want).max(),
                                       err_msg=f"d{name} {(b, t, m, d)} "
                                               f"{jnp.dtype(dtype).name} "
                                               f"segments={with_segments}")

  def test_causal_no_output_depends_on_a_later_input(self):
    b, t, m, d = self.shapes[0]
    value, gate, scale, kernel, _ = random_case(3, b, t, m, d, False)
    probe = t // 2

    def out_at_probe(value):
      return jnp.sum(self.conv(value, gate, scale, kernel, None, jnp.float32)[:, probe])

    # The value reaches the output through the norm of its own position and the taps: output
    # t reads exactly t, t - 3, t - 6, t - 9.
    read_T = np.abs(np.asarray(jax.grad(out_at_probe)(value))).sum((0, 2)) > 0
    np.testing.assert_array_equal(np.flatnonzero(read_T),
                                  [probe - j * DILATION for j in reversed(range(TAPS))])


class TestReference(ShortConvTestBase):
  conv_kwargs = dict(implementation="xla")


class TestInterpretGpuKernel(ShortConvTestBase):
  """Small tiles: several d tiles, time tiles and backward groups, and padding of T."""
  conv_kwargs = dict(implementation="pallas", interpret=True,
                     config=GpuShortConvConfig(block_t=8, block_d=16, bwd_block_t=8,
                                               bwd_chunks=2))


@pytest.mark.gpu
class TestGpuKernel(ShortConvTestBase):
  conv_kwargs = dict(implementation="pallas")
  shapes = ((2, 40, 2, 32), (2, 300, 4, 1024))


@pytest.mark.parametrize("bad, error, match", [
    (dict(value=jnp.zeros((2, 8))), ValueError, "value must be"),
    (dict(gate=jnp.zeros((2, 7, 2))), ValueError, "gate must be"),
    (dict(scale=jnp.zeros((3, 32))), ValueError, "scale must be"),
    (dict(kernel=jnp.zeros((4, 2, 16))), ValueError, "kernel must be"),
    (dict(seg=jnp.zeros((2, 9), jnp.int32)), ValueError, "segment_ids must be"),
    (dict(gate=jnp.zeros((2, 8, 2), jnp.int32)), TypeError, "gate must be floating"),
    (dict(implementation="pallas"), ValueError, "pass interpret=True"),
    (dict(implementation="triton"), ValueError, "implementation must be"),
    (dict(value=jnp.zeros((2, 8, 12)), scale=jnp.zeros((2, 12)),
          kernel=jnp.zeros((4, 2, 12)), implementation="pallas", interpret=True),
     ValueError, "divisible by 8"),
])
def test_clear_errors(bad, error, match):
  args = dict(value=jnp.zeros((2, 8, 32)), gate=jnp.zeros((2, 8, 2)),
              scale=jnp.zeros((2, 32)), kernel=jnp.zeros((4, 2, 32)), seg=None)
  kwargs = {k: bad.pop(k) for k in ("implementation", "interpret") if k in bad}
  args.update(bad)
  with pytest.raises(error, match=match):
    gated_short_conv(args["value"], args["gate"], args["scale"], args["kernel"], args["seg"],
                     dilation=DILATION, eps=EPS, **kwargs)


def test_engram_layer_same_output_and_grads_with_either_conv():
  """The layer with conv_implementation='pallas' (interpreted) equals the 'xla' layer."""
  import dataclasses
  import flax.linen as nn
  from engram_jax.config import EngramConfig
  from engram_jax import fusion

  cfg = EngramConfig(engram_vocab_size=(97, 89), n_embed_per_ngram=32, n_head_per_ngram=2,
                     layer_ids=(0,), hidden_size=32, hc_mult=2, zero_init_conv=False)
  heads = (11, 13, 17, 19)
  k_h, k_ids = jax.random.split(jax.random.key(0))
  hidden = jax.random.normal(k_h, (2, 24, 2, 32))
  ids = jax.random.randint(k_ids, (2, 24, 4), 0, 11)
  layer = fusion.Engram(dataclasses.replace(cfg, conv_implementation="xla"), heads)
  params = nn.unbox(layer.init(jax.random.key(1), hidden, ids))

  def run(conv_cfg, interpret):
    def loss(params, hidden):
      # The Engram module passes no interpret flag; interpret through the api's default.
      return jnp.sum(jnp.sin(fusion.Engram(conv_cfg, heads).apply(params, hidden, ids)))
    return jax.value_and_grad(loss, argnums=(0, 1))(params, hidden)

  want = run(dataclasses.replace(cfg, conv_implementation="xla"), False)
  original = fusion.short_conv.gated_short_conv

  def interpreted(*args, **kwargs):
    return original(*args, **kwargs, interpret=True,
                    config=GpuShortConvConfig(block_t=8, block_d=16, bwd_block_t=8))

  fusion.short_conv.gated_short_conv = interpreted
  try:
    got = run(dataclasses.replace(cfg, conv_implementation="pallas"), True)
  finally:
    fusion.short_conv.gated_short_conv = original
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5,
                               atol=1e-5 * float(np.abs(np.asarray(w)).max()))
