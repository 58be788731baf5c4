"""Checkpoints: train state + data iterator + Engram hash fingerprint, saved together.

One orbax `CheckpointManager` per workdir (`workdir/checkpoints/<step>/`), with three items:
  state        the whole TrainState (params, optax state, sparse tables and their optimiser
               state, MoE router biases, RNG, step), restored into the caller's shardings;
  data         the grain iterator position (grain's own handler: one JSON per process);
  fingerprint  JSON: the n-gram hash mapping (multipliers, primes, pad id, vocabularies) and the
               compression-table digest. Restoring with any difference is refused before the
               state is read: the saved table rows would be addressed by different hash ids.

Host tables (`engram.placement='pinned_host'`) are not in the orbax state: they are written by
`save_host_tables` to `<workdir>/host_tables/<step>/` (offload.save_trainer: row chunks into
.npy memmaps, never a second full copy) *before* the orbax checkpoint of the same step, so every
orbax step has its tables; `restore_host_tables` refuses a step without them.

Saves are asynchronous (orbax copies arrays to host before `save` returns, so the donated
state may be overwritten by the next step); `wait()` joins the background write. A resumed
run continues from the latest step; together with the iterator state and the RNG in the train
state this reproduces the loss sequence of an uninterrupted run.

Dimension legend: none (no arrays are created here).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping, Optional

import grain
import orbax.checkpoint as ocp

from engram_jax import offload


class FingerprintMismatchError(ValueError):
  """The checkpoint was written with a different Engram hash or compression table."""


def _diff(saved: Any, current: Any, prefix: str = "") -> list[str]:
  """Human-readable leaf differences between two JSON values."""
  if isinstance(saved, Mapping) and isinstance(current, Mapping):
    out = []
    for k in sorted(set(saved) | set(current), key=str):
      out += _diff(saved.get(k, "<missing>"), current.get(k, "<missing>"), f"{prefix}{k}.")
    return out
  if saved != current:
    s, c = json.dumps(saved), json.dumps(current)
    short = lambda x: x if len(x) <= 80 else x[:77] + "..."  # noqa: E731
    return [f"{prefix[:-1]}: checkpoint {short(s)} != config {short(c)}"]
  return []


def check_fingerprint(saved: Mapping, current: Mapping, where: str) -> None:
  """Raises FingerprintMismatchError naming every differing field."""
  diffs = _diff(json.loads(json.dumps(saved)), json.loads(json.dumps(current)))
  if diffs:
    raise FingerprintMismatchError(
        f"refusing to restore {where}: its Engram hashing differs from the current config, so "
        f"its table rows would be read with different ids. Differences:\n  "
        + "\n  ".join(diffs)
        + "\nRestore with the config (engram.* fields, tokenizer) the checkpoint was written "
        "with, or train in a fresh workdir.")


class Checkpointer:
  """Async, keep-k checkpoints of (state, data iterator, fingerprint) in `directory`."""

  def __init__(self, directory: str, *, fingerprint: Mapping, save_every: int, keep: int,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.fingerprint = dict(fingerprint)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep,
        enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "fingerprint": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, data_iterator=None, *, force: bool = False) -> bool:
    """Starts a save of `step` if the interval (or `force`) says so; returns whether it did."""
    items = {"state": ocp.args.StandardSave(state),
             "fingerprint": ocp.args.JsonSave(self.fingerprint)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def read_fingerprint(self, step: int) -> dict:
    restored = self._manager.restore(
        step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore()))
    return dict(restored["fingerprint"])

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """Restores `step` into the shapes/shardings of `abstract_state` (and the iterator in place).

    The fingerprint is checked first, so a hash mismatch is reported as such rather than as a
    table-shape error.
    """
    check_fingerprint(self.read_fingerprint(step), self.fingerprint,
                      f"checkpoint step {step} in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self) -> None:
    """Blocks until the last asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


# ---- host tables ---------------------------------------------------------------------------------


def host_tables_directory(root: str, step: int) -> str:
  """`root` is the directory holding one sub-directory per step (`<workdir>/host_tables`)."""
  return os.path.join(os.path.abspath(root), str(int(step)))


def save_host_tables(root: str, step: int, host: offload.HostTableTrainer) -> str:
  """Writes the host tables and their optimiser state of `step` (synchronously).

  Written into a temporary directory and renamed, so a killed save never leaves a directory
  that looks complete. Call it before the orbax save of the same step (see module docstring).
  """
  final = host_tables_directory(root, step)
  tmp = final + ".tmp"
  for d in (tmp, final):
    if os.path.exists(d):
      shutil.rmtree(d)
  offload.save_trainer(tmp, host)
  os.replace(tmp, final)
  return final


def prune_host_tables(root: str, keep_steps) -> None:
  """Deletes the host tables of every step not in `keep_steps` (orbax's kept steps + the newest)."""
  keep = {int(s) for s in keep_steps}
  for name in os.listdir(root):
    if name.isdigit() and int(name) not in keep:
      shutil.rmtree(os.path.join(root, name))


def restore_host_tables(root: str, step: int, cfg, offsets: Mapping[int, Any]
                        ) -> offload.HostTableTrainer:
  """The `HostTableTrainer` saved at `step` (tables and state in pinned host memory)."""
  directory = require_host_tables(root, step)
  return offload.restore_trainer(directory, cfg, offsets,
                                 {int(l): "pinned_host" for l in offsets})


def has_host_tables(root: str, step: int) -> bool:
  return os.path.isfile(os.path.join(host_tables_directory(root, step),
                                     offload._MANIFEST))  # pylint: disable=protected-access


def require_host_tables(root: str, step: int) -> str:
  """The host-table directory of `step`; FileNotFoundError if its files are missing."""
  directory = host_tables_directory(root, step)
  if not has_host_tables(root, step):
    raise FileNotFoundError(
        f"checkpoint step {step} has no host tables at {directory}: the orbax state of that "
        "step does not contain the Engram tables (engram.placement='pinned_host'), so it "
        "cannot be resumed. Was the run trained with engram.placement='device', or were the "
        "host_tables files deleted? Restore with the placement it was trained with, or train in "
        "a fresh workdir.")
  return directory
