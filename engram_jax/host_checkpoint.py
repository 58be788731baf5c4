"""Checkpoints of host tables (`engram.placement='pinned_host'`), written beside orbax's.

Host tables are not in the orbax state: orbax copies every array to host before writing, a
second full copy of a host table. `save_host_tables` writes them to `<root>/<step>/` *before*
the orbax checkpoint of the same step (engram_jax/train.py), so every orbax step has its
tables; `restore_host_tables` refuses a step without them.

Layout: every process writes its own block of rows (`host_tables.row_block`) of every table and
optimiser-state array to `<root>/<step>/block_<p>/`, one `.npy` per array plus a manifest and
`block.json` (its rows [start, stop) of R per layer, the job's process count). A restore reads
the rows [start, stop) that the restoring process keeps from whichever saved blocks hold them,
so a checkpoint restores into a job of any number of processes (one process reads every
block). Each block is written into a temporary directory and renamed, so a killed save never
leaves a block that looks complete; a step has host tables only if all its blocks are there.

The format (`save_arrays` / `restore_arrays`) streams row chunks. A save copies a chunk of rows
to the device (a dynamic_slice from host memory, the host offloader's supported pattern),
fetches it into NumPy and writes it into a memory-mapped .npy: peak extra memory one chunk in
HBM + one chunk of NumPy memory (`host_memory.DEFAULT_CHUNK_BYTES`) plus reclaimable page
cache; the table is never copied. A restore allocates the destination (checked by
`host_memory.check_host_allocation`) and copies the rows from the memory-mapped files into it
through a NumPy view of its buffer (`host_memory.host_view`), chunk by chunk.

Dimension legend: R rows of a streamed array.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import host_memory
from engram_jax import table_optim
from engram_jax.host_tables import HostTables, row_block

_BLOCK = "block.json"


def host_tables_directory(root: str, step: int) -> str:
  """`root` is the directory holding one sub-directory per step (`<workdir>/host_tables`)."""
  return os.path.join(os.path.abspath(root), str(int(step)))


def _block_directory(root: str, step: int, process: int) -> str:
  return os.path.join(host_tables_directory(root, step), f"block_{int(process)}")


def _arrays_of(host: HostTables, l) -> dict:
  out = {f"layer{l}.table": host.tables[l]}
  out.update({f"layer{l}.{k}": v for k, v in host.states[l]._asdict().items() if v is not None})
  return out


def save_host_tables(root: str, step: int, host: HostTables, *,
                     chunk_bytes: int = host_memory.DEFAULT_CHUNK_BYTES) -> str:
  """Writes this process's block of the host tables and their optimiser state of `step`
  (synchronously); every process of the job calls it. Call it before the orbax save of the
  same step (module docstring); the block directory is returned."""
  index, count = host.process
  final = _block_directory(root, step, index)
  tmp = final + ".tmp"
  for d in (tmp, final):
    if os.path.exists(d):
      shutil.rmtree(d)
  if index == 0:  # blocks of an earlier save of this step by a larger job
    step_dir = host_tables_directory(root, step)
    for name in os.listdir(step_dir) if os.path.isdir(step_dir) else ():
      if name.startswith("block_") and name[6:].isdigit() and int(name[6:]) >= count:
        shutil.rmtree(os.path.join(step_dir, name))
  arrays = {}
  for l in host.layers:
    arrays.update(_arrays_of(host, l))
  save_arrays(tmp, arrays, chunk_bytes=chunk_bytes)
  block = {"process": index, "num_processes": count,
           "rows": {str(l): [*host.blocks[l], host.num_rows(l)] for l in host.layers}}
  with open(os.path.join(tmp, _BLOCK), "w") as f:
    json.dump(block, f, indent=1)
  os.replace(tmp, final)
  return final


def prune_host_tables(root: str, keep_steps) -> None:
  """Deletes the host tables of every step not in `keep_steps` (orbax's kept steps + the newest);
  one process of a job calls it."""
  keep = {int(s) for s in keep_steps}
  for name in os.listdir(root):
    if name.isdigit() and int(name) not in keep:
      shutil.rmtree(os.path.join(root, name))


def _saved_blocks(root: str, step: int) -> list[tuple[str, dict]]:
  """[(block directory, its block.json)] of a step, in process order; [] unless complete."""
  first = os.path.join(_block_directory(root, step, 0), _BLOCK)
  if not os.path.isfile(first):
    return []
  with open(first) as f:
    count = json.load(f)["num_processes"]
  out = []
  for p in range(count):
    d = _block_directory(root, step, p)
    if not os.path.isfile(os.path.join(d, _BLOCK)):
      return []
    with open(os.path.join(d, _BLOCK)) as f:
      out.append((d, json.load(f)))
  return out


def has_host_tables(root: str, step: int) -> bool:
  return bool(_saved_blocks(root, step))


def require_host_tables(root: str, step: int) -> str:
  """The host-table directory of `step`; FileNotFoundError if its files are missing."""
  directory = host_tables_directory(root, step)
  if not has_host_tables(root, step):
    raise FileNotFoundError(
        f"checkpoint step {step} has no host tables at {directory}: the orbax state of that "
        "step does not contain the Engram tables (engram.placement='pinned_host'), so it "
        "cannot be resumed. Was the run trained with engram.placement='device', or were the "
        "host_tables files (or one process's block) deleted? Restore with the placement it "
        "was trained with, or train in a fresh workdir.")
  return directory


def _read_rows(blocks, name: str, layer: str, start: int, stop: int,
               chunk_bytes: int) -> jax.Array:
  """Rows [start, stop) of array `name` assembled from the saved blocks, in pinned host memory."""
  with open(os.path.join(blocks[0][0], _MANIFEST)) as f:
    meta = json.load(f)[name]
  dtype = jnp.dtype(meta["dtype"])
  shape = (stop - start,) + tuple(meta["shape"][1:])
  out = host_memory.zeros(shape, dtype, "pinned_host")
  view = host_memory.host_view(out)
  chunk = _rows_chunk(shape, dtype.itemsize, chunk_bytes)
  for directory, block in blocks:
    lo, hi = max(start, block["rows"][layer][0]), min(stop, block["rows"][layer][1])
    if lo >= hi:
      continue
    src = np.load(os.path.join(directory, f"{name}.npy"), mmap_mode="r")
    first = block["rows"][layer][0]
    for a in range(lo, hi, chunk):
      b = min(a + chunk, hi)
      view[a - start:b - start] = np.asarray(src[a - first:b - first]).view(dtype)
  return out


def restore_host_tables(root: str, step: int, cfg: table_optim.TableOptimizerConfig,
                        offsets: Mapping[int, Any], *,
                        chunk_bytes: int = host_memory.DEFAULT_CHUNK_BYTES,
                        **layout) -> HostTables:
  """The `HostTables` saved at `step`: this process's block (`layout['process']`, default
  JAX's) of every table and state array, read into pinned host memory. `layout`: the other
  `HostTables` keyword arguments (batch_sharding); `num_rows` must match the saved tables."""
  require_host_tables(root, step)
  blocks = _saved_blocks(root, step)
  process = layout.pop("process", None) or (jax.process_index(), jax.process_count())
  want_rows = layout.pop("num_rows", None)
  offsets = {int(l): v for l, v in offsets.items()}
  tables, states, num_rows = {}, {}, {}
  for l in offsets:
    key = str(l)
    if key not in blocks[0][1]["rows"]:
      raise ValueError(f"checkpoint step {step}: no host table of layer {l} in {root}")
    num_rows[l] = blocks[0][1]["rows"][key][2]
    if want_rows is not None and want_rows[l] != num_rows[l]:
      raise ValueError(f"checkpoint step {step}: host table of layer {l} has {num_rows[l]} "
                       f"rows, the config's hashing needs {want_rows[l]}")
    start, stop = row_block(num_rows[l], *process)
    tables[l] = _read_rows(blocks, f"layer{l}.table", key, start, stop, chunk_bytes)
    shapes = table_optim.init_table_state_shapes(cfg, *tables[l].shape)
    states[l] = table_optim.TableOptState(**{
        k: None if v is None else _read_rows(blocks, f"layer{l}.{k}", key, start, stop,
                                             chunk_bytes)
        for k, v in shapes._asdict().items()})
  return HostTables(cfg, tables, offsets, states, num_rows=num_rows, process=process, **layout)


def read_host_tables(root: str, step: int) -> dict[str, np.ndarray]:
  """{array name: whole NumPy array} of every host table and state array saved at `step`,
  assembled from its blocks (for inspection and tests)."""
  require_host_tables(root, step)
  blocks = _saved_blocks(root, step)
  out: dict[str, list] = {}
  for directory, _ in blocks:
    with open(os.path.join(directory, _MANIFEST)) as f:
      manifest = json.load(f)
    for name, meta in manifest.items():
      raw = np.load(os.path.join(directory, f"{name}.npy"))
      out.setdefault(name, []).append(raw.view(jnp.dtype(meta["dtype"])))
  return {name: np.concatenate(parts) for name, parts in out.items()}


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
