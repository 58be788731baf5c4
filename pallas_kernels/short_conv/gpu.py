"""GPU kernels of the gated ShortConv branch: one Pallas-Triton pass forward, one backward.

What XLA does with reference.py (H200, demo shapes, `bench_layer --profile`): the forward taps
fuse into whatever consumes the output, and the backward becomes several reductions over the
[B, T, M, D] cotangent (kernel and scale gradients over B*T, the norm factor's over D, the
value's over M), each reading it again. Here each pass reads its [B, T, M, D] operand once:

forward, program (b, t tile, d tile), all M streams: loads the K shifted value windows once
  (shared by the streams), builds `xn = round(factor * value * scale)` per stream and tap, and
  writes `y = gate * value + SiLU(sum_j kernel_j * xn(t - s_j))` in the output dtype.
backward, program (b, group of time tiles, d tile): for each tile, recomputes z at the K
  future positions t + s_j that read position t (from 2K-1 shifted value windows, cached in
  L1/L2), forms dz = dy * SiLU'(z) there, and sums
    dxn(t)      = sum_j kernel_j * w_j(t + s_j) * dz(t + s_j)
    dvalue      = sum_m (dxn * factor * scale + gate * dy)          written per tile
    dfactor     = sum_d dxn * value * scale,  dgate = sum_d dy * value   per d tile (partials)
    dscale, dkernel                                                  in registers over the group
  The partial sums (one row per d tile, or per program) are added by XLA afterwards: a few MB,
  no atomics, so results are deterministic.

The rounding of xn to the compute dtype is treated as the identity in the backward (as JAX's
gradient of a cast); the kernel keeps dxn in float32 where the reference's gradient rounds it
to the compute dtype per tap, so bf16 gradients differ from the reference by that rounding.

Every load uses clamped in-bounds indices and masks the value instead (no masked loads).
T is padded to a multiple of the time tile when needed (a copy of the inputs); D must have a
power-of-two divisor of at least 8.

Dimension legend: B batch, T time, M streams, D hidden, K taps, N = B*T, S time tile,
C d tile, G time-tile groups, P = B*G partial rows.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels.short_conv.configs import GpuShortConvConfig


def block_d(width: int, config: GpuShortConvConfig) -> int:
  """The d tile: the largest power of two dividing D, capped at `config.block_d`."""
  tile = min(width & -width, config.block_d)
  if tile < 8:
    raise ValueError(f"the Pallas ShortConv needs D divisible by 8, got D={width}; "
                     "use implementation='xla'")
  return tile


def _sigmoid(x):
  return 1.0 / (1.0 + jnp.exp(-x))


def _round(x, dtype):
  return x.astype(dtype).astype(jnp.float32)


def _forward_kernel(value_ref, gate_ref, factor_ref, seg_ref, scale_ref, kernel_ref, out_ref,
                    *, length, streams, width, taps, dilation, tile_t, tile_d, dtype):
  dt, tt, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  base = b * length
  t_S = tt * tile_t + jax.lax.iota(jnp.int32, tile_t)
  d0 = pl.multiple_of(dt * tile_d, tile_d)
  cols = pl.ds(d0, tile_d)
  seg_S = seg_ref[base + t_S]
  windows = []  # per tap j: (rows, mask, value window), shift s_j = (K-1-j) * dilation
  for j in range(taps):
    src_S = t_S - (taps - 1 - j) * dilation
    row_S = base + jnp.maximum(src_S, 0)
    ok_S = (src_S >= 0) & (seg_ref[row_S] == seg_S)
    windows.append((row_S, ok_S, value_ref[row_S, cols]))
  row0_S, value0_SxC = base + t_S, windows[-1][2]
  for m in range(streams):
    scale_C = scale_ref[m, cols]
    z_SxC = jnp.zeros((tile_t, tile_d), jnp.float32)
    for j, (row_S, ok_S, value_SxC) in enumerate(windows):
      factor_S = factor_ref[row_S, m]
      xn_SxC = _round(factor_S[:, None] * value_SxC * scale_C[None, :], dtype)
      kernel_C = kernel_ref[j * streams + m, cols]
      z_SxC += jnp.where(ok_S[:, None], xn_SxC, 0.0) * kernel_C[None, :]
    gate_S = gate_ref[row0_S, m]
    y_SxC = gate_S[:, None] * value0_SxC + z_SxC * _sigmoid(z_SxC)
    out_ref[row0_S, pl.ds(pl.multiple_of(m * width + d0, tile_d), tile_d)] = (
        y_SxC.astype(out_ref.dtype))


def _backward_kernel(value_ref, gate_ref, factor_ref, seg_ref, scale_ref, kernel_ref, dy_ref,
                     dvalue_ref, dgate_ref, dfactor_ref, dscale_ref, dkernel_ref, *, length,
                     streams, width, taps, dilation, tile_t, tile_d, chunks, dtype):
  dt, grp, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  base, rows_total = b * length, pl.num_programs(2) * length
  d0 = pl.multiple_of(dt * tile_d, tile_d)
  cols = pl.ds(d0, tile_d)
  d_C = d0 + jax.lax.iota(jnp.int32, tile_d)
  shifts = [(taps - 1 - j) * dilation for j in range(taps)]
  offsets = sorted({si - sj for si in shifts for sj in shifts})
  scale_MxC = [scale_ref[m, cols] for m in range(streams)]
  kernel_KxMxC = [[kernel_ref[j * streams + m, cols] for m in range(streams)]
                  for j in range(taps)]

  def tile(c, acc):
    dkernel_acc, dscale_acc = list(acc[0]), list(acc[1])
    t_S = (grp * chunks + c) * tile_t + jax.lax.iota(jnp.int32, tile_t)
    row, inside, seg, value = {}, {}, {}, {}  # per offset o: position t + o
    for o in offsets:
      p_S = t_S + o
      inside[o] = (p_S >= 0) & (p_S < length)
      row[o] = base + jnp.clip(p_S, 0, length - 1)
      seg[o] = seg_ref[row[o]]
      value[o] = value_ref[row[o], cols]
    dvalue_SxC = jnp.zeros((tile_t, tile_d), jnp.float32)
    for m in range(streams):
      xn = {o: jnp.where(inside[o][:, None],
                         _round(factor_ref[row[o], m][:, None] * value[o]
                                * scale_MxC[m][None, :], dtype), 0.0)
            for o in offsets}
      dxn_SxC = jnp.zeros((tile_t, tile_d), jnp.float32)
      for j, sj in enumerate(shifts):  # z and dz at p = t + s_j, whose tap j reads t.
        z_SxC = jnp.zeros((tile_t, tile_d), jnp.float32)
        for i, si in enumerate(shifts):
          same = (seg[sj - si] == seg[sj])[:, None]
          z_SxC += jnp.where(same, xn[sj - si], 0.0) * kernel_KxMxC[i][m][None, :]
        dy_SxC = jnp.where(inside[sj][:, None],
                           dy_ref[row[sj], pl.ds(pl.multiple_of(m * width + d0, tile_d),
                                                 tile_d)].astype(jnp.float32), 0.0)
        sig_SxC = _sigmoid(z_SxC)
        dz_SxC = dy_SxC * sig_SxC * (1.0 + z_SxC * (1.0 - sig_SxC))
        same_j = (seg[0] == seg[sj])[:, None]
        dxn_SxC += jnp.where(same_j, dz_SxC, 0.0) * kernel_KxMxC[j][m][None, :]
        if sj == 0:
          dz0_SxC, dy0_SxC = dz_SxC, dy_SxC
      for j, sj in enumerate(shifts):
        same = (seg[-sj] == seg[0])[:, None]
        dkernel_acc[j * streams + m] += jnp.sum(
            dz0_SxC * jnp.where(same, xn[-sj], 0.0), axis=0)
      factor0_S = factor_ref[row[0], m]
      gate0_S = gate_ref[row[0], m]
      dscale_acc[m] += jnp.sum(dxn_SxC * factor0_S[:, None] * value[0], axis=0)
      dfactor_S = jnp.sum(dxn_SxC * value[0] * scale_MxC[m][None, :], axis=1)
      dgate_S = jnp.sum(dy0_SxC * value[0], axis=1)
      flat_S = dt * (rows_total * streams) + row[0] * streams + m
      dfactor_ref[flat_S] = dfactor_S
      dgate_ref[flat_S] = dgate_S
      dvalue_SxC += (dxn_SxC * factor0_S[:, None] * scale_MxC[m][None, :]
                     + gate0_S[:, None] * dy0_SxC)
    dvalue_ref[row[0], cols] = dvalue_SxC
    return tuple(dkernel_acc), tuple(dscale_acc)

  zeros_C = jnp.zeros((tile_d,), jnp.float32)
  dkernel_acc, dscale_acc = jax.lax.fori_loop(
      0, chunks, tile, ((zeros_C,) * (taps * streams), (zeros_C,) * streams))
  part = b * pl.num_programs(1) + grp
  for m in range(streams):
    dscale_ref[part * (streams * width) + m * width + d_C] = dscale_acc[m]
    for j in range(taps):
      dkernel_ref[part * (taps * streams * width) + (j * streams + m) * width + d_C] = (
          dkernel_acc[j * streams + m])


def _pad_time(x, multiple):
  t = x.shape[1]
  padded = pl.cdiv(t, multiple) * multiple
  if padded == t:
    return x
  return jnp.pad(x, ((0, 0), (0, padded - t)) + ((0, 0),) * (x.ndim - 2))


def _flat_inputs(value_BxTxD, gate_BxTxM, factor_BxTxM, seg_BxT, multiple):
  value = _pad_time(value_BxTxD.astype(jnp.float32), multiple)
  b, tp, d = value.shape
  m = gate_BxTxM.shape[-1]
  return (value.reshape(b * tp, d),
          _pad_time(gate_BxTxM.astype(jnp.float32), multiple).reshape(b * tp, m),
          _pad_time(factor_BxTxM.astype(jnp.float32), multiple).reshape(b * tp, m),
          _pad_time(seg_BxT.astype(jnp.int32), multiple).reshape(-1), tp)


def forward(value_BxTxD, gate_BxTxM, factor_BxTxM, seg_BxT, scale_MxD, kernel_KxMxD, *,
            dilation: int, dtype: Any, config: GpuShortConvConfig,
            interpret: bool = False) -> jax.Array:
  """`y = gate * value + SiLU(conv(xn))`, `[B, T, M, D]` in `dtype` (reference.py)."""
  b, t, d = value_BxTxD.shape
  m, k = gate_BxTxM.shape[-1], kernel_KxMxD.shape[0]
  tile_t, tile_d = config.block_t, block_d(d, config)
  value, gate, factor, seg, tp = _flat_inputs(value_BxTxD, gate_BxTxM, factor_BxTxM, seg_BxT,
                                              tile_t)
  kernel = functools.partial(_forward_kernel, length=tp, streams=m, width=d, taps=k,
                             dilation=dilation, tile_t=tile_t, tile_d=tile_d, dtype=dtype)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((b * tp, m * d), dtype),
      grid=(d // tile_d, tp // tile_t, b),
      compiler_params=pl_triton.CompilerParams(num_warps=config.num_warps, num_stages=1),
      interpret=interpret,
      name="engram_short_conv_fwd",
  )(value, gate, factor, seg, scale_MxD.astype(jnp.float32),
    kernel_KxMxD.astype(jnp.float32).reshape(k * m, d))
  return out.reshape(b, tp, m, d)[:, :t]


def backward(value_BxTxD, gate_BxTxM, factor_BxTxM, seg_BxT, scale_MxD, kernel_KxMxD,
             dy_BxTxMxD, *, dilation: int, dtype: Any, config: GpuShortConvConfig,
             interpret: bool = False):
  """Float32 (dvalue [B,T,D], dgate [B,T,M], dfactor [B,T,M], dscale [M,D], dkernel [K,M,D])."""
  b, t, d = value_BxTxD.shape
  m, k = gate_BxTxM.shape[-1], kernel_KxMxD.shape[0]
  tile_t, tile_d = config.bwd_block_t, block_d(d, config)
  value, gate, factor, seg, tp = _flat_inputs(value_BxTxD, gate_BxTxM, factor_BxTxM, seg_BxT,
                                              tile_t)
  dy = _pad_time(dy_BxTxMxD, tile_t).reshape(b * tp, m * d)
  tiles = tp // tile_t
  chunks = max(c for c in range(1, min(config.bwd_chunks, tiles) + 1) if tiles % c == 0)
  groups, d_tiles = tiles // chunks, d // tile_d
  parts = b * groups
  kernel = functools.partial(_backward_kernel, length=tp, streams=m, width=d, taps=k,
                             dilation=dilation, tile_t=tile_t, tile_d=tile_d, chunks=chunks,
                             dtype=dtype)
  f32 = jnp.float32
  dvalue, dgate, dfactor, dscale, dkernel = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((b * tp, d), f32),
                 jax.ShapeDtypeStruct((d_tiles * b * tp * m,), f32),
                 jax.ShapeDtypeStruct((d_tiles * b * tp * m,), f32),
                 jax.ShapeDtypeStruct((parts * m * d,), f32),
                 jax.ShapeDtypeStruct((parts * k * m * d,), f32)),
      grid=(d_tiles, groups, b),
      compiler_params=pl_triton.CompilerParams(num_warps=config.bwd_num_warps, num_stages=1),
      interpret=interpret,
      name="engram_short_conv_bwd",
  )(value, gate, factor, seg, scale_MxD.astype(f32), kernel_KxMxD.astype(f32).reshape(k * m, d),
    dy)
  dgate = dgate.reshape(d_tiles, b, tp, m).sum(0)[:, :t]
  dfactor = dfactor.reshape(d_tiles, b, tp, m).sum(0)[:, :t]
  return (dvalue.reshape(b, tp, d)[:, :t], dgate, dfactor,
          dscale.reshape(parts, m, d).sum(0), dkernel.reshape(parts, k, m, d).sum(0))
