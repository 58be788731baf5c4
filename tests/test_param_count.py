"""Parameter counter vs the real param tree (jax.eval_shape), FLOPs per token by hand,
iso-parameter variants."""

import jax
import jax.numpy as jnp
import pytest

from engram_jax.config import EngramConfig, ModelConfig, MoEConfig
from engram_jax.model import EngramLM, with_engram_head_sizes
from engram_jax.param_count import (count_params, engram_at_rho, flops_per_token, iso_param_report,
                               moe_baseline, tree_param_count)

ENGRAM = EngramConfig(engram_vocab_size=(211, 223), n_embed_per_ngram=16, n_head_per_ngram=2,
                      layer_ids=(1, 3), hidden_size=32, hc_mult=2, pad_id=0)
MOE = MoEConfig(num_experts=8, num_shared_experts=1, top_k=2, expert_hidden_size=16)


def cfg_of(**kw):
  base = dict(vocab_size=64, num_layers=5, hidden_size=32, num_heads=4, num_kv_heads=2,
              head_dim=8, ffn_hidden_size=48, num_dense_layers=1, moe=MOE, hc_mult=2,
              engram=ENGRAM)
  base.update(kw)
  return with_engram_head_sizes(ModelConfig(**base), tokenizer_vocab_size=64, compressed_pad_id=0)


def tree_count(cfg):
  x = jnp.zeros((1, 4), jnp.int32)
  ids = {l: jnp.zeros((1, 4, cfg.engram.num_heads), jnp.int32) for l in cfg.engram_layer_ids}
  shapes = jax.eval_shape(lambda: EngramLM(cfg).init(jax.random.key(0), x, engram_inputs=ids))
  return tree_param_count(shapes["params"])


@pytest.mark.parametrize("kw", [
    dict(),
    dict(engram=None, moe=None, hc_mult=1),
    dict(engram=None, hc_mult=1, tie_embeddings=True),
    dict(engram=ENGRAM.replace(hc_mult=4), hc_mult=4, scan_layers=False),
    dict(moe=MOE.replace(num_shared_experts=0), num_dense_layers=0),
])
def test_count_matches_param_tree(kw):
  cfg = cfg_of(**kw)
  assert count_params(cfg)["total"] == tree_count(cfg)


def test_activated_and_sparse_definitions():
  dense = cfg_of(engram=None, moe=None, hc_mult=1)
  c = count_params(dense)
  assert c["activated"] == c["total"] - 64 * 32 + 32 and c["sparse"] == 0 and c["rho"] is None
  cfg = cfg_of()
  c = count_params(cfg)
  per_expert = 3 * 32 * 16
  assert c["routed_experts"] == 4 * 8 * per_expert
  assert c["engram"] == sum(map(sum, cfg.engram_head_sizes)) * ENGRAM.head_dim
  assert c["sparse"] == c["routed_experts"] + c["engram"]
  unused = 4 * (8 - 2) * per_expert
  reads = 32 + 2 * ENGRAM.num_heads * ENGRAM.head_dim
  assert c["activated"] == c["total"] - 64 * 32 - c["engram"] - unused + reads
  assert c["rho"] == pytest.approx(c["routed_experts"] / c["sparse"])


def test_flops_per_token_by_hand():
  # cfg_of(): V=64, L=5, D=32, 4 heads / 2 KV heads of 8, FFN 48 in block 0, blocks 1-4 MoE
  # (8 experts of width 16, top-2, 1 shared), M=2 streams, Engram at blocks 1 and 3 with
  # d_mem = 2 orders x 16 = 32; T = 128.
  f = flops_per_token(cfg_of(), 128)
  assert f["attention_projections"] == 6 * 5 * (32 * 32 + 32 * 16 + 32 * 16 + 32 * 32)
  assert f["dense_ffn"] == 6 * 1 * 3 * 32 * 48
  assert f["routed_experts"] == 6 * 4 * 2 * 3 * 32 * 16
  assert f["shared_experts"] == 6 * 4 * 1 * 3 * 32 * 16
  assert f["router"] == 6 * 4 * 32 * 8
  assert f["engram_projections"] == 6 * 2 * (32 * 32 + 2 * 32 * 32)   # value + 2 keys
  assert f["hyper_connections"] == 6 * 5 * 2 * (2 * 32) * (2 * 2 + 2 * 2)
  assert f["lm_head"] == 6 * 64 * 32
  assert f["attention_scores"] == 12 * 5 * 128 * 4 * 8 // 2             # causal half
  parts = {k: v for k, v in f.items() if k != "total"}
  assert f["total"] == sum(parts.values()) == 316_416 + 122_880
  # Dense, tied, single stream: attention + FFN + LM head (= the embedding) + scores only.
  g = flops_per_token(cfg_of(engram=None, moe=None, hc_mult=1, tie_embeddings=True), 64)
  assert g["total"] == 6 * (5 * 3072 + 5 * 3 * 32 * 48 + 64 * 32) + 6 * 5 * 64 * 4 * 8
  assert g["router"] == g["engram_projections"] == g["hyper_connections"] == 0


def test_moe_baseline_is_iso_total():
  cfg = cfg_of()
  base = moe_baseline(cfg)
  assert base.engram is None and base.moe.num_experts > cfg.moe.num_experts
  rep = iso_param_report(cfg, base)
  # Rounding to whole experts: at most half an expert (over all MoE layers) of mismatch.
  assert abs(rep["total"] - rep["total_ref"]) <= 0.5 * 4 * 3 * 32 * 16
  assert count_params(base)["total"] == tree_count(base)


@pytest.mark.parametrize("rho", [0.6, 0.8])
def test_engram_at_rho_reallocates_the_sparse_budget(rho):
  cfg = cfg_of(moe=MOE.replace(num_experts=16))
  var = engram_at_rho(cfg, rho)
  assert var.engram_head_sizes == () and not count_params(var)["engram_rows_exact"]
  var = with_engram_head_sizes(var, tokenizer_vocab_size=64, compressed_pad_id=0)
  c_ref, c = count_params(cfg), count_params(var)
  assert c["rho"] == pytest.approx(rho, abs=0.03)
  assert c["total"] == pytest.approx(c_ref["total"], rel=0.02)
  # Only the router width (D per expert and MoE layer) moves the activated count.
  router_delta = 4 * 32 * (var.moe.num_experts - cfg.moe.num_experts)
  assert c["activated"] - c_ref["activated"] == router_delta
  assert c["total"] == tree_count(var)


def test_engram_at_rho_one_is_the_moe_baseline():
  cfg = cfg_of()
  assert engram_at_rho(cfg, 1.0) == moe_baseline(cfg)
  with pytest.raises(ValueError, match="rho"):
    engram_at_rho(cfg, 0.0)
  with pytest.raises(ValueError, match="no Engram"):
    moe_baseline(cfg.replace(engram=None, engram_head_sizes=()))
