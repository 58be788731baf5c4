"""Backbone building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Precision: every matmul takes compute-dtype (`dtype`) inputs and accumulates in float32
(`preferred_element_type`); norms and softmax statistics run in float32. Parameters are stored
in `param_dtype` and cast at the point of use.

Packed documents: attention builds one boolean mask, causal AND same-segment, so a token never
sees another document. `segment_ids=None` means one document per row (causal only). Segment 0
(padding) only attends to padding, which keeps every softmax row non-empty.

Dimension legend: B batch, T query length, S key length, D hidden size, N query heads,
K kv heads, G = N // K query heads per kv head, Hd head dim, F FFN hidden size.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def dtype_of(name: str) -> jnp.dtype:
  """'float32' / 'bfloat16' -> jnp dtype (configs carry names so they stay hashable/JSON)."""
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def kernel_init(in_axes: int = 1):
  """Variance scaling over the fan-in of the first `in_axes` axes (lecun normal)."""
  return nn.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=tuple(range(in_axes)),
      out_axis=-1)


class RMSNorm(nn.Module):
  """`x / rms(x) * scale` over the last axis, in float32, returned in `dtype`."""

  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x_NxD: jax.Array) -> jax.Array:
    scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                               (self.axis_name,)),
                         (x_NxD.shape[-1],), self.param_dtype)
    x32 = x_NxD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * scale_D.astype(jnp.float32)).astype(self.dtype)


def apply_rope(x_BxTxNxHd: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, half-split convention (pairs i and i + Hd/2), computed in float32."""
  hd = x_BxTxNxHd.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
  angle_BxTxHd2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  sin = jnp.sin(angle_BxTxHd2)[:, :, None, :]
  cos = jnp.cos(angle_BxTxHd2)[:, :, None, :]
  x32 = x_BxTxNxHd.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxHd.dtype)


def attention_mask(segment_ids_BxT: Optional[jax.Array], t: int) -> Optional[jax.Array]:
  """Boolean [B, 1, T, T] same-segment mask (causality is added by `is_causal`)."""
  if segment_ids_BxT is None:
    return None
  if segment_ids_BxT.ndim != 2 or segment_ids_BxT.shape[1] != t:
    raise ValueError(f"segment_ids must be [B, T={t}], got {segment_ids_BxT.shape}")
  same_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
  return same_BxTxS[:, None, :, :]


