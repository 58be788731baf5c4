"""Multi-head hashed memory: one Engram layer's embedding table and its lookup.

Each of the H hash heads owns a contiguous block of `head_sizes[h]` rows (a distinct prime) in
one `[R, E]` table; per-head local ids plus the static `offsets` give global rows. The looked-up
rows of all heads are concatenated into the memory vector `e` of width d_mem = H*E.

Two placements:
  'param'    the table is a Flax parameter of this module and rows are read through
             `pallas_kernels.engram_lookup.engram_lookup` (dense table gradient).
  'external' the table lives elsewhere (pinned host, a row-sparse optimiser state); the caller
             gathers the unique rows of the batch ahead of time and passes a `PrefetchedRows`.
             The gradient with respect to `rows_UxE` is then the row-sparse table gradient.
             Or the caller expands the rows itself and passes `MemoryVectors`.

This module knows nothing about hashing: it receives the per-layer head sizes and the per-head
ids, so it can be tested (and used) with any small tables.

Dimension legend: B batch, T sequence length, H hash heads, E row width (config.head_dim),
R rows of the table (sum of head_sizes), U unique rows of a batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax.config import EngramConfig
from pallas_kernels.engram_lookup import engram_lookup
from pallas_kernels.engram_lookup.row_sparse import PrefetchedRows, expand_rows

TABLE_PLACEMENTS = ("param", "external")

# The lookup forms global row ids in int32.
_MAX_ROWS = 2**31 - 1



class MemoryVectors(NamedTuple):
  """Memory vectors `[B, T, H*E]` that the caller already expanded from its rows ('external').

  Row-sharded tables expand every batch shard's own rows inside an explicit shard_map
  (engram_jax/sharded_tables.expand); the module then only casts them.
  """
  e_BxTxF: jax.Array


EngramInput = Union[jax.Array, PrefetchedRows, MemoryVectors]


def head_offsets(head_sizes: tuple[int, ...]) -> np.ndarray:
  """First global row of every head: the exclusive cumulative sum of `head_sizes`, int64[H]."""
  sizes_H = np.asarray(head_sizes, dtype=np.int64)
  return np.concatenate([np.zeros(1, np.int64), np.cumsum(sizes_H)[:-1]])


def validate_head_sizes(config: EngramConfig, head_sizes: tuple[int, ...]) -> None:
  """Raises a ValueError naming `head_sizes` unless they fit `config`."""
  if not isinstance(head_sizes, (tuple, list)):
    raise ValueError(f"head_sizes must be a tuple of ints, got {type(head_sizes).__name__}")
  if len(head_sizes) != config.num_heads:
    raise ValueError(
        f"head_sizes must have config.num_heads={config.num_heads} entries "
        f"((max_ngram_size-1)*n_head_per_ngram), got {len(head_sizes)}")
  if any(int(s) < 1 for s in head_sizes):
    raise ValueError(f"head_sizes must all be >= 1, got {tuple(head_sizes)}")
  if sum(int(s) for s in head_sizes) > _MAX_ROWS:
    raise ValueError(
        f"head_sizes sum to {sum(int(s) for s in head_sizes)} rows; global row ids are int32, "
        f"so a layer's table must stay below 2**31 rows")


def table_init(std: float):
  """N(0, std^2) initialiser for the table (the demo's nn.Embedding uses std 1)."""
  return nn.initializers.normal(stddev=std)


class MultiHeadMemory(nn.Module):
  """One Engram layer's table and lookup; returns `e_BxTxF` with F = H*E = config.memory_dim.

  Attributes:
    config: the Engram hyper-parameters (head_dim, table_init_std, lookup_implementation).
    head_sizes: H per-head row counts, 2-gram heads first (`NgramHashMapping.head_sizes`).
    table_placement: 'param' (table owned here) or 'external' (rows arrive as PrefetchedRows).
    dtype: dtype of the returned memory vector (the compute dtype); rows are cast after the
      gather so that only the touched rows are converted.
    param_dtype: dtype of the table parameter.
  """

  config: EngramConfig
  head_sizes: tuple[int, ...]
  table_placement: str = "param"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def offsets(self) -> np.ndarray:
    """Static int64[H] first row of every head."""
    return head_offsets(tuple(self.head_sizes))

  @property
  def num_rows(self) -> int:
    return int(sum(int(s) for s in self.head_sizes))

  def setup(self):
    validate_head_sizes(self.config, self.head_sizes)
    if self.table_placement not in TABLE_PLACEMENTS:
      raise ValueError(
          f"table_placement must be one of {TABLE_PLACEMENTS}, got {self.table_placement!r}")
    if self.table_placement == "param":
      self.table = self.param(
          "table",
          nn.with_logical_partitioning(table_init(self.config.table_init_std),
                                       ("engram_rows", "engram_dim")),
          (self.num_rows, self.config.head_dim),
          self.param_dtype)

  def __call__(self, engram_input: EngramInput) -> jax.Array:
    if self.table_placement == "param":
      if isinstance(engram_input, PrefetchedRows):
        raise ValueError("engram_input: got PrefetchedRows but table_placement='param' owns its "
                         "table and expects hash ids int[B, T, H]")
      ids_BxTxH = self._check_ids(engram_input, "engram_input (hash ids)")
      e_BxTxF = engram_lookup(self.table, ids_BxTxH, jnp.asarray(self.offsets, jnp.int32),
                              implementation=self.config.lookup_implementation)
    elif isinstance(engram_input, MemoryVectors):
      e_BxTxF = engram_input.e_BxTxF
      if e_BxTxF.ndim != 3 or e_BxTxF.shape[-1] != self.config.memory_dim:
        raise ValueError(f"engram_input.e_BxTxF must be [B, T, H*E={self.config.memory_dim}], "
                         f"got shape {e_BxTxF.shape}")
    else:
      if not isinstance(engram_input, PrefetchedRows):
        raise ValueError("engram_input: table_placement='external' expects PrefetchedRows "
                         f"(rows gathered ahead of time), got {type(engram_input).__name__}")
      self._check_ids(engram_input.inverse_BxTxH, "engram_input.inverse_BxTxH")
      rows_UxE = engram_input.rows_UxE
      if rows_UxE.ndim != 2 or rows_UxE.shape[-1] != self.config.head_dim:
        raise ValueError(f"engram_input.rows_UxE must be [U, E={self.config.head_dim}], "
                         f"got shape {rows_UxE.shape}")
      e_BxTxF = expand_rows(rows_UxE, engram_input.inverse_BxTxH, plan=engram_input.plan)
    return e_BxTxF.astype(self.dtype)

  def _check_ids(self, ids, what: str) -> jax.Array:
    if not hasattr(ids, "ndim") or not hasattr(ids, "dtype"):
      raise ValueError(f"{what} must be an integer array [B, T, H], got {type(ids).__name__}")
    if ids.ndim != 3:
      raise ValueError(f"{what} must have rank 3 [B, T, H], got shape {tuple(ids.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"{what} must have an integer dtype, got {ids.dtype}")
    if ids.shape[-1] != len(self.head_sizes):
      raise ValueError(f"{what} has H={ids.shape[-1]} heads but head_sizes has "
                       f"{len(self.head_sizes)} entries")
    return ids
