"""Bytes a row-sharded Engram lookup moves per step, against the rows the step needs.

  python -m benchmarks.bench_sharded_lookup [--mesh=fsdp=8] [--devices=8] \
      [--capacity_factors=0,1,1.5] [--config=experiments/configs/quickstart.py \
      --config.data.batch_size=64 --config.engram.engram_vocab_size='(50000,50000)']

For one real batch of the config's corpus (its hash ids, so repeated n-grams repeat rows) and
each capacity factor, the script compiles one table's lookup as a training step does it
(`sharded_tables.prefetch`, `expand`, its gradient and `to_owners`), reads every all-to-all of
the compiled program (per-device operand shapes in the HLO), and prints, per device and step:

  moved   bytes of the all-to-alls: request ids, rows back, f32 row gradients to the owners
  needed  the batch shard's unique rows x (row bytes + f32 gradient bytes + a 4-byte id), the
          traffic of an exchange that sends exactly the rows in use
  ratio   moved / needed (goal <= 2)
  overflow  unique rows that found no request slot in this batch (must be 0 to train)

and, as the baseline measured in the same run, the bytes one all-gather of the table would
move into each device. On CPU (default) the mesh is `--devices` fake devices; on GPUs or TPUs
pass --devices=0 to use the real ones. Results are logged in benchmarks/README.md.

Dimension legend: B batch, T time, H heads, E row width, R table rows, n row shards, U lookup
slots of a batch shard, C request slots per (requester, owner) pair.
"""

import os
import re

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/quickstart.py", "Config whose corpus, hashing and table "
    "shapes are measured.", lock_config=True)
_MESH = flags.DEFINE_string("mesh", "fsdp=8", "Mesh axis sizes, e.g. 'data=2,fsdp=4'.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices (0 = the real devices).")
_FACTORS = flags.DEFINE_string("capacity_factors", "0,1,1.5,2",
                               "Comma-separated TableSharding.capacity_factor values (0 = "
                               "worst-case buffers).")
_BATCH_AXES = ("data", "fsdp", "expert")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "f64": 8}


def all_to_all_bytes(hlo: str) -> list[int]:
  """Per-device result bytes of every all-to-all instruction of an HLO module's text."""
  out = []
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%\S+ = (.+?) all-to-all\(", line)
    if m:
      out.append(sum(_DTYPE_BYTES[t] * _numel(dims)
                     for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))))
  return out


def _numel(dims: str) -> int:
  n = 1
  for d in filter(None, dims.split(",")):
    n *= int(d)
  return n


def _batch_ids(config):
  from engram_jax import data as data_lib
  from engram_jax import experiment_config
  from engram_jax import train
  exp = experiment_config.resolve(config)
  corpus = data_lib.TokenizedCorpus(list(exp.eval_files), exp.tokenizer_path)
  batches = data_lib.make_dataset(corpus, seq_len=config.data.seq_len,
                                  batch_size=config.data.batch_size, train=False,
                                  engram_hash_fn=train.engram_hash_fn(exp, False))
  batch = next(iter(batches))
  layer = exp.model.engram.layer_ids[0]
  return exp, layer, batch["engram_ids"][layer]


def measure(config, mesh_sizes: dict, factors) -> list[dict]:
  """One record per capacity factor (see the module docstring)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from engram_jax import sharded_tables as st
  from engram_jax import sharding
  exp, layer, ids_np = _batch_ids(config)
  mesh = sharding.make_mesh(mesh_sizes)
  num_rows, width = exp.hashing.num_rows(layer), exp.model.engram.head_dim
  offsets = jnp.asarray(exp.hashing.offsets(layer), jnp.int32)
  dtype = jnp.dtype(config.model.param_dtype)
  row_bytes = width * dtype.itemsize
  records = []
  for factor in factors:
    ts = st.TableSharding(mesh, num_rows, batch_axes=_BATCH_AXES, capacity_factor=factor)
    table = jax.device_put(jnp.zeros((ts.padded_rows, width), dtype), ts.table_sharding())
    ids = jax.device_put(jnp.asarray(ids_np, jnp.int32), NamedSharding(mesh, P(ts.batch_axes)))
    cot = jnp.ones(ids.shape[:2] + (ids.shape[2] * width,), jnp.float32)

    def step(table, ids, cot, ts=ts):
      pre = st.prefetch(ts, table, ids, offsets)
      loss, grad = jax.value_and_grad(lambda r: jnp.vdot(
          st.expand(ts, r, pre).astype(jnp.float32), cot))(pre.rows_UxE)
      return loss, st.to_owners(ts, pre, grad).values_UxE, pre.overflow
    compiled = jax.jit(step).lower(table, ids, cot).compile()
    moved = all_to_all_bytes(compiled.as_text())
    *_, overflow = compiled(table, ids, cot)
    if len(moved) != 3:
      raise RuntimeError(f"expected 3 all-to-alls (ids, rows, gradients), found {len(moved)}")
    rows = np.clip(np.asarray(ids_np) + np.asarray(offsets), 0, num_rows - 1)
    unique = np.mean([np.unique(s).size for s in rows.reshape(ts.num_batch_shards, -1)])
    needed = unique * (row_bytes + 4 * width + 4)
    slots = rows.size // ts.num_batch_shards
    records.append(dict(
        factor=factor, capacity=ts.capacity(slots), slots=slots, unique=unique,
        moved=sum(moved), num_all_to_all=len(moved), needed=needed,
        ratio=sum(moved) / needed, overflow=int(overflow),
        table_gather=(ts.num_shards - 1) * ts.rows_per_shard * row_bytes))
  return records


def main(argv):
  del argv
  if _DEVICES.value:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_DEVICES.value}")
  mesh_sizes = {k: int(v) for k, v in (item.split("=") for item in _MESH.value.split(","))}
  factors = [float(f) for f in _FACTORS.value.split(",")]
  config = _CONFIG.value
  records = measure(config, mesh_sizes, factors)
  r0 = records[0]
  print(f"mesh {mesh_sizes}, batch {config.data.batch_size} x {config.data.seq_len}, "
        f"{r0['slots']} lookups and {r0['unique']:.0f} unique rows per batch shard; baseline: "
        f"an all-gather of the table moves {r0['table_gather'] / 2**20:.2f} MiB per device")
  print(f"{'capacity_factor':>15} {'C':>6} {'moved KiB':>10} {'needed KiB':>11} "
        f"{'ratio':>6} {'overflow':>8}")
  for r in records:
    print(f"{r['factor']:>15g} {r['capacity']:>6} {r['moved'] / 1024:>10.1f} "
          f"{r['needed'] / 1024:>11.1f} {r['ratio']:>6.2f} {r['overflow']:>8}")


if __name__ == "__main__":
  app.run(main)
