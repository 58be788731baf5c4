"""The NaN stop of the training loop: a non-finite loss or gradient norm stops the run
(`check_finite`), and a state holding NaN or Inf is never saved (`refuse_nonfinite_save`: one
fused reduction over the device state, a chunked scan of every process's host-table block), so
the latest checkpoint is always a finite one; the error names it.

Dimension legend: none.
"""

from __future__ import annotations

import jax
import numpy as np

from engram_jax import checkpoint as checkpoint_lib
from engram_jax.train_step import HostPlacementTrainer, Trainer, TrainState


class TrainingDivergedError(FloatingPointError):
  """The loss or gradient norm became NaN/Inf."""



def _last_good(ckpt: checkpoint_lib.Checkpointer) -> str:
  """Where a rerun resumes: every saved state was checked finite before it was written."""
  ckpt.wait()
  latest = ckpt.latest_step()
  return (f"the last good checkpoint is step {latest} in {ckpt.directory} (its state was "
          "checked finite before saving; a rerun resumes from it)" if latest is not None
          else "no checkpoint was written")


_ADVICE = ("Lower optim.learning_rate or table_optim.lr_multiplier, or raise "
           "optim.warmup_steps.")


def check_finite(step: int, m: dict, ckpt: checkpoint_lib.Checkpointer):
  loss, gnorm = float(m["loss"]), float(m["grad_norm"])
  if np.isfinite(loss) and np.isfinite(gnorm):
    return
  raise TrainingDivergedError(
      f"non-finite {'loss' if not np.isfinite(loss) else 'gradient norm'} at step {step} "
      f"(loss={loss}, grad_norm={gnorm}); stopping. {_last_good(ckpt)}. {_ADVICE}")


def nonfinite_state(trainer: Trainer, state: TrainState) -> list[str]:
  """Leaves of the state (params, optimiser, tables, their state; host tables too) holding
  NaN or Inf: one fused reduction on device, plus a chunked host scan for pinned_host tables."""
  bad = checkpoint_lib.nonfinite_leaves(
      {"params": state.params, "opt_state": state.opt_state, "model_state": state.model_state,
       "tables": state.tables, "table_opt": state.table_opt})
  if isinstance(trainer, HostPlacementTrainer):
    bad += nonfinite_host_blocks(trainer, with_state=True)
  return bad


def nonfinite_host_blocks(trainer: HostPlacementTrainer, with_state: bool) -> list[str]:
  """Host arrays holding NaN or Inf in any process's block (every process learns of every
  block, so that all of them stop together)."""
  host = trainer.host
  arrays = {f"host table {l}": host.tables[l] for l in host.layers}
  for l in host.layers if with_state else ():
    arrays.update({f"host table {l} {k}": v for k, v in host.states[l]._asdict().items()})
  bad = checkpoint_lib.nonfinite_host_arrays(arrays)
  if jax.process_count() == 1:
    return bad
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  counts = multihost_utils.process_allgather(np.int32(len(bad)))
  return bad + [f"the host table block of process {p}" for p, n in enumerate(counts)
                if n and p != jax.process_index()]


def refuse_nonfinite_save(trainer: Trainer, state: TrainState, step: int,
                           ckpt: checkpoint_lib.Checkpointer) -> None:
  """Raises TrainingDivergedError instead of saving a state that holds NaN or Inf (the loss
  and gradient norm of step `step` are computed before its update, so they can be finite)."""
  bad = nonfinite_state(trainer, state)
  if bad:
    raise TrainingDivergedError(
        f"non-finite train state after step {step} ({', '.join(bad)}); not saving it, "
        f"stopping. {_last_good(ckpt)}. {_ADVICE}")
