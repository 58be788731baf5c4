"""The Engram layer of one block: memory lookup, per-stream gate, shared value, ShortConv.

Maths (official demo, REFERENCE.md section 1 steps 6-8), for every residual stream m:
  e      = memory(ids)                               flattened rows, width F = d_mem
  k_m    = RMSNorm1_m(e W_K,m + b_K,m)               one key projection per stream
  q_m    = RMSNorm2_m(h_m)
  s_m    = <k_m, q_m> / sqrt(D);  s_m = sign(s_m) sqrt(max(|s_m|, 1e-6))  (signed_sqrt_gate)
  alpha_m = sigmoid(s_m)
  v_m    = alpha_m (e W_V + b_V)                     one value projection shared by all streams
  y      = v + SiLU(conv(RMSNorm_m(v)))              depthwise causal dilated conv over M*D
The caller adds `y` to the residual streams.

Ablation switches (EngramConfig; defaults are the maths above):
  gate='shared'          one key projection k and one query q = RMSNorm2(mean_m h_m); the
                         single alpha multiplies every stream's value
  gate='none'            no key projection or norms: alpha = 1 exactly
  use_short_conv=False   y = v (no conv parameters)
With gate='none' and use_short_conv=False the layer is a plain additive hashed n-gram table:
y_m = e W_V + b_V for every stream.

Precision: matmuls take compute-dtype inputs, accumulate in float32 and return the compute
dtype (as a torch Linear under autocast); norms, the gate, the conv's multiply-adds and the SiLU
run in float32, on the conv's normalised input rounded to the compute dtype (as torch's
autocast conv reads it); the output is cast back to the compute dtype. With float32 compute
all of it is float32. In bf16, projection outputs and the conv input in the compute dtype halve
those tensors' bytes; the conv's norm comes from the value's one mean square (StreamRMSNorm's
`gain_NxM`), so the M gated copies [B, T, M, D] are never built before it. Apart from the
lookup, the layer is plain XLA. Timings: benchmarks/README.md, "Whole Engram layer"
(`python -m benchmarks.bench_layer`).

Initialisation: RMSNorm scales 1; key/value kernels lecun-normal over their input width with
zero biases (Flax's Dense default, not torch's uniform); the conv kernel is zero when
`config.zero_init_conv` (the paper: y == v at step 0), else torch's Conv1d default,
U(-1/sqrt(K), 1/sqrt(K)) (kaiming-uniform with a=sqrt(5) and fan_in = kernel_size, as each
depthwise channel sees K inputs).

Dimension legend: B batch, T sequence length, M residual streams (hc_mult), D hidden size,
F = d_mem memory width, K conv kernel size, H hash heads.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax.config import EngramConfig
from engram_jax.hyper_connections import contract_streams
from engram_jax.memory import EngramInput, MultiHeadMemory

# Floor of |s| in the signed square root, as in the demo (keeps the sqrt's gradient finite).
GATE_ABS_FLOOR = 1e-6


def torch_conv1d_default_init(kernel_size: int):
  """torch.nn.Conv1d's default for a depthwise kernel: U(-1/sqrt(K), 1/sqrt(K))."""
  bound = 1.0 / math.sqrt(kernel_size)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class StreamRMSNorm(nn.Module):
  """M independent RMSNorms over the last axis of `x_...xMxD`; returns float32.

  `gain_NxM`: `x` is `[..., D]`, shared by the M streams, and the streams normalised are the
  scaled copies `gain[..., m] * x`. Their norms come from the one mean square of `x`
  (`mean((g x)^2) = g^2 mean(x^2)`), so the M copies are never built before the norm (the
  Engram value's M gated copies, whose M mean squares would otherwise each read `[..., M, D]`).
  """

  eps: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_NxMxD: jax.Array, gain_NxM: Optional[jax.Array] = None) -> jax.Array:
    m, d = (gain_NxM.shape[-1], x_NxMxD.shape[-1]) if gain_NxM is not None else x_NxMxD.shape[-2:]
    scale_MxD = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, ("streams", "embed")),
        (m, d), self.param_dtype).astype(jnp.float32)
    x32 = x_NxMxD.astype(jnp.float32)
    mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    if gain_NxM is None:
      return x32 * jax.lax.rsqrt(mean_square + self.eps) * scale_MxD
    g_NxM = gain_NxM.astype(jnp.float32)
    factor_NxM = g_NxM * jax.lax.rsqrt(jnp.square(g_NxM) * mean_square + self.eps)
    return factor_NxM[..., None] * x32[..., None, :] * scale_MxD


