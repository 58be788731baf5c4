"""Manifold-constrained hyper-connections (mHC, arXiv 2512.24880): an M-stream residual.

The residual is M streams `x_l [M, D]` per token. Around every sub-layer F (attention, FFN):

  x~     = RMSNorm(vec(x_l))                                     over all M*D features
  H~pre  = a_pre  * (x~ phi_pre)  + b_pre        [M]
  H~post = a_post * (x~ phi_post) + b_post       [M]
  H~res  = a_res  * mat(x~ phi_res) + b_res      [M, M]
  H_pre  = sigmoid(H~pre)   H_post = 2 sigmoid(H~post)   H_res = SinkhornKnopp(exp(H~res))
  x_{l+1} = H_res x_l + H_post^T F(H_pre x_l)

so the input of F is a non-negative mixture of the streams, F's output is written back to every
stream with a non-negative gain, and the stream-to-stream residual is doubly stochastic (rows
and columns sum to 1): its spectral norm is <= 1 and products of such matrices stay doubly
stochastic, which is what keeps deep multi-stream residuals from exploding. `phi` are the
dynamic (input-dependent) parts, `b` the static parts, `a` learnable scalar gates.

Implemented faithfully: the three maps, both parts, the sigmoid / 2*sigmoid / Sinkhorn
constraints, the RMSNorm over the flattened streams. Choices the paper leaves open or that we
simplify (documented, not hidden):
  * Initialisation: `a = 0.01`; `phi ~ N(0, 1/(M*D))`; `b_pre = logit(1/M)` (the input of F is
    the stream mean), `b_post = 0` (gain 1 on every stream), `b_res` has 0 on the diagonal and
    `RES_OFFDIAG_LOGIT` elsewhere (near-identity mixing). Streams start as M copies of the
    embedding, so at step 0 the network equals a plain pre-norm residual network.
  * No custom kernels and no recomputation tricks of the paper's infrastructure section; the
    coefficients are computed in float32 by XLA: one [M*D, 2M + M^2] projection per token (the
    three phi concatenated, the RMSNorm's 1/rms applied to its output and its scale folded into
    phi, so the normalised streams are never materialised). The H_res stream mixing
    (`mix_streams`) is an einsum on CPU and elementwise products + a sum elsewhere, where XLA
    runs the einsum as batched MxM GEMMs; each is the faster one on its platform
    (benchmarks/README.md, "mHC wrapper").
  * Sinkhorn runs a fixed `sinkhorn_iters` (paper: 20) row-then-column normalisations; the
    result is exactly column-stochastic and row sums converge to 1.
Stream expansion (`expand_streams`) copies the embedding to the M streams; contraction
(`contract_streams`) takes the stream *mean* before the final norm (each stream carries the
whole residual at init, so the mean keeps the plain-residual scale; MaxText sums, which only
rescales the input of the final RMSNorm).

Dimension legend: B batch, T length, M streams (hc_mult), D hidden size.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Off-diagonal logit of the static residual mixing: exp(-4) ~ 2% leak to each other stream at
# init; far enough from uniform to keep streams distinct, close enough to learn from.
RES_OFFDIAG_LOGIT = -4.0
GATE_INIT = 0.01


def sinkhorn_knopp(logits_NxMxM: jax.Array, iters: int) -> jax.Array:
  """Projects exp(logits) toward the doubly stochastic matrices (float32, last two axes)."""
  x = logits_NxMxM.astype(jnp.float32)
  # Max-shift before exp: Sinkhorn is invariant to a per-matrix scale, so this only avoids overflow.
  p = jnp.exp(x - jnp.max(x, axis=(-2, -1), keepdims=True))

  def body(_, p):
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.sum(p, axis=-2, keepdims=True)

  return jax.lax.fori_loop(0, iters, body, p)


def expand_streams(x_BxTxD: jax.Array, m: int) -> jax.Array:
  """Embedding -> M identical residual streams."""
  return jnp.broadcast_to(x_BxTxD[:, :, None, :], (*x_BxTxD.shape[:2], m, x_BxTxD.shape[-1]))


def contract_streams(x_BxTxMxD: jax.Array) -> jax.Array:
  """M streams -> one hidden state (mean, see module docstring)."""
  return jnp.mean(x_BxTxMxD.astype(jnp.float32), axis=2).astype(x_BxTxMxD.dtype)


class HyperConnection(nn.Module):
  """Computes one sub-layer's mHC coefficients and its input.

  `__call__(x_BxTxMxD) -> (layer_input_BxTxD, coeffs)`; after running the sub-layer F on
  `layer_input`, call `hc_combine(x_BxTxMxD, F_out_BxTxD, coeffs)`. coeffs = (H_post [B,T,M],
  H_res [B,T,M,M]), float32.
  """

  sinkhorn_iters: int = 20
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxMxD: jax.Array):
    b, t, m, d = x_BxTxMxD.shape
    f32 = jnp.float32

    def param(name, init, shape, axes):
      return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                        self.param_dtype).astype(f32)

    phi_init = nn.initializers.normal(1.0 / math.sqrt(m * d))
    scale_MxD = param("norm_scale", nn.initializers.ones, (m, d), ("streams", "embed"))
    phi_pre_MxDxM = param("phi_pre", phi_init, (m, d, m), ("streams", "embed", None))
    phi_post_MxDxM = param("phi_post", phi_init, (m, d, m), ("streams", "embed", None))
    phi_res_MxDxMM = param("phi_res", phi_init, (m, d, m * m), ("streams", "embed", None))
    gate = lambda name: param(name, nn.initializers.constant(GATE_INIT), (), ())  # noqa: E731
    a_pre, a_post, a_res = gate("alpha_pre"), gate("alpha_post"), gate("alpha_res")
    # sigmoid(-log(M - 1)) = 1/M: the sub-layer input starts as the stream mean.
    b_pre_init = -math.log(m - 1) if m > 1 else 0.0
    b_pre_M = param("bias_pre", nn.initializers.constant(b_pre_init), (m,), (None,))
    b_post_M = param("bias_post", nn.initializers.zeros, (m,), (None,))
    res_init = lambda key, shape, dtype: jnp.where(  # noqa: E731
        jnp.eye(m, dtype=bool), 0.0, RES_OFFDIAG_LOGIT).astype(dtype)
    b_res_MxM = param("bias_res", res_init, (m, m), (None, None))

    x32 = x_BxTxMxD.astype(f32)
    inv_rms_BxT = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=(2, 3)) + self.eps)
    # (x * inv_rms * scale) @ phi == inv_rms * (x @ (scale * phi)): one pass over the streams.
    phi_MxDxK = jnp.concatenate([phi_pre_MxDxM, phi_post_MxDxM, phi_res_MxDxMM], axis=-1)
    proj_BxTxK = inv_rms_BxT[..., None] * jnp.einsum(
        "btmd,mdk->btk", x32, scale_MxD[..., None] * phi_MxDxK)
    pre_BxTxM = jax.nn.sigmoid(a_pre * proj_BxTxK[..., :m] + b_pre_M)
    post_BxTxM = 2.0 * jax.nn.sigmoid(a_post * proj_BxTxK[..., m:2 * m] + b_post_M)
    res_logits = a_res * proj_BxTxK[..., 2 * m:]
    res_BxTxMxM = sinkhorn_knopp(res_logits.reshape(b, t, m, m) + b_res_MxM, self.sinkhorn_iters)

    layer_in_BxTxD = jnp.einsum("btm,btmd->btd", pre_BxTxM, x32).astype(self.dtype)
    return layer_in_BxTxD, (post_BxTxM, res_BxTxMxM)


def mix_streams(res_BxTxMxM: jax.Array, x_BxTxMxD: jax.Array, how: Optional[str] = None
                ) -> jax.Array:
  """H_res x per token: sum_j res[b,t,i,j] x[b,t,j,:].

  `how`: "einsum" (a batched MxM GEMM per token), "elementwise" (M^2 broadcast products and a
  sum over j), or None: einsum on CPU, elementwise elsewhere, the faster one on each
  (`python -m benchmarks.bench_mhc`; benchmarks/README.md, "mHC wrapper").
  """
  how = how or ("einsum" if jax.default_backend() == "cpu" else "elementwise")
  if how == "einsum":
    return jnp.einsum("btij,btjd->btid", res_BxTxMxM, x_BxTxMxD)
  if how == "elementwise":
    return jnp.sum(res_BxTxMxM[..., None] * x_BxTxMxD[:, :, None, :, :], axis=3)
  raise ValueError(f"mix_streams: how must be 'einsum', 'elementwise' or None, got {how!r}")


def hc_combine(x_BxTxMxD: jax.Array, out_BxTxD: jax.Array, coeffs, how: Optional[str] = None
               ) -> jax.Array:
  """x_{l+1} = H_res x_l + H_post^T out, in float32, returned in x's dtype (`how`: as in
  `mix_streams`)."""
  post_BxTxM, res_BxTxMxM = coeffs
  with jax.named_scope("hc_combine"):       # benchmarks/profile_step.py files it under mHC
    mixed = mix_streams(res_BxTxMxM, x_BxTxMxD.astype(jnp.float32), how)
    new = mixed + post_BxTxM[..., None] * out_BxTxD.astype(jnp.float32)[:, :, None, :]
    return new.astype(x_BxTxMxD.dtype)
