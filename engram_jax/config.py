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
    zero_init_conv: zero-initialise the ShortConv kernel (paper) instead of the default init (demo).
    conv_dilation: ShortConv dilation; None means `max_ngram_size`, as in the demo.
    norm_eps: epsilon of the key/query RMSNorms; the demo inherits torch's float32 epsilon.
    conv_norm_eps: epsilon of the ShortConv RMSNorms (1e-5 in the demo).
    table_init_std: the tables are initialised N(0, std^2); the demo's nn.Embedding uses 1.
    segment_reset: with packed sequences, start every document's n-grams from padding instead
      of the previous document's tokens. Off reproduces the reference ids.
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
    if max(self.engram_vocab_size) >= 2**31 - 2**20:
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
  def dilation(self) -> int:
    return self.max_ngram_size if self.conv_dilation is None else self.conv_dilation

  def replace(self, **changes) -> "EngramConfig":
    return dataclasses.replace(self, **changes)
