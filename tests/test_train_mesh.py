"""Training on device meshes (8 fake CPU devices): FSDP / data / expert meshes reproduce the
one-device losses, every device holds 1/n of each Engram table and of its optimiser state, the
compiled step never all-gathers a table or its state, request-buffer overflow stops the run
by name, and run_summary.json records the layout.

One module-scoped reference run (one device) and one run per mesh, 20 steps of a tiny model;
the data x fsdp x tensor mesh splits the table rows over data x fsdp only
(`engram.table_row_axes`).
"""

import json
import os
import re

import jax
import numpy as np
import pytest

from engram_jax import data as data_lib
from engram_jax import sharded_train_step
from engram_jax import train
from experiments.configs import tiny_test

pytestmark = pytest.mark.slow

STEPS = 20
MESHES = {"fsdp8": {"fsdp": 8}, "data2_fsdp2_expert2": {"data": 2, "fsdp": 2, "expert": 2},
          "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2}}
# Runs with more than the mesh: rows split over data x fsdp only (whole copies along 'tensor').
OVERRIDES = {"data2_fsdp2_tensor2": {"engram.table_row_axes": ("data", "fsdp")}}


def _config(mesh=None, **overrides):
  c = tiny_test.get_config()
  valid = data_lib.default_corpus_paths()["valid"]
  c.data.train_files = tuple(valid)
  c.data.eval_files = tuple(valid)
  c.data.batch_size = 8
  c.data.seq_len = 16
  c.train.num_steps = STEPS
  c.train.log_every = 1
  c.train.checkpoint_every = STEPS
  c.train.num_eval_batches = 1
  for axis, size in (mesh or {}).items():
    c.train.mesh[axis] = size
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  return c


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  train_records = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
  return np.array([r["loss"] for r in train_records])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = {}
  for name, mesh in [("one", {})] + list(MESHES.items()):
    workdir = str(tmp_path_factory.mktemp(name))
    final = train.train_and_evaluate(_config(mesh, **OVERRIDES.get(name, {})), workdir)
    out[name] = {"workdir": workdir, "final": final, "losses": _losses(workdir)}
  return out


@pytest.mark.parametrize("name", sorted(MESHES))
def test_mesh_reproduces_the_one_device_losses(runs, name):
  one, mesh = runs["one"], runs[name]
  assert one["losses"][-3:].mean() < one["losses"][:3].mean() - 0.5  # it learns
  np.testing.assert_allclose(mesh["losses"], one["losses"], rtol=2e-5)
  np.testing.assert_allclose(mesh["final"]["eval_loss"], one["final"]["eval_loss"], rtol=2e-5)


def test_run_summary_records_the_mesh_and_bytes_per_device(runs):
  with open(os.path.join(runs["one"]["workdir"], "run_summary.json")) as f:
    one = json.load(f)
  with open(os.path.join(runs["fsdp8"]["workdir"], "run_summary.json")) as f:
    fsdp = json.load(f)
  assert one["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
  assert fsdp["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}
  assert (fsdp["num_processes"], fsdp["num_devices"], one["num_devices"]) == (1, 8, 1)
  assert fsdp["params"]["total"] == one["params"]["total"] > 0
  # Tables and their state: padded to a multiple of 8 rows, then 1/8 per device.
  for key in ("engram_table_bytes_per_device", "table_state_bytes_per_device"):
    assert one[key] <= fsdp[key] * 8 < one[key] * 1.05, key
  # Dense parameters: FSDP shards most of them (a few small ones stay whole).
  assert fsdp["dense_param_bytes_per_device"] < one["dense_param_bytes_per_device"] / 4
  # Rows over data x fsdp = 4 devices only: each 'tensor' member holds a quarter.
  with open(os.path.join(runs["data2_fsdp2_tensor2"]["workdir"], "run_summary.json")) as f:
    quarter = json.load(f)
  for key in ("engram_table_bytes_per_device", "table_state_bytes_per_device"):
    assert one[key] <= quarter[key] * 4 < one[key] * 1.05, key


def test_table_row_axes_must_cover_every_batch_axis():
  with pytest.raises(ValueError, match=r"engram\.table_row_axes=\('fsdp',\) leaves out "
                                       r"train\.mesh\.data=2"):
    _bad_mesh({"data": 2, "fsdp": 4}, **{"engram.table_row_axes": ("fsdp",)})
  with pytest.raises(ValueError, match=r"engram\.table_row_axes must be distinct names"):
    _bad_mesh({"fsdp": 8}, **{"engram.table_row_axes": ("fsdp", "rows")})


@pytest.fixture(scope="module")
def compiled_fsdp8():
  """The fsdp=8 train step with small request buffers (capacity factor 0.5)."""
  config = _config(MESHES["fsdp8"], **{"engram.shard_capacity_factor": 0.5})
  _, trainer, abstract = train.setup(config, check_data=False)
  train_c, _, batch_sh = trainer.compile(abstract, trainer.shapes, evaluate=False)
  return trainer, abstract, train_c, batch_sh


def test_tables_and_their_state_hold_one_eighth_of_the_rows_per_device(compiled_fsdp8):
  trainer, abstract, _, _ = compiled_fsdp8
  assert isinstance(trainer, sharded_train_step.ShardedTablesTrainer)
  leaves = jax.tree.leaves((abstract.tables, abstract.table_opt))
  assert len(leaves) == 1 + 3  # table; lazy Adam's m, v and per-row count
  for x in leaves:
    rows = x.shape[0]
    assert rows % 8 == 0
    assert x.sharding.shard_shape(x.shape)[0] == rows // 8
    assert len(x.sharding.device_set) == 8


def _all_gather_shapes(hlo_text):
  shapes = []
  for line in hlo_text.splitlines():
    if re.search(r"\ball-gather(-start)?\(", line):
      lhs = line.split("=", 1)[1] if "=" in line else line
      shapes += [tuple(int(d) for d in dims.split(",") if d)
                 for dims in re.findall(r"\[([\d,]*)\]", lhs.split("all-gather")[0])]
  return shapes


def test_compiled_step_never_all_gathers_a_table_or_its_state(compiled_fsdp8):
  trainer, abstract, train_c, _ = compiled_fsdp8
  hlo = train_c.as_text()
  gathered = _all_gather_shapes(hlo)
  assert gathered  # FSDP gathers the dense parameters at use
  # Any gather of table rows has a dimension of k * L (L rows per device, 257 here: prime, so
  # no other operand of the step has a dimension divisible by it) or R.
  per_device = {ts.rows_per_shard for ts in trainer.table_shardings.values()}
  rows = {trainer.exp.hashing.num_rows(l) for l in trainer.layer_ids}
  assert per_device == {257}
  bad = [s for s in gathered
         if any(d in rows or any(d % n == 0 for n in per_device) for d in s if d)]
  assert not bad, f"all-gathers of table-shaped operands: {bad}"
  assert "all-to-all" in hlo


def test_overflowing_request_buffers_stop_the_run_by_name(compiled_fsdp8):
  trainer, _, train_c, batch_sh = compiled_fsdp8
  rng = np.random.default_rng(0)
  b, t = trainer.shapes["inputs"].shape
  batch = {"inputs": rng.integers(0, 100, (b, t)), "targets": rng.integers(0, 100, (b, t)),
           "segment_ids": np.ones((b, t)), "positions": np.broadcast_to(np.arange(t), (b, t)),
           "weights": np.ones((b, t))}
  batch = {k: np.asarray(v, np.float32 if k == "weights" else np.int32)
           for k, v in batch.items()}
  batch["engram_ids"] = {
      l: np.stack([rng.integers(0, p, (b, t)) for p in trainer.exp.hashing.head_sizes(l)],
                  -1).astype(np.int32) for l in trainer.layer_ids}
  _, metrics = train_c(trainer.init_state(), jax.device_put(batch, batch_sh))
  metrics = jax.device_get(metrics)
  assert metrics["engram/overflow"] > 0
  with pytest.raises(OverflowError, match=r"step 3: metric 'engram/overflow'.*"
                                          r"engram\.shard_capacity_factor"):
    sharded_train_step.check_overflow(3, metrics)
  sharded_train_step.check_overflow(3, {**metrics, "engram/overflow": 0})  # no overflow: runs on


def test_mesh_fields_are_checked_by_name():
  with pytest.raises(ValueError, match=r"train\.mesh\.fsdp=0 must be >= 1, or -1"):
    _bad_mesh({"fsdp": 0})
  with pytest.raises(ValueError, match=r"at most one train\.mesh field may be -1"):
    _bad_mesh({"fsdp": -1, "data": -1})
  with pytest.raises(ValueError, match=r"data\.batch_size=8 must be divisible by train\.mesh"):
    _bad_mesh({"fsdp": 1, "data": 3})
  with pytest.raises(ValueError, match=r"train\.mesh=.*needs 16 devices, only 8 exist"):
    train.make_mesh(_config({"fsdp": 16}))


def _bad_mesh(mesh, **overrides):
  from engram_jax import experiment_config  # pylint: disable=g-import-not-at-top
  c = _config(**overrides)
  for axis, size in mesh.items():
    c.train.mesh[axis] = size
  experiment_config.check_config(c)
