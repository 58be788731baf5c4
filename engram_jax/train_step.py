"""One training step and one eval step of an Engram LM, with their state and shardings.

`Trainer` owns the model, the optimisers and the shardings of one experiment and provides the
jitted steps that `engram_jax.train` drives:

  ids      hash ids per Engram layer: from the grain pipeline (default), or on device
           (`engram.hash_on_device`: compression lookup + `NgramHashMapping.hash` in the step)
  tables   'dense_adam': tables are params (`layer_l/engram/memory/table`), looked up with the
           ids, dense gradients, Adam at 5x LR inside the optax chain (engram_jax/optim.py).
           'lazy_adam' | 'adagrad': tables live in `state.tables[str(l)]` with their optimiser
           state in `state.table_opt[str(l)]`; the step gathers the batch's unique rows
           (`prefetch_rows`, outside the gradient), runs the model on `PrefetchedRows`
           (`table_placement='external'`), differentiates w.r.t. the dense params and the
           gathered rows, and applies `apply_row_sparse_update` to the touched rows only.
  loss     token-weighted cross entropy (+ the MoE auxiliary loss, 0 by default); the MoE
           router biases (collection 'moe_stats') are updated by the forward pass.
  clip     one global norm over dense and row-sparse gradients (identical in both table modes).

`HostPlacementTrainer` (engram.placement='pinned_host', sparse optimisers only) keeps the tables
in a `host_tables.HostTables` outside the state, each process its block of rows; its model step
takes the batch's `PrefetchedRows` (replicated on every device of the mesh, the inverse index
batch-sharded) and returns the clipped row gradients, which `HostTables.make_step` applies to
the rows in the same program (engram_jax/train.py drives it).

`sharded_train_step.ShardedTablesTrainer` (row-sparse optimisers on a mesh of > 1 device)
overrides the lookup hooks (`_prefetch`, `_engram_inputs`, `_row_grads_for_update`) to split
every table by rows over the devices.

Both table modes start from identical values: the state is always initialised with tables as
params, and the sparse mode moves them out of the param tree. Shardings come from the logical
axis names of every parameter (engram_jax/sharding.py rules); the state is donated.

Dimension legend: B batch, T sequence length, V vocabulary, H hash heads, U unique-row slots
(= B*T*H), E table row width, R table rows, M residual streams.
"""

from __future__ import annotations

from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from engram_jax import experiment_config
from engram_jax import host_memory
from engram_jax import host_tables
from engram_jax import optim
from engram_jax import sharding as sharding_lib
from engram_jax import table_optim
from engram_jax.model import EngramLM
from pallas_kernels.engram_lookup.row_sparse import (PrefetchedRows, RowSparse, prefetch_rows,
                                                     row_sparse_grad)


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes (and everything a checkpoint holds besides the data).

  step: int32 number of updates applied. params: dense params (f32 masters; the tables too in
  'dense_adam' mode). opt_state: optax state of params. model_state: non-param collections
  ('moe_stats'). tables / table_opt: {str(layer_id): [R, E]} / TableOptState (sparse modes only).
  rng: PRNGKey carried for stochastic layers (none yet), checkpointed for exact resumption.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any
  tables: Any
  table_opt: Any
  rng: jax.Array


def without_engram_ids(batch: dict) -> dict:
  """The batch (or its shapes) without the pipeline's hash ids (steps that do not read them)."""
  return {k: v for k, v in batch.items() if k != "engram_ids"}


def _table_path(layer_id: int) -> tuple[str, ...]:
  return (f"layer_{layer_id}", "engram", "memory", "table")


def _pop_table(params: dict, layer_id: int):
  """Removes one Engram table from a (nested, plain-dict) param tree; returns it."""
  *parents, leaf = _table_path(layer_id)
  node = params
  for name in parents:
    if name not in node:
      raise KeyError(f"Engram table of layer {layer_id} not found at {'/'.join(_table_path(layer_id))}"
                     f"; param tree top level: {sorted(params)}")
    node = node[name]
  return node.pop(leaf)


