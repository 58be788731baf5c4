"""A multi-process job on one machine (`experiments.launch_local`, 2 CPU processes x 4 fake
devices, gloo collectives): it trains the losses of one process with 8 devices fed the same
global batches, and after `kill -9` of one process mid-run a relaunch resumes from the last
checkpoint and reproduces the uninterrupted run.

Every process reads its own data shard, so the 8-device reference reads both processes' shards
and concatenates them (process 0's rows first: its devices own the first half of the batch).
"""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from engram_jax import data as data_lib
from engram_jax import train
from engram_jax import workdir as workdir_lib
from experiments.configs import tiny_test

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_launch_local")]

STEPS = 10
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"data.batch_size": 8, "data.seq_len": 16, "train.num_steps": STEPS,
             "train.log_every": 1, "train.checkpoint_every": 5, "train.num_eval_batches": 1,
             "train.mesh.fsdp": -1}


def _valid():
  return tuple(data_lib.default_corpus_paths()["valid"])


def _flags(workdir):
  flags = [f"--config={os.path.join(REPO, 'experiments/configs/tiny_test.py')}",
           f"--workdir={workdir}", f"--config.data.train_files={_valid()!r}",
           f"--config.data.eval_files={_valid()!r}"]
  return flags + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]


def _launch(workdir, kill_after=None):
  """Runs the job; with `kill_after`, kill -9s process 1 once process 0 prints that text.
  Returns (exit status, output)."""
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  launcher = subprocess.Popen(
      [sys.executable, "-m", "experiments.launch_local", "--num_processes=2",
       "--devices_per_process=4", "--", *_flags(workdir)],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in launcher.stdout:
    lines.append(line)
    if kill_after is not None and line.startswith("[p0]") and kill_after in line:
      children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                text=True).stdout.split()
      assert len(children) == 2, children
      os.kill(int(sorted(children, key=int)[1]), signal.SIGKILL)  # process 1: started second
      kill_after = None
  return launcher.wait(timeout=600), "".join(lines)


def _train_records(workdir):
  """{step: loss} of the last train record of every step (a resumed run appends)."""
  records = workdir_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"), splits=["train"])
  return {r["step"]: r["loss"] for r in records}


class _Concat:
  """The global batches of a 2-process job, read in one process (both shards, p0's first)."""

  def __init__(self, iterators):
    self._its = iterators

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self._its]
    return jax.tree.map(lambda *x: np.concatenate(x), *parts)

  def get_state(self):
    return json.dumps([it.get_state() for it in self._its]).encode()

  def set_state(self, state):
    for it, s in zip(self._its, json.loads(state)):
      it.set_state(s)


def _reference_losses(workdir, monkeypatch):
  """One process, 8 devices, fed the global batches of the 2-process job."""
  make = data_lib.make_datasets

  def two_shards(train_paths, eval_paths, *, batch_size, **kw):
    kw.pop("process_index", None)
    kw.pop("process_count", None)
    pairs = [make(train_paths, eval_paths, batch_size=batch_size // 2, process_index=i,
                  process_count=2, **kw) for i in range(2)]
    return (_Concat([p[0] for p in pairs]),
            lambda: _Concat([p[1]() for p in pairs]))

  monkeypatch.setattr(data_lib, "make_datasets", two_shards)
  c = tiny_test.get_config()
  c.data.train_files = c.data.eval_files = _valid()
  for key, value in dict(OVERRIDES, **{"train.checkpoint_every": STEPS}).items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  train.train_and_evaluate(c, workdir)
  return _train_records(workdir)


def test_two_by_four_equals_one_by_eight_and_resumes_after_kill(tmp_path, monkeypatch):
  one = _reference_losses(str(tmp_path / "one_by_eight"), monkeypatch)
  assert sorted(one) == list(range(1, STEPS + 1))
  workdir = str(tmp_path / "two_by_four")
  # Step 7 is logged after the (synchronous) checkpoint of step 5 is complete.
  status, out = _launch(workdir, kill_after=f"step 7/{STEPS}")
  assert status != 0, out[-3000:]
  assert "[p0]" in out and "[p1]" in out
  assert "[launch_local] process 1 exited with -9" in out, out[-3000:]
  killed = _train_records(workdir)
  assert 7 <= max(killed) < STEPS
  with open(os.path.join(workdir, "run_summary.json")) as f:
    summary = json.load(f)
  assert (summary["num_processes"], summary["num_devices"]) == (2, 8)
  # 2 processes x 4 devices train the losses of 1 process x 8 devices.
  steps = sorted(killed)
  np.testing.assert_allclose([killed[s] for s in steps], [one[s] for s in steps], rtol=2e-5)

  status, out = _launch(workdir)
  assert status == 0, out[-3000:]
  assert "resuming from checkpoint step 5" in out, out[-3000:]
  resumed = _train_records(workdir)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  # The relaunch reproduces the steps the killed run had already taken after step 5 ...
  again = list(range(6, max(killed) + 1))
  np.testing.assert_allclose([resumed[s] for s in again], [killed[s] for s in again], rtol=1e-6)
  # ... and goes on as the one-process run.
  rest = list(range(6, STEPS + 1))
  np.testing.assert_allclose([resumed[s] for s in rest], [one[s] for s in rest], rtol=2e-5)