class ShortConv(nn.Module):
  """`SiLU(conv(RMSNorm_m(gate_m * value)))`: depthwise, causal, dilated conv over the M*D channels.

  Its input is the M gated copies of the shared value, `x_m = gate[..., m] * value`, passed as
  the two factors (`value_BxTxD`, `gate_BxTxM`): the RMSNorm of each copy comes from the one
  mean square of the value (`StreamRMSNorm`'s `gain_NxM`), so the [B, T, M, D] input is never
  materialised; its normalised form is built inside the taps' fusion.
  `dtype`: the normalised input is rounded to it before the taps (multiply-adds in float32).
  Causal means output t sees inputs t - j*dilation, j = 0..K-1 (left zero padding of
  (K-1)*dilation, the demo's symmetric padding followed by keeping the first T outputs).
  With `segment_ids_BxT`, a tap that reaches into another packed document is dropped, so a
  document's output never depends on the one before it (the demo has no such mask).
  Returns float32 `[B, T, M, D]`.

  `decode=True`: the last (K-1)*dilation normalised inputs are kept in the 'cache' collection
  (`history`, zeros = the causal padding); the first call only creates it (its inputs are not
  recorded), every later call continues the sequence from it. No segment mask in decoding.
  """

  config: EngramConfig
  param_dtype: Any = jnp.float32
  decode: bool = False
  dtype: Any = jnp.float32  # the normalised input is rounded to it before the taps

  @nn.compact
  def __call__(self, value_BxTxD: jax.Array, gate_BxTxM: jax.Array,
               segment_ids_BxT: Optional[jax.Array] = None) -> jax.Array:
    cfg = self.config
    k, dil = cfg.kernel_size, cfg.dilation
    t, m, d = value_BxTxD.shape[1], gate_BxTxM.shape[-1], value_BxTxD.shape[-1]
    init = (nn.initializers.zeros if cfg.zero_init_conv else torch_conv1d_default_init(k))
    # Tap j of kernel_KxMxD multiplies the input (K-1-j)*dilation steps back, as in torch's
    # cross-correlation; the kernel width axis is tiny and never sharded.
    kernel_KxMxD = self.param(
        "kernel", nn.with_logical_partitioning(init, (None, "streams", "embed")),
        (k, m, d), self.param_dtype).astype(jnp.float32)
    xn_BxTxMxD = StreamRMSNorm(cfg.conv_norm_eps, self.param_dtype, name="norm")(
        value_BxTxD, gain_NxM=gate_BxTxM).astype(self.dtype)
    pad = (k - 1) * dil
    xp_BxPxMxD = jnp.pad(xn_BxTxMxD, ((0, 0), (pad, 0), (0, 0), (0, 0)))
    if self.decode and pad:
      created = self.has_variable("cache", "history")
      history = self.variable("cache", "history", jnp.zeros,
                              (xn_BxTxMxD.shape[0], pad, m, d), xn_BxTxMxD.dtype)
      if created:
        xp_BxPxMxD = jnp.concatenate([history.value, xn_BxTxMxD], axis=1)
        history.value = xp_BxPxMxD[:, -pad:]
    # K shifted multiply-adds: XLA fuses them into one pass, no im2col buffer.
    taps = [xp_BxPxMxD[:, j * dil:j * dil + t] for j in range(k)]
    if segment_ids_BxT is not None:
      segp_BxP = jnp.pad(segment_ids_BxT, ((0, 0), (pad, 0)), constant_values=-1)
      taps = [tap * (segp_BxP[:, j * dil:j * dil + t] == segment_ids_BxT)[:, :, None, None]
              for j, tap in enumerate(taps)]
    y_BxTxMxD = sum(tap.astype(jnp.float32) * kernel_KxMxD[j] for j, tap in enumerate(taps))
    return jax.nn.silu(y_BxTxMxD)


