"""Analytic parameter and FLOP counts, and iso-parameter variants of a model config.

Definitions (per token, all counts in parameters):
  total      every parameter of `EngramLM(cfg).init`, Engram tables included (also when they
             live outside the param tree, `engram_table_placement='external'`).
  sparse     routed-expert weights (all experts) + Engram tables.
  engram     Engram tables; `engram_dense` is the rest of the Engram layers (key/value
             projections, norms, conv), which every token uses.
  activated  what one token touches: total - input-embedding table - Engram tables - the
             (E - top_k) unused routed experts of every MoE layer, plus the rows actually read
             (one embedding row of D when the embedding is not tied, H*E per Engram layer; both
             negligible). A tied embedding counts in full, as the output projection. The
             paper's Dense-4B (4.1B total, 3.8B active) follows the same convention.
  rho        routed-expert params / sparse params (the paper's allocation ratio; 1.0 without
             Engram, None without any sparse params).

Training FLOPs per token, `flops_per_token(cfg, T)` (the numerator of the trainer's MFU):
  6 x the weights of every matmul one token goes through (2 FLOPs per weight forward, 4
  backward): attention projections (q, k, v, o), dense FFNs, shared experts and the top_k
  routed experts, the router, the Engram value and key projections, the mHC coefficient
  projections, and the LM head (the embedding matrix when tied);
  + attention scores and values, 12 * L * T * num_heads * head_dim * 1/2: q.k and p.v are
  2 * T * num_heads * head_dim FLOPs each forward per token, x3 for forward + backward, halved
  because a causal mask needs only the lower triangle (PaLM's count keeps the full square).
Not counted: table and embedding lookups (copies, no arithmetic), norms, activations, the
Engram gate and depthwise conv, the mHC stream mixing and Sinkhorn iterations (elementwise or
per-token work of width M or D, no weight matrices), and recomputation under remat.

Engram table sizes come from `cfg.engram_head_sizes` when filled; otherwise they are
approximated by K * sum(engram_vocab_size) rows per layer (each prime lies just above its
start, so the relative error is ~1e-5 at the paper's sizes) and `engram_rows_exact` is False.

Variants keep the total (and, as far as the architecture allows, the activated) count:
  moe_baseline(cfg)       Engram removed, its whole budget moved into more routed experts.
  engram_at_rho(cfg, rho) the sparse budget of cfg split rho : (1 - rho) between routed experts
                          and Engram tables (num_experts and engram_vocab_size adjusted).
`iso_param_report(a, b)` gives the residual mismatch of two configs.

Dimension legend: V vocab, D hidden, L layers, M streams, E routed experts, Fe expert width,
H Engram heads, F_mem Engram memory width.
"""

from __future__ import annotations

from engram_jax.config import ModelConfig


def _engram_rows_per_layer(cfg: ModelConfig) -> tuple[list[int], bool]:
  eng = cfg.engram
  if cfg.engram_head_sizes:
    return [sum(hs) for hs in cfg.engram_head_sizes], True
  approx = eng.n_head_per_ngram * sum(eng.engram_vocab_size)
  return [approx] * len(eng.layer_ids), False


def _hc_params(cfg: ModelConfig) -> int:
  m, d = cfg.hc_mult, cfg.hidden_size
  if m == 1:
    return 0
  # norm scale, phi_pre, phi_post, phi_res, three gates, b_pre, b_post, b_res
  return m * d + 2 * m * d * m + m * d * m * m + 3 + 2 * m + m * m


