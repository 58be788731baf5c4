"""Checkpoints: train state + data iterator + Engram hash fingerprint, saved together.

One orbax `CheckpointManager` per workdir (`workdir/checkpoints/<step>/`), with three items:
  state        the whole TrainState (params, optax state, sparse tables and their optimiser
               state, MoE router biases, RNG, step), restored into the caller's shardings;
  data         the grain iterator position (grain's own handler: one JSON per process);
  fingerprint  JSON: the n-gram hash mapping (multipliers, primes, pad id, vocabularies) and the
               compression-table digest. Restoring with any difference is refused before the
               state is read: the saved table rows would be addressed by different hash ids.

Host tables (`engram.placement='pinned_host'`) are not in the orbax state: orbax copies every
array to host before writing, a second full copy of a host table. `save_host_tables` writes
them to `<workdir>/host_tables/<step>/` *before* the orbax checkpoint of the same step, so every
orbax step has its tables; `restore_host_tables` refuses a step without them. The format
(`save_arrays` / `restore_arrays`): one `.npy` per array plus a manifest, streamed in row
chunks. A save copies a chunk of rows to the device (a dynamic_slice from host memory, the host
offloader's supported pattern), fetches it into NumPy and writes it into a memory-mapped .npy:
peak extra memory one chunk in HBM + one chunk of NumPy memory (`DEFAULT_CHUNK_BYTES`) plus
reclaimable page cache; the table is never copied. A restore allocates the destination (checked
by `host_memory.check_host_allocation`) and fills it chunk by chunk in place (donated
dynamic_update_slice): peak = table + one chunk on the host + one chunk in HBM.

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
from engram_jax import table_optim
from engram_jax.host_tables import HostTables

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


# ---- host tables ---------------------------------------------------------------------------------


def host_tables_directory(root: str, step: int) -> str:
  """`root` is the directory holding one sub-directory per step (`<workdir>/host_tables`)."""
  return os.path.join(os.path.abspath(root), str(int(step)))


def save_host_tables(root: str, step: int, host: HostTables, *,
                     chunk_bytes: int = host_memory.DEFAULT_CHUNK_BYTES) -> str:
  """Writes the host tables and their optimiser state of `step` (synchronously).

  Written into a temporary directory and renamed, so a killed save never leaves a directory
  that looks complete. Call it before the orbax save of the same step (see module docstring).
  """
  final = host_tables_directory(root, step)
  tmp = final + ".tmp"
  for d in (tmp, final):
    if os.path.exists(d):
      shutil.rmtree(d)
  arrays = {}
  for l in host.layers:
    arrays[f"layer{l}.table"] = host.tables[l]
    arrays.update({f"layer{l}.{k}": v for k, v in host.states[l]._asdict().items()
                   if v is not None})
  save_arrays(tmp, arrays, chunk_bytes=chunk_bytes)
  os.replace(tmp, final)
  return final


def prune_host_tables(root: str, keep_steps) -> None:
  """Deletes the host tables of every step not in `keep_steps` (orbax's kept steps + the newest)."""
  keep = {int(s) for s in keep_steps}
  for name in os.listdir(root):
    if name.isdigit() and int(name) not in keep:
      shutil.rmtree(os.path.join(root, name))


def restore_host_tables(root: str, step: int, cfg: table_optim.TableOptimizerConfig,
                        offsets: Mapping[int, Any], *,
                        chunk_bytes: int = host_memory.DEFAULT_CHUNK_BYTES) -> HostTables:
  """The `HostTables` saved at `step` (tables and state read into pinned host memory)."""
  directory = require_host_tables(root, step)
  offsets = {int(l): v for l, v in offsets.items()}
  tables, states = {}, {}
  for l in offsets:
    name = f"layer{l}.table"
    tables[l] = restore_arrays(directory, names=[name], chunk_bytes=chunk_bytes)[name]
    shapes = table_optim.init_table_state_shapes(cfg, *tables[l].shape)
    names = [f"layer{l}.{k}" for k, v in shapes._asdict().items() if v is not None]
    got = restore_arrays(directory, names=names, chunk_bytes=chunk_bytes)
    states[l] = table_optim.TableOptState(
        **{k: got.get(f"layer{l}.{k}") for k in shapes._asdict()})
  return HostTables(cfg, tables, offsets, states)


def has_host_tables(root: str, step: int) -> bool:
  return os.path.isfile(os.path.join(host_tables_directory(root, step), _MANIFEST))


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


# ---- arrays streamed in row chunks ---------------------------------------------------------------

_MANIFEST = "manifest.json"


def _raw_dtype(dtype: np.dtype) -> np.dtype:
  # .npy cannot describe bfloat16; store the bits as unsigned ints of the same width.
  return np.dtype(f"u{np.dtype(dtype).itemsize}")


def _rows_chunk(x_shape, itemsize, chunk_bytes):
  row_bytes = int(np.prod(x_shape[1:], dtype=np.int64)) * itemsize if len(x_shape) > 1 \
      else itemsize
  return int(min(x_shape[0], host_memory.chunk_rows_for(row_bytes, chunk_bytes)))


def save_arrays(directory: str, arrays: Mapping[str, jax.Array], *,
                chunk_bytes: int = host_memory.DEFAULT_CHUNK_BYTES) -> None:
  """Writes `{name: [R, ...] array}` (any placement) as `<name>.npy` + a manifest, in row chunks."""
  os.makedirs(directory, exist_ok=True)
  manifest = {}
  dev = jax.memory.Space.Device
  for name, x in arrays.items():
    if "/" in name or name == _MANIFEST:
      raise ValueError(f"save_arrays: bad array name {name!r}")
    dtype = np.dtype(x.dtype)
    chunk = _rows_chunk(x.shape, dtype.itemsize, chunk_bytes)
    out = np.lib.format.open_memmap(os.path.join(directory, f"{name}.npy"), mode="w+",
                                    dtype=_raw_dtype(dtype), shape=tuple(x.shape))
    take = jax.jit(lambda a, start, c=chunk: jax.device_put(
        jax.lax.dynamic_slice_in_dim(a, start, c, axis=0), dev))
    for start in range(0, x.shape[0], chunk):
      start = min(start, x.shape[0] - chunk)
      part = np.asarray(jax.device_get(take(x, np.int32(start))))
      out[start:start + chunk] = part.view(_raw_dtype(dtype))
    out.flush()
    del out
    manifest[name] = {"shape": list(x.shape), "dtype": dtype.name}
  with open(os.path.join(directory, _MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)


def restore_arrays(directory: str, placement: str = "pinned_host", *,
                   names: Optional[list] = None,
                   chunk_bytes: int = host_memory.DEFAULT_CHUNK_BYTES,
                   device: Optional[jax.Device] = None) -> dict[str, jax.Array]:
  """Reads arrays written by `save_arrays` into `placement`, chunk by chunk."""
  with open(os.path.join(directory, _MANIFEST)) as f:
    manifest = json.load(f)
  names = list(manifest) if names is None else names
  sharding = host_memory.placement_sharding(placement, device)
  dev = host_memory.placement_sharding("device", device)
  space = host_memory.memory_space(placement)
  out = {}
  for name in names:
    if name not in manifest:
      raise ValueError(f"restore_arrays: {name!r} not in {directory} (has {sorted(manifest)})")
    shape, dtype = tuple(manifest[name]["shape"]), jnp.dtype(manifest[name]["dtype"])
    src = np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r")
    if src.shape != shape:
      raise ValueError(f"restore_arrays: {name}.npy has shape {src.shape}, manifest {shape}")
    x = host_memory.zeros(shape, dtype, placement, device)
    chunk = _rows_chunk(shape, dtype.itemsize, chunk_bytes)
    put = jax.jit(lambda a, c, start: jax.lax.dynamic_update_slice_in_dim(
        a, jax.device_put(c, space), start, axis=0), donate_argnums=0, out_shardings=sharding)
    for start in range(0, shape[0], chunk):
      start = min(start, shape[0] - chunk)
      part = np.ascontiguousarray(src[start:start + chunk]).view(dtype)
      x = put(x, jax.device_put(part, dev), np.int32(start))
    out[name] = x
  return out
