"""Checkpoints: train state + data iterator + Engram hash fingerprint, saved together.

One orbax `CheckpointManager` per workdir (`workdir/checkpoints/<step>/`), with three items:
  state        the whole TrainState (params, optax state, sparse tables and their optimiser
               state, MoE router biases, RNG, step), restored into the caller's shardings;
  data         the grain iterator position (grain's own handler: one JSON per process);
  fingerprint  JSON: the n-gram hash mapping (multipliers, primes, pad id, vocabularies) and the
               compression-table digest. Restoring with any difference is refused before the
               state is read: the saved table rows would be addressed by different hash ids.

Host tables (`engram.placement='pinned_host'`) are not in the orbax state; each process writes
its block of them beside it (engram_jax/host_checkpoint.py), and the checksums below cover
those files too.

Saves are asynchronous (orbax copies arrays to host before `save` returns, so the donated
state may be overwritten by the next step); `wait()` joins the background write. A resumed
run continues from the latest step; together with the iterator state and the RNG in the train
state this reproduces the loss sequence of an uninterrupted run.

Integrity: once a step's save is on disk, `checksums.json` in its directory lists the size and
CRC32 of every file of the step (arrays, iterator state, fingerprint, orbax metadata) and of
the step's directory under each `extra_roots` (the host tables). A step is intact only if
that file exists and every listed file matches it, so a step killed before its checksums were
written counts as unfinished. `select_step` verifies the newest step (or `restore_step`) before
anything is read, so a truncated, missing or bit-flipped file is reported in one line naming
it, never as a TensorStore error; without an explicit step the newest intact one is used and
the damaged newer ones are named (`set_aside` then moves them out of the way so the run can
save those steps again). CRC32 rather than a cryptographic hash: it guards against damage,
not tampering, and reads at disk speed. A directory without the `steps_have_checksums` marker
(written before checksums existed) is restored unverified, with a warning.

Finiteness: `nonfinite_leaves` (one fused all-finite reduction on device, per-leaf paths only
when it fails) and `nonfinite_host_arrays` let the trainer refuse to save, and the evaluator
to use, a state holding NaN or Inf.

Dimension legend: R rows of a streamed array.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import zlib
from typing import Any, Mapping, Optional, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from engram_jax import host_memory

CHECKSUMS = "checksums.json"
# In the checkpoint directory once a step was saved with checksums: from then on a step
# without them is unfinished, not a step written before checksums existed.
CHECKSUMS_MARKER = "steps_have_checksums"
SET_ASIDE_DIR = "checkpoints_set_aside"


class FingerprintMismatchError(ValueError):
  """The checkpoint was written with a different Engram hash or compression table."""


class CheckpointDamagedError(ValueError):
  """A checkpoint's files do not match its checksums (or it has none: unfinished save)."""


class CheckpointRestoreError(ValueError):
  """An intact checkpoint that does not fit the current config's state."""


class NonFiniteStateError(FloatingPointError):
  """A state (to save, or restored) holds NaN or Inf."""


def _warn(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] WARNING: {msg}", flush=True)


# ---- checksums -----------------------------------------------------------------------------------


def _file_crc32(path: str, chunk: int = 16 << 20) -> int:
  crc = 0
  with open(path, "rb") as f:
    while block := f.read(chunk):
      crc = zlib.crc32(block, crc)
  return crc


