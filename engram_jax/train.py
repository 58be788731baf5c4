"""Training loop: `train_and_evaluate(config, workdir) -> final metrics`.

The step itself (state, shardings, dense / row-sparse table updates) is in
engram_jax/train_step.py. This loop reads step t-1's metrics after dispatching step t (no host
sync per step), stops on a non-finite loss or gradient norm, and never saves a state holding
NaN or Inf (engram_jax/divergence.py, checked right before each save: the loss and gradient
norm of a step are computed before its update), so the latest checkpoint is always a finite
one. It logs every `log_every` steps (`workdir.MetricsLog`: stdout + workdir/metrics.jsonl:
loss, tokens/s, MFU, learning rate, gradient norm, Engram gate mean/std, router max/mean load,
and under 'capacity' MoE dispatch the share of dropped pairs), evaluates every `eval_every`
steps and at the end, and checkpoints every `checkpoint_every` steps, resuming automatically
from `workdir`: from its newest intact checkpoint (engram_jax/checkpoint.py checksums;
`train.restore_step` picks one), under the workdir's lock and only after the resume checks
(integrity, hash fingerprint, config changes: engram_jax/workdir.py) passed; nothing in the
workdir changes before. MFU = tokens/s x
`engram_jax.param_count.flops_per_token(...)['total']` / (peak FLOP/s x devices).

The device mesh is `train.mesh` (`make_mesh`; default every device on 'fsdp'): dense
parameters and optimiser state follow the logical rules of engram_jax/sharding.py, the batch is
split over data x fsdp x expert, and with a row-sparse table optimiser on more than one device
the tables are row-sharded (`ShardedTablesTrainer`, engram_jax/sharded_train_step.py; a
non-zero `engram/overflow` metric stops the run). Process 0 writes `workdir/run_summary.json`
(mesh, job size, parameter counts, bytes per device of dense parameters, tables and table
state) before training, and the metrics files; every process reads its own data shard and
writes its part of each checkpoint.

With `engram.placement='pinned_host'` (`HostPlacementTrainer`) the tables stay in host memory,
each process keeping a contiguous block of the rows of every table (`host_tables.row_block`),
and a step is driven by `_HostTableSteps`: one device program per step (over the whole mesh,
the dense parameters and the batch sharded as with device tables) runs step s on its
prefetched rows and updates those rows, while NumPy worker threads gather step s+1's rows from
the host blocks and write step s-1's update into them (`host_tables.HostTables.make_step`).
Every process checkpoints its block next to the orbax checkpoint (`workdir/host_tables/<step>/`,
engram_jax/host_checkpoint.py), and logs which rows it keeps.

Dimension legend: B batch, T sequence length, H Engram hash heads.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from engram_jax import checkpoint as checkpoint_lib
from engram_jax import data as data_lib
from engram_jax import distributed
from engram_jax.divergence import (TrainingDivergedError, check_finite,  # noqa: F401
                                   nonfinite_host_blocks, refuse_nonfinite_save)
from engram_jax import evaluate as evaluate_lib
from engram_jax import experiment_config
from engram_jax import host_checkpoint
from engram_jax import sharded_train_step
from engram_jax import sharding as sharding_lib
from engram_jax import table_optim
from engram_jax import workdir as workdir_lib
from engram_jax.train_step import HostPlacementTrainer, TrainState, Trainer  # noqa: F401
from engram_jax.sharded_train_step import ShardedTablesTrainer
from engram_jax.run_summary import model_summary, run_summary
from engram_jax.train_step import without_engram_ids as _without_ids

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix. CPU has no meaningful peak: the
# nominal 1e12 only keeps the MFU column defined (CPU MFU numbers are not comparable).
PEAK_FLOPS = (
    ("NVIDIA H200", 989e12), ("NVIDIA H100", 989e12), ("NVIDIA A100", 312e12),
    ("NVIDIA L4", 121e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v6", 918e12), ("cpu", 1e12),
)


def peak_flops_per_device(device: jax.Device) -> float:
  kind = getattr(device, "device_kind", "") or device.platform
  for prefix, flops in PEAK_FLOPS:
    if kind.lower().startswith(prefix.lower()) or device.platform == prefix:
      return flops
  return 0.0


# ---- the run ------------------------------------------------------------------------------


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The device mesh of `train.mesh` (axis sizes, one may be -1 = the devices the rest leave).

  Fewer devices than exist are taken from the front (one process only: a multi-process mesh
  must span every process's devices). The global batch must split evenly over the batch axes.
  """
  sizes = experiment_config.mesh_axis_sizes(config)
  devices = jax.devices()
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if -1 in sizes.values():
    if len(devices) % known:
      raise ValueError(f"config.train.mesh={sizes}: the {len(devices)} devices are not "
                       f"divisible by the product of the other axes ({known})")
  elif known > len(devices):
    raise ValueError(f"config.train.mesh={sizes} needs {known} devices, only {len(devices)} "
                     "exist")
  elif known < len(devices):
    if jax.process_count() > 1:
      raise ValueError(f"config.train.mesh={sizes} uses {known} of the {len(devices)} devices "
                       f"of a {jax.process_count()}-process job; the mesh must span every "
                       "device (set one train.mesh field to -1)")
    devices = devices[:known]
  mesh = sharding_lib.make_mesh(sizes, devices)
  split = int(np.prod([mesh.shape[a] for a in sharding_lib.batch_axes(mesh)]))
  if config.data.batch_size % split:
    raise ValueError(f"data.batch_size={config.data.batch_size} must be divisible by the "
                     f"{split} batch shards of train.mesh={dict(mesh.shape)} (data x fsdp x "
                     "expert)")
  return mesh


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