class Engram(nn.Module):
  """The full Engram layer of one block: `y = Engram(h, ids)`, to be added to `h`.

  Attributes:
    config: Engram hyper-parameters (hidden_size, hc_mult, kernel, eps, gate variant, init).
    head_sizes: H per-head table sizes of this layer (`NgramHashMapping.head_sizes(layer_id)`).
    table_placement: 'param' or 'external' (see `MultiHeadMemory`).
    dtype: compute dtype (e.g. bfloat16) of the matmul inputs and of the output.
    param_dtype: dtype of all parameters (float32).

  `__call__(hidden_BxTxMxD, engram_input, segment_ids_BxT=None)`: `engram_input` is int ids
  `[B, T, H]` ('param') or a `PrefetchedRows` ('external'); `segment_ids_BxT` (packed data)
  keeps the ShortConv inside each document. Sows `intermediates/gate`, the float32 gate alpha
  `[B, T, M]` applied to each stream (with gate='shared' the M columns are equal; gate='none'
  sows nothing), so the trainer can log its statistics (mask padding with the batch weights).
  """

  config: EngramConfig
  head_sizes: tuple[int, ...]
  table_placement: str = "param"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  decode: bool = False  # ShortConv keeps its history in the 'cache' collection

  @nn.compact
  def __call__(self, hidden_BxTxMxD: jax.Array, engram_input: EngramInput,
               segment_ids_BxT: Optional[jax.Array] = None) -> jax.Array:
    cfg = self.config
    m, d, f = cfg.hc_mult, cfg.hidden_size, cfg.memory_dim
    self._check_hidden(hidden_BxTxMxD)

    e_BxTxF = MultiHeadMemory(cfg, tuple(self.head_sizes), self.table_placement, self.dtype,
                              self.param_dtype, name="memory")(engram_input)
    if e_BxTxF.shape[:2] != hidden_BxTxMxD.shape[:2]:
      raise ValueError(f"engram_input gives [B, T]={e_BxTxF.shape[:2]} but hidden_BxTxMxD has "
                       f"[B, T]={hidden_BxTxMxD.shape[:2]}")

    dense_init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1)
    value_kernel_FxD = self.param(
        "value_kernel", nn.with_logical_partitioning(dense_init, ("engram_mem", "embed")),
        (f, d), self.param_dtype)
    value_bias_D = self.param(
        "value_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        (d,), self.param_dtype)
    # Projection outputs in the compute dtype (accumulated in f32 inside the matmul, then
    # rounded, as a torch Linear under autocast returns them): their cotangents then reach the
    # backward matmuls in that dtype too, instead of f32 (TF32 matmuls on a GPU).
    value_BxTxD = jnp.einsum("btf,fd->btd", e_BxTxF, value_kernel_FxD.astype(self.dtype),
                             preferred_element_type=self.dtype).astype(jnp.float32)
    value_BxTxD = value_BxTxD + value_bias_D.astype(jnp.float32)
    if cfg.gate == "none":
      gate_BxTxM = jnp.ones(value_BxTxD.shape[:2] + (m,), jnp.float32)
    else:
      gate_BxTxM = self._gate(e_BxTxF, hidden_BxTxMxD)
      self.sow("intermediates", "gate", gate_BxTxM)

    y_BxTxMxD = gate_BxTxM[..., None] * value_BxTxD[:, :, None, :]
    if cfg.use_short_conv:
      y_BxTxMxD = y_BxTxMxD + ShortConv(cfg, self.param_dtype, self.decode, self.dtype,
                                        name="short_conv")(
          value_BxTxD, gate_BxTxM, segment_ids_BxT)
    y_BxTxMxD = nn.with_logical_constraint(y_BxTxMxD, ("batch", "length", "streams", "embed"))
    return y_BxTxMxD.astype(self.dtype)

  def _gate(self, e_BxTxF: jax.Array, hidden_BxTxMxD: jax.Array) -> jax.Array:
    """alpha `[B, T, M]` (float32): per stream ('multi') or one broadcast gate ('shared')."""
    cfg = self.config
    g, m, d, f = cfg.gate_streams, cfg.hc_mult, cfg.hidden_size, cfg.memory_dim
    # All G key projections in one einsum over a stacked kernel.
    key_kernel_GxFxD = self.param(
        "key_kernel",
        nn.with_logical_partitioning(
            nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,)),
            ("streams", "engram_mem", "embed")),
        (g, f, d), self.param_dtype)
    key_bias_GxD = self.param(
        "key_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("streams", "embed")),
        (g, d), self.param_dtype)
    key_BxTxGxD = jnp.einsum("btf,gfd->btgd", e_BxTxF, key_kernel_GxFxD.astype(self.dtype),
                             preferred_element_type=self.dtype).astype(jnp.float32)
    key_BxTxGxD = key_BxTxGxD + key_bias_GxD.astype(jnp.float32)
    k_BxTxGxD = StreamRMSNorm(cfg.norm_eps, self.param_dtype, name="key_norm")(key_BxTxGxD)
    # The query norm sees the compute-dtype hidden states, as torch sees the autocast input;
    # one shared gate reads the streams' mean (the model's own stream contraction).
    query_BxTxGxD = hidden_BxTxMxD.astype(self.dtype)
    if cfg.gate == "shared":
      query_BxTxGxD = contract_streams(query_BxTxGxD)[:, :, None, :]
    q_BxTxGxD = StreamRMSNorm(cfg.norm_eps, self.param_dtype, name="query_norm")(query_BxTxGxD)
    s_BxTxG = jnp.sum(k_BxTxGxD * q_BxTxGxD, axis=-1) / math.sqrt(d)
    if cfg.signed_sqrt_gate:
      s_BxTxG = jnp.sign(s_BxTxG) * jnp.sqrt(jnp.maximum(jnp.abs(s_BxTxG), GATE_ABS_FLOOR))
    alpha_BxTxG = jax.nn.sigmoid(s_BxTxG)
    return jnp.broadcast_to(alpha_BxTxG, alpha_BxTxG.shape[:2] + (m,))

  def _check_hidden(self, hidden) -> None:
    cfg = self.config
    if getattr(hidden, "ndim", None) != 4:
      raise ValueError("hidden_BxTxMxD must have rank 4 [B, T, M, D], got shape "
                       f"{getattr(hidden, 'shape', type(hidden).__name__)}")
    if hidden.shape[2] != cfg.hc_mult:
      raise ValueError(f"hidden_BxTxMxD has {hidden.shape[2]} streams (axis 2) but "
                       f"config.hc_mult={cfg.hc_mult}")
    if hidden.shape[3] != cfg.hidden_size:
      raise ValueError(f"hidden_BxTxMxD has D={hidden.shape[3]} (axis 3) but "
                       f"config.hidden_size={cfg.hidden_size}")
    if not jnp.issubdtype(hidden.dtype, jnp.floating):
      raise ValueError(f"hidden_BxTxMxD must be floating point, got {hidden.dtype}")
