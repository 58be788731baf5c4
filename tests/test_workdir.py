"""Workdir lock, per-start config records, the resume config check and metrics.jsonl markers."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from engram_jax import experiment_config
from engram_jax import workdir


def test_second_lock_is_refused_naming_the_holder_and_released_at_exit(tmp_path):
  d = str(tmp_path / "run")
  lock = workdir.WorkdirLock(d).acquire()
  holder = json.load(open(os.path.join(d, "lock")))
  assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
  with pytest.raises(workdir.WorkdirLockedError,
                     match=rf"in use by pid {os.getpid()} on host '{socket.gethostname()}'"):
    workdir.WorkdirLock(d).acquire()
  assert os.path.exists(os.path.join(d, "lock"))  # the refusal left the holder's lock alone
  lock.release()
  # The lock made the workdir and nothing else was written: no empty workdir is left behind.
  assert not os.path.exists(d)
  with workdir.WorkdirLock(d):
    open(os.path.join(d, "kept"), "w").close()
  assert os.listdir(d) == ["kept"]


def test_lock_of_a_live_process_is_refused(tmp_path):
  d = str(tmp_path)
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from engram_jax import workdir; "
       "workdir.WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)",
       d], stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir.WorkdirLockedError, match=rf"pid {holder.pid} on host"):
      workdir.WorkdirLock(d).acquire()
  finally:
    holder.kill()
    holder.wait()


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys):
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  with open(tmp_path / "lock", "w") as f:
    json.dump({"pid": gone.pid, "host": socket.gethostname(), "start_time": time.time() - 10,
               "start_time_utc": "then", "argv": ["train"]}, f)
  lock = workdir.WorkdirLock(str(tmp_path)).acquire()
  assert f"taking over the stale lock of {tmp_path}: held by pid {gone.pid}" in \
      capsys.readouterr().out
  assert json.load(open(tmp_path / "lock"))["pid"] == os.getpid()
  lock.release()
  assert not os.path.exists(tmp_path / "lock")
  # A lock held on another host cannot be checked, so it is never taken over.
  with open(tmp_path / "lock", "w") as f:
    json.dump({"pid": gone.pid, "host": "elsewhere", "start_time": 0.0}, f)
  with pytest.raises(workdir.WorkdirLockedError, match="on host 'elsewhere'"):
    workdir.WorkdirLock(str(tmp_path)).acquire()


def _cfg(**over):
  c = {"name": "x", "seed": 0, "model": {"hidden_size": 32, "moe": {"matmul_implementation": ""}},
       "engram": {"segment_reset": True, "placement": "device"},
       "data": {"batch_size": 4, "seq_len": 32, "train_files": ["a"], "eval_files": ["b"]},
       "optim": {"kind": "adamw", "learning_rate": 1e-2},
       "train": {"num_steps": 20, "allow_config_change": False}}
  return experiment_config.apply_overrides(c, over.items())


def test_resume_config_check_names_computation_changing_fields(tmp_path):
  d = str(tmp_path)
  workdir.record_config(d, _cfg())
  changed = _cfg(**{"model.hidden_size": 48, "engram.segment_reset": False,
                    "data.batch_size": 8, "data.seq_len": 64, "data.train_files": ["c"]})
  with pytest.raises(workdir.ConfigChangedError) as e:
    workdir.check_resume_config(d, changed, 10, allow=False)
  msg = str(e.value)
  for field in ("model.hidden_size: 32 -> 48", "engram.segment_reset: true -> false",
                "data.batch_size: 4 -> 8", "data.seq_len: 32 -> 64", "data.train_files",
                "allow_config_change"):
    assert field in msg
  assert "\n" not in msg
  # Allowed with the flag (the caller logs the changes).
  assert set(workdir.check_resume_config(d, changed, 10, allow=True)) == {
      "model.hidden_size", "engram.segment_reset", "data.batch_size", "data.seq_len",
      "data.train_files"}
  # A field the saved config lacks (written before it existed) is not refused.
  old = _cfg()
  del old["engram"]["segment_reset"]
  with open(tmp_path / "config.json", "w") as f:
    json.dump(old, f)
  assert workdir.refused_changes(workdir.check_resume_config(d, _cfg(), 10, allow=False)) == {}
  workdir.record_config(d, _cfg())
  # Fields that choose how the same computation runs, run control and learning rates pass.
  ok = _cfg(**{"engram.placement": "pinned_host", "data.eval_files": ["z"],
               "model.moe.matmul_implementation": "xla", "train.num_steps": 40,
               "optim.learning_rate": 5e-3})
  assert set(workdir.check_resume_config(d, ok, 10, allow=False)) == {
      "engram.placement", "data.eval_files", "model.moe.matmul_implementation",
      "train.num_steps", "optim.learning_rate"}


def test_every_start_config_is_recorded_beside_the_old_ones(tmp_path):
  d = str(tmp_path)
  with open(tmp_path / "config.json", "w") as f:  # a workdir from before the records
    json.dump(_cfg(seed=7), f)
  assert workdir.record_config(d, _cfg(seed=8)) == os.path.join("configs", "config_1.json")
  assert workdir.record_config(d, _cfg(seed=9)) == os.path.join("configs", "config_2.json")
  seeds = [json.load(open(tmp_path / "configs" / f"config_{i}.json"))["seed"] for i in range(3)]
  assert seeds == [7, 8, 9]
  assert json.load(open(tmp_path / "config.json"))["seed"] == 9


def test_metrics_restart_marker_and_last_record_per_step(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  workdir.mark_start(path, 0, resumed_from=None, config_record="configs/config_0.json")
  with open(path, "a") as f:
    for step in (1, 2, 3):
      f.write(json.dumps({"step": step, "split": "train", "loss": float(step)}) + "\n")
    f.write('{"step": 4, "split": "tr')  # a kill in the middle of a line
  workdir.mark_start(path, 2, resumed_from=2, config_record="configs/config_1.json")
  with open(path, "a") as f:
    for step in (3, 4):
      f.write(json.dumps({"step": step, "split": "train", "loss": 10.0 + step}) + "\n")
  lines = open(path).read().splitlines()
  start = json.loads(lines[5])
  assert start["split"] == "start" and start["step"] == 2 and start["resumed_from"] == 2
  assert start["config"] == "configs/config_1.json" and start["pid"] == os.getpid()
  train = workdir.read_metrics(path, splits=("train",))
  assert [(r["step"], r["loss"]) for r in train] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
  starts = [r for r in workdir.read_metrics(path) if r["split"] == "start"]
  assert [s["resumed_from"] for s in starts] == [None, 2]


def test_plotting_reads_the_last_record_per_step(tmp_path):
  from engram_jax import plotting
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    for step, loss in ((1, 5.0), (2, 4.0), (2, 3.0)):
      f.write(json.dumps({"step": step, "split": "train", "loss": loss}) + "\n")
  workdir.mark_start(path, 1, resumed_from=1, config_record="c")
  assert [r["loss"] for r in plotting.read_metrics(str(tmp_path))] == [5.0, 3.0]
