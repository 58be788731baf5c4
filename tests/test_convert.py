"""PyTorch demo state dict <-> Engram params: exact round trips, layout and error messages."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from engram_jax.config import EngramConfig
from engram_jax.convert import from_torch_state_dict, to_torch_state_dict
from engram_jax.engram_layer import Engram
from tests import numpy_layer_reference as ref

HEAD_SIZES = (3, 5, 7, 11)


def tiny_config(**overrides):
  kw = dict(engram_vocab_size=(2, 2), max_ngram_size=3, n_embed_per_ngram=4,
            n_head_per_ngram=2, layer_ids=(0,), hidden_size=6, hc_mult=3, kernel_size=4)
  kw.update(overrides)
  return EngramConfig(**kw)


def random_sd(cfg, seed=0, dtype=np.float32):
  return ref.random_state_dict(np.random.default_rng(seed), head_sizes=HEAD_SIZES,
                               head_dim=cfg.head_dim, hidden_size=cfg.hidden_size,
                               hc_mult=cfg.hc_mult, kernel_size=cfg.kernel_size, dtype=dtype)


def with_offsets(sd):
  return dict(sd, **{"multi_head_embedding.offsets": np.array([0, 3, 8, 15], np.int64)})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_state_dict_round_trip_is_exact(dtype):
  cfg = tiny_config()
  sd = with_offsets(random_sd(cfg, dtype=dtype))
  back = to_torch_state_dict(from_torch_state_dict(sd, cfg, HEAD_SIZES), cfg,
                             head_sizes=HEAD_SIZES)
  assert set(back) == set(sd)
  for key, value in sd.items():
    assert back[key].dtype == value.dtype, key
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  assert "multi_head_embedding.offsets" not in to_torch_state_dict(
      from_torch_state_dict(sd, cfg, HEAD_SIZES), cfg)


def test_params_round_trip_is_exact_and_matches_init_structure():
  cfg = tiny_config(zero_init_conv=False)
  rng = np.random.default_rng(1)
  hidden = rng.normal(size=(1, 4, cfg.hc_mult, cfg.hidden_size)).astype(np.float32)
  ids = np.zeros((1, 4, len(HEAD_SIZES)), np.int32)
  boxed = Engram(cfg, HEAD_SIZES).init(jax.random.key(0), hidden, ids)["params"]
  params = nn.unbox(boxed)
  back = from_torch_state_dict(to_torch_state_dict(boxed, cfg), cfg, HEAD_SIZES)
  assert jax.tree.structure(back) == jax.tree.structure(jax.tree.map(np.asarray, params))
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_layout_of_linear_and_conv_weights():
  cfg = tiny_config()
  m, d, f, k = cfg.hc_mult, cfg.hidden_size, cfg.memory_dim, cfg.kernel_size
  sd = random_sd(cfg)
  # Encode (channel, tap) in the conv weight and (out, in) in the key projection of stream 1.
  sd["short_conv.conv.weight"] = (np.arange(m * d)[:, None, None] * 10
                                  + np.arange(k)[None, None, :]).astype(np.float32)
  sd["key_projs.1.weight"] = (np.arange(d)[:, None] * 100
                              + np.arange(f)[None, :]).astype(np.float32)
  p = from_torch_state_dict(sd, cfg, HEAD_SIZES)
  for stream, feat, tap in [(0, 0, 0), (2, 5, 3), (1, 3, 2)]:
    # torch channel c = stream * D + feature (the demo concatenates streams along features).
    assert p["short_conv"]["kernel"][tap, stream, feat] == (stream * d + feat) * 10 + tap
  assert p["key_kernel"][1, 7, 4] == 4 * 100 + 7  # ours [in, out] = torch [out, in]^T
  np.testing.assert_array_equal(p["value_kernel"], sd["value_proj.weight"].T)
  np.testing.assert_array_equal(p["query_norm"]["scale"][2], sd["norm2.2.weight"])


def test_converted_weights_reproduce_numpy_reference():
  cfg = tiny_config()
  sd = random_sd(cfg, seed=4)
  rng = np.random.default_rng(5)
  ids = rng.integers(0, np.array(HEAD_SIZES), size=(2, 10, len(HEAD_SIZES))).astype(np.int32)
  hidden = rng.normal(size=(2, 10, cfg.hc_mult, cfg.hidden_size)).astype(np.float32)
  out = Engram(cfg, HEAD_SIZES).apply(
      {"params": from_torch_state_dict(sd, cfg, HEAD_SIZES)}, hidden, ids)
  want, _ = ref.engram_forward(sd, hidden, ids, HEAD_SIZES, kernel_size=cfg.kernel_size,
                               dilation=cfg.dilation)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)


class _ArrayLike:
  """Only `__array__`, like many tensor types."""

  def __init__(self, a):
    self._a = a

  def __array__(self, dtype=None, copy=None):
    return self._a


class _TensorLike:
  """`detach().cpu().numpy()`, like a torch tensor."""

  def __init__(self, a):
    self._a = a

  def detach(self):
    return self

  def cpu(self):
    return self

  def numpy(self):
    return self._a


def test_accepts_array_like_and_tensor_like_values():
  cfg = tiny_config()
  sd = random_sd(cfg)
  want = from_torch_state_dict(sd, cfg, HEAD_SIZES)
  for wrap in (_ArrayLike, _TensorLike):
    got = from_torch_state_dict({k: wrap(v) for k, v in sd.items()}, cfg, HEAD_SIZES)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_missing_unexpected_and_misshapen_keys_raise():
  cfg = tiny_config()
  sd = random_sd(cfg)
  with pytest.raises(ValueError, match=r"missing keys \['norm1.2.weight'\]"):
    from_torch_state_dict({k: v for k, v in sd.items() if k != "norm1.2.weight"}, cfg,
                          HEAD_SIZES)
  with pytest.raises(ValueError, match=r"unexpected keys \['key_projs.3.bias'\]"):
    from_torch_state_dict(dict(sd, **{"key_projs.3.bias": sd["key_projs.0.bias"]}), cfg,
                          HEAD_SIZES)
  with pytest.raises(ValueError, match="value_proj.weight.*expected"):
    from_torch_state_dict(dict(sd, **{"value_proj.weight": sd["value_proj.weight"].T}), cfg,
                          HEAD_SIZES)
  with pytest.raises(ValueError, match="embedding.weight.*expected"):
    from_torch_state_dict(sd, cfg, (3, 5, 7, 13))  # table has 26 rows, head sizes say 28
  with pytest.raises(ValueError, match="offsets"):
    bad = dict(sd, **{"multi_head_embedding.offsets": np.array([0, 3, 8, 16])})
    from_torch_state_dict(bad, cfg, HEAD_SIZES)
  with pytest.raises(ValueError, match="head_sizes"):
    from_torch_state_dict(sd, cfg, HEAD_SIZES[:3])


def test_to_torch_rejects_bad_params():
  cfg = tiny_config()
  params = from_torch_state_dict(random_sd(cfg), cfg, HEAD_SIZES)
  with pytest.raises(ValueError, match="variables\\['params'\\]"):
    to_torch_state_dict({"params": params}, cfg)
  with pytest.raises(ValueError, match="missing entry short_conv/kernel"):
    to_torch_state_dict(dict(params, short_conv={"norm": params["short_conv"]["norm"]}), cfg)
  with pytest.raises(ValueError, match="unexpected entries \\['extra'\\]"):
    to_torch_state_dict(dict(params, extra=np.zeros(1)), cfg)
  with pytest.raises(ValueError, match="params/key_kernel"):
    to_torch_state_dict(dict(params, key_kernel=params["key_kernel"][:2]), cfg)
  with pytest.raises(ValueError, match="table has 26"):
    to_torch_state_dict(params, cfg, head_sizes=(3, 5, 7, 13))
