"""Interop with the official PyTorch demo's `Engram` module state dict.

`from_torch_state_dict` turns the demo's state dict (tensors, numpy arrays or anything with
`__array__`) into the `params` collection of `engram_jax.engram_layer.Engram`; `to_torch_state_dict`
is its exact inverse and returns numpy arrays (wrap them with `torch.from_numpy` to load).
Values are copied bit for bit, dtypes are kept; torch is never imported.

Key map (torch Linear weights are [out, in], ours [in, out]; channel c of the demo's depthwise
conv is stream c // D, feature c % D):
  multi_head_embedding.embedding.weight [R, E]      memory/table [R, E]
  multi_head_embedding.offsets [H] (buffer)         checked against head_sizes, not stored
  value_proj.weight [D, F], .bias [D]               value_kernel [F, D], value_bias [D]
  key_projs.{m}.weight [D, F], .bias [D]            key_kernel[m] [F, D], key_bias[m] [D]
  norm1.{m}.weight [D]                              key_norm/scale[m]
  norm2.{m}.weight [D]                              query_norm/scale[m]
  short_conv.conv.weight [M*D, 1, K]                short_conv/kernel [K, M, D]
  short_conv.norms.{m}.weight [D]                   short_conv/norm/scale[m]

Dimension legend: R table rows, E head width, H hash heads, F = d_mem, D hidden size,
M residual streams, K conv kernel size.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
from flax import traverse_util
import numpy as np

from engram_jax.config import EngramConfig
from engram_jax.memory import head_offsets, validate_head_sizes

_OFFSETS_KEY = "multi_head_embedding.offsets"


def _check_demo_layout(config: EngramConfig) -> None:
  """The demo's state dict has M key projections and a ShortConv: other variants do not map."""
  if config.gate != "multi" or not config.use_short_conv:
    raise ValueError(f"config: the demo's state dict needs gate='multi' and "
                     f"use_short_conv=True, got gate={config.gate!r}, "
                     f"use_short_conv={config.use_short_conv}")


def _expected_shapes(config: EngramConfig, num_rows: int) -> dict[str, tuple[int, ...]]:
  _check_demo_layout(config)
  m, d, f, k = config.hc_mult, config.hidden_size, config.memory_dim, config.kernel_size
  shapes = {
      "multi_head_embedding.embedding.weight": (num_rows, config.head_dim),
      "value_proj.weight": (d, f),
      "value_proj.bias": (d,),
      "short_conv.conv.weight": (m * d, 1, k),
  }
  for i in range(m):
    shapes[f"key_projs.{i}.weight"] = (d, f)
    shapes[f"key_projs.{i}.bias"] = (d,)
    shapes[f"norm1.{i}.weight"] = (d,)
    shapes[f"norm2.{i}.weight"] = (d,)
    shapes[f"short_conv.norms.{i}.weight"] = (d,)
  return shapes


def _to_numpy(value: Any, key: str) -> np.ndarray:
  # torch tensors: detach from autograd and move to host without importing torch.
  if hasattr(value, "detach"):
    value = value.detach()
  if hasattr(value, "cpu"):
    value = value.cpu()
  if hasattr(value, "numpy") and not isinstance(value, np.ndarray):
    try:
      return np.asarray(value.numpy())
    except TypeError as err:  # e.g. torch.bfloat16 has no numpy dtype
      raise ValueError(f"state_dict[{key!r}]: cannot convert to numpy ({err}); "
                       "cast the tensor to float32 first") from err
  if not hasattr(value, "__array__"):
    raise ValueError(f"state_dict[{key!r}] is not array-like: {type(value).__name__}")
  return np.asarray(value)


