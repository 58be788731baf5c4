"""Row-sharded Engram tables: every device owns a block of rows; rows and their gradients
travel between requesters and owners by fixed-capacity all-to-all.

A table `[R, E]` and its row-sparse optimiser state (engram_jax/table_optim.py) are split by
rows over `TableSharding.row_axes` (default: every mesh axis, so each device holds 1/n of the
rows). One training step of one table is four explicit `jax.shard_map`s:

  prefetch   each device deduplicates its batch shard's lookups (`row_sparse.unique_rows`'
             sort, with its plan), sends every owner its requested row ids (`[n, C]` int32,
             one `all_to_all` over the row axes), the owners gather the rows from their shard
             and send them back (`[n, C, E]`, a second `all_to_all`). -> `ShardedRows`.
  expand     per batch shard, `row_sparse.expand_rows` of its own rows (`[B, T, H*E]`, the
             memory vectors the model reads); differentiable w.r.t. the rows, local.
  to_owners  the row gradients go back by the prefetch's route (`[n, C, E]`, one
             `all_to_all`); each owner coalesces what it received from all requesters with a
             stable sort and a float32 segment sum (the same deterministic reduction as the
             single-device backward, `segment_sum.py`) into an owner-local `RowSparse`.
  update     `table_optim.apply_row_sparse_update` on every owner's shard (local; under a
             donated jit the scatters run in place).

Ownership is by contiguous blocks: row r lives on shard `r // L` (L = ceil(R / n) rows per
shard, the table padded to n*L rows with rows no id can reach). The stored array is then the
table itself (checkpoints, evaluation and decoding read it unchanged), and the sorted unique
ids of a batch shard are already grouped by owner, so the requests to owner o are one
contiguous run (two `searchsorted`) with no extra sort. Hash ids are uniform within every head,
so each owner receives about 1/n of the requests whatever the layout.

Capacity: a requester sends each owner C request slots. By default C = min(U, L), the worst
case (a batch shard has at most U unique rows, an owner at most L), so nothing can overflow.
`capacity_factor > 0` sets C = ceil(capacity_factor * U / n) (rounded up to 8, at most the
worst case): the traffic then follows the expected load rather than the worst case. Rows
beyond C are not delivered (zeros in the forward, no gradient); every call returns the number
of such rows as `overflow`, and `check_overflow` raises when it is non-zero, so a caller that
checks it never drops a row silently.

Batch layout: the batch is split over `batch_axes` (S shards); `ShardedRows` holds S blocks of
U slots, one per batch shard, and shard s's inverse index points into its own block. Every
batch axis of size > 1 must be a row axis (then one all-to-all group sees the whole batch and
each row's gradient reaches exactly one owner per table replica). Row axes that do not split
the batch (e.g. 'tensor') hold identical batches: their devices request the same rows, and in
the backward only the member with coordinate 0 on those axes contributes gradients.

`ragged_all_to_all` is deliberately not used: fixed-size buffers, one collective each way.

Dimension legend: B global batch, T time, H hash heads, E row width, R table rows (logical),
n row shards, L = ceil(R / n) rows per shard, S batch shards, U = (B / S)*T*H lookup slots of
a batch shard, C request slots per (requester, owner) pair, N = U lookups of a batch shard.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from engram_jax import table_optim
from pallas_kernels.engram_lookup import row_sparse, segment_sum
from pallas_kernels.engram_lookup.row_sparse import RowSparse


@dataclasses.dataclass(frozen=True)
class TableSharding:
  """How one table of `num_rows` rows is split over `mesh` (see the module docstring).

  row_axes: mesh axes the rows are split over, in mesh order; () = every mesh axis.
  batch_axes: mesh axes the batch is split over (the trainer's 'batch' rule).
  capacity_factor: 0 = worst-case buffers (never overflow); > 0 = C = ceil(f * U / n).
  """
  mesh: Mesh
  num_rows: int
  row_axes: tuple[str, ...] = ()
  batch_axes: tuple[str, ...] = ()
  capacity_factor: float = 0.0

  def __post_init__(self):
    names = tuple(self.mesh.axis_names)
    row_axes = tuple(self.row_axes) or names
    for field, axes in (("row_axes", row_axes), ("batch_axes", tuple(self.batch_axes))):
      unknown = [a for a in axes if a not in names]
      if unknown or len(set(axes)) != len(axes):
        raise ValueError(f"TableSharding.{field}={axes} must be distinct axes of the mesh "
                         f"{names}")
    # Mesh order, so the row shard index and the all-to-all group index agree.
    object.__setattr__(self, "row_axes", tuple(a for a in names if a in row_axes))
    object.__setattr__(self, "batch_axes", tuple(a for a in names if a in self.batch_axes))
    missing = [a for a in self.batch_axes if a not in self.row_axes and self.mesh.shape[a] > 1]
    if missing:
      raise ValueError(f"TableSharding: the batch is split over {missing}, which are not row "
                       f"axes {self.row_axes}; every batch axis of size > 1 must be a row axis "
                       "(one all-to-all group must see the whole batch)")
    if not 1 <= self.num_rows < 2**31:
      raise ValueError(f"TableSharding.num_rows must be in [1, 2^31), got {self.num_rows}")
    if not (math.isfinite(self.capacity_factor) and self.capacity_factor >= 0):
      raise ValueError(f"TableSharding.capacity_factor must be finite and >= 0, got "
                       f"{self.capacity_factor}")

  @property
  def num_shards(self) -> int:
    return int(np.prod([self.mesh.shape[a] for a in self.row_axes]))

  @property
  def num_batch_shards(self) -> int:
    return int(np.prod([self.mesh.shape[a] for a in self.batch_axes]))

  @property
  def rows_per_shard(self) -> int:
    return -(-self.num_rows // self.num_shards)

  @property
  def padded_rows(self) -> int:
    """Rows of the stored table: n*L >= R; rows >= R are never read or written."""
    return self.num_shards * self.rows_per_shard

  def capacity(self, slots: int) -> int:
    """C for a batch shard of `slots` = U lookups (see the module docstring)."""
    worst = min(slots, self.rows_per_shard)
    if not self.capacity_factor:
      return worst
    c = math.ceil(self.capacity_factor * slots / self.num_shards)
    return max(1, min(-(-c // 8) * 8, worst))

  def table_sharding(self) -> NamedSharding:
    """Of the table and every `[R, E]` / `[R]` state leaf (rows split, the rest whole)."""
    return NamedSharding(self.mesh, P(self.row_axes))

  def _replica_sources(self) -> np.ndarray:
    """bool[n]: members of the row group that only repeat another member's batch."""
    sizes = [self.mesh.shape[a] for a in self.row_axes]
    coords = np.stack(np.unravel_index(np.arange(self.num_shards), sizes), axis=-1)
    repeat = [i for i, a in enumerate(self.row_axes) if a not in self.batch_axes]
    return (coords[:, repeat] != 0).any(axis=-1) if repeat else np.zeros(self.num_shards, bool)


class ShardedRows(NamedTuple):
  """The rows one global batch reads from a row-sharded table (global arrays, S blocks).

  rows_UxE: [S*U, E] block s = the unique rows of batch shard s (zeros in padding slots and
    for rows beyond capacity), in the table's dtype; sharded over the batch axes.
  inverse_BxTxH: int32 index of every lookup into its own shard's block.
  row_ids_U: int32 [S*U] global row ids of `rows_UxE`, sorted per block, R in padding.
  plan: `segment_sum.SortedSegments` of each block's lookups (per-block arrays, concatenated).
  served_ids: int32 [n*n*C] owner side: the local rows each owner sent each requester (L for
    empty slots); sharded over the row axes. The backward returns gradients into these slots.
  overflow: int32 [] unique rows (summed over batch shards) that found no request slot.
  """
  rows_UxE: jax.Array
  inverse_BxTxH: jax.Array
  row_ids_U: jax.Array
  plan: segment_sum.SortedSegments
  served_ids: jax.Array
  overflow: jax.Array


def pad_table(table_RxE: jax.Array, ts: TableSharding) -> jax.Array:
  """The table (or a per-row state leaf) padded with zero rows to `ts.padded_rows`."""
  if table_RxE.shape[0] != ts.num_rows:
    raise ValueError(f"pad_table: the table has {table_RxE.shape[0]} rows, the sharding "
                     f"describes {ts.num_rows}")
  pad = [(0, ts.padded_rows - ts.num_rows)] + [(0, 0)] * (table_RxE.ndim - 1)
  return jnp.pad(table_RxE, pad)


def check_overflow(overflow, what: str = "Engram table",
                   knob: str = "TableSharding.capacity_factor") -> None:
  """Raises if a lookup left rows undelivered (`ShardedRows.overflow` > 0). `knob` names the
  setting that sizes the buffers (the config field, for the trainer)."""
  count = int(overflow)
  if count:
    raise OverflowError(
        f"{what}: {count} unique rows found no all-to-all request slot this step (they read "
        f"zeros and got no gradient); raise {knob}, or set it to 0 for worst-case buffers "
        "that never overflow")


def _requests(ts: TableSharding, row_ids_U, capacity: int):
  """Per batch shard: the request slots of every owner and where each unique row comes back.

  Returns (slot_nxC: position in `row_ids_U` of every request, valid_nxC, ids_nxC: local row
  id at the owner (L when empty), back_U: flat [n*C] index of each unique row's reply (n*C
  when it has none), overflow: unique rows beyond capacity).
  """
  n, rows, per_shard = ts.num_shards, ts.num_rows, ts.rows_per_shard
  first_n1 = jnp.minimum(jnp.arange(n + 1, dtype=jnp.int32) * per_shard, rows)
  edges_n1 = jnp.searchsorted(row_ids_U, first_n1, side="left").astype(jnp.int32)
  start_n, count_n = edges_n1[:-1], edges_n1[1:] - edges_n1[:-1]
  rank_C = jnp.arange(capacity, dtype=jnp.int32)
  slot_nxC = start_n[:, None] + rank_C
  valid_nxC = rank_C < count_n[:, None]
  owner_first_n1 = first_n1[:-1, None]
  ids_nxC = jnp.where(valid_nxC, row_ids_U.at[slot_nxC].get(mode="fill", fill_value=0)
                      - owner_first_n1, per_shard)
  valid_U = row_ids_U < rows
  owner_U = jnp.where(valid_U, row_ids_U // per_shard, 0)
  rank_U = jnp.arange(row_ids_U.shape[0], dtype=jnp.int32) - start_n[owner_U]
  back_U = jnp.where(valid_U & (rank_U < capacity), owner_U * capacity + rank_U, n * capacity)
  overflow = jnp.sum(jnp.maximum(count_n - capacity, 0))
  return slot_nxC, valid_nxC, ids_nxC, back_U, overflow


def _all_to_all(x, ts: TableSharding):
  """Block j of the leading [n] axis goes to row shard j; block i of the result came from i."""
  return jax.lax.all_to_all(x, ts.row_axes, 0, 0, tiled=True)


def prefetch(ts: TableSharding, table_RxE: jax.Array, ids_BxTxH: jax.Array,
             offsets_H: jax.Array) -> ShardedRows:
  """Gathers the unique rows of every batch shard from their owners (no gradient)."""
  if table_RxE.ndim != 2 or table_RxE.shape[0] != ts.padded_rows:
    raise ValueError(f"prefetch: table must be [{ts.padded_rows}, E] (padded, pad_table), got "
                     f"{table_RxE.shape}")
  if ids_BxTxH.ndim != 3 or ids_BxTxH.shape[0] % ts.num_batch_shards:
    raise ValueError(f"prefetch: ids must be [B, T, H] with B divisible by the "
                     f"{ts.num_batch_shards} batch shards, got {ids_BxTxH.shape}")
  b, t, h = ids_BxTxH.shape
  slots = b // ts.num_batch_shards * t * h
  capacity = ts.capacity(slots)
  batch = P(ts.batch_axes)

  def body(table_LxE, ids_bxTxH, offsets_H):
    row_ids_U, inverse_bxTxH, plan = row_sparse._unique_rows_plan(  # pylint: disable=protected-access
        ids_bxTxH, offsets_H, ts.num_rows)
    _, _, ids_nxC, back_U, overflow = _requests(ts, row_ids_U, capacity)
    served_nxC = _all_to_all(ids_nxC, ts)
    rows_nxCxE = row_sparse.gather_rows(table_LxE, served_nxC.reshape(-1)).reshape(
        *served_nxC.shape, -1)
    got_nxCxE = _all_to_all(rows_nxCxE, ts)
    rows_UxE = got_nxCxE.reshape(-1, table_LxE.shape[1]).at[back_U].get(
        mode="fill", fill_value=0)
    if ts.batch_axes:
      overflow = jax.lax.psum(overflow, ts.batch_axes)
    return (rows_UxE, inverse_bxTxH, row_ids_U, plan, served_nxC.reshape(-1), overflow)

  plan_spec = segment_sum.SortedSegments(batch, batch, batch, batch)
  out = jax.shard_map(body, mesh=ts.mesh, in_specs=(P(ts.row_axes), batch, P()),
                      out_specs=(batch, batch, batch, plan_spec, P(ts.row_axes), P()),
                      check_vma=False)(table_RxE, ids_BxTxH, jnp.asarray(offsets_H, jnp.int32))
  return ShardedRows(*out)


def expand(ts: TableSharding, rows_UxE: jax.Array, prefetched: ShardedRows, *,
           backward=None) -> jax.Array:
  """`[B, T, H*E]` memory vectors: each batch shard expands its own block of `rows_UxE`.

  Differentiable w.r.t. `rows_UxE` (pass `prefetched.rows_UxE`, or a traced copy of it); the
  gradient is the per-block f32 segment sum of `row_sparse.expand_rows`, cast to its dtype.
  """
  batch = P(ts.batch_axes)

  def body(rows_UxE, inverse_bxTxH, plan):
    return row_sparse.expand_rows(rows_UxE, inverse_bxTxH, plan=plan, backward=backward)

  plan_spec = segment_sum.SortedSegments(batch, batch, batch, batch)
  return jax.shard_map(body, mesh=ts.mesh, in_specs=(batch, batch, plan_spec),
                       out_specs=batch)(rows_UxE, prefetched.inverse_BxTxH, prefetched.plan)


def to_owners(ts: TableSharding, prefetched: ShardedRows, grad_rows_UxE: jax.Array, *,
              backward=None) -> RowSparse:
  """Sends every batch shard's row gradients to the rows' owners and coalesces them there.

  Returns the owner-local `RowSparse` of every shard as global arrays sharded over the row
  axes: `rows_U` [n * n*C] local row ids (sorted per shard, L in padding), `values_UxE` f32
  sums (zero in padding). Each owner adds its requesters' contributions in requester order.
  """
  per_shard = ts.rows_per_shard
  replica_n = jnp.asarray(ts._replica_sources())  # pylint: disable=protected-access
  width = grad_rows_UxE.shape[-1]
  backward = backward or row_sparse._default_backward(width)  # pylint: disable=protected-access
  slots = prefetched.row_ids_U.shape[0] // ts.num_batch_shards
  capacity = ts.capacity(slots)
  batch = P(ts.batch_axes)

  def body(row_ids_U, grad_UxE, served_N):
    slot_nxC, valid_nxC, _, _, _ = _requests(ts, row_ids_U, capacity)
    send_nxCxE = jnp.where(valid_nxC[..., None],
                           grad_UxE.astype(jnp.float32).at[slot_nxC].get(
                               mode="fill", fill_value=0), 0.0)
    got_nxCxE = _all_to_all(send_nxCxE, ts)
    ids_nxC = jnp.where(replica_n[:, None], per_shard, served_N.reshape(-1, capacity))
    ids_M = ids_nxC.reshape(-1)
    g_MxE = jnp.where((ids_M < per_shard)[:, None], got_nxCxE.reshape(-1, width), 0.0)
    plan = segment_sum.sort_segments(ids_M, fill=per_shard)
    sums_MxE = segment_sum.segment_sum(g_MxE, plan, implementation=backward)
    sums_MxE = jnp.where((plan.keys_U < per_shard)[:, None], sums_MxE, 0.0)
    return plan.keys_U, sums_MxE

  rows_spec = P(ts.row_axes)
  rows_U, values_UxE = jax.shard_map(
      body, mesh=ts.mesh, in_specs=(batch, batch, rows_spec), out_specs=(rows_spec, rows_spec),
      check_vma=False)(prefetched.row_ids_U, grad_rows_UxE, prefetched.served_ids)
  return RowSparse(rows_U, values_UxE)


def apply_update(ts: TableSharding, cfg: table_optim.TableOptimizerConfig,
                 table_RxE: jax.Array, state: table_optim.TableOptState, grad: RowSparse,
                 learning_rate, step=None):
  """`table_optim.apply_row_sparse_update` on every owner's shard with its `to_owners` grad."""
  rows_spec = P(ts.row_axes)
  state_spec = jax.tree.map(lambda _: rows_spec, state)
  step = jnp.zeros((), jnp.int32) if step is None else step

  def body(table_LxE, state, rows_U, values_UxE, lr, step):
    return table_optim.apply_row_sparse_update(cfg, table_LxE, state,
                                               RowSparse(rows_U, values_UxE), lr, step=step)

  return jax.shard_map(
      body, mesh=ts.mesh, in_specs=(rows_spec, state_spec, rows_spec, rows_spec, P(), P()),
      out_specs=(rows_spec, state_spec), check_vma=False)(
          table_RxE, state, grad.rows_U, grad.values_UxE,
          jnp.asarray(learning_rate, jnp.float32), step)
