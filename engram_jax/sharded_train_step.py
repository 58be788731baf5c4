"""Training and eval steps with row-sharded Engram tables (a mesh of more than one device).

`ShardedTablesTrainer` is `train_step.Trainer` for the row-sparse table optimisers
('lazy_adam', 'adagrad') on a mesh of more than one device. Every table and every leaf of its
optimiser state is split by rows over the n devices of `engram.table_row_axes` (default every
mesh axis; `sharded_tables.TableSharding`; the stored table is padded to n*L rows that no id
reaches), so each device holds 1/n of every table; along a mesh axis left out (only 'tensor'
may be) every device holds the same shard. One step of one table, all inside the one jitted
train step:

  prefetch   `sharded_tables.prefetch`: every batch shard deduplicates its lookups and gets
             its unique rows from their owners by fixed-capacity all-to-all (no gradient);
  expand     `sharded_tables.expand` inside the loss: every batch shard's `[B/S, T, H*E]`
             memory vectors, handed to the model as `memory.MemoryVectors`;
  to_owners  the row gradients return to their owners and are summed there *before* the global
             gradient clip: an owner's sums are the whole batch's per-row gradients, so the clip
             norm is the single-device norm (per-shard partial sums would give another);
  update     `sharded_tables.apply_update` on every owner's shard (in place: the step donates
             its state).

No table-sized array moves between devices (tests/test_train_mesh.py reads the compiled HLO).
With `engram.shard_capacity_factor` > 0 the request buffers follow the expected load; rows
beyond them are counted in the step metric `engram/overflow`, and the loop stops the run when
it is non-zero (engram_jax/train.py), so no row is dropped silently. Dense parameters,
optimiser state and the batch follow the logical rules (engram_jax/sharding.py) as in `Trainer`.

Checkpoints hold the padded tables in their row sharding (orbax writes each shard from its
process); they restore into a mesh of the same number of devices.

Dimension legend: B batch, T sequence length, H hash heads, E row width, R table rows,
n row shards (the devices along the row axes), L = ceil(R / n) rows per device, S batch
shards, U lookup slots of a batch shard.
"""

from __future__ import annotations

import jax

from engram_jax import sharded_tables
from engram_jax import sharding as sharding_lib
from engram_jax import table_optim
from engram_jax.memory import MemoryVectors
from engram_jax.train_step import Trainer, TrainState

OVERFLOW_METRIC = "engram/overflow"


class ShardedTablesTrainer(Trainer):
  """`Trainer` whose Engram tables are row-sharded over `engram.table_row_axes` (module
  docstring)."""

  def __init__(self, config, exp, mesh, rules=sharding_lib.DEFAULT_RULES):
    super().__init__(config, exp, mesh, rules)
    if not exp.sparse_tables:
      raise ValueError("ShardedTablesTrainer needs a row-sparse table optimiser "
                       f"(table_optim.kind in {table_optim.SPARSE_KINDS})")
    batch_axes = sharding_lib.batch_axes(mesh, rules)
    factor = float(config.engram.shard_capacity_factor)
    self.table_shardings = {
        l: sharded_tables.TableSharding(mesh, exp.hashing.num_rows(l),
                                        row_axes=tuple(config.engram.table_row_axes),
                                        batch_axes=batch_axes, capacity_factor=factor)
        for l in self.layer_ids}

  # ---- state -------------------------------------------------------------------------------

  def _boxed_init(self, rng, dummy_batch):
    state = super()._boxed_init(rng, dummy_batch)
    tables = {k: sharded_tables.pad_table(t, self.table_shardings[int(k)])
              for k, t in state.tables.items()}
    table_opt = {k: table_optim.init_table_state(self.exp.table_optim, t)
                 for k, t in tables.items()}
    return state.replace(tables=tables, table_opt=table_opt)

  def _shardings(self, abstract_boxed: TrainState) -> TrainState:
    shardings = super()._shardings(abstract_boxed)
    rows = {k: self.table_shardings[int(k)].table_sharding() for k in abstract_boxed.tables}
    table_opt = {k: jax.tree.map(lambda _, s=rows[k]: s, v)
                 for k, v in abstract_boxed.table_opt.items()}
    return shardings.replace(tables=rows, table_opt=table_opt)

  # ---- steps -------------------------------------------------------------------------------

  def _prefetch(self, state: TrainState, ids) -> dict:
    return {l: sharded_tables.prefetch(self.table_shardings[l], state.tables[str(l)], ids[l],
                                       self.offsets[l]) for l in self.layer_ids}

  def _engram_inputs(self, prefetched: dict, rows: dict) -> dict:
    return {l: MemoryVectors(sharded_tables.expand(self.table_shardings[l], rows[str(l)], p))
            for l, p in prefetched.items()}

  def _row_grads_for_update(self, prefetched: dict, row_grads: dict) -> dict:
    return {k: sharded_tables.to_owners(self.table_shardings[int(k)], prefetched[int(k)], g)
            for k, g in row_grads.items()}

  def _lookup_metrics(self, prefetched: dict) -> dict:
    return {OVERFLOW_METRIC: sum(p.overflow for p in prefetched.values())}

  def _update_table(self, l, table_RxE, opt_state, prefetched_l, grad, learning_rate, step):
    """The owners' coalesced row gradients (`_row_grads`) update each owner's shard."""
    del prefetched_l
    return sharded_tables.apply_update(self.table_shardings[int(l)], self.exp.table_optim,
                                       table_RxE, opt_state, grad, learning_rate, step=step)

  def eval_step(self, state: TrainState, batch: dict) -> dict:
    prefetched = self._prefetch(state, self.engram_ids(batch))
    rows = {str(l): p.rows_UxE for l, p in prefetched.items()}
    return self._eval_on(state, batch, self._engram_inputs(prefetched, rows))


def check_overflow(step: int, metrics: dict) -> None:
  """Stops the run when a step's lookups left rows undelivered (metric `engram/overflow`)."""
  if OVERFLOW_METRIC in metrics:
    sharded_tables.check_overflow(
        round(float(metrics[OVERFLOW_METRIC])),
        what=f"step {step}: metric {OVERFLOW_METRIC!r} (row-sharded Engram tables)",
        knob="engram.shard_capacity_factor")