def resolve_attention_impl(impl: Optional[str], dtype, decode: bool,
                           backend: Optional[str] = None) -> str:
  """The `jax.nn.dot_product_attention` implementation to use: `impl` when given; automatic
  (None): 'cudnn' (fused flash attention) on a GPU for bf16/f16 training and prefill calls,
  'xla' otherwise (CPU/TPU, f32, decoding). jax's own None means XLA, which materialises the
  [B, N, T, S] f32 scores and their mask (`python -m benchmarks.profile_step` shows their
  share of a step; benchmarks/README.md)."""
  if impl is not None:
    return impl
  backend = backend or jax.default_backend()
  if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and not decode:
    return "cudnn"
  return "xla"


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE via `jax.nn.dot_product_attention`.

  `decode=True` keeps a KV cache in the 'cache' collection: the first call (inputs of the
  maximum length, any values) only creates `key`/`value` [B, S_max, K, Hd] and `index`; every
  later call writes its T new positions at `index`, attends to cache positions <= its own
  (positions given by the caller's `positions_BxT`, which must be index..index+T-1), and moves
  `index` by T. Decoding assumes one document per row (no segment mask).
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  attention_impl: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  decode: bool = False

  def _proj(self, name, shape, axes, in_axes=1):
    return self.param(name, nn.with_logical_partitioning(kernel_init(in_axes), axes), shape,
                      self.param_dtype).astype(self.dtype)

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
               segment_ids_BxT: Optional[jax.Array] = None) -> jax.Array:
    d = x_BxTxD.shape[-1]
    n, k, hd = self.num_heads, self.num_kv_heads, self.head_dim
    wq_DxNxHd = self._proj("query", (d, n, hd), ("embed", "heads", "head_dim"))
    wk_DxKxHd = self._proj("key", (d, k, hd), ("embed", "kv_heads", "head_dim"))
    wv_DxKxHd = self._proj("value", (d, k, hd), ("embed", "kv_heads", "head_dim"))
    wo_NxHdxD = self._proj("out", (n, hd, d), ("heads", "head_dim", "embed"), in_axes=2)

    x = x_BxTxD.astype(self.dtype)
    f32 = jnp.float32
    q_BxTxNxHd = jnp.einsum("btd,dnh->btnh", x, wq_DxNxHd, preferred_element_type=f32)
    k_BxSxKxHd = jnp.einsum("btd,dkh->btkh", x, wk_DxKxHd, preferred_element_type=f32)
    v_BxSxKxHd = jnp.einsum("btd,dkh->btkh", x, wv_DxKxHd, preferred_element_type=f32)
    q_BxTxNxHd = apply_rope(q_BxTxNxHd, positions_BxT, self.rope_theta).astype(self.dtype)
    k_BxSxKxHd = apply_rope(k_BxSxKxHd, positions_BxT, self.rope_theta).astype(self.dtype)
    v_BxSxKxHd = v_BxSxKxHd.astype(self.dtype)
    q_BxTxNxHd = nn.with_logical_constraint(q_BxTxNxHd, ("batch", "length", "heads", "head_dim"))
    k_BxSxKxHd = nn.with_logical_constraint(k_BxSxKxHd,
                                            ("batch", "length", "kv_heads", "head_dim"))

    mask, causal = attention_mask(segment_ids_BxT, x_BxTxD.shape[1]), True
    if self.decode and self.has_variable("cache", "key"):
      k_BxSxKxHd, v_BxSxKxHd, mask = self._cached(k_BxSxKxHd, v_BxSxKxHd)
      causal = False  # the mask above is causal in absolute positions
    elif self.decode:  # the sizing call: create the cache, attend as usual
      self._cached(k_BxSxKxHd, v_BxSxKxHd)
    # dot_product_attention broadcasts the K kv heads over the G query heads of each group.
    o_BxTxNxHd = jax.nn.dot_product_attention(
        q_BxTxNxHd, k_BxSxKxHd, v_BxSxKxHd, mask=mask, is_causal=causal,
        implementation=resolve_attention_impl(self.attention_impl, self.dtype, self.decode))
    o_BxTxNxHd = nn.with_logical_constraint(o_BxTxNxHd, ("batch", "length", "heads", "head_dim"))
    out_BxTxD = jnp.einsum("btnh,nhd->btd", o_BxTxNxHd, wo_NxHdxD, preferred_element_type=f32)
    return out_BxTxD.astype(self.dtype)

  def _cached(self, k_BxTxKxHd, v_BxTxKxHd):
    """Writes the new keys/values at `index`; returns the whole cache and its [1, 1, T, S]
    mask (cache position <= query position). On the creating call: only creates the cache."""
    created = self.has_variable("cache", "key")
    key = self.variable("cache", "key", jnp.zeros, k_BxTxKxHd.shape, k_BxTxKxHd.dtype)
    value = self.variable("cache", "value", jnp.zeros, v_BxTxKxHd.shape, v_BxTxKxHd.dtype)
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if not created:
      return None
    t, s_max = k_BxTxKxHd.shape[1], key.value.shape[1]
    start = index.value
    key.value = jax.lax.dynamic_update_slice(key.value, k_BxTxKxHd.astype(key.value.dtype),
                                             (0, start, 0, 0))
    value.value = jax.lax.dynamic_update_slice(value.value, v_BxTxKxHd.astype(value.value.dtype),
                                               (0, start, 0, 0))
    index.value = start + t
    mask_TxS = (jnp.arange(s_max)[None, :] <= (start + jnp.arange(t))[:, None])
    return key.value, value.value, mask_TxS[None, None]


class SwiGLU(nn.Module):
  """`(silu(x W_gate) * (x W_up)) W_down`: the dense FFN and the fused shared experts."""

  hidden_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    d, f = x_BxTxD.shape[-1], self.hidden_size
    p = lambda name, shape, axes: self.param(  # noqa: E731
        name, nn.with_logical_partitioning(kernel_init(), axes), shape,
        self.param_dtype).astype(self.dtype)
    wg_DxF = p("gate", (d, f), ("embed", "mlp"))
    wu_DxF = p("up", (d, f), ("embed", "mlp"))
    wd_FxD = p("down", (f, d), ("mlp", "embed"))
    x = x_BxTxD.astype(self.dtype)
    g = jnp.einsum("...d,df->...f", x, wg_DxF, preferred_element_type=jnp.float32)
    u = jnp.einsum("...d,df->...f", x, wu_DxF, preferred_element_type=jnp.float32)
    h_BxTxF = (jax.nn.silu(g) * u).astype(self.dtype)
    if h_BxTxF.ndim == 3:
      h_BxTxF = nn.with_logical_constraint(h_BxTxF, ("batch", "length", "mlp"))
    out = jnp.einsum("...f,fd->...d", h_BxTxF, wd_FxD, preferred_element_type=jnp.float32)
    return out.astype(self.dtype)
