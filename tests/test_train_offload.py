"""`train_and_evaluate` with Engram tables in pinned host memory (engram.placement).

Host placement must be the device placement moved, not a different trainer: same losses, same
evaluation, same final table rows and optimiser state, on one device and on a mesh of 8 fake
devices (data=2 x fsdp=4, against one device and against row-sharded device tables on that
mesh); kill-and-resume with host tables repeats the uninterrupted run, on the mesh too;
configurations it cannot serve are refused by name at load time.

Dimension legend: R table rows, E row width.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from engram_jax import data as data_lib
from engram_jax import evaluate
from engram_jax import experiment_config
from engram_jax import host_checkpoint
from engram_jax import train
from tests.test_train import _config, _losses

pytestmark = pytest.mark.slow


STEPS = 6
CHECKPOINT_EVERY = 3
MESH = {"train.mesh.data": 2, "train.mesh.fsdp": 4}   # 8 batch shards of the 8 sequences


def _host_config(**overrides):
  return _config(**{"engram.placement": "pinned_host", "train.num_steps": STEPS,
                    "train.checkpoint_every": CHECKPOINT_EVERY, "data.batch_size": 8,
                    **overrides})


def _host_tables(workdir, step):
  """{name: NumPy array} of the whole host tables + state saved at `step`."""
  return host_checkpoint.read_host_tables(os.path.join(workdir, "host_tables"), step)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = {}
  for placement in ("device", "pinned_host"):
    workdir = str(tmp_path_factory.mktemp(placement))
    final = train.train_and_evaluate(_host_config(**{"engram.placement": placement}), workdir)
    out[placement] = {"workdir": workdir, "final": final, "losses": _losses(workdir)[0]}
  return out


def test_host_placement_equals_device_placement(runs):
  dev, host = runs["device"], runs["pinned_host"]
  assert len(host["losses"]) == STEPS
  np.testing.assert_allclose(host["losses"], dev["losses"], rtol=1e-6, atol=0)
  np.testing.assert_allclose(host["final"]["eval_loss"], dev["final"]["eval_loss"], rtol=1e-6)
  # Final rows and optimiser state: the device run's are in its orbax state, the host run's
  # only in host_tables/<step> (its orbax state holds no table).
  _, dev_state, _ = train.restore_for_eval(
      evaluate.load_workdir_config(dev["workdir"]), dev["workdir"])
  _, host_state, _ = train.restore_for_eval(
      evaluate.load_workdir_config(host["workdir"]), host["workdir"])
  assert host_state.tables == {} and host_state.table_opt == {}
  saved = _host_tables(host["workdir"], STEPS)
  for k, table in dev_state.tables.items():
    opt = dev_state.table_opt[k]
    np.testing.assert_allclose(saved[f"layer{k}.table"], np.asarray(table), rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(saved[f"layer{k}.nu_RxE"], np.asarray(opt.nu_RxE), rtol=1e-6,
                               atol=1e-12)
    np.testing.assert_array_equal(saved[f"layer{k}.count_R"], np.asarray(opt.count_R))
    # Training moved some rows and not others, so the equality above is not vacuous.
    counts = np.asarray(opt.count_R)
    assert counts.max() > 1 and (counts == 0).any()
    assert np.abs(saved[f"layer{k}.mu_RxE"]).max() > 0


def test_host_tables_stay_on_the_host_and_match_the_checkpoint(runs):
  workdir = runs["pinned_host"]["workdir"]
  trainer, state, step = train.restore_for_eval(evaluate.load_workdir_config(workdir), workdir)
  assert step == STEPS
  for l in trainer.host.layers:
    for x in jax.tree.leaves((trainer.host.tables[l], trainer.host.states[l])):
      assert x.sharding.memory_kind == "pinned_host"
  # The eval CLI's path (restored host tables, rows read per batch) gives the run's final eval.
  eval_step, put = trainer.eval_fn
  valid = data_lib.default_corpus_paths()["valid"]
  m = evaluate.evaluate(eval_step, state, trainer.eval_batches(valid), put, num_batches=2)
  np.testing.assert_allclose(m["eval_loss"], runs["pinned_host"]["final"]["eval_loss"], rtol=1e-6)
  # One host_tables directory per kept orbax step, none left half-written.
  kept = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert sorted(os.listdir(os.path.join(workdir, "host_tables"))) == [str(s) for s in kept]


def test_kill_and_resume_with_host_tables_reproduces_the_run(runs, tmp_path):
  # A run killed between its checkpoints of steps 3 and 6: the workdir as it was at step 5
  # (the complete run's, without the step-6 checkpoint, orbax state and host tables alike).
  workdir = str(tmp_path / "killed")
  shutil.copytree(runs["pinned_host"]["workdir"], workdir)
  for root in ("checkpoints", "host_tables"):
    shutil.rmtree(os.path.join(workdir, root, str(STEPS)))
  assert host_checkpoint.has_host_tables(os.path.join(workdir, "host_tables"), CHECKPOINT_EVERY)
  train.train_and_evaluate(_host_config(), workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(l) for l in f if '"train"' in l]
  resumed = records[-(STEPS - CHECKPOINT_EVERY):]
  assert [r["step"] for r in resumed] == list(range(CHECKPOINT_EVERY + 1, STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in resumed],
                             runs["pinned_host"]["losses"][CHECKPOINT_EVERY:], rtol=1e-6, atol=0)
  # The resumed run's final tables and optimiser state are the uninterrupted run's.
  want = _host_tables(runs["pinned_host"]["workdir"], STEPS)
  got = _host_tables(workdir, STEPS)
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
  """Both placements on the 8-device mesh (device tables: row-sharded, ShardedTablesTrainer)."""
  out = {}
  for placement in ("device", "pinned_host"):
    workdir = str(tmp_path_factory.mktemp(f"mesh_{placement}"))
    final = train.train_and_evaluate(
        _host_config(**{"engram.placement": placement, **MESH}), workdir)
    out[placement] = {"workdir": workdir, "final": final, "losses": _losses(workdir)[0]}
  return out


def test_host_tables_on_a_mesh_equal_one_device_and_device_tables_on_the_mesh(runs, mesh_runs):
  host, one, dev = mesh_runs["pinned_host"], runs["pinned_host"], mesh_runs["device"]
  assert len(host["losses"]) == STEPS
  # Other reduction orders over the batch shards: the mesh tests' tolerance.
  np.testing.assert_allclose(host["losses"], one["losses"], rtol=2e-5, atol=0)
  np.testing.assert_allclose(host["losses"], dev["losses"], rtol=2e-5, atol=0)
  np.testing.assert_allclose(host["final"]["eval_loss"], one["final"]["eval_loss"], rtol=2e-5)
  np.testing.assert_allclose(host["final"]["eval_loss"], dev["final"]["eval_loss"], rtol=2e-5)
  saved, want = _host_tables(host["workdir"], STEPS), _host_tables(one["workdir"], STEPS)
  assert sorted(saved) == sorted(want)
  # Against one device: lazy Adam divides by the root of tiny second moments, which magnifies
  # the other summation order of the row gradients (device tables on this mesh differ from
  # one device by as much); a row moves up to 5 x lr = 0.05 per step.
  for name in want:
    np.testing.assert_allclose(saved[name], want[name], rtol=1e-3, atol=1e-3, err_msg=name)
  # Against device tables on the same mesh: equal up to float rounding. The device run's
  # tables are padded to a multiple of 8 rows that no id reaches.
  _, dev_state, _ = train.restore_for_eval(
      evaluate.load_workdir_config(dev["workdir"]), dev["workdir"])
  for k, table in dev_state.tables.items():
    rows = saved[f"layer{k}.table"].shape[0]
    opt = dev_state.table_opt[k]
    np.testing.assert_allclose(saved[f"layer{k}.table"], np.asarray(table)[:rows], rtol=1e-5,
                               atol=2e-6)
    np.testing.assert_allclose(saved[f"layer{k}.nu_RxE"], np.asarray(opt.nu_RxE)[:rows],
                               rtol=1e-4, atol=1e-12)
    counts = np.asarray(opt.count_R)[:rows]
    np.testing.assert_array_equal(saved[f"layer{k}.count_R"], counts)
    assert counts.max() > 1 and (counts == 0).any()       # not vacuous
  with open(os.path.join(host["workdir"], "run_summary.json")) as f:
    summary = json.load(f)
  assert (summary["trainer"], summary["num_devices"], summary["num_processes"]) == (
      "HostPlacementTrainer", 8, 1)
  for k, blocks in summary["engram_table_host_rows_per_process"].items():
    rows = saved[f"layer{k}.table"].shape[0]
    assert blocks == [[0, rows]]
  table_bytes = sum(v.nbytes for n, v in saved.items() if n.endswith(".table"))
  assert summary["engram_table_bytes_host_per_process"] == table_bytes
  assert summary["table_state_bytes_host_per_process"] == sum(
      v.nbytes for n, v in saved.items() if not n.endswith(".table"))


def test_kill_and_resume_on_a_mesh_reproduces_the_run(mesh_runs, tmp_path):
  workdir = str(tmp_path / "killed")
  shutil.copytree(mesh_runs["pinned_host"]["workdir"], workdir)
  for root in ("checkpoints", "host_tables"):
    shutil.rmtree(os.path.join(workdir, root, str(STEPS)))
  train.train_and_evaluate(_host_config(**MESH), workdir)
  losses, steps = _losses(workdir)
  assert steps == list(range(1, STEPS + 1))
  np.testing.assert_allclose(losses[CHECKPOINT_EVERY:],
                             mesh_runs["pinned_host"]["losses"][CHECKPOINT_EVERY:], rtol=1e-6,
                             atol=0)
  want = _host_tables(mesh_runs["pinned_host"]["workdir"], STEPS)
  got = _host_tables(workdir, STEPS)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])


def test_a_mesh_config_with_host_tables_passes_the_load_checks():
  """Host tables on a mesh of 8 devices: accepted at load time (formerly refused: one device)."""
  config = _host_config(**MESH)
  experiment_config.check_config(config)
  _, trainer, _ = train.setup(config, check_data=False)
  assert isinstance(trainer, train.HostPlacementTrainer) and trainer.mesh.size == 8


def test_resume_without_host_tables_is_refused(runs, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(runs["pinned_host"]["workdir"], workdir)
  shutil.rmtree(os.path.join(workdir, "host_tables", str(STEPS)))
  with pytest.raises(FileNotFoundError, match=rf"checkpoint step {STEPS} has no host tables"):
    train.train_and_evaluate(_host_config(**{"train.num_steps": STEPS + 1}), workdir)


def test_resuming_a_host_run_on_the_device_is_refused(runs, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(runs["pinned_host"]["workdir"], workdir)
  with pytest.raises(ValueError, match=r"trained with engram.placement='pinned_host'"):
    train.train_and_evaluate(_host_config(**{"engram.placement": "device",
                                             "train.num_steps": STEPS + 1}), workdir)


@pytest.mark.parametrize("overrides, match", [
    ({"table_optim.kind": "dense_adam"},
     r"engram.placement='pinned_host' needs a row-sparse table optimiser.*'dense_adam'"),
    ({"engram.hash_on_device": True}, r"set engram.hash_on_device=False"),
    ({"engram.placement": "hbm"}, r"engram.placement must be one of"),
])
def test_unsupported_host_configs_are_refused(overrides, match):
  config = _config()
  config.engram.placement = "pinned_host"
  experiment_config.apply_overrides(config, overrides.items())
  with pytest.raises(ValueError, match=match):
    experiment_config.check_config(config)


@pytest.mark.parametrize("key", ["host_step", "host_row_buckets", "allow_xla_host_writes"])
def test_removed_host_step_keys_are_refused_by_name(key):
  """Host tables have one step; a config (or --config override) still setting a removed key
  fails naming it, not silently."""
  config = _config()
  with pytest.raises(KeyError, match=rf'Key "{key}" does not exist'):
    config.engram[key] = "threads"


def test_gate_view_reads_host_tables_like_device_tables(runs):
  """experiments/paper/gate_view on a pinned_host workdir: the gates of the device run."""
  from experiments.paper import gates as gate_view
  gates = {}
  for name in ("device", "pinned_host"):
    workdir = runs[name]["workdir"]
    trainer, state, _ = train.restore_for_eval(evaluate.load_workdir_config(workdir), workdir)
    tokens, gates[name] = gate_view.gate_values(trainer, state, "In the beginning God created")
  assert len(tokens) > 3 and sorted(gates["pinned_host"]) == sorted(gates["device"])
  for l, g_TxM in gates["device"].items():
    np.testing.assert_allclose(gates["pinned_host"][l], g_TxM, rtol=1e-5, atol=1e-6)
