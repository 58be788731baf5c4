"""Specification of the Engram layer's gated ShortConv branch, in plain jnp.

For the M gated copies `x_m = gate[..., m] * value` of the shared value (fusion.py):

  factor_m = gate_m * rsqrt(gate_m^2 * mean_D(value^2) + eps)      RMSNorm of x_m, folded
  xn_m     = round_dtype(factor_m * value * scale_m)                 = RMSNorm_m(x_m), rounded
  z_m(t)   = sum_j kernel[j, m] * w_j(t) * xn_m(t - s_j),  s_j = (K-1-j) * dilation
  y_m      = x_m + SiLU(z_m)                                         returned in `dtype`

`w_j(t)` is 1 when t - s_j >= 0 (causal zero padding) and, with segment ids, both positions
belong to the same packed document. The RMSNorm of each copy comes from the one mean square of
the value (`mean((g v)^2) = g^2 mean(v^2)`), so no [B, T, M, D] tensor exists before the taps.
XLA fuses the taps; autodiff of this function is the 'xla' gradient.

Dimension legend: B batch, T time, M streams, D hidden, K kernel taps, P = T + (K-1)*dilation.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp


def norm_factor(value_BxTxD: jax.Array, gate_BxTxM: jax.Array, eps: float) -> jax.Array:
  """`gate * rsqrt(gate^2 mean_D(value^2) + eps)`: float32 `[B, T, M]`."""
  v32 = value_BxTxD.astype(jnp.float32)
  g32 = gate_BxTxM.astype(jnp.float32)
  mean_square_BxTx1 = jnp.mean(jnp.square(v32), axis=-1, keepdims=True)
  return g32 * jax.lax.rsqrt(jnp.square(g32) * mean_square_BxTx1 + eps)


def normalised_input(value_BxTxD: jax.Array, factor_BxTxM: jax.Array, scale_MxD: jax.Array,
                     dtype: Any) -> jax.Array:
  """`xn = round_dtype(factor * value * scale)`: `[B, T, M, D]` in `dtype`."""
  return (factor_BxTxM[..., None] * value_BxTxD.astype(jnp.float32)[:, :, None, :]
          * scale_MxD.astype(jnp.float32)).astype(dtype)


def causal_taps(xp_BxPxMxD: jax.Array, kernel_KxMxD: jax.Array, length: int, dilation: int,
                segment_ids_BxT: Optional[jax.Array] = None) -> jax.Array:
  """`SiLU(z)` (float32) from the left-padded normalised input `xp` (P = T + (K-1)*dil)."""
  k = kernel_KxMxD.shape[0]
  pad = (k - 1) * dilation
  taps = [xp_BxPxMxD[:, j * dilation:j * dilation + length] for j in range(k)]
  if segment_ids_BxT is not None:
    segp_BxP = jnp.pad(segment_ids_BxT, ((0, 0), (pad, 0)), constant_values=-1)
    taps = [tap * (segp_BxP[:, j * dilation:j * dilation + length]
                   == segment_ids_BxT)[:, :, None, None]
            for j, tap in enumerate(taps)]
  kernel32 = kernel_KxMxD.astype(jnp.float32)
  z_BxTxMxD = sum(tap.astype(jnp.float32) * kernel32[j] for j, tap in enumerate(taps))
  return jax.nn.silu(z_BxTxMxD)


def gated_short_conv_reference(value_BxTxD: jax.Array, gate_BxTxM: jax.Array,
                               factor_BxTxM: jax.Array, scale_MxD: jax.Array,
                               kernel_KxMxD: jax.Array,
                               segment_ids_BxT: Optional[jax.Array] = None, *,
                               dilation: int, dtype: Any) -> jax.Array:
  """`y = gate * value + SiLU(conv(xn))` in `dtype` (see the module docstring)."""
  k = kernel_KxMxD.shape[0]
  t = value_BxTxD.shape[1]
  xn_BxTxMxD = normalised_input(value_BxTxD, factor_BxTxM, scale_MxD, dtype)
  xp_BxPxMxD = jnp.pad(xn_BxTxMxD, ((0, 0), ((k - 1) * dilation, 0), (0, 0), (0, 0)))
  conv_BxTxMxD = causal_taps(xp_BxPxMxD, kernel_KxMxD, t, dilation, segment_ids_BxT)
  v_BxTxMxD = (gate_BxTxM.astype(jnp.float32)[..., None]
               * value_BxTxD.astype(jnp.float32)[:, :, None, :])
  return (v_BxTxMxD + conv_BxTxMxD).astype(dtype)