def _resume_step(ckpt: checkpoint_lib.Checkpointer, config, workdir: str):
  """(step to resume from or None, {reason: steps to set aside}, config changes); reads only.

  The newest intact checkpoint, or `train.restore_step`; the config is compared with the
  workdir's and refused on computation-changing differences (workdir_lib.check_resume_config)
  unless `train.allow_config_change`.
  """
  requested = int(config.train.restore_step)
  step, damaged = ckpt.select_step(requested)
  aside = {}
  if damaged:
    aside["damaged"] = [s for s, _ in damaged]
    workdir_lib.warn(
        f"checkpoint step {damaged[0][0]} is damaged, resuming from step {step} instead: "
        + " | ".join(reason for _, reason in damaged))
  if step is None:
    return None, aside, {}
  newer = [s for s in ckpt.all_steps() if s > step and s not in aside.get("damaged", [])]
  if newer:
    aside["after_restore_step"] = newer
  # The hash fingerprint first: a hash change is named as such (and is never allowed).
  checkpoint_lib.check_fingerprint(ckpt.read_fingerprint(step), ckpt.fingerprint,
                                   f"checkpoint step {step} in {ckpt.directory}")
  allow = bool(config.train.allow_config_change)
  changes = workdir_lib.check_resume_config(workdir, config, step, allow=allow)
  return step, aside, changes


def _record_start(ckpt: checkpoint_lib.Checkpointer, config, workdir: str,
                  resumed_from: Optional[int], aside: dict, changes: dict) -> None:
  """After the resume checks passed: steps set aside, the config recorded, a restart marker
  (by process 0; the others then re-read the checkpoint directory)."""
  if jax.process_index() != 0:
    _sync_processes("engram_jax.train._record_start")
    ckpt.reload()
    return
  moved = {}
  for reason, steps in aside.items():
    for step, dest in zip(sorted(steps), ckpt.set_aside(steps, reason)):
      moved[step] = dest
      log(f"checkpoint step {step} moved to {dest} ({reason.replace('_', ' ')})")
  if changes:
    refused = workdir_lib.refused_changes(changes)
    log(f"resuming with a changed config{' (train.allow_config_change)' if refused else ''}: "
        f"{workdir_lib.format_changes(changes)}")
  record = workdir_lib.record_config(workdir, config)
  workdir_lib.mark_start(
      os.path.join(workdir, "metrics.jsonl"), 0 if resumed_from is None else resumed_from,
      resumed_from=resumed_from, config_record=record,
      set_aside={str(k): v for k, v in moved.items()},
      config_changes=sorted(changes))
  _sync_processes("engram_jax.train._record_start")


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def trainer_class(exp: experiment_config.Experiment, mesh: jax.sharding.Mesh) -> type:
  """Host tables, row-sharded tables (row-sparse optimisers on > 1 device), or `Trainer`."""
  if exp.table_placement == "pinned_host":
    return HostPlacementTrainer
  if exp.sparse_tables and mesh.size > 1:
    return ShardedTablesTrainer
  return Trainer


def setup(config: ml_collections.ConfigDict, *, check_data: bool = True):
  """(experiment, trainer, abstract state) for a config; nothing is allocated on device."""
  exp = experiment_config.resolve(config, check_data=check_data)
  mesh = make_mesh(config)
  trainer = trainer_class(exp, mesh)(config, exp, mesh)
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


