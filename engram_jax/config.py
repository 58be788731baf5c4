"""Typed, frozen configuration for the Engram layer.

`EngramConfig` is what an Engram layer and the hash mapping receive: it is validated once, at
construction, and every error names the offending field. Experiment configs (ml_collections,
under `experiments/configs/`) are converted into these dataclasses at the model boundary.

Defaults follow the official demo (`engram_demo_v1.py`); where the paper differs the choice is a
field, documented below and in the README's deviation table.

Dimension legend used across the package:
  B batch, T sequence length, M residual streams (hc_mult), D hidden size,
  N max n-gram order, K heads per order, H = (N-1)*K hash heads, E = per-head embedding width,
  R rows of a layer's table (sum of its primes).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

# torch.nn.RMSNorm(eps=None) uses the float32 machine epsilon; the demo's key/query norms rely
# on that default, its ShortConv norms pass 1e-5 explicitly.
TORCH_F32_EPS = 1.1920928955078125e-07

LookupImpl = Optional[Literal["xla", "pallas"]]
GateKind = Literal["multi", "shared", "none"]
GATE_KINDS = ("multi", "shared", "none")
# Per-head tables stay below 2**31 rows, with room for the prime search above the base size,
# so hash ids and global rows fit in int32.
MAX_ENGRAM_VOCAB_SIZE = 2**31 - 2**20 - 1


def _err(field: str, msg: str) -> ValueError:
  return ValueError(f"EngramConfig.{field}: {msg}")


@dataclasses.dataclass(frozen=True)
class EngramConfig:
  """Hyper-parameters of the Engram layers of one model.

  Attributes:
    engram_vocab_size: per n-gram order (2..N), the number the prime search starts from; the
      table of each head has a distinct prime number of rows just above it.
    max_ngram_size: N, the largest n-gram order (>= 2).
    n_embed_per_ngram: embedding width per order; split evenly across the K heads.
    n_head_per_ngram: K, hash heads per order.
    layer_ids: 0-based indices of the transformer blocks that carry an Engram layer.
    pad_id: the *raw* tokenizer pad id; it is mapped through the compression table.
    seed: seeds the per-layer hash multipliers.
    kernel_size: ShortConv kernel width.
    hidden_size: D, the backbone width.
    hc_mult: M, the number of residual streams (1 = plain residual).
    signed_sqrt_gate: apply the demo's `sign(s)*sqrt(|s|)` before the sigmoid (the paper omits it).
    gate: 'multi' (demo and paper): one key projection and one gate per residual stream;
      'shared': one key projection, and one gate computed from the mean of the streams and
      applied to all of them (the paper's "without multi-branch" ablation); 'none': no key
      projection, alpha = 1 (the value enters ungated).
    use_short_conv: add `SiLU(conv(RMSNorm(v)))` to the gated value (demo, paper); False leaves
      `y = v` and creates no conv parameters.
    compress_tokenizer: hash n-grams of compressed ids (demo, paper); False hashes the raw
      tokenizer ids (identity mapping, V' = V). The compression table's fingerprint goes into
      every checkpoint, so the two never mix.
    zero_init_conv: zero-initialise the ShortConv kernel (paper) instead of the default init (demo).
    conv_dilation: ShortConv dilation; None means `max_ngram_size`, as in the demo.
    norm_eps: epsilon of the key/query RMSNorms; the demo inherits torch's float32 epsilon.
    conv_norm_eps: epsilon of the ShortConv RMSNorms (1e-5 in the demo).
    table_init_std: the tables are initialised N(0, std^2); the demo's nn.Embedding uses 1.
    segment_reset: with packed sequences, start every document's n-grams from padding instead
      of the previous document's tokens, and keep the ShortConv's taps inside each document.
      Off reproduces the reference ids and outputs.
    lookup_implementation: None (automatic), 'xla' or 'pallas'; see pallas_kernels.engram_lookup.
  """

  engram_vocab_size: tuple[int, ...] = (129280 * 5, 129280 * 5)
  max_ngram_size: int = 3
  n_embed_per_ngram: int = 512
  n_head_per_ngram: int = 8
  layer_ids: tuple[int, ...] = (1, 15)
  pad_id: int = 2
  seed: int = 0
  kernel_size: int = 4
  hidden_size: int = 1024
  hc_mult: int = 4
  signed_sqrt_gate: bool = True
  gate: GateKind = "multi"
  use_short_conv: bool = True
  compress_tokenizer: bool = True
  zero_init_conv: bool = True
  conv_dilation: Optional[int] = None
  norm_eps: float = TORCH_F32_EPS
  conv_norm_eps: float = 1e-5
  table_init_std: float = 1.0
  segment_reset: bool = False
  lookup_implementation: LookupImpl = None

  def __post_init__(self):
    # Accept lists from ml_collections / JSON and store tuples so the config stays hashable.
    object.__setattr__(self, "engram_vocab_size", tuple(int(v) for v in self.engram_vocab_size))
    object.__setattr__(self, "layer_ids", tuple(int(v) for v in self.layer_ids))
    if self.max_ngram_size < 2:
      raise _err("max_ngram_size", f"must be >= 2 (n-grams start at order 2), got {self.max_ngram_size}")
    if len(self.engram_vocab_size) != self.max_ngram_size - 1:
      raise _err(
          "engram_vocab_size",
          f"needs one entry per order 2..{self.max_ngram_size} "
          f"({self.max_ngram_size - 1}), got {len(self.engram_vocab_size)}")
    if any(v < 2 for v in self.engram_vocab_size):
      raise _err("engram_vocab_size", f"every entry must be >= 2, got {self.engram_vocab_size}")
    if max(self.engram_vocab_size) > MAX_ENGRAM_VOCAB_SIZE:
      raise _err("engram_vocab_size",
                 "per-head tables must stay below 2**31 rows so hash ids fit in int32")
    if self.n_head_per_ngram < 1:
      raise _err("n_head_per_ngram", f"must be >= 1, got {self.n_head_per_ngram}")
    if self.n_embed_per_ngram < 1 or self.n_embed_per_ngram % self.n_head_per_ngram:
      raise _err(
          "n_embed_per_ngram",
          f"must be a positive multiple of n_head_per_ngram={self.n_head_per_ngram} "
          f"(n_embed_per_ngram % n_head_per_ngram != 0), got {self.n_embed_per_ngram}")
    if not self.layer_ids:
      raise _err("layer_ids", "must name at least one layer")
    if len(set(self.layer_ids)) != len(self.layer_ids):
      raise _err("layer_ids", f"contains duplicates: {self.layer_ids}")
    if min(self.layer_ids) < 0:
      raise _err("layer_ids", f"must be >= 0, got {self.layer_ids}")
    if self.pad_id < 0:
      raise _err("pad_id", f"must be >= 0, got {self.pad_id}")
    if self.kernel_size < 1:
      raise _err("kernel_size", f"must be >= 1, got {self.kernel_size}")
    if self.hidden_size < 1:
      raise _err("hidden_size", f"must be >= 1, got {self.hidden_size}")
    if self.hc_mult < 1:
      raise _err("hc_mult", f"must be >= 1, got {self.hc_mult}")
    if self.gate not in GATE_KINDS:
      raise _err("gate", f"must be one of {GATE_KINDS}, got {self.gate!r}")
    for name in ("signed_sqrt_gate", "use_short_conv", "compress_tokenizer"):
      if not isinstance(getattr(self, name), bool):
        raise _err(name, f"must be a bool, got {getattr(self, name)!r}")
    if self.conv_dilation is not None and self.conv_dilation < 1:
      raise _err("conv_dilation", f"must be >= 1 or None, got {self.conv_dilation}")
    if self.norm_eps <= 0 or self.conv_norm_eps <= 0:
      raise _err("norm_eps", "epsilons must be > 0")
    if self.table_init_std < 0:
      raise _err("table_init_std", f"must be >= 0, got {self.table_init_std}")
    if self.lookup_implementation not in (None, "xla", "pallas"):
      raise _err("lookup_implementation",
                 f"must be None, 'xla' or 'pallas', got {self.lookup_implementation!r}")

  @property
  def num_orders(self) -> int:
    """N - 1: the n-gram orders 2..N."""
    return self.max_ngram_size - 1

  @property
  def num_heads(self) -> int:
    """H = (N-1)*K hash heads per Engram layer."""
    return self.num_orders * self.n_head_per_ngram

  @property
  def head_dim(self) -> int:
    """E: embedding width of one head's rows."""
    return self.n_embed_per_ngram // self.n_head_per_ngram

  @property
  def memory_dim(self) -> int:
    """d_mem = (N-1) * n_embed_per_ngram: width of the flattened looked-up embedding."""
    return self.num_orders * self.n_embed_per_ngram

  @property
  def gate_streams(self) -> int:
    """Key projections (and distinct gates) per layer: M ('multi'), 1 ('shared'), 0 ('none')."""
    return {"multi": self.hc_mult, "shared": 1, "none": 0}[self.gate]

  @property
  def dilation(self) -> int:
    return self.max_ngram_size if self.conv_dilation is None else self.conv_dilation

  def replace(self, **changes) -> "EngramConfig":
    return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------
# Backbone: the language model that carries the Engram layers.
# ----------------------------------------------------------------------------------------------

DTypeName = Literal["float32", "bfloat16"]
RematPolicy = Literal["none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                      "nothing_saveable"]
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
                   "nothing_saveable")


def _model_err(cls: str, field: str, msg: str) -> ValueError:
  return ValueError(f"{cls}.{field}: {msg}")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Mixture-of-experts FFN (DeepSeek-V3 style: shared experts plus top-k routed experts).

  Attributes:
    num_experts: routed experts per MoE layer.
    num_shared_experts: experts every token goes through; fused into one SwiGLU of width
      `num_shared_experts * expert_hidden_size`.
    top_k: routed experts per token.
    expert_hidden_size: SwiGLU width of one expert.
    score_func: 'sigmoid' (V3: independent affinities) or 'softmax' over the routed experts.
    routing: 'aux_free' selects with `affinity + bias`, where the per-expert bias lives in the
      non-trainable 'moe_stats' collection and moves by `bias_update_rate * sign(mean load -
      load)` whenever the model is applied with `mutable=['moe_stats']` and
      deterministic=False; 'plain' selects by affinity alone (no bias variable).
    aux_loss_coef: weight of the batch-level balance loss `E * sum_e f_e P_e` (0 disables it;
      V3 uses a tiny sequence-level one next to the bias).
    bias_update_rate: gamma of the aux-free bias update.
    routed_scaling_factor: multiplies the normalised routing weights (V3 uses 2.5 at scale).
    dispatch: how routed (token, expert) pairs reach the experts (see Capacity); 'ragged'
      (dropless) by default, 'capacity' only when asked for.
    matmul_implementation: 'ragged' dispatch only: the grouped matmul of
      `pallas_kernels.grouped_matmul` (None: automatic, the Mosaic GPU kernels on Hopper GPUs
      for bf16/f16 and `jax.lax.ragged_dot` elsewhere; 'xla' or 'mosaic_gpu' to force one).
    capacity_factor: 'capacity' dispatch only: slots per expert are
      `C = ceil(capacity_factor * S * top_k / num_experts)` rounded up to a multiple of 8 and
      capped at S (S tokens in the batch); must be > 0.
    Capacity: 'ragged' is dropless: the pairs are sorted by expert and fed to one grouped
      matmul per projection, so no pair is dropped and no [experts, capacity] tensor exists;
      the cost is a data-dependent load per expert. 'capacity' gives every expert C slots, filled
      in token order (padding last), and runs dense batched einsums on [E, C, D]; pairs beyond
      an expert's C slots are dropped (they add zero; the shared experts still apply) and
      their share is reported as `dropped_fraction`. Both modes use the same parameters, so
      checkpoints move between them; loads, the bias update and the aux loss always count
      every routed pair.
  """

  num_experts: int = 8
  num_shared_experts: int = 1
  top_k: int = 2
  expert_hidden_size: int = 256
  score_func: Literal["sigmoid", "softmax"] = "sigmoid"
  routing: Literal["aux_free", "plain"] = "aux_free"
  aux_loss_coef: float = 0.0
  bias_update_rate: float = 1e-3
  routed_scaling_factor: float = 1.0
  dispatch: Literal["ragged", "capacity"] = "ragged"
  capacity_factor: float = 1.25
  matmul_implementation: Optional[Literal["xla", "mosaic_gpu"]] = None

  def __post_init__(self):
    e = lambda f, m: _model_err("MoEConfig", f, m)  # noqa: E731
    if self.num_experts < 1:
      raise e("num_experts", f"must be >= 1, got {self.num_experts}")
    if self.num_shared_experts < 0:
      raise e("num_shared_experts", f"must be >= 0, got {self.num_shared_experts}")
    if not 1 <= self.top_k <= self.num_experts:
      raise e("top_k", f"must be in [1, num_experts={self.num_experts}], got {self.top_k}")
    if self.expert_hidden_size < 1:
      raise e("expert_hidden_size", f"must be >= 1, got {self.expert_hidden_size}")
    if self.score_func not in ("sigmoid", "softmax"):
      raise e("score_func", f"must be 'sigmoid' or 'softmax', got {self.score_func!r}")
    if self.routing not in ("aux_free", "plain"):
      raise e("routing", f"must be 'aux_free' or 'plain', got {self.routing!r}")
    if self.aux_loss_coef < 0:
      raise e("aux_loss_coef", f"must be >= 0, got {self.aux_loss_coef}")
    if self.bias_update_rate < 0:
      raise e("bias_update_rate", f"must be >= 0, got {self.bias_update_rate}")
    if self.routed_scaling_factor <= 0:
      raise e("routed_scaling_factor", f"must be > 0, got {self.routed_scaling_factor}")
    if self.dispatch not in ("ragged", "capacity"):
      raise e("dispatch", f"must be 'ragged' or 'capacity', got {self.dispatch!r}")
    if not self.capacity_factor > 0:  # `not >` also rejects NaN
      raise e("capacity_factor", f"must be > 0, got {self.capacity_factor}")
    if self.matmul_implementation not in (None, "xla", "mosaic_gpu"):
      raise e("matmul_implementation",
              f"must be None, 'xla' or 'mosaic_gpu', got {self.matmul_implementation!r}")

  def replace(self, **changes) -> "MoEConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only backbone: embedding, [Engram +] attention + FFN/MoE blocks, mHC residual.

  Attributes:
    vocab_size: V, tokenizer vocabulary (raw ids, not the compressed Engram vocabulary).
    num_layers: L blocks.
    hidden_size: D.
    num_heads / num_kv_heads / head_dim: grouped-query attention (num_heads % num_kv_heads == 0).
    ffn_hidden_size: SwiGLU width of the dense FFN layers.
    num_dense_layers: leading blocks with a dense FFN; the rest use `moe` (all dense if None).
    moe: MoEConfig or None.
    hc_mult: M residual streams (1 = plain pre-norm residual, no hyper-connection params).
    sinkhorn_iters: Sinkhorn-Knopp iterations of the mHC residual mixing matrix.
    engram: EngramConfig or None; its hidden_size and hc_mult must equal the model's and its
      layer_ids must be < num_layers.
    engram_head_sizes: one tuple of H table sizes per Engram layer, in `engram.layer_ids`
      order; filled by `engram_jax.model.with_engram_head_sizes` (or by hand). Empty tuple
      means "not resolved yet": the model refuses to build, counters approximate.
    rope_theta: RoPE base.
    norm_eps: RMSNorm epsilon of the backbone norms.
    dtype: compute dtype; param_dtype: storage dtype of the parameters.
    scan_layers: run runs of identical blocks with nn.scan (compile time flat in depth).
    remat_policy: 'none' or a rematerialisation policy applied per block.
    tie_embeddings: reuse the token embedding as the output projection.
    attention_impl: 'xla' or 'cudnn' for `jax.nn.dot_product_attention`; None: automatic,
      cuDNN flash attention on a GPU in bf16/f16 (not when decoding), XLA otherwise
      (`layers.resolve_attention_impl`).
    engram_table_placement: 'param' (tables in the param tree) or 'external' (PrefetchedRows).
  """

  vocab_size: int = 32000
  num_layers: int = 4
  hidden_size: int = 256
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 64
  ffn_hidden_size: int = 1024
  num_dense_layers: int = 1
  moe: Optional[MoEConfig] = None
  hc_mult: int = 1
  sinkhorn_iters: int = 20
  engram: Optional[EngramConfig] = None
  engram_head_sizes: tuple[tuple[int, ...], ...] = ()
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  dtype: DTypeName = "float32"
  param_dtype: DTypeName = "float32"
  scan_layers: bool = True
  remat_policy: RematPolicy = "none"
  tie_embeddings: bool = False
  attention_impl: Optional[Literal["xla", "cudnn"]] = None
  engram_table_placement: Literal["param", "external"] = "param"

  def __post_init__(self):
    e = lambda f, m: _model_err("ModelConfig", f, m)  # noqa: E731
    object.__setattr__(self, "engram_head_sizes",
                       tuple(tuple(int(s) for s in hs) for hs in self.engram_head_sizes))
    for name in ("vocab_size", "num_layers", "hidden_size", "num_heads", "num_kv_heads",
                 "head_dim", "ffn_hidden_size", "hc_mult", "sinkhorn_iters"):
      if getattr(self, name) < 1:
        raise e(name, f"must be >= 1, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise e("num_kv_heads", f"must divide num_heads={self.num_heads}, got {self.num_kv_heads}")
    if self.head_dim % 2:
      raise e("head_dim", f"must be even for RoPE, got {self.head_dim}")
    if not 0 <= self.num_dense_layers <= self.num_layers:
      raise e("num_dense_layers", f"must be in [0, num_layers={self.num_layers}], got "
              f"{self.num_dense_layers}")
    if self.moe is not None and not isinstance(self.moe, MoEConfig):
      raise e("moe", f"must be a MoEConfig or None, got {type(self.moe).__name__}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in ("float32", "bfloat16"):
        raise e(name, f"must be 'float32' or 'bfloat16', got {getattr(self, name)!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise e("remat_policy", f"must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
    if self.attention_impl not in (None, "xla", "cudnn"):
      raise e("attention_impl", f"must be None, 'xla' or 'cudnn', got {self.attention_impl!r}")
    if self.engram_table_placement not in ("param", "external"):
      raise e("engram_table_placement",
              f"must be 'param' or 'external', got {self.engram_table_placement!r}")
    if self.rope_theta <= 0:
      raise e("rope_theta", f"must be > 0, got {self.rope_theta}")
    if self.norm_eps <= 0:
      raise e("norm_eps", f"must be > 0, got {self.norm_eps}")
    if self.engram is None:
      if self.engram_head_sizes:
        raise e("engram_head_sizes", "given but engram is None")
      return
    if not isinstance(self.engram, EngramConfig):
      raise e("engram", f"must be an EngramConfig or None, got {type(self.engram).__name__}")
    if self.engram.hidden_size != self.hidden_size:
      raise e("engram", f"engram.hidden_size={self.engram.hidden_size} != hidden_size="
              f"{self.hidden_size}")
    if self.engram.hc_mult != self.hc_mult:
      raise e("engram", f"engram.hc_mult={self.engram.hc_mult} != hc_mult={self.hc_mult}")
    if max(self.engram.layer_ids) >= self.num_layers:
      raise e("engram", f"engram.layer_ids={self.engram.layer_ids} must be < num_layers="
              f"{self.num_layers}")
    if self.engram_head_sizes:
      if len(self.engram_head_sizes) != len(self.engram.layer_ids):
        raise e("engram_head_sizes", f"needs one tuple per Engram layer "
                f"({len(self.engram.layer_ids)}), got {len(self.engram_head_sizes)}")
      for hs in self.engram_head_sizes:
        if len(hs) != self.engram.num_heads or min(hs) < 1:
          raise e("engram_head_sizes", f"each tuple needs H={self.engram.num_heads} positive "
                  f"sizes, got {hs}")

  @property
  def moe_layer_ids(self) -> tuple[int, ...]:
    """Blocks whose FFN is the MoE (empty when moe is None)."""
    if self.moe is None:
      return ()
    return tuple(range(self.num_dense_layers, self.num_layers))

  @property
  def engram_layer_ids(self) -> tuple[int, ...]:
    return () if self.engram is None else self.engram.layer_ids

  def engram_head_sizes_for(self, layer_id: int) -> tuple[int, ...]:
    """Table sizes of the Engram layer at block `layer_id`; raises if not resolved."""
    if not self.engram_head_sizes:
      raise ValueError("ModelConfig.engram_head_sizes is empty: fill it with "
                       "engram_jax.model.with_engram_head_sizes(cfg, tokenizer_vocab_size, "
                       "compressed_pad_id) before building the model")
    return self.engram_head_sizes[self.engram.layer_ids.index(layer_id)]

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)