class Trainer:
  """Builds the model, optimisers, shardings and the jitted steps of one experiment."""

  def __init__(self, config: ml_collections.ConfigDict, exp: experiment_config.Experiment,
               mesh: jax.sharding.Mesh, rules=sharding_lib.DEFAULT_RULES):
    self.config, self.exp, self.mesh, self.rules = config, exp, mesh, rules
    self.model = EngramLM(exp.model)
    # Initialisation always places tables in the params (identical values in both modes).
    self.init_model = EngramLM(exp.model.replace(engram_table_placement="param"))
    self.schedule = optim.make_schedule(exp.optim)
    self.layer_ids = exp.model.engram_layer_ids
    self.offsets = {l: jnp.asarray(exp.hashing.offsets(l), jnp.int32) for l in self.layer_ids}
    self.hash_on_device = bool(config.engram.enabled and config.engram.hash_on_device)
    self.nan_step = int(config.train.inject_nan_at_step)
    self.tx: Optional[optax.GradientTransformation] = None
    self.state_shardings = None
    # Set by engram_jax.train: global batch shapes, and for evaluation-only use the compiled
    # (eval_step, put_batch) pair and a files -> batches function.
    self.shapes: Optional[dict] = None
    self.eval_fn = None
    self.eval_batches = None

  # ---- initial state and shardings ---------------------------------------------------------

  def _make_tx(self, params):
    t = self.exp.table_optim
    kw = {} if t is None else dict(table_lr_multiplier=t.lr_multiplier, table_b1=t.b1,
                                   table_b2=t.b2, table_eps=t.eps,
                                   table_weight_decay=t.weight_decay,
                                   table_moment_dtype=jnp.dtype(t.moment_dtype))
    return optim.make_optimizer(self.exp.optim, params, **kw)

  def _boxed_init(self, rng, dummy_batch):
    init_rng, state_rng = jax.random.split(rng)
    ids = self._engram_ids_for_init(dummy_batch)
    variables = self.init_model.init(init_rng, dummy_batch["inputs"],
                                     segment_ids=dummy_batch["segment_ids"],
                                     positions=dummy_batch["positions"], engram_inputs=ids)
    variables = flax.core.unfreeze(variables)
    params = variables.pop("params")
    variables.pop("intermediates", None)
    tables, table_opt = {}, {}
    if self.exp.sparse_tables:
      for l in self.layer_ids:
        table = _pop_table(params, l).unbox()
        tables[str(l)] = table
        table_opt[str(l)] = table_optim.init_table_state(self.exp.table_optim, table)
    tx = self._make_tx(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      model_state=variables, tables=tables, table_opt=table_opt, rng=state_rng)

  def _engram_ids_for_init(self, batch):
    if not self.layer_ids:
      return None
    b, t = batch["inputs"].shape
    return {l: jnp.zeros((b, t, self.exp.model.engram.num_heads), jnp.int32)
            for l in self.layer_ids}

  def _shardings(self, abstract_boxed: TrainState) -> TrainState:
    shardings = sharding_lib.logical_to_sharding(abstract_boxed, self.mesh, self.rules)
    if self.exp.sparse_tables:
      named = lambda names: jax.sharding.NamedSharding(  # noqa: E731
          self.mesh, sharding_lib.logical_spec(tuple(names), self.rules))
      axes = table_optim.table_state_logical_axes(self.exp.table_optim)
      table_opt = {k: jax.tree.map(named, axes, is_leaf=lambda x: isinstance(
          x, jax.sharding.PartitionSpec)) for k in abstract_boxed.table_opt}
      tables = {k: named(("engram_rows", "engram_dim")) for k in abstract_boxed.tables}
      shardings = shardings.replace(tables=tables, table_opt=table_opt)
    return shardings

  def prepare(self, seed: int, batch_shapes: dict) -> TrainState:
    """Abstract state (shapes + shardings) and the optimiser; no device memory is touched."""
    self._dummy_shapes = without_engram_ids(batch_shapes)
    self._rng = jax.random.PRNGKey(seed)
    with self._context():
      abstract_boxed = jax.eval_shape(self._boxed_init, self._rng, self._dummy())
    unboxed = nn.unbox(abstract_boxed)
    self.state_shardings = jax.tree.map(lambda s, x: sharding_lib.fit_to_shape(s, x.shape),
                                        self._shardings(abstract_boxed), unboxed)
    self.tx = self._make_tx(nn.unbox(abstract_boxed.params))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        unboxed, self.state_shardings)

  def _dummy(self):
    return {k: jnp.zeros(v.shape, v.dtype) for k, v in self._dummy_shapes.items()}

  def init_state(self) -> TrainState:
    """The initial state, created directly in its shardings (call `prepare` first)."""
    return self._init_in(self.state_shardings)

  def _init_in(self, shardings) -> TrainState:
    with self._context():
      init = jax.jit(lambda r, d: nn.unbox(self._boxed_init(r, d)), out_shardings=shardings)
      return init(self._rng, self._dummy())

  def _context(self):
    return _Contexts(self.mesh, self.rules)

  # ---- forward pieces ----------------------------------------------------------------------

  def engram_ids(self, batch) -> Optional[dict]:
    if not self.layer_ids:
      return None
    if not self.hash_on_device:
      if "engram_ids" not in batch:
        raise ValueError("batch has no 'engram_ids': the pipeline's engram_hash_fn is not set "
                         "and engram.hash_on_device is False")
      return {int(l): v for l, v in batch["engram_ids"].items()}
    lookup_V = jnp.asarray(self.exp.compressor.lookup_table, jnp.int32)
    compressed_BxT = lookup_V[batch["inputs"]]
    segments = batch["segment_ids"] if self.exp.model.engram.segment_reset else None
    return self.exp.hashing.hash(compressed_BxT, segments)

  def _forward(self, params, model_state, batch, engram_inputs, train: bool):
    mutable = ["intermediates"] + (["moe_stats"] if train and "moe_stats" in model_state else [])
    (logits_BxTxV, aux), mutated = self.model.apply(
        {"params": params, **model_state}, batch["inputs"], segment_ids=batch["segment_ids"],
        positions=batch["positions"], engram_inputs=engram_inputs, deterministic=not train,
        mutable=mutable)
    weights_BxT = batch["weights"]
    xent_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["targets"])
    loss_sum = jnp.sum(xent_BxT * weights_BxT)
    num_tokens = jnp.sum(weights_BxT)
    loss = loss_sum / jnp.maximum(num_tokens, 1.0)
    stats = {"loss_sum": loss_sum, "num_tokens": num_tokens, "xent": loss}
    stats.update(_gate_stats(mutated.get("intermediates", {}), batch["segment_ids"] > 0))
    if "moe" in aux:
      load = aux["moe"]["max_over_mean_load"]
      stats["router/max_over_mean_load"] = jnp.mean(load)
      stats["router/max_over_mean_load_worst"] = jnp.max(load)
      if self.exp.model.moe.dispatch == "capacity":  # the dropless dispatch drops nothing
        stats["router/dropped_fraction"] = jnp.mean(aux["moe"]["dropped_fraction"])
      stats["moe_aux_loss"] = aux["moe_aux_loss"]
    new_model_state = {k: mutated[k] for k in mutated if k != "intermediates"}
    return loss + aux["moe_aux_loss"], stats, new_model_state

  # ---- steps -------------------------------------------------------------------------------

  def _prefetch(self, state: TrainState, ids) -> dict:
    """{layer: PrefetchedRows} of the state's tables (sparse modes), else {}."""
    if not self.exp.sparse_tables:
      return {}
    return {l: prefetch_rows(state.tables[str(l)], ids[l], self.offsets[l])
            for l in self.layer_ids}

  def _update_table(self, l, table_RxE, opt_state, prefetched_l, grad, learning_rate, step):
    """Lazy Adam / Adagrad on the rows of table `l` one step touched (`grad`: the gathered
    rows' gradients); ShardedTablesTrainer applies it on every owner's shard instead."""
    del l
    return table_optim.apply_row_sparse_update(
        self.exp.table_optim, table_RxE, opt_state, row_sparse_grad(prefetched_l, grad),
        learning_rate, step=step)

  def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    ids = self.engram_ids(batch)
    prefetched = self._prefetch(state, ids)
    new_state, metrics, row_grads = self._step_on_rows(state, batch, ids, prefetched)
    tables, table_opt = dict(state.tables), dict(state.table_opt)
    for l, grad in row_grads.items():
      k = str(l)
      tables[k], table_opt[k] = self._update_table(
          l, state.tables[k], state.table_opt[k], prefetched[l], grad, metrics["learning_rate"],
          state.step)
    return new_state.replace(tables=tables, table_opt=table_opt), metrics

  def _step_on_rows(self, state: TrainState, batch: dict, ids, prefetched: dict):
    """Forward/backward, one global clip, dense update; the tables are not touched.

    `prefetched` {layer: PrefetchedRows} (sparse modes; `ids` unused then) or {} (dense_adam:
    the model looks the ids up in its params). Returns the state with everything but the tables
    advanced, the metrics, and {layer: clipped f32 [U, E] gradient w.r.t. the prefetched rows}
    (row-sharded tables: the owners' clipped `RowSparse`, engram_jax/sharded_train_step.py).
    """
    rows = {str(l): p.rows_UxE for l, p in prefetched.items()}

    def loss_fn(params, rows):
      engram_inputs = self._engram_inputs(prefetched, rows) if prefetched else ids
      loss, stats, model_state = self._forward(params, state.model_state, batch, engram_inputs,
                                               train=True)
      if self.nan_step:
        loss = loss * jnp.where(state.step + 1 >= self.nan_step, jnp.nan, 1.0)
      return loss, (stats, model_state)

    (loss, (stats, model_state)), (grads, row_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, rows)
    row_grads = self._row_grads_for_update(prefetched, row_grads)
    keys = sorted(row_grads)
    grads, clipped_rows, grad_norm = optim.clip_by_global_norm(
        grads, [_values(row_grads[k]) for k in keys], self.exp.optim.grad_clip_norm)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    lr = self.schedule(state.step)
    rng, _ = jax.random.split(state.rng)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state or state.model_state, rng=rng)
    metrics = dict(stats, loss=loss, grad_norm=grad_norm, learning_rate=lr)
    row_grads = {int(k): _with_values(row_grads[k], g.astype(jnp.float32))
                 for k, g in zip(keys, clipped_rows)}
    metrics.update(self._lookup_metrics(prefetched))
    return new_state, metrics, row_grads

  def _engram_inputs(self, prefetched: dict, rows: dict) -> dict:
    """{layer: what the model reads} for `prefetched` with its rows replaced by `rows`
    {str(layer): [U, E]} (the differentiated copies)."""
    return {l: p._replace(rows_UxE=rows[str(l)]) for l, p in prefetched.items()}

  def _row_grads_for_update(self, prefetched: dict, row_grads: dict) -> dict:
    """{str(layer): the gradient the global clip and the table update see}: here the
    gradient w.r.t. the prefetched rows; a `RowSparse` clips its values."""
    del prefetched
    return row_grads

  def _lookup_metrics(self, prefetched: dict) -> dict:
    """Metrics of the step's table lookups (none for single-device tables)."""
    del prefetched
    return {}

  def eval_step(self, state: TrainState, batch: dict) -> dict:
    ids = self.engram_ids(batch)
    return self._eval_on(state, batch,
                         self._prefetch(state, ids) if self.exp.sparse_tables else ids)

  def _eval_on(self, state: TrainState, batch: dict, engram_inputs) -> dict:
    _, stats, _ = self._forward(state.params, state.model_state, batch, engram_inputs,
                                train=False)
    return {"loss_sum": stats["loss_sum"], "num_tokens": stats["num_tokens"]}

  def batch_shardings(self, batch_shapes: dict):
    def shard(x):
      return sharding_lib.batch_sharding(self.mesh, self.rules, ndim=len(x.shape))
    return jax.tree.map(shard, batch_shapes)

  # Steps' arguments after (state, batch) and train-step outputs after (state, metrics).
  def _step_batch_shapes(self, batch_shapes: dict) -> dict:
    return batch_shapes

  def _extra_step_args(self, batch_shapes: dict) -> tuple:
    return ()

  _extra_train_outputs = 0

  def compile(self, abstract_state: TrainState, batch_shapes: dict, train: bool = True,
              evaluate: bool = True, compiler_options: Optional[dict] = None):
    """AOT-compiles the steps (so compile time is reported, and never paid mid-run).
    `compiler_options`: XLA debug options for this compile only (benchmarks/common.py uses it
    to profile a step without CUDA graphs in the process that times the step with them).

    Returns (train_step or None, eval_step or None, batch shardings)."""
    batch_shapes = self._step_batch_shapes(batch_shapes)
    batch_sh = self.batch_shardings(batch_shapes)
    abstract_batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  batch_shapes, batch_sh)
    extra = self._extra_step_args(batch_shapes)
    extra_sh = tuple(jax.tree.map(lambda x: x.sharding, a) for a in extra)
    in_sh = (self.state_shardings, batch_sh) + extra_sh
    # Metrics replicated: every process reads them (a multi-process job included).
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    train_c = eval_c = None
    with self._context():
      if train:
        train_c = jax.jit(self.train_step, in_shardings=in_sh,
                          out_shardings=(self.state_shardings, replicated) + (None,) *
                          self._extra_train_outputs, donate_argnums=(0,)).lower(
                              abstract_state, abstract_batch, *extra).compile(compiler_options)
      if evaluate:
        eval_c = jax.jit(self.eval_step, in_shardings=in_sh, out_shardings=replicated).lower(
            abstract_state, abstract_batch, *extra).compile()
    return train_c, eval_c, batch_sh


