"""MultiHeadMemory: offsets, lookup semantics, init, 'external' placement and argument checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax.config import EngramConfig
from engram_jax.memory import MultiHeadMemory
from pallas_kernels.engram_lookup import PrefetchedRows, densify, prefetch_rows, row_sparse_grad

HEAD_SIZES = (5, 7, 11, 13)
B, T = 2, 6


def tiny_config(**overrides):
  kw = dict(engram_vocab_size=(4, 4), max_ngram_size=3, n_embed_per_ngram=6,
            n_head_per_ngram=2, layer_ids=(0,), hidden_size=8, hc_mult=2)
  kw.update(overrides)
  return EngramConfig(**kw)


def random_ids(seed=0, head_sizes=HEAD_SIZES):
  rng = np.random.default_rng(seed)
  return rng.integers(0, np.array(head_sizes), size=(B, T, len(head_sizes))).astype(np.int32)


def test_offsets_are_exclusive_cumsum():
  mem = MultiHeadMemory(tiny_config(), HEAD_SIZES)
  np.testing.assert_array_equal(mem.offsets, [0, 5, 12, 23])
  assert mem.offsets.dtype == np.int64 and mem.num_rows == 36


def test_lookup_reads_head_blocks_and_concatenates():
  cfg = tiny_config()
  mem = MultiHeadMemory(cfg, HEAD_SIZES)
  ids = random_ids()
  params = nn.unbox(mem.init(jax.random.key(0), ids)["params"])
  table = np.asarray(params["table"])
  assert table.shape == (sum(HEAD_SIZES), cfg.head_dim)
  out = np.asarray(mem.apply({"params": params}, ids))
  assert out.shape == (B, T, cfg.memory_dim)
  starts = np.cumsum((0,) + HEAD_SIZES)
  for b in range(B):
    for t in range(T):
      want = np.concatenate([table[starts[h] + ids[b, t, h]] for h in range(len(HEAD_SIZES))])
      np.testing.assert_array_equal(out[b, t], want)


def test_table_init_std_and_logical_axes():
  cfg = tiny_config(table_init_std=0.5)
  sizes = (1009, 1013, 1019, 1021)
  boxed = MultiHeadMemory(cfg, sizes).init(jax.random.key(1), random_ids(head_sizes=sizes))
  table = boxed["params"]["table"]
  assert isinstance(table, nn.LogicallyPartitioned)
  assert table.names == ("engram_rows", "engram_dim")
  values = np.asarray(table.value)
  # 12,186 samples: the std estimate is within ~1% of 0.5.
  assert abs(values.std() - 0.5) < 0.02 and abs(values.mean()) < 0.02


def test_compute_dtype_applies_to_output_not_table():
  mem = MultiHeadMemory(tiny_config(), HEAD_SIZES, dtype=jnp.bfloat16)
  ids = random_ids()
  variables = mem.init(jax.random.key(0), ids)
  assert nn.unbox(variables["params"])["table"].dtype == jnp.float32
  assert mem.apply(variables, ids).dtype == jnp.bfloat16


def test_external_rows_match_param_lookup_and_give_row_sparse_grad():
  cfg = tiny_config()
  ids = random_ids(3)
  param_mem = MultiHeadMemory(cfg, HEAD_SIZES)
  table = nn.unbox(param_mem.init(jax.random.key(0), ids)["params"])["table"]
  ext_mem = MultiHeadMemory(cfg, HEAD_SIZES, table_placement="external")
  assert ext_mem.init(jax.random.key(0), prefetch_rows(table, ids, ext_mem.offsets)) == {}
  cot = jax.random.normal(jax.random.key(2), (B, T, cfg.memory_dim))

  def dense_loss(tab):
    return jnp.sum(param_mem.apply({"params": {"table": tab}}, ids) * cot)

  def sparse_loss(rows_UxE, pre):
    return jnp.sum(ext_mem.apply({}, pre._replace(rows_UxE=rows_UxE)) * cot)

  pre = prefetch_rows(table, ids, ext_mem.offsets)
  np.testing.assert_array_equal(ext_mem.apply({}, pre),
                                param_mem.apply({"params": {"table": table}}, ids))
  dense_grad = jax.grad(dense_loss)(table)
  rows_grad = jax.grad(sparse_loss)(pre.rows_UxE, pre)
  np.testing.assert_allclose(densify(row_sparse_grad(pre, rows_grad), table.shape[0]),
                             dense_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make_ids, match", [
    (lambda ids: ids.astype(np.float32), "integer dtype"),
    (lambda ids: ids[0], "rank 3"),
    (lambda ids: ids[..., :2], "H=2"),
])
def test_bad_ids_raise(make_ids, match):
  mem = MultiHeadMemory(tiny_config(), HEAD_SIZES)
  with pytest.raises(ValueError, match=match):
    mem.init(jax.random.key(0), make_ids(random_ids()))


def test_placement_and_input_kind_must_agree():
  cfg = tiny_config()
  ids = random_ids()
  table = jnp.zeros((sum(HEAD_SIZES), cfg.head_dim))
  pre = prefetch_rows(table, ids, MultiHeadMemory(cfg, HEAD_SIZES).offsets)
  with pytest.raises(ValueError, match="table_placement='param'"):
    MultiHeadMemory(cfg, HEAD_SIZES).init(jax.random.key(0), pre)
  with pytest.raises(ValueError, match="table_placement='external'"):
    MultiHeadMemory(cfg, HEAD_SIZES, table_placement="external").init(jax.random.key(0), ids)
  bad_rows = PrefetchedRows(pre.rows_UxE[:, :2], pre.inverse_BxTxH, pre.row_ids_U)
  with pytest.raises(ValueError, match="rows_UxE"):
    MultiHeadMemory(cfg, HEAD_SIZES, table_placement="external").init(jax.random.key(0), bad_rows)
  with pytest.raises(ValueError, match="table_placement must be"):
    MultiHeadMemory(cfg, HEAD_SIZES, table_placement="host").init(jax.random.key(0), ids)


@pytest.mark.parametrize("sizes, match", [
    ((5, 7, 11), "num_heads=4"),
    ((5, 0, 11, 13), ">= 1"),
    ((2**30, 2**30, 5, 7), "2\\*\\*31"),
])
def test_bad_head_sizes_raise(sizes, match):
  with pytest.raises(ValueError, match=match):
    MultiHeadMemory(tiny_config(), sizes).init(jax.random.key(0), random_ids()[..., :len(sizes)])