def restore_latest(config: ml_collections.ConfigDict, workdir: str, step: int = 0):
  """(trainer, abstract state, checkpointed state, its step) of a training workdir: checkpoint
  `step`, or for 0 the newest intact one; refused (NonFiniteStateError) if it holds NaN or Inf.
  Nothing is compiled (experiments/eval.py, engram_jax/generate.py)."""
  exp, trainer, abstract = setup(config, check_data=False)
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     fingerprint=exp.fingerprint(), save_every=1, keep=1000,
                                     extra_roots=[_host_tables_root(workdir)])
  step, damaged = ckpt.select_step(step)
  if step is None:
    ckpt.close()
    raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: "
                            "has the run saved one (train.checkpoint_every)?")
  if damaged:
    workdir_lib.warn(f"checkpoint step {damaged[0][0]} is damaged, using step {step} instead: "
                     + " | ".join(reason for _, reason in damaged))
  log(f"restoring step {step} from {ckpt.directory}")
  state = _restore(trainer, ckpt, workdir, step, abstract)
  ckpt.close()
  bad = checkpoint_lib.nonfinite_leaves(
      {"params": state.params, "model_state": state.model_state, "tables": state.tables})
  if isinstance(trainer, HostPlacementTrainer):
    bad += nonfinite_host_blocks(trainer, with_state=False)
  if bad:
    raise checkpoint_lib.NonFiniteStateError(
        f"checkpoint step {step} in {ckpt.directory} holds non-finite parameters "
        f"({', '.join(bad)}); refusing to use it")
  return trainer, abstract, state, step


def restore_for_eval(config: ml_collections.ConfigDict, workdir: str, step: int = 0):
  """Trainer + checkpointed state of `workdir` (for experiments/eval.py), as restore_latest."""
  trainer, abstract, state, step = restore_latest(config, workdir, step)
  log("compiling eval step ...")
  _, eval_c, batch_sh = trainer.compile(abstract, trainer.shapes, train=False)
  trainer.eval_fn = _eval_fns(trainer, eval_c, batch_sh)
  trainer.eval_batches = lambda files: _eval_batches(trainer, files, config)
  return trainer, state, step


def evaluate_workdir(workdir: str, files: Sequence[str], *, batch_size: Optional[int] = None,
                     num_batches: int = 0) -> dict:
  """Evaluates the latest checkpoint of a training workdir on `files` (experiments/eval.py)."""
  files = [files] if isinstance(files, str) else list(files)
  if not files:
    raise ValueError("evaluate_workdir: no data files given")
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    raise FileNotFoundError(f"data file(s) not found: {missing}")
  config = evaluate_lib.load_workdir_config(workdir)
  if batch_size:
    config.data.batch_size = int(batch_size)
  config.data.eval_files = tuple(files)
  trainer, state, step = restore_for_eval(config, workdir)
  eval_step, put = trainer.eval_fn
  metrics = evaluate_lib.evaluate(eval_step, state, trainer.eval_batches(files), put, num_batches)
  metrics["step"] = step
  return metrics


def _host_tables_root(workdir: str) -> str:
  return os.path.join(workdir, "host_tables")


def _restore(trainer: Trainer, ckpt: checkpoint_lib.Checkpointer, workdir: str, step: int,
             abstract: TrainState, data_iterator=None) -> TrainState:
  """The state of checkpoint `step`, and for host placement its host tables into `trainer.host`.

  A checkpoint of the other placement is refused before anything is read: a pinned_host
  checkpoint's orbax state holds no tables, a device one has no host_tables directory.
  """
  root = _host_tables_root(workdir)
  if isinstance(trainer, HostPlacementTrainer):
    host_checkpoint.require_host_tables(root, step)
  elif host_checkpoint.has_host_tables(root, step):
    raise ValueError(f"checkpoint step {step} in {workdir} was trained with "
                     "engram.placement='pinned_host' (its tables are in "
                     f"{host_checkpoint.host_tables_directory(root, step)}, not in the orbax "
                     "state); set engram.placement='pinned_host' to resume or evaluate it")
  state = ckpt.restore(step, abstract, data_iterator)  # checks the hash fingerprint first
  if isinstance(trainer, HostPlacementTrainer):
    trainer.set_host(host_checkpoint.restore_host_tables(
        root, step, trainer.exp.table_optim, trainer.host_offsets(), **trainer.host_layout()))
  return state


