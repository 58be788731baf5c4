"""Public entry point of the gated ShortConv branch: validation, dispatch and the custom VJP.

`gated_short_conv(value, gate, scale, kernel, segment_ids, dilation=, eps=, dtype=)` returns
`y = x + SiLU(conv(RMSNorm(x)))` for the M gated copies `x_m = gate_m * value` (reference.py
states the maths), `[B, T, M, D]` in `dtype`:

  implementation=None      'pallas' on GPU, 'xla' on CPU and TPU (no TPU kernel: on TPU
                           the reference runs; D not divisible by 8 raises on GPU rather
                           than falling back silently).
  implementation='xla'     reference.gated_short_conv_reference; its gradient is autodiff.
  implementation='pallas'  gpu.py's forward and backward kernels under one `jax.custom_vjp`;
                           on CPU pass `interpret=True`.

Both implementations fold the RMSNorm into a per-(token, stream) factor computed here in jnp
(`reference.norm_factor`), so the gradient w.r.t. value and gate through the norm is autodiff
of that small `[B, T, M]` function in both.

Dimension legend: B batch, T time, M streams, D hidden, K kernel taps.
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.short_conv import gpu, reference
from pallas_kernels.short_conv.configs import GpuShortConvConfig


@dataclasses.dataclass(frozen=True)
class ConvPlan:
  """Static choices of one call (hashable: a nondiff argument of the custom VJP)."""
  dilation: int
  dtype: Any
  interpret: bool = False
  config: GpuShortConvConfig = GpuShortConvConfig()


def current_platform() -> str:
  platform = jax.default_backend()
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def resolve_implementation(width: int, implementation: Optional[str], interpret: bool) -> str:
  """'xla' or 'pallas', raising on impossible combinations."""
  platform = current_platform()
  if implementation is None:
    implementation = "pallas" if platform == "gpu" and not interpret else "xla"
  if implementation not in ("xla", "pallas"):
    raise ValueError(f"implementation must be None, 'xla' or 'pallas', got {implementation!r}")
  if implementation == "pallas":
    if platform != "gpu" and not interpret:
      raise ValueError(f"the Pallas ShortConv is a GPU (Triton) kernel; on {platform} pass "
                       "interpret=True or use implementation='xla'")
    gpu.block_d(width, GpuShortConvConfig())  # Raises for D without a divisor of 8.
  return implementation


def validate(value_BxTxD, gate_BxTxM, scale_MxD, kernel_KxMxD, segment_ids_BxT, dilation):
  if value_BxTxD.ndim != 3:
    raise ValueError(f"value must be [B, T, D], got shape {value_BxTxD.shape}")
  b, t, d = value_BxTxD.shape
  if gate_BxTxM.ndim != 3 or gate_BxTxM.shape[:2] != (b, t):
    raise ValueError(f"gate must be [B, T, M] with [B, T]={(b, t)}, got {gate_BxTxM.shape}")
  m = gate_BxTxM.shape[2]
  if scale_MxD.shape != (m, d):
    raise ValueError(f"scale must be [M, D]={(m, d)}, got {scale_MxD.shape}")
  if kernel_KxMxD.ndim != 3 or kernel_KxMxD.shape[1:] != (m, d):
    raise ValueError(f"kernel must be [K, M, D] with [M, D]={(m, d)}, got {kernel_KxMxD.shape}")
  if segment_ids_BxT is not None and segment_ids_BxT.shape != (b, t):
    raise ValueError(f"segment_ids must be [B, T]={(b, t)}, got {segment_ids_BxT.shape}")
  for name, x in (("value", value_BxTxD), ("gate", gate_BxTxM), ("scale", scale_MxD),
                  ("kernel", kernel_KxMxD)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise TypeError(f"{name} must be floating point, got {x.dtype}")
  if not isinstance(dilation, int) or dilation < 1:
    raise ValueError(f"dilation must be a positive int, got {dilation!r}")


def _core_impl(plan, value, gate, factor, seg, scale, kernel):
  return gpu.forward(value, gate, factor, seg, scale, kernel, dilation=plan.dilation,
                     dtype=plan.dtype, config=plan.config, interpret=plan.interpret)


def _core_fwd(plan, value, gate, factor, seg, scale, kernel):
  out = _core_impl(plan, value, gate, factor, seg, scale, kernel)
  return out, (value, gate, factor, seg, scale, kernel)


def _core_bwd(plan, res, dy_BxTxMxD):
  value, gate, factor, seg, scale, kernel = res
  dvalue, dgate, dfactor, dscale, dkernel = gpu.backward(
      value, gate, factor, seg, scale, kernel, dy_BxTxMxD.astype(plan.dtype),
      dilation=plan.dilation, dtype=plan.dtype, config=plan.config, interpret=plan.interpret)
  return (dvalue.astype(value.dtype), dgate.astype(gate.dtype), dfactor.astype(factor.dtype),
          jnp.zeros(seg.shape, jax.dtypes.float0), dscale.astype(scale.dtype),
          dkernel.astype(kernel.dtype))


_core = jax.custom_vjp(_core_impl, nondiff_argnums=(0,))
_core.defvjp(_core_fwd, _core_bwd)


def gated_short_conv(value_BxTxD: jax.Array, gate_BxTxM: jax.Array, scale_MxD: jax.Array,
                     kernel_KxMxD: jax.Array, segment_ids_BxT: Optional[jax.Array] = None, *,
                     dilation: int, eps: float, dtype: Any = jnp.float32,
                     implementation: Optional[str] = None, interpret: bool = False,
                     config: Optional[GpuShortConvConfig] = None) -> jax.Array:
  """`gate * value + SiLU(conv(RMSNorm_m(gate * value)))` as `[B, T, M, D]` in `dtype`.

  `scale_MxD`: the M RMSNorm scales; `kernel_KxMxD`: depthwise taps (tap j reads
  (K-1-j)*dilation steps back); `segment_ids_BxT`: taps never cross packed documents. The
  normalised input is rounded to `dtype` before the taps (multiply-adds in float32).
  """
  validate(value_BxTxD, gate_BxTxM, scale_MxD, kernel_KxMxD, segment_ids_BxT, dilation)
  implementation = resolve_implementation(value_BxTxD.shape[-1], implementation, interpret)
  factor_BxTxM = reference.norm_factor(value_BxTxD, gate_BxTxM, eps)
  if implementation == "xla":
    return reference.gated_short_conv_reference(
        value_BxTxD, gate_BxTxM, factor_BxTxM, scale_MxD, kernel_KxMxD, segment_ids_BxT,
        dilation=dilation, dtype=dtype)
  if segment_ids_BxT is None:
    segment_ids_BxT = jnp.zeros(value_BxTxD.shape[:2], jnp.int32)
  plan = ConvPlan(dilation, jnp.dtype(dtype), bool(interpret), config or GpuShortConvConfig())
  return _core(plan, value_BxTxD, gate_BxTxM, factor_BxTxM, segment_ids_BxT, scale_MxD,
               kernel_KxMxD)