class HostPlacementTrainer(Trainer):
  """`Trainer` for `engram.placement='pinned_host'`: tables outside the jitted state.

  The Engram tables and their row-sparse optimiser state live in `self.host`, a
  `host_tables.HostTables` in pinned host memory (each process its block of rows; on any mesh,
  the dense state sharded as `Trainer` shards it); the TrainState holds everything else
  (`tables` / `table_opt` are empty). `train_step` takes the batch's `PrefetchedRows` as an
  argument and returns the globally clipped row gradients; the loop (engram_jax/train.py) runs
  it as the model step of `self.host.make_step`, which updates the rows in the same program and
  writes them back to the host tables. Forward, loss, clipping and dense update are the base
  class's (`_step_on_rows`), and the table arithmetic is `table_optim`'s in both placements, so
  a run equals the 'device' placement's.
  """

  host: Optional[host_tables.HostTables] = None

  def prepare(self, seed: int, batch_shapes: dict) -> TrainState:
    abstract = super().prepare(seed, batch_shapes)
    self._full_shardings = self.state_shardings
    self.state_shardings = self.state_shardings.replace(tables={}, table_opt={})
    self._row_dtype = {int(k): t.dtype for k, t in abstract.tables.items()}
    return abstract.replace(tables={}, table_opt={})

  def init_state(self) -> TrainState:
    """Initial state as `Trainer.init_state` (same values), with each process's block of rows
    of every table (`host_tables.row_block`) moved to its host memory.

    The tables are drawn by the model's initialiser on the devices, replicated, and each
    process copies its block from its first device, so that a host run starts from exactly the
    device run's tables; every device therefore holds each table once during initialisation
    (tables beyond HBM would need `host_memory.create_table` in both modes).
    """
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    shardings = self._full_shardings.replace(
        tables={k: replicated for k in self._full_shardings.tables}, table_opt={})
    with self._context():
      init = jax.jit(lambda r, d: nn.unbox(self._boxed_init(r, d)).replace(table_opt={}),
                     out_shardings=shardings)
      state = init(self._rng, self._dummy())
    device = jax.local_devices()[0]
    host = host_memory.placement_sharding("pinned_host", device)
    tables = {}
    for k, table in state.tables.items():
      start, stop = host_tables.row_block(table.shape[0], jax.process_index(),
                                          jax.process_count())
      block = next(s.data for s in table.addressable_shards if s.device == device)
      block = block[start:stop] if (start, stop) != (0, table.shape[0]) else block
      host_memory.check_host_allocation(block.nbytes, what=f"Engram table of layer {k}",
                                        already_allocated=sum(t.nbytes for t in tables.values()))
      tables[int(k)] = jax.device_put(block, host).block_until_ready()
      table.delete()  # the device copies: from here on the host blocks are the only ones
    # Zero optimiser state allocated on the host directly (== table_optim.init_table_state).
    self.set_host(host_tables.HostTables(self.exp.table_optim, tables, self.host_offsets(),
                                         **self.host_layout()))
    return state.replace(tables={}, table_opt={})

  def host_offsets(self) -> dict:
    return {l: self.exp.hashing.offsets(l) for l in self.layer_ids}

  def host_layout(self) -> dict:
    """`HostTables` keyword arguments of this run: whole-table rows and the batch's sharding
    over the mesh."""
    return {"num_rows": {l: self.exp.hashing.num_rows(l) for l in self.layer_ids},
            "batch_sharding": sharding_lib.batch_sharding(self.mesh, self.rules, ndim=3)}

  def set_host(self, host: host_tables.HostTables) -> None:
    if host.layers != tuple(sorted(self.layer_ids)):
      raise ValueError(f"host tables for layers {host.layers}, model has {self.layer_ids}")
    if host.mesh != self.mesh:
      raise ValueError("host tables were made for another mesh than the trainer's")
    for l in host.layers:
      start, stop = host.blocks[l]
      want = (self.exp.hashing.num_rows(l), stop - start, self.exp.model.engram.head_dim)
      got = (host.num_rows(l),) + tuple(host.tables[l].shape)
      if got != want:
        raise ValueError(f"host table of layer {l}: {got[1]} x {got[2]} rows of {got[0]} in "
                         f"this process, the config's hashing needs rows [{start}, {stop}) "
                         f"of {want[0]}, width {want[2]}")
    self.host = host

  def host_ids(self, batch: dict) -> dict:
    """The pipeline's NumPy hash ids {layer: [B, T, H]} (what `host` deduplicates)."""
    if "engram_ids" not in batch:
      raise ValueError("batch has no 'engram_ids': engram.placement='pinned_host' needs the "
                       "pipeline's hash ids (engram.hash_on_device=False)")
    return {int(l): np.asarray(v) for l, v in batch["engram_ids"].items()}

  def train_step(self, state: TrainState, batch: dict, rows: dict):
    """(state, metrics, {layer: clipped f32 [U, E] row gradient}); `rows` from `host`."""
    return self._step_on_rows(state, batch, None, rows)

  def eval_step(self, state: TrainState, batch: dict, rows: dict) -> dict:
    return self._eval_on(state, batch, rows)

  # `Trainer.compile` with steps of (state, batch without engram_ids, rows) and a train step
  # that also returns the row gradients.
  _extra_train_outputs = 1

  def _step_batch_shapes(self, batch_shapes: dict) -> dict:
    return without_engram_ids(batch_shapes)

  def _extra_step_args(self, batch_shapes: dict) -> tuple:
    # Rows arrive as `HostTables.rows` gives them: on every device, the inverse batch-sharded.
    rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    inv = self.host_layout()["batch_sharding"]
    b, t = batch_shapes["inputs"].shape
    h = self.exp.model.engram.num_heads
    u = b * t * h
    return ({l: PrefetchedRows(
        jax.ShapeDtypeStruct((u, self.exp.model.engram.head_dim), self._row_dtype[l],
                             sharding=rep),
        jax.ShapeDtypeStruct((b, t, h), jnp.int32, sharding=inv),
        jax.ShapeDtypeStruct((u,), jnp.int32, sharding=rep)) for l in self.layer_ids},)


