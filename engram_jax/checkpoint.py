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

Dimension legend: R rows of a streamed array.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping, Optional

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from engram_jax import host_memory
from engram_jax import table_optim
from engram_jax.host_tables import HostTables


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
