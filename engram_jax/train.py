"""Training loop: `train_and_evaluate(config, workdir) -> final metrics`.

One jitted step (explicit in/out shardings on a `jax.sharding.Mesh`, donated state):

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

The loop reads step t-1's metrics after dispatching step t (no host sync per step), stops on a
non-finite loss or gradient norm (the last checkpoint, written only after its own metrics were
checked finite, stays the latest), logs every `log_every` steps (stdout + workdir/metrics.jsonl),
evaluates every `eval_every` steps and at the end, and checkpoints every `checkpoint_every`
steps (resuming automatically from workdir).

Both table modes start from identical values: the state is always initialised with tables as
params, and the sparse mode moves them out of the param tree.

Dimension legend: B batch, T sequence length, V vocabulary, H hash heads, U unique-row slots
(= B*T*H), E table row width, R table rows, M residual streams.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from engram_jax import checkpoint as checkpoint_lib
from engram_jax import data as data_lib
from engram_jax import evaluate as evaluate_lib
from engram_jax import experiment_config
from engram_jax import optim
from engram_jax import sharding as sharding_lib
from engram_jax import table_optim
from engram_jax.model import EngramLM
from pallas_kernels.engram_lookup.row_sparse import PrefetchedRows, RowSparse, prefetch_rows

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix. CPU has no meaningful peak: the
# nominal 1e12 only keeps the MFU column defined (CPU MFU numbers are not comparable).
PEAK_FLOPS = (
    ("NVIDIA H200", 989e12), ("NVIDIA H100", 989e12), ("NVIDIA A100", 312e12),
    ("NVIDIA L4", 121e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v6", 918e12), ("cpu", 1e12),
)


class TrainingDivergedError(FloatingPointError):
  """The loss or gradient norm became NaN/Inf."""


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


def peak_flops_per_device(device: jax.Device) -> float:
  kind = getattr(device, "device_kind", "") or device.platform
  for prefix, flops in PEAK_FLOPS:
    if kind.lower().startswith(prefix.lower()) or device.platform == prefix:
      return flops
  return 0.0


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
    shardings = _logical_to_sharding(abstract_boxed, self.mesh, self.rules)
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
    self._dummy_shapes = {k: v for k, v in batch_shapes.items() if k != "engram_ids"}
    self._rng = jax.random.PRNGKey(seed)
    with self._context():
      abstract_boxed = jax.eval_shape(self._boxed_init, self._rng, self._dummy())
    self.state_shardings = self._shardings(abstract_boxed)
    self.tx = self._make_tx(nn.unbox(abstract_boxed.params))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.unbox(abstract_boxed), self.state_shardings)

  def _dummy(self):
    return {k: jnp.zeros(v.shape, v.dtype) for k, v in self._dummy_shapes.items()}

  def init_state(self) -> TrainState:
    """The initial state, created directly in its shardings (call `prepare` first)."""
    with self._context():
      init = jax.jit(lambda r, d: nn.unbox(self._boxed_init(r, d)),
                     out_shardings=self.state_shardings)
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
      stats["moe_aux_loss"] = aux["moe_aux_loss"]
    new_model_state = {k: mutated[k] for k in mutated if k != "intermediates"}
    return loss + aux["moe_aux_loss"], stats, new_model_state

  # ---- steps -------------------------------------------------------------------------------

  def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    ids = self.engram_ids(batch)
    prefetched = {}
    if self.exp.sparse_tables:
      prefetched = {l: prefetch_rows(state.tables[str(l)], ids[l], self.offsets[l])
                    for l in self.layer_ids}
    rows = {str(l): p.rows_UxE for l, p in prefetched.items()}

    def loss_fn(params, rows):
      if self.exp.sparse_tables:
        engram_inputs = {l: prefetched[l]._replace(rows_UxE=rows[str(l)]) for l in self.layer_ids}
      else:
        engram_inputs = ids
      loss, stats, model_state = self._forward(params, state.model_state, batch, engram_inputs,
                                               train=True)
      if self.nan_step:
        loss = loss * jnp.where(state.step + 1 >= self.nan_step, jnp.nan, 1.0)
      return loss, (stats, model_state)

    (loss, (stats, model_state)), (grads, row_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params, rows)
    keys = sorted(row_grads)
    grads, clipped_rows, grad_norm = optim.clip_by_global_norm(
        grads, [row_grads[k] for k in keys], self.exp.optim.grad_clip_norm)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    lr = self.schedule(state.step)
    tables, table_opt = dict(state.tables), dict(state.table_opt)
    for k, g_UxE in zip(keys, clipped_rows):
      grad = RowSparse(prefetched[int(k)].row_ids_U, g_UxE.astype(jnp.float32))
      tables[k], table_opt[k] = table_optim.apply_row_sparse_update(
          self.exp.table_optim, state.tables[k], state.table_opt[k], grad, lr, step=state.step)
    rng, _ = jax.random.split(state.rng)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              model_state=model_state or state.model_state, tables=tables,
                              table_opt=table_opt, rng=rng)
    metrics = dict(stats, loss=loss, grad_norm=grad_norm, learning_rate=lr)
    return new_state, metrics

  def eval_step(self, state: TrainState, batch: dict) -> dict:
    ids = self.engram_ids(batch)
    if self.exp.sparse_tables:
      ids = {l: prefetch_rows(state.tables[str(l)], ids[l], self.offsets[l])
             for l in self.layer_ids}
    _, stats, _ = self._forward(state.params, state.model_state, batch, ids, train=False)
    return {"loss_sum": stats["loss_sum"], "num_tokens": stats["num_tokens"]}

  def batch_shardings(self, batch_shapes: dict):
    def shard(x):
      return sharding_lib.batch_sharding(self.mesh, self.rules, ndim=len(x.shape))
    return jax.tree.map(shard, batch_shapes)

  def compile(self, abstract_state: TrainState, batch_shapes: dict, train: bool = True):
    """AOT-compiles the steps (so compile time is reported, and never paid mid-run).

    Returns (train_step or None, eval_step, batch shardings)."""
    batch_sh = self.batch_shardings(batch_shapes)
    abstract_batch = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  batch_shapes, batch_sh)
    train_c = None
    with self._context():
      if train:
        train_c = jax.jit(self.train_step, in_shardings=(self.state_shardings, batch_sh),
                          out_shardings=(self.state_shardings, None),
                          donate_argnums=(0,)).lower(abstract_state, abstract_batch).compile()
      eval_c = jax.jit(self.eval_step, in_shardings=(self.state_shardings, batch_sh)).lower(
          abstract_state, abstract_batch).compile()
    return train_c, eval_c, batch_sh


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


def _logical_to_sharding(tree, mesh, rules):
  """Like `sharding.logical_to_sharding`, but boxes around empty subtrees stay empty.

  optax's `multi_transform` replaces the other partition's leaves by `MaskedNode` *inside*
  their Partitioned boxes; such a box must map to the empty node, not to a sharding.
  """
  def spec(x):
    if isinstance(x, nn.Partitioned):
      return x.get_partition_spec() if jax.tree.leaves(x.value) else x.value
    return jax.sharding.PartitionSpec()
  specs = jax.tree.map(spec, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s),
                      nn.logical_to_mesh(specs, rules),
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


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


# ---- the run ------------------------------------------------------------------------------


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """A data-parallel mesh over `train.data_parallel` devices (-1 = all)."""
  devices = jax.devices()
  n = len(devices) if config.train.data_parallel == -1 else config.train.data_parallel
  if n > len(devices):
    raise ValueError(f"config.train.data_parallel={n} but only {len(devices)} devices exist")
  return sharding_lib.make_mesh({"data": n}, devices[:n])


def batch_shapes(exp: experiment_config.Experiment, config, hash_on_device: bool) -> dict:
  """Global shapes of one batch (the DESIGN.md batch contract)."""
  b, t = config.data.batch_size, config.data.seq_len
  shapes = {k: jax.ShapeDtypeStruct((b, t), jnp.int32)
            for k in ("inputs", "targets", "segment_ids", "positions")}
  shapes["weights"] = jax.ShapeDtypeStruct((b, t), jnp.float32)
  if exp.model.engram is not None and not hash_on_device:
    h = exp.model.engram.num_heads
    shapes["engram_ids"] = {l: jax.ShapeDtypeStruct((b, t, h), jnp.int32)
                            for l in exp.model.engram.layer_ids}
  return shapes


def engram_hash_fn(exp: experiment_config.Experiment, hash_on_device: bool):
  """The pipeline hook: raw ids -> compressed ids -> {layer_id: ids [B, T, H]} (or None)."""
  if exp.hashing is None or hash_on_device:
    return None
  reset = exp.model.engram.segment_reset

  def fn(inputs_BxT, segment_ids_BxT):
    return exp.hashing.hash_numpy(exp.compressor(inputs_BxT), segment_ids_BxT if reset else None)
  return fn


def _put_fn(shardings):
  def put(batch):
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)),
                        batch, shardings)
  return put


def _per_process_batch(config) -> int:
  if config.data.batch_size % jax.process_count():
    raise ValueError(f"data.batch_size={config.data.batch_size} must be divisible by the "
                     f"number of processes ({jax.process_count()})")
  return config.data.batch_size // jax.process_count()


def model_summary(exp: experiment_config.Experiment, seq_len: int) -> dict:
  """Parameter counts and training FLOPs per token (engram_jax.params)."""
  from engram_jax import params as params_lib  # pylint: disable=g-import-not-at-top
  counts = params_lib.count_params(exp.model)
  out = {k: v for k, v in dict(counts).items()
         if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}
  out["flops_per_token"] = float(params_lib.flops_per_token(exp.model, seq_len))
  return out


class _MetricsLog:
  """Interval means of the step metrics; one stdout line and one JSONL record per interval."""

  def __init__(self, path: str, tokens_per_step: int, flops_per_token: float, peak: float):
    self._file = open(path, "a")
    self._tokens_per_step, self._flops, self._peak = tokens_per_step, flops_per_token, peak
    self.reset_timer()
    self._sums: dict = {}
    self._n = 0
    self.last: dict = {}

  def reset_timer(self):
    self._t0, self._steps_in_timer = time.perf_counter(), 0

  def add(self, step: int, m: dict):
    for k, v in m.items():
      self._sums[k] = self._sums.get(k, 0.0) + float(v)
    self._n += 1
    self._steps_in_timer += 1

  def write(self, record: dict):
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def emit(self, step: int, num_steps: int):
    if not self._n:
      return
    means = {k: v / self._n for k, v in self._sums.items()}
    dt = max(time.perf_counter() - self._t0, 1e-9)
    tok_s = self._tokens_per_step * self._steps_in_timer / dt
    mfu = self._flops * tok_s / self._peak if self._peak else float("nan")
    rec = {"step": step, "split": "train", "loss": means["loss"], "xent": means["xent"],
           "tokens_per_s": tok_s, "mfu": mfu, "time": time.time()}
    rec.update({k: v for k, v in means.items()
                if k not in ("loss", "xent", "loss_sum", "num_tokens")})
    self.write(rec)
    parts = [f"step {step}/{num_steps}", f"loss {rec['loss']:.4f}",
             f"{tok_s / 1e3:.1f}k tok/s", f"MFU {100 * mfu:.2f}%",
             f"lr {rec['learning_rate']:.2e}", f"gnorm {rec['grad_norm']:.3f}"]
    if "gate/mean" in rec:
      parts.append(f"gate {rec['gate/mean']:.3f}±{rec['gate/std']:.3f}")
    if "router/max_over_mean_load" in rec:
      parts.append(f"load max/mean {rec['router/max_over_mean_load']:.2f} "
                   f"(worst {rec['router/max_over_mean_load_worst']:.2f})")
    log(" | ".join(parts))
    self.last = rec
    self._sums, self._n = {}, 0
    self.reset_timer()

  def close(self):
    self._file.close()


def _check_finite(step: int, m: dict, ckpt: checkpoint_lib.Checkpointer):
  loss, gnorm = float(m["loss"]), float(m["grad_norm"])
  if np.isfinite(loss) and np.isfinite(gnorm):
    return
  ckpt.wait()
  latest = ckpt.latest_step()
  where = (f"the last good checkpoint is step {latest} in {ckpt.directory} (a rerun resumes "
           "from it)" if latest is not None else "no checkpoint was written")
  raise TrainingDivergedError(
      f"non-finite {'loss' if not np.isfinite(loss) else 'gradient norm'} at step {step} "
      f"(loss={loss}, grad_norm={gnorm}); stopping. {where}. Lower optim.learning_rate or "
      "table_optim.lr_multiplier, or raise optim.warmup_steps.")


def setup(config: ml_collections.ConfigDict, *, check_data: bool = True):
  """(experiment, trainer, abstract state) for a config; nothing is allocated on device."""
  exp = experiment_config.resolve(config, check_data=check_data)
  trainer = Trainer(config, exp, make_mesh(config))
  shapes = batch_shapes(exp, config, trainer.hash_on_device)
  abstract = trainer.prepare(config.seed, shapes)
  trainer.shapes = shapes
  return exp, trainer, abstract


def _eval_batches(trainer: Trainer, files, config):
  corpus = data_lib.TokenizedCorpus(list(files), trainer.exp.tokenizer_path)
  return iter(data_lib.make_dataset(
      corpus, seq_len=config.data.seq_len, batch_size=_per_process_batch(config), train=False,
      process_index=jax.process_index(), process_count=jax.process_count(),
      engram_hash_fn=engram_hash_fn(trainer.exp, trainer.hash_on_device)))


def restore_for_eval(config: ml_collections.ConfigDict, workdir: str):
  """Trainer + latest checkpointed state of `workdir` (for experiments/eval.py)."""
  exp, trainer, abstract = setup(config, check_data=False)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     fingerprint=exp.fingerprint(), save_every=1, keep=1000)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
  log(f"restoring step {step} from {ckpt.directory}")
  state = ckpt.restore(step, abstract)
  ckpt.close()
  log("compiling eval step ...")
  _, eval_c, batch_sh = trainer.compile(abstract, trainer.shapes, train=False)
  trainer.eval_fn = (eval_c, _put_fn(batch_sh))
  trainer.eval_batches = lambda files: _eval_batches(trainer, files, config)
  return trainer, state, step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from `workdir` if it holds checkpoints) and evaluates; returns final
  metrics: train loss of the last interval, eval loss/perplexity, steps, wall time, params."""
  t_start = time.perf_counter()
  os.makedirs(workdir, exist_ok=True)
  exp, trainer, abstract = setup(config)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  summary = model_summary(exp, config.data.seq_len)
  table_mode = "none"
  if exp.table_optim is not None:
    summary["table_bytes_per_param"] = table_optim.bytes_per_table_param(
        exp.table_optim, exp.model.param_dtype, row_width=exp.model.engram.head_dim)
    table_mode = (f"{exp.table_optim.kind} ({summary['table_bytes_per_param']:.2f} bytes/param "
                  f"incl. optimiser state)")
  log(f"{config.name}: {summary} | tables: {table_mode} | mesh {dict(trainer.mesh.shape)} | "
      f"devices {jax.devices()[0].device_kind} x{trainer.mesh.size}")

  per_process_b = _per_process_batch(config)
  log(f"loading data: {len(exp.train_files)} train / {len(exp.eval_files)} eval file(s) ...")
  train_iter, eval_iter_fn = data_lib.make_datasets(
      list(exp.train_files), list(exp.eval_files), tokenizer_path=exp.tokenizer_path,
      seq_len=config.data.seq_len, batch_size=per_process_b, seed=config.data.shuffle_seed,
      engram_hash_fn=engram_hash_fn(exp, trainer.hash_on_device))

  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), fingerprint=exp.fingerprint(),
      save_every=config.train.checkpoint_every, keep=config.train.keep_checkpoints,
      async_save=config.train.async_checkpoint)
  latest = ckpt.latest_step()
  if latest is not None:
    log(f"resuming from checkpoint step {latest} in {ckpt.directory} ...")
    state = ckpt.restore(latest, abstract, train_iter)
  else:
    state = trainer.init_state()

  log("compiling train and eval steps ...")
  t0 = time.perf_counter()
  train_c, eval_c, batch_sh = trainer.compile(abstract, trainer.shapes)
  log(f"compiled in {time.perf_counter() - t0:.1f}s")
  put = _put_fn(batch_sh)

  num_steps = config.train.num_steps
  peak = (config.train.peak_flops or peak_flops_per_device(jax.devices()[0])) * trainer.mesh.size
  mlog = _MetricsLog(os.path.join(workdir, "metrics.jsonl"),
                     config.data.batch_size * config.data.seq_len, summary["flops_per_token"],
                     peak)

  def run_eval(step):
    log(f"evaluating at step {step} ...")
    m = evaluate_lib.evaluate(eval_c, state, eval_iter_fn(), put, config.train.num_eval_batches)
    log(f"eval step {step}: loss {m['eval_loss']:.4f} | ppl {m['eval_perplexity']:.2f} | "
        f"{m['eval_tokens']} tokens in {m['eval_seconds']:.1f}s")
    mlog.write({"step": step, "split": "eval", **m, "time": time.time()})
    mlog.reset_timer()
    return m

  start = int(jax.device_get(state.step))
  pending = None
  eval_metrics: dict = {}
  try:
    for step in range(start + 1, num_steps + 1):
      batch = next(train_iter)
      state, metrics = train_c(state, put(batch))
      if pending is not None:  # step t-1's metrics, read while step t runs
        _check_finite(*pending, ckpt)
        mlog.add(*pending)
        if pending[0] % config.train.log_every == 0:
          mlog.emit(pending[0], num_steps)
      pending = (step, metrics)
      save = step % config.train.checkpoint_every == 0 or step == num_steps
      do_eval = config.train.eval_every and step % config.train.eval_every == 0
      if save or do_eval or step == num_steps:
        pending = (step, jax.device_get(metrics))
        _check_finite(*pending, ckpt)  # never checkpoint a diverged state
        mlog.add(*pending)
        if step % config.train.log_every == 0 or step == num_steps:
          mlog.emit(step, num_steps)
        pending = None
      if save:
        log(f"saving checkpoint step {step} ...")
        ckpt.save(step, state, train_iter, force=True)
        mlog.reset_timer()
      if do_eval and step != num_steps:
        run_eval(step)
    if pending is not None:
      _check_finite(*pending, ckpt)
      mlog.add(*pending)
      mlog.emit(pending[0], num_steps)
    eval_metrics = run_eval(num_steps)
  finally:
    ckpt.close()
    mlog.close()

  final = {"steps": num_steps, "train_loss": mlog.last.get("loss", float("nan")),
           **eval_metrics, "wall_seconds": time.perf_counter() - t_start, **summary}
  with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
    json.dump(final, f, indent=2)
  log(f"done: {json.dumps({k: final[k] for k in ('steps', 'train_loss', 'eval_loss')})}")
  return final