class _Contexts:
  """`with mesh, logical rules:` as one context manager (both are needed while tracing)."""

  def __init__(self, mesh, rules):
    self._mesh, self._rules = mesh, rules

  def __enter__(self):
    self._m = jax.set_mesh(self._mesh)
    self._m.__enter__()
    self._r = nn.logical_axis_rules(self._rules)
    self._r.__enter__()

  def __exit__(self, *exc):
    self._r.__exit__(*exc)
    self._m.__exit__(*exc)


def _values(grad):
  return grad.values_UxE if isinstance(grad, RowSparse) else grad


def _with_values(grad, values):
  return grad._replace(values_UxE=values) if isinstance(grad, RowSparse) else values


def _gate_stats(intermediates, mask_BxT) -> dict:
  """Mean/std of every Engram layer's gate alpha [B, T, M] over non-padding tokens."""
  gates = [x for path, x in jax.tree_util.tree_flatten_with_path(intermediates)[0]
           if any(getattr(k, "key", None) == "gate" for k in path)]
  if not gates:
    return {}
  w = jnp.broadcast_to(mask_BxT[..., None], gates[0].shape).astype(jnp.float32)
  g = jnp.stack([x.astype(jnp.float32) for x in gates])
  n = jnp.maximum(jnp.sum(w) * len(gates), 1.0)
  mean = jnp.sum(g * w) / n
  var = jnp.sum(jnp.square(g - mean) * w) / n
  return {"gate/mean": mean, "gate/std": jnp.sqrt(var)}