def directory_checksums(directory: str) -> dict:
  """{relative path: [size, crc32]} of every file under `directory` (checksums.json excluded)."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel == CHECKSUMS:
        continue
      out[rel] = [os.path.getsize(path), _file_crc32(path)]
  return dict(sorted(out.items()))


def _first_line(e: BaseException, limit: int = 300) -> str:
  text = str(e).strip().splitlines()
  line = text[0] if text else ""
  return f"{type(e).__name__}: {line[:limit]}"


# ---- finiteness ----------------------------------------------------------------------------------


@jax.jit
def _all_finite(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _float_leaves(tree):
  return [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(tree)
          if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]


def nonfinite_leaves(tree, limit: int = 5) -> list[str]:
  """Paths of (up to `limit`) floating leaves of `tree` holding NaN or Inf; [] if all finite.

  One compiled reduction over every leaf and one scalar read when all is finite (the common
  case); the per-leaf paths are computed only when it is not.
  """
  leaves = _float_leaves(tree)
  if not leaves or bool(_all_finite([x for _, x in leaves])):
    return []
  bad = [p for p, x in leaves if not bool(jnp.all(jnp.isfinite(x)))]
  return bad[:limit] + ([f"... ({len(bad)} arrays)"] if len(bad) > limit else [])


def nonfinite_host_arrays(arrays: Mapping[str, Any], chunk_bytes: int = 256 << 20) -> list[str]:
  """Names of the floating host arrays (pinned_host tables, their moments) holding NaN or Inf.

  Read in row chunks through a NumPy view of the host buffer (no copy of the table; a plain
  copy where no view can be taken).
  """
  bad = []
  for name, x in arrays.items():
    if x is None or not jnp.issubdtype(x.dtype, jnp.inexact):
      continue
    try:
      view = host_memory.host_view(x)
    except ValueError:
      view = np.asarray(jax.device_get(x))
    rows = max(1, chunk_bytes // max(1, view[:1].nbytes))
    for start in range(0, view.shape[0], rows):
      if not np.isfinite(view[start:start + rows].astype(np.float32, copy=False)).all():
        bad.append(name)
        break
  return bad


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
               async_save: bool = True, extra_roots: Sequence[str] = ()):
    """`extra_roots`: directories with one sub-directory per step saved beside the orbax step
    (the host tables); their step's files are part of the step's checksums."""
    self.directory = os.path.abspath(directory)
    self.fingerprint = dict(fingerprint)
    self.extra_roots = {os.path.basename(os.path.abspath(r)): os.path.abspath(r)
                        for r in extra_roots}
    self._async = bool(async_save)
    self._checksum_thread: Optional[threading.Thread] = None
    self._checksum_error: Optional[BaseException] = None
    self._verified: set = set()
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
    """Starts a save of `step` if the interval (or `force`) says so; returns whether it did.

    Its checksums are written once the save is on disk: right away for a synchronous save,
    by a thread waiting for the background write otherwise.
    """
    self._join_checksums()
    marker = os.path.join(self.directory, CHECKSUMS_MARKER)
    if jax.process_index() == 0 and not os.path.exists(marker):
      os.makedirs(self.directory, exist_ok=True)
      with open(marker, "w") as f:
        f.write(f"every step directory here has a {CHECKSUMS} once its save completed\n")
    items = {"state": ocp.args.StandardSave(state),
             "fingerprint": ocp.args.JsonSave(self.fingerprint)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
      if self._async:
        self._checksum_thread = threading.Thread(
            target=self._checksums_after_save, args=(step,), daemon=True)
        self._checksum_thread.start()
      else:
        self._manager.wait_until_finished()
        self._write_checksums(step)
    return saved

  # -- integrity -------------------------------------------------------------------------------

  def step_directory(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def _parts(self, step: int) -> dict:
    """{part name: directory} holding the files of `step` (the orbax step + extra roots)."""
    parts = {"checkpoint": self.step_directory(step)}
    for name, root in self.extra_roots.items():
      d = os.path.join(root, str(int(step)))
      if os.path.isdir(d):
        parts[name] = d
    return parts

  def _write_checksums(self, step: int) -> None:
    if jax.process_index() != 0:
      return
    manifest = {"algorithm": "crc32", "step": int(step),
                "parts": {name: directory_checksums(d) for name, d in self._parts(step).items()}}
    path = os.path.join(self.step_directory(step), CHECKSUMS)
    with open(path + ".tmp", "w") as f:
      json.dump(manifest, f, indent=1)
      f.flush()
      os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    self._verified.add(int(step))

  def _checksums_after_save(self, step: int) -> None:
    try:
      self._manager.wait_until_finished()
      self._write_checksums(step)
    except BaseException as e:  # pylint: disable=broad-except
      self._checksum_error = e

  def _join_checksums(self) -> None:
    if self._checksum_thread is not None:
      self._checksum_thread.join()
      self._checksum_thread = None
    if self._checksum_error is not None:
      e, self._checksum_error = self._checksum_error, None
      raise RuntimeError(f"writing the checksums of a checkpoint failed: {_first_line(e)}") from e

  def _legacy(self) -> bool:
    """A directory written before checkpoints had checksums."""
    return not os.path.exists(os.path.join(self.directory, CHECKSUMS_MARKER))

  def verify(self, step: int) -> None:
    """Raises CheckpointDamagedError (one line, naming the file) unless `step` is intact."""
    step = int(step)
    if step in self._verified:
      return
    where = f"checkpoint step {step} in {self.directory}"
    path = os.path.join(self.step_directory(step), CHECKSUMS)
    if not os.path.isfile(path):
      if self._legacy():
        _warn(f"{where} has no {CHECKSUMS} (written before checkpoints had checksums); "
              "restoring it unverified")
        self._verified.add(step)
        return
      raise CheckpointDamagedError(f"{where} is unfinished or damaged: it has no {CHECKSUMS} "
                                   "(the run was stopped before its save completed)")
    try:
      with open(path) as f:
        parts = json.load(f)["parts"]
    except (OSError, ValueError, KeyError) as e:
      raise CheckpointDamagedError(f"{where} is damaged: {path} is unreadable "
                                   f"({_first_line(e)})") from None
    roots = {"checkpoint": self.step_directory(step),
             **{n: os.path.join(r, str(step)) for n, r in self.extra_roots.items()}}
    for name, files in parts.items():
      base = roots.get(name)
      if base is None:
        raise CheckpointDamagedError(f"{where}: its checksums list a part {name!r} this "
                                     "checkpointer does not know")
      if files and not os.path.isdir(base):
        # A whole part gone is not damage to fall back from: its directory was removed (or the
        # run is resumed with another placement); refused like a step that never had it.
        raise FileNotFoundError(
            f"checkpoint step {step} has no {name.replace('_', ' ')} at {base}, which its "
            f"checksums list; restore it with the files it was saved with, or remove "
            f"{self.step_directory(step)} to resume from an earlier step")
      for rel, (size, crc) in files.items():
        f = os.path.join(base, rel)
        if not os.path.isfile(f):
          raise CheckpointDamagedError(f"{where} is damaged: file {f} is missing")
        got = os.path.getsize(f)
        if got != size:
          raise CheckpointDamagedError(f"{where} is damaged: file {f} has {got} bytes, "
                                       f"{size} when saved (truncated or overwritten)")
        if _file_crc32(f) != crc:
          raise CheckpointDamagedError(f"{where} is damaged: file {f} differs from its checksum "
                                       "(its content changed after the save)")
    self._verified.add(step)

  def select_step(self, requested: int = 0) -> tuple[Optional[int], list[tuple[int, str]]]:
    """(step to restore or None, [(damaged newer step, reason)]), nothing read but checksums.

    `requested` > 0 picks that step (refused if missing or damaged); 0 takes the newest intact
    one. Raises CheckpointDamagedError when steps exist but none is intact. Every candidate is
    verified afresh (a later `restore` of the chosen step does not read it a second time).
    """
    self._verified.clear()
    steps = sorted(self.all_steps(), reverse=True)
    if requested:
      if requested not in steps:
        raise ValueError(f"train.restore_step={requested}: no such checkpoint in "
                         f"{self.directory} (steps: {sorted(steps) or 'none'})")
      self.verify(requested)
      return int(requested), []
    damaged = []
    for s in steps:
      try:
        self.verify(s)
        return int(s), damaged
      except CheckpointDamagedError as e:
        damaged.append((int(s), str(e)))
    if damaged:
      raise CheckpointDamagedError(
          f"no intact checkpoint in {self.directory}: " + "; ".join(r for _, r in damaged))
    return None, []

  def reload(self) -> None:
    """Re-reads the directory's steps (after another process moved some)."""
    self._manager.reload()
    self._verified.clear()

  def set_aside(self, steps, reason: str) -> list[str]:
    """Moves `steps` (orbax step + extra-root directories) to `<parent>/checkpoints_set_aside/`
    so the run can save those steps again; returns the new locations."""
    moved = []
    for step in sorted(int(s) for s in steps):
      parts = self._parts(step)
      base = os.path.join(os.path.dirname(self.directory), SET_ASIDE_DIR, f"{step}_{reason}")
      dest, n = base, 1
      while os.path.exists(dest):
        dest, n = f"{base}_{n}", n + 1
      os.makedirs(dest)
      for name, d in parts.items():
        if os.path.isdir(d):
          shutil.move(d, os.path.join(dest, name))
      moved.append(dest)
      self._verified.discard(step)
    self._manager.reload()
    return moved

  def read_fingerprint(self, step: int) -> dict:
    self.verify(step)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(fingerprint=ocp.args.JsonRestore()))
    return dict(restored["fingerprint"])

  def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
    """Restores `step` into the shapes/shardings of `abstract_state` (and the iterator in place).

    The fingerprint is checked first, so a hash mismatch is reported as such rather than as a
    table-shape error.
    """
    self.verify(step)
    where = f"checkpoint step {step} in {self.directory}"
    check_fingerprint(self.read_fingerprint(step), self.fingerprint, where)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      # Intact files (verified above) that do not fit: a state of other shapes or structure.
      raise CheckpointRestoreError(
          f"{where} does not fit the current config's train state ({_first_line(e)}); restore "
          "it with the config it was trained with (the workdir's config.json)") from None
    return restored["state"]

  def wait(self) -> None:
    """Blocks until the last asynchronous save (and its checksums) is on disk."""
    self._manager.wait_until_finished()
    self._join_checksums()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._join_checksums()
    self._manager.close()
