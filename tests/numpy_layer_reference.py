"""Test oracle: the official demo's `Engram.forward` in plain NumPy float64.

Written from REFERENCE.md section 1 and `engram_demo_v1.py`, independent of `engram_jax`: it
reads weights in the PyTorch state-dict layout (Linear weights [out, in], the depthwise conv as
[M*D, 1, K]), loops over streams like the demo, and computes the conv the way torch does
(zero padding of (K-1)*dilation on *both* sides, cross-correlation, keep the first T outputs).
The ablation switches of `EngramConfig` are options of `engram_forward`: `gate='shared'` reads
stream 0's key projection and norms with the streams' mean as the query, `gate='none'` uses
alpha = 1, `use_short_conv=False` returns the gated value.

Dimension legend: B batch, T sequence length, M residual streams, D hidden size, H hash heads,
E head width, F = H*E memory width, K conv kernel size, R table rows.
"""

import numpy as np

TORCH_F32_EPS = float(np.finfo(np.float32).eps)


def _rms_norm(x, weight, eps):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(weight, np.float64)


def _linear(x, weight_OxI, bias_O):
  return x @ np.asarray(weight_OxI, np.float64).T + np.asarray(bias_O, np.float64)


def _silu(x):
  return x / (1.0 + np.exp(-x))


def torch_style_depthwise_conv(x_BxCxT, weight_Cx1xK, dilation):
  """torch.nn.Conv1d(groups=C, padding=(K-1)*dilation, bias=False) followed by `[..., :T]`."""
  b, c, t = x_BxCxT.shape
  k = weight_Cx1xK.shape[-1]
  pad = (k - 1) * dilation
  xp = np.zeros((b, c, t + 2 * pad))
  xp[:, :, pad:pad + t] = x_BxCxT
  t_out = t + 2 * pad - dilation * (k - 1)
  out = np.zeros((b, c, t_out))
  w = np.asarray(weight_Cx1xK, np.float64)[:, 0, :]
  for i in range(t_out):
    for j in range(k):
      out[:, :, i] += w[None, :, j] * xp[:, :, i + j * dilation]
  return out[:, :, :t]


def embed(state_dict, ids_BxTxH, head_sizes):
  """Per-head ids + offsets -> rows of the single table, flattened to [B, T, H*E]."""
  offsets = np.concatenate([[0], np.cumsum(head_sizes)[:-1]]).astype(np.int64)
  table = np.asarray(state_dict["multi_head_embedding.embedding.weight"], np.float64)
  rows = np.asarray(ids_BxTxH, np.int64) + offsets
  b, t, h = rows.shape
  return table[rows].reshape(b, t, h * table.shape[1])


def engram_forward(state_dict, hidden_BxTxMxD, ids_BxTxH, head_sizes, *, kernel_size,
                   dilation, norm_eps=TORCH_F32_EPS, conv_norm_eps=1e-5,
                   signed_sqrt_gate=True, gate="multi", use_short_conv=True):
  """Returns (output_BxTxMxD, gate_BxTxM) of the demo's Engram module, float64."""
  h = np.asarray(hidden_BxTxMxD, np.float64)
  b, t, m, d = h.shape
  if state_dict["short_conv.conv.weight"].shape[-1] != kernel_size:
    raise ValueError("kernel_size does not match short_conv.conv.weight")
  e = embed(state_dict, ids_BxTxH, head_sizes)
  queries = {"multi": h, "shared": h.mean(axis=2, keepdims=True), "none": h[:, :, :0]}[gate]
  gates = []
  for i in range(queries.shape[2]):
    key = _linear(e, state_dict[f"key_projs.{i}.weight"], state_dict[f"key_projs.{i}.bias"])
    k_n = _rms_norm(key, state_dict[f"norm1.{i}.weight"], norm_eps)
    q_n = _rms_norm(queries[:, :, i, :], state_dict[f"norm2.{i}.weight"], norm_eps)
    s = (k_n * q_n).sum(-1) / np.sqrt(d)
    if signed_sqrt_gate:
      s = np.sqrt(np.maximum(np.abs(s), 1e-6)) * np.sign(s)
    gates.append(1.0 / (1.0 + np.exp(-s)))
  gate = (np.broadcast_to(np.stack(gates, axis=2), (b, t, m)) if gates
          else np.ones((b, t, m)))
  value = gate[..., None] * _linear(e, state_dict["value_proj.weight"],
                                    state_dict["value_proj.bias"])[:, :, None, :]
  if not use_short_conv:
    return value, gate
  normed = np.concatenate(
      [_rms_norm(value[:, :, i, :], state_dict[f"short_conv.norms.{i}.weight"], conv_norm_eps)
       for i in range(m)], axis=-1)
  conv = torch_style_depthwise_conv(normed.transpose(0, 2, 1),
                                    state_dict["short_conv.conv.weight"], dilation)
  short = _silu(conv).transpose(0, 2, 1).reshape(b, t, m, d)
  return value + short, gate


def random_state_dict(rng, *, head_sizes, head_dim, hidden_size, hc_mult, kernel_size,
                      dtype=np.float32):
  """Random demo-layout weights with non-trivial norms, biases and conv taps."""
  f = len(head_sizes) * head_dim
  d, m = hidden_size, hc_mult
  sd = {
      "multi_head_embedding.embedding.weight": rng.normal(size=(sum(head_sizes), head_dim)),
      "value_proj.weight": rng.normal(size=(d, f)) / np.sqrt(f),
      "value_proj.bias": rng.normal(size=(d,)) * 0.1,
      "short_conv.conv.weight": rng.uniform(-0.5, 0.5, size=(m * d, 1, kernel_size)),
  }
  for i in range(m):
    sd[f"key_projs.{i}.weight"] = rng.normal(size=(d, f)) / np.sqrt(f)
    sd[f"key_projs.{i}.bias"] = rng.normal(size=(d,)) * 0.1
    sd[f"norm1.{i}.weight"] = rng.uniform(0.5, 1.5, size=(d,))
    sd[f"norm2.{i}.weight"] = rng.uniform(0.5, 1.5, size=(d,))
    sd[f"short_conv.norms.{i}.weight"] = rng.uniform(0.5, 1.5, size=(d,))
  return {k: v.astype(dtype) for k, v in sd.items()}