def count_params(cfg: ModelConfig) -> dict:
  """Analytic parameter counts (see the module docstring for the definitions)."""
  v, d, n_layers, m = cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.hc_mult
  embedding = v * d
  lm_head = 0 if cfg.tie_embeddings else d * v
  attention = (d * cfg.num_heads * cfg.head_dim * 2 + d * cfg.num_kv_heads * cfg.head_dim * 2)
  per_block_common = attention + 2 * d + 2 * _hc_params(cfg)
  n_moe = len(cfg.moe_layer_ids)
  dense_ffn = (n_layers - n_moe) * 3 * d * cfg.ffn_hidden_size

  routed = router = shared = routed_active = 0
  if cfg.moe is not None and n_moe:
    mo = cfg.moe
    per_expert = 3 * d * mo.expert_hidden_size
    routed = n_moe * mo.num_experts * per_expert
    routed_active = n_moe * mo.top_k * per_expert
    router = n_moe * d * mo.num_experts
    shared = n_moe * mo.num_shared_experts * per_expert

  engram_tables = engram_dense = rows_read = 0
  rows_exact = True
  if cfg.engram is not None:
    eng = cfg.engram
    rows, rows_exact = _engram_rows_per_layer(cfg)
    engram_tables = sum(rows) * eng.head_dim
    f = eng.memory_dim
    # value (F*D + D), G keys (G*F*D + G*D) and key/query norms (2*G*D) with G = gate_streams,
    # conv kernel + norm (K*M*D + M*D) unless use_short_conv is off.
    g = eng.gate_streams
    per_layer = f * d + d + g * (f * d + d + 2 * d)
    if eng.use_short_conv:
      per_layer += eng.kernel_size * m * d + m * d
    engram_dense = len(eng.layer_ids) * per_layer
    rows_read = len(eng.layer_ids) * eng.num_heads * eng.head_dim

  total = (embedding + lm_head + d + n_layers * per_block_common + dense_ffn + routed + router
           + shared + engram_tables + engram_dense)
  embed_row = 0 if cfg.tie_embeddings else d
  activated = (total - (0 if cfg.tie_embeddings else embedding) - engram_tables
               - (routed - routed_active) + embed_row + rows_read)
  sparse = routed + engram_tables
  return {
      "total": total,
      "activated": activated,
      "sparse": sparse,
      "routed_experts": routed,
      "engram": engram_tables,
      "engram_dense": engram_dense,
      "rho": (routed / sparse) if sparse else None,
      "embedding": embedding,
      "lm_head": lm_head,
      "attention": n_layers * attention,
      "hyper_connections": n_layers * 2 * _hc_params(cfg),
      "dense_ffn": dense_ffn,
      "shared_experts": shared,
      "router": router,
      "rows_read_per_token": embed_row + rows_read,
      "engram_rows_exact": rows_exact,
  }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict:
  """Training FLOPs per token by part, and their `total` (see the module docstring)."""
  d, n_layers = cfg.hidden_size, cfg.num_layers
  heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  n_moe = len(cfg.moe_layer_ids)
  weights = {
      "attention_projections": n_layers * (2 * d * heads * head_dim
                                           + 2 * d * kv_heads * head_dim),
      "dense_ffn": (n_layers - n_moe) * 3 * d * cfg.ffn_hidden_size,
      "routed_experts": 0, "shared_experts": 0, "router": 0, "engram_projections": 0,
      # Two hyper-connected sub-layers per block, one [M*D, 2M + M^2] projection each.
      "hyper_connections": (n_layers * 2 * cfg.hc_mult * d * (2 * cfg.hc_mult + cfg.hc_mult ** 2)
                            if cfg.hc_mult > 1 else 0),
      "lm_head": cfg.vocab_size * d,
  }
  if cfg.moe is not None and n_moe:
    per_expert = 3 * d * cfg.moe.expert_hidden_size
    weights["routed_experts"] = n_moe * cfg.moe.top_k * per_expert
    weights["shared_experts"] = n_moe * cfg.moe.num_shared_experts * per_expert
    weights["router"] = n_moe * d * cfg.moe.num_experts
  if cfg.engram is not None:
    f = cfg.engram.memory_dim
    # One value projection [F, D] and M key projections [F, D] per Engram layer.
    weights["engram_projections"] = len(cfg.engram.layer_ids) * (1 + cfg.hc_mult) * f * d
  flops = {name: 6 * w for name, w in weights.items()}
  flops["attention_scores"] = 12 * n_layers * seq_len * heads * head_dim // 2
  flops["total"] = sum(flops.values())
  return flops


def _per_expert_budget(cfg: ModelConfig) -> int:
  return len(cfg.moe_layer_ids) * 3 * cfg.hidden_size * cfg.moe.expert_hidden_size


def _require_moe_engram(cfg: ModelConfig, what: str) -> None:
  if cfg.moe is None or not cfg.moe_layer_ids:
    raise ValueError(f"{what}: the config has no MoE layers (moe is None or all layers dense)")
  if cfg.engram is None:
    raise ValueError(f"{what}: the config has no Engram layers (engram is None)")


def moe_baseline(cfg: ModelConfig) -> ModelConfig:
  """Iso-total MoE: Engram removed, its parameters (tables and dense part) become experts."""
  _require_moe_engram(cfg, "moe_baseline")
  c = count_params(cfg)
  extra = round((c["engram"] + c["engram_dense"]) / _per_expert_budget(cfg))
  return cfg.replace(engram=None, engram_head_sizes=(),
                     moe=cfg.moe.replace(num_experts=cfg.moe.num_experts + extra))


def engram_at_rho(cfg: ModelConfig, rho: float) -> ModelConfig:
  """Splits cfg's sparse budget: rho to routed experts, 1 - rho to Engram tables.

  The returned config has `engram_head_sizes=()`: refill it (model.with_engram_head_sizes)
  before building the model. rho == 1 removes Engram (its dense part becomes experts too,
  as in `moe_baseline`).
  """
  _require_moe_engram(cfg, "engram_at_rho")
  if not 0.0 < rho <= 1.0:
    raise ValueError(f"engram_at_rho: rho must be in (0, 1], got {rho}")
  if rho == 1.0:
    return moe_baseline(cfg)
  c = count_params(cfg)
  per_expert_all_layers = _per_expert_budget(cfg)
  num_experts = max(cfg.moe.top_k, round(rho * c["sparse"] / per_expert_all_layers))
  table_budget = c["sparse"] - num_experts * per_expert_all_layers
  eng = cfg.engram
  rows_per_layer = table_budget / (len(eng.layer_ids) * eng.head_dim)
  per_head = int(round(rows_per_layer / (eng.n_head_per_ngram * eng.num_orders)))
  if per_head < 2:
    raise ValueError(f"engram_at_rho: rho={rho} leaves {table_budget} table parameters, too "
                     "few for one row per head")
  return cfg.replace(
      moe=cfg.moe.replace(num_experts=num_experts), engram_head_sizes=(),
      engram=eng.replace(engram_vocab_size=(per_head,) * eng.num_orders))


def iso_param_report(ref: ModelConfig, other: ModelConfig) -> dict:
  """Relative mismatch of `other` against `ref` in total and activated parameters."""
  a, b = count_params(ref), count_params(other)
  rel = lambda k: (b[k] - a[k]) / a[k]  # noqa: E731
  return {"total_ref": a["total"], "total": b["total"], "total_rel_diff": rel("total"),
          "activated_ref": a["activated"], "activated": b["activated"],
          "activated_rel_diff": rel("activated"), "rho_ref": a["rho"], "rho": b["rho"]}


def tree_param_count(tree) -> int:
  """Number of scalars in a (possibly boxed) parameter tree or its ShapeDtypeStructs."""
  import flax.linen as nn
  import jax
  import numpy as np
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree))))
