"""A multi-process job on one machine (`experiments.launch_local`, 2 CPU processes x 4 fake
devices, gloo collectives): it trains the losses of one process with 8 devices fed the same
global batches, and after `kill -9` of one process mid-run a relaunch resumes from the last
checkpoint and reproduces the uninterrupted run. With host tables (engram.placement=
'pinned_host') each process keeps half the rows of every table, the job trains the same
losses, and a relaunch from its checkpoint (one block per process) reproduces it; one process
restores the whole tables from the two blocks.

Every process reads its own data shard, so the 8-device reference reads both processes' shards
and concatenates them (process 0's rows first: its devices own the first half of the batch).
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from engram_jax import data as data_lib
from engram_jax import evaluate
from engram_jax import host_checkpoint
from engram_jax import host_memory
from engram_jax import train
from engram_jax import workdir as workdir_lib
from experiments.configs import tiny_test

pytestmark = pytest.mark.slow

STEPS = 10
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"data.batch_size": 8, "data.seq_len": 16, "train.num_steps": STEPS,
             "train.log_every": 1, "train.checkpoint_every": 5, "train.num_eval_batches": 1,
             "train.mesh.fsdp": -1}


def _valid():
  return tuple(data_lib.default_corpus_paths()["valid"])


def _flags(workdir, extra=()):
  flags = [f"--config={os.path.join(REPO, 'experiments/configs/tiny_test.py')}",
           f"--workdir={workdir}", f"--config.data.train_files={_valid()!r}",
           f"--config.data.eval_files={_valid()!r}"]
  return flags + [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + list(extra)


def _launch(workdir, kill_after=None, extra=()):
  """Runs the job; with `kill_after`, kill -9s process 1 once process 0 prints that text.
  Returns (exit status, output)."""
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)
  launcher = subprocess.Popen(
      [sys.executable, "-m", "experiments.launch_local", "--num_processes=2",
       "--devices_per_process=4", "--", *_flags(workdir, extra)],
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


@pytest.fixture(scope="module")
def one_by_eight(tmp_path_factory):
  """{step: loss} of one process, 8 devices (device tables), the 2-process job's batches."""
  with pytest.MonkeyPatch.context() as monkeypatch:
    return _reference_losses(str(tmp_path_factory.mktemp("one_by_eight")), monkeypatch)


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


def test_two_by_four_equals_one_by_eight_and_resumes_after_kill(tmp_path, one_by_eight):
  one = one_by_eight
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


def test_two_by_four_with_host_tables_keeps_a_block_per_process(tmp_path, one_by_eight):
  workdir = str(tmp_path / "host")
  host = ["--config.engram.placement=pinned_host"]
  status, out = _launch(workdir, extra=host)
  assert status == 0, out[-3000:]
  got = _train_records(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)],
                             [one_by_eight[s] for s in sorted(got)], rtol=2e-5)
  # Each process reports the half of the rows it keeps (tiny_test: one table of 2056 rows).
  with open(os.path.join(workdir, "run_summary.json")) as f:
    summary = json.load(f)
  assert (summary["trainer"], summary["num_processes"]) == ("HostPlacementTrainer", 2)
  blocks = summary["engram_table_host_rows_per_process"]["1"]
  rows = blocks[-1][1]
  assert blocks == [[0, rows // 2], [rows // 2, rows]] and rows == 2056
  width = 16 // 2  # n_embed_per_ngram / n_head_per_ngram
  assert summary["engram_table_bytes_host_per_process"] == rows // 2 * width * 4
  for p, (a, b) in enumerate(blocks):
    assert f"[p{p}] " in out and (f"host tables: process {p} of 2 keeps rows [{a}, {b}) of "
                                  f"{rows} (layer 1)") in out, out[-3000:]
  # The checkpoint holds one block per process, each of its process's rows only.
  saved = host_checkpoint.read_host_tables(os.path.join(workdir, "host_tables"), STEPS)
  for p, (a, b) in enumerate(blocks):
    block = os.path.join(workdir, "host_tables", str(STEPS), f"block_{p}")
    assert np.load(os.path.join(block, "layer1.table.npy"), mmap_mode="r").shape == (b - a,
                                                                                     width)
  # One process (8 devices) restores the whole table from the two blocks.
  config = evaluate.load_workdir_config(workdir)
  trainer, _, _, _ = train.restore_latest(config, workdir)
  assert trainer.host.blocks == {1: (0, rows)}
  np.testing.assert_array_equal(host_memory.host_view(trainer.host.tables[1]),
                                saved["layer1.table"])
  counts = saved["layer1.count_R"]
  assert counts[: rows // 2].any() and counts[rows // 2:].any()   # both halves trained

  # A relaunch from step 5 (each process reads its block) reproduces steps 6..10.
  for root in ("checkpoints", "host_tables"):
    shutil.rmtree(os.path.join(workdir, root, str(STEPS)))
  status, out = _launch(workdir, extra=host)
  assert status == 0, out[-3000:]
  assert "resuming from checkpoint step 5" in out, out[-3000:]
  again = _train_records(workdir)
  rest = list(range(6, STEPS + 1))
  np.testing.assert_allclose([again[s] for s in rest], [got[s] for s in rest], rtol=1e-6)
  resaved = host_checkpoint.read_host_tables(os.path.join(workdir, "host_tables"), STEPS)
  for name in saved:
    np.testing.assert_array_equal(resaved[name], saved[name])
