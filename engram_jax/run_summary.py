"""What a run records about itself: parameter counts and FLOPs per token of the model
(engram_jax.param_count), and `WORKDIR/run_summary.json` (the mesh, the job and the bytes per
device of dense parameters, Engram tables and their optimiser state, read from the shardings of
the abstract train state; for host tables the rows and bytes each process keeps). Written by
engram_jax/train.py at the start of every run.

Dimension legend: none.
"""

from __future__ import annotations

import jax
import numpy as np

from engram_jax import experiment_config
from engram_jax import host_tables
from engram_jax import param_count
from engram_jax import table_optim
from engram_jax.train_step import HostPlacementTrainer, Trainer, TrainState


def model_summary(exp: experiment_config.Experiment, seq_len: int) -> dict:
  """Parameter counts and training FLOPs per token (engram_jax.param_count)."""
  counts = param_count.count_params(exp.model)
  out = {k: v for k, v in dict(counts).items()
         if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}
  out["flops_per_token"] = float(param_count.flops_per_token(exp.model, seq_len)["total"])
  return out


def _bytes_per_device(tree) -> int:
  """Bytes that the most loaded device holds of the arrays `tree` describes (abstract arrays
  with shardings: the shard shape of each leaf)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
  return total


def _is_table(path) -> bool:
  names = tuple(getattr(k, "key", None) for k in path)
  return names[-3:] == ("engram", "memory", "table")


def run_summary(trainer: Trainer, abstract: TrainState, params_summary: dict) -> dict:
  """What `WORKDIR/run_summary.json` records: the mesh, the job, parameter counts and the bytes
  per device of the dense parameters, the Engram tables and the tables' optimiser state (from
  the shardings of the abstract state; 'dense_adam' tables are params, counted as tables, and
  their optax moments as dense optimiser state)."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract.params)[0]
  tables_in_params = [x for p, x in leaves if _is_table(p)]
  dense_params = [x for p, x in leaves if not _is_table(p)]
  host = {}
  if isinstance(trainer, HostPlacementTrainer):
    host = _host_blocks(trainer)
  return {
      "mesh": {a: int(n) for a, n in trainer.mesh.shape.items()},
      "num_processes": jax.process_count(),
      "num_devices": int(trainer.mesh.size),
      "device_kind": jax.devices()[0].device_kind,
      "trainer": type(trainer).__name__,
      "params": params_summary,
      "dense_param_bytes_per_device": _bytes_per_device(dense_params),
      "dense_opt_state_bytes_per_device": _bytes_per_device(abstract.opt_state),
      "engram_table_bytes_per_device": _bytes_per_device(
          (tables_in_params, abstract.tables)),
      "table_state_bytes_per_device": _bytes_per_device(abstract.table_opt),
      **host,
  }


def _host_blocks(trainer: HostPlacementTrainer) -> dict:
  """Host tables: the rows every process keeps (`host_tables.row_block`) and the bytes of the
  largest block of tables and of their optimiser state (process 0's: blocks are ceil(R/P)
  rows, the last one shorter)."""
  e, cfg = trainer.exp.model.engram, trainer.exp.table_optim
  count = jax.process_count()
  rows, table_bytes, state_bytes = {}, 0, 0
  for l in trainer.layer_ids:
    r = trainer.exp.hashing.num_rows(l)
    rows[str(l)] = [list(host_tables.row_block(r, p, count)) for p in range(count)]
    block = rows[str(l)][0][1]
    table_bytes += block * e.head_dim * np.dtype(trainer._row_dtype[l]).itemsize  # pylint: disable=protected-access
    for shape in table_optim.init_table_state_shapes(cfg, block, e.head_dim):
      if shape is not None:
        state_bytes += int(np.prod(shape[0])) * np.dtype(shape[1]).itemsize
  return {"engram_table_host_rows_per_process": rows,
          "engram_table_bytes_host_per_process": table_bytes,
          "table_state_bytes_host_per_process": state_bytes}