def _eval_fns(trainer: Trainer, eval_c, batch_sh):
  """(eval_step(state, batch), put_batch) for `evaluate_lib.evaluate`, in either placement."""
  put = _put_fn(batch_sh)
  if not isinstance(trainer, HostPlacementTrainer):
    return eval_c, put

  def eval_step(state, batch):
    # Read right away (before the next step): the handle is not patched by updates.
    handle = trainer.host.prefetch(trainer.host_ids(batch), for_update=False)
    return eval_c(state, put(_without_ids(batch)), trainer.host.rows(handle))
  return eval_step, lambda batch: batch  # the eval step puts the batch itself


class _DeviceSteps:
  """One training step with the tables in the train state: one compiled program."""

  def __init__(self, train_c, put, batches):
    self._train_c, self._put, self._batches = train_c, put, batches

  def __call__(self, state, step: int, lookahead: bool):
    del step, lookahead
    return self._train_c(state, self._put(next(self._batches)))


class _HostTableSteps:
  """One training step with host tables: draw batch s+1, then one program runs step s and
  updates the rows of s while NumPy threads gather the rows of s+1 (after writing s-1's update)
  and then write s's (`HostTables.make_step`).

  Step s+1's ids are deduplicated while step s runs, and step s+1's program patches its rows
  with step s's update. Without `lookahead` (checkpoint steps, the last step) the next batch is
  not drawn, so the data iterator saved with step s stands exactly after batch s.
  """

  def __init__(self, trainer: HostPlacementTrainer, put, batches):
    self._trainer, self._put, self._batches = trainer, put, batches
    self._ahead = None  # (batch without ids, PrefetchHandle) of the next step

    def model_step(state, batch, rows):
      state, metrics, row_grads = trainer.train_step(state, batch, rows)
      return (state, metrics), row_grads, metrics["learning_rate"]
    # Metrics replicated: every process reads them.
    replicated = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec())
    self._run = trainer.host.make_step(model_step, donate_state=True,
                                       out_shardings=(trainer.state_shardings, replicated))

  def __call__(self, state, step: int, lookahead: bool):
    if self._ahead is None:
      batch = next(self._batches)
      self._ahead = (_without_ids(batch),
                     self._trainer.host.prefetch(self._trainer.host_ids(batch)))
    batch, handle = self._ahead
    self._ahead = None
    nxt = next(self._batches) if lookahead else None
    with self._trainer._context():  # the model traces under the mesh and logical rules
      # `step - 1` updates were applied before this one (what the device path passes).
      (state, metrics), nxt_handle = self._run(
          handle, None if nxt is None else self._trainer.host_ids(nxt), state,
          self._put(batch), step=step - 1)
    if nxt is not None:
      self._ahead = (_without_ids(nxt), nxt_handle)
    return state, metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from `workdir` if it holds checkpoints) and evaluates; returns final
  metrics: train loss of the last interval, eval loss/perplexity, steps, wall time, params.

  The config is validated first (a refused config creates no workdir); then the workdir is
  locked for the run (engram_jax/workdir.py: a second trainer refuses), and nothing in it
  changes before the resume checks (checkpoint integrity, config changes) have passed.
  """
  t_start = time.perf_counter()
  # Before anything touches a device: joins the job that train.distributed or the ENGRAM_*
  # environment names (engram_jax/distributed.py), if any and not yet joined.
  distributed.initialize(config.train.distributed)
  if jax.process_count() > 1 and not config.train.num_eval_batches:
    raise ValueError("train.num_eval_batches=0 (the whole held-out set) is refused in a "
                     f"{jax.process_count()}-process job: the processes' data shards may hold "
                     "different numbers of batches, and every process must run the same "
                     "number of eval steps; set train.num_eval_batches > 0")
  built = setup(config)  # validates: a refused config creates no workdir
  lock = workdir_lib.WorkdirLock(workdir)
  if jax.process_index() == 0:
    lock.acquire()
  try:
    return _train_and_evaluate(config, workdir, built, t_start)
  finally:
    lock.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, built,
                        t_start: float) -> dict:
  exp, trainer, abstract = built
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
      async_save=config.train.async_checkpoint, extra_roots=[_host_tables_root(workdir)])
  on_host = isinstance(trainer, HostPlacementTrainer)
  latest, aside, changes = _resume_step(ckpt, config, workdir)
  if latest is not None:
    log(f"resuming from checkpoint step {latest} in {ckpt.directory} ...")
    state = _restore(trainer, ckpt, workdir, latest, abstract, train_iter)
  else:
    state = trainer.init_state()
  _record_start(ckpt, config, workdir, latest, aside, changes)
  if on_host:
    host = trainer.host
    log(f"host tables: process {host.process[0]} of {host.process[1]} keeps rows "
        + ", ".join(f"[{a}, {b}) of {host.num_rows(l)} (layer {l})"
                    for l, (a, b) in host.blocks.items())
        + f": {host.host_bytes()} bytes with the optimiser state")
  if jax.process_index() == 0:  # after the resume checks: nothing is written before them
    with open(os.path.join(workdir, "run_summary.json"), "w") as f:
      json.dump(run_summary(trainer, abstract, {k: v for k, v in summary.items()
                                                 if k != "table_bytes_per_param"}), f, indent=2)

  log("compiling train and eval steps ..." if not on_host else
      "compiling the eval step (the host-table train step compiles at its first call) ...")
  t0 = time.perf_counter()
  train_c, eval_c, batch_sh = trainer.compile(abstract, trainer.shapes, train=not on_host)
  log(f"compiled in {time.perf_counter() - t0:.1f}s")
  put = _put_fn(batch_sh)
  if on_host:
    run_step = _HostTableSteps(trainer, put, train_iter)
  else:
    run_step = _DeviceSteps(train_c, put, train_iter)
  eval_step, eval_put = _eval_fns(trainer, eval_c, batch_sh)

  num_steps = config.train.num_steps
  peak = (config.train.peak_flops or peak_flops_per_device(jax.devices()[0])) * trainer.mesh.size
  mlog = workdir_lib.MetricsLog(os.path.join(workdir, "metrics.jsonl"),
                                config.data.batch_size * config.data.seq_len,
                                summary["flops_per_token"], peak,
                                writer=jax.process_index() == 0, log=log)

  def run_eval(step):
    log(f"evaluating at step {step} ...")
    m = evaluate_lib.evaluate(eval_step, state, eval_iter_fn(), eval_put,
                              config.train.num_eval_batches)
    log(f"eval step {step}: loss {m['eval_loss']:.4f} | ppl {m['eval_perplexity']:.2f} | "
        f"{m['eval_tokens']} tokens in {m['eval_seconds']:.1f}s")
    mlog.write({"step": step, "split": "eval", **m, "time": time.time()})
    mlog.reset_timer()
    return m

  def record(step, metrics):
    check_finite(step, metrics, ckpt)
    sharded_train_step.check_overflow(step, metrics)
    mlog.add(step, metrics)
    if step % config.train.log_every == 0 or step == num_steps:
      mlog.emit(step, num_steps)

  start = int(jax.device_get(state.step))
  pending = None
  eval_metrics: dict = {}
  try:
    for step in range(start + 1, num_steps + 1):
      save = step % config.train.checkpoint_every == 0 or step == num_steps
      state, metrics = run_step(state, step, lookahead=not save)
      if pending is not None:  # step t-1's metrics, read while step t runs
        record(*pending)
      pending = (step, metrics)
      do_eval = config.train.eval_every and step % config.train.eval_every == 0
      if save or do_eval:  # the last step saves, so its metrics are always read here
        record(step, jax.device_get(metrics))  # never checkpoint a diverged state
        pending = None
      if save:
        refuse_nonfinite_save(trainer, state, step, ckpt)
        log(f"saving checkpoint step {step} ...")
        if on_host:  # before the orbax save: every orbax step has all its host blocks
          host_checkpoint.save_host_tables(_host_tables_root(workdir), step, trainer.host)
          _sync_processes(f"engram_jax.train.save_host_tables.{step}")
        ckpt.save(step, state, train_iter, force=True)
        if on_host and jax.process_index() == 0:
          host_checkpoint.prune_host_tables(_host_tables_root(workdir),
                                            ckpt.all_steps() + [step])
        mlog.reset_timer()
      if do_eval and step != num_steps:
        run_eval(step)
    eval_metrics = run_eval(num_steps)
  finally:
    ckpt.close()
    mlog.close()

  final = {"steps": num_steps, "train_loss": mlog.last.get("loss", float("nan")),
           **eval_metrics, "wall_seconds": time.perf_counter() - t_start, **summary}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump(final, f, indent=2)
  log(f"done: {json.dumps({k: final[k] for k in ('steps', 'train_loss', 'eval_loss')})}")
  return final