def from_torch_state_dict(state_dict: Mapping[str, Any], config: EngramConfig,
                          head_sizes: tuple[int, ...]) -> dict:
  """Maps the demo `Engram` state dict to the `params` collection of `engram_layer.Engram`.

  Raises a ValueError listing missing or unexpected keys, or the first key whose shape does not
  match `config` and `head_sizes`. Returns plain numpy arrays (no partitioning boxes), usable
  as `Engram(...).apply({'params': params}, ...)`.
  """
  validate_head_sizes(config, head_sizes)
  num_rows = int(sum(int(s) for s in head_sizes))
  expected = _expected_shapes(config, num_rows)
  keys = set(state_dict.keys())
  missing = sorted(set(expected) - keys)
  unexpected = sorted(keys - set(expected) - {_OFFSETS_KEY})
  if missing or unexpected:
    raise ValueError(f"state_dict: missing keys {missing}, unexpected keys {unexpected}")

  arrays = {}
  for key, shape in expected.items():
    arr = _to_numpy(state_dict[key], key)
    if arr.shape != shape:
      raise ValueError(f"state_dict[{key!r}] has shape {arr.shape}, expected {shape} "
                       f"(from config and head_sizes)")
    arrays[key] = arr
  if _OFFSETS_KEY in state_dict:
    offsets = _to_numpy(state_dict[_OFFSETS_KEY], _OFFSETS_KEY)
    if not np.array_equal(offsets, head_offsets(tuple(head_sizes))):
      raise ValueError(f"state_dict[{_OFFSETS_KEY!r}]={offsets.tolist()} does not match the "
                       f"exclusive cumulative sum of head_sizes={tuple(head_sizes)}")

  m, d, k = config.hc_mult, config.hidden_size, config.kernel_size
  stack = lambda fmt: np.stack([arrays[fmt.format(i)] for i in range(m)])
  conv_MDx1xK = arrays["short_conv.conv.weight"]
  return {
      "memory": {"table": arrays["multi_head_embedding.embedding.weight"].copy()},
      "value_kernel": arrays["value_proj.weight"].T.copy(),
      "value_bias": arrays["value_proj.bias"].copy(),
      "key_kernel": np.stack([arrays[f"key_projs.{i}.weight"].T for i in range(m)]),
      "key_bias": stack("key_projs.{}.bias"),
      "key_norm": {"scale": stack("norm1.{}.weight")},
      "query_norm": {"scale": stack("norm2.{}.weight")},
      "short_conv": {
          "kernel": conv_MDx1xK[:, 0, :].T.reshape(k, m, d).copy(),
          "norm": {"scale": stack("short_conv.norms.{}.weight")},
      },
  }


def to_torch_state_dict(params: Mapping[str, Any], config: EngramConfig, *,
                        head_sizes: Optional[tuple[int, ...]] = None) -> dict[str, np.ndarray]:
  """Inverse of `from_torch_state_dict`: `engram_layer.Engram` params -> demo state dict (numpy).

  `params` is the `params` collection (partitioning boxes are unwrapped). With `head_sizes` the
  demo's persistent `multi_head_embedding.offsets` buffer (int64) is included too, which
  `torch.nn.Module.load_state_dict(strict=True)` requires.
  """
  if "params" in params and len(params) == 1:
    raise ValueError("params: pass the 'params' collection itself, i.e. variables['params']")
  _check_demo_layout(config)
  params = nn.unbox(params)
  m, d, f, k = config.hc_mult, config.hidden_size, config.memory_dim, config.kernel_size

  def get(*path):
    node = params
    for i, name in enumerate(path):
      if not isinstance(node, Mapping) or name not in node:
        raise ValueError(f"params: missing entry {'/'.join(path[:i + 1])}")
      node = node[name]
    return np.asarray(node)

  expected = {
      ("memory", "table"): (None, config.head_dim),
      ("value_kernel",): (f, d), ("value_bias",): (d,),
      ("key_kernel",): (m, f, d), ("key_bias",): (m, d),
      ("key_norm", "scale"): (m, d), ("query_norm", "scale"): (m, d),
      ("short_conv", "kernel"): (k, m, d), ("short_conv", "norm", "scale"): (m, d),
  }
  extra = sorted("/".join(path) for path in traverse_util.flatten_dict(params)
                 if tuple(path) not in expected)
  if extra:
    raise ValueError(f"params: unexpected entries {extra}")
  p = {}
  for path, shape in expected.items():
    arr = get(*path)
    if len(arr.shape) != len(shape) or any(s is not None and s != a
                                           for s, a in zip(shape, arr.shape)):
      raise ValueError(f"params/{'/'.join(path)} has shape {arr.shape}, expected {shape} "
                       "(None = any) from config")
    p[path] = arr
  table = p[("memory", "table")]

  out = {"multi_head_embedding.embedding.weight": table.copy()}
  if head_sizes is not None:
    validate_head_sizes(config, head_sizes)
    if sum(int(s) for s in head_sizes) != table.shape[0]:
      raise ValueError(f"head_sizes sum to {sum(int(s) for s in head_sizes)} rows but the "
                       f"table has {table.shape[0]}")
    out[_OFFSETS_KEY] = head_offsets(tuple(head_sizes))
  out["value_proj.weight"] = p[("value_kernel",)].T.copy()
  out["value_proj.bias"] = p[("value_bias",)].copy()
  for i in range(m):
    out[f"key_projs.{i}.weight"] = p[("key_kernel",)][i].T.copy()
    out[f"key_projs.{i}.bias"] = p[("key_bias",)][i].copy()
  for i in range(m):
    out[f"norm1.{i}.weight"] = p[("key_norm", "scale")][i].copy()
  for i in range(m):
    out[f"norm2.{i}.weight"] = p[("query_norm", "scale")][i].copy()
  out["short_conv.conv.weight"] = (
      p[("short_conv", "kernel")].reshape(k, m * d).T[:, None, :].copy())
  for i in range(m):
    out[f"short_conv.norms.{i}.weight"] = p[("short_conv", "norm", "scale")][i].copy()
  return out
