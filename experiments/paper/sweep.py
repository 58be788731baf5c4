r"""Runs a paper sweep and writes its results table and plot.

  python -m experiments.paper.sweep --sweep=iso|alloc|slots|ablate[,...] --out=DIR \
      --data_dir=DATA [--parallel=N] [--time_budget_s=S] [--tiny] [--only=run,...]
  python -m experiments.paper.sweep --sweep=iso --tiny --out=/tmp/paper_tiny   # 2-core CPU

Every run is `python -m experiments.train` with experiments/paper/configs/paper.py (or
paper_moe.py) and the overrides of experiments/paper/sweeps.py, in its own workdir under
--workdir_root, followed by `python -m experiments.eval` of its checkpoint on the
out-of-domain text. N runs go at once; on a GPU each process gets
XLA_PYTHON_CLIENT_PREALLOCATE=false and XLA_PYTHON_CLIENT_MEM_FRACTION=0.9/N, and all share
one persistent compilation cache (--workdir_root/jax_cache), so seeds of one config compile
once. A run shared by several sweeps (the reference, the MoE baseline) runs once per --out.

Written to --out (small files only; checkpoints stay in --workdir_root):
  results/<run>.json    status, losses, tokens, seed, parameter counts, exact commands
  logs/<run>.log        the run's training and evaluation output
  metrics/<run>.jsonl   its training curve
  <sweep>.md, <sweep>.png   the sweep's table, conclusions and plot (the .md is also printed)
  gate_view/            experiments.paper.gate_view of engram_s0 (when the sweeps ran it)
Results already in --out/results with the same command are reused, so a sweep split over
several calls (--only, or a --time_budget_s stop) completes in the same --out, and
`--report_only` rebuilds the tables from them without training.

--data_dir holds train.jsonl.gz, valid.jsonl.gz, ood.jsonl.gz and tokenizer.json
(experiments/paper/prepare_data.py). --tiny without --data_dir trains on slices of the shipped
corpus (held-out: other documents of it; out-of-domain stand-in: engram_jax/assets/README.md).
--time_budget_s stops the runs still going when it elapses and writes the tables marked
PARTIAL. Dimension legend: none.
"""

from __future__ import annotations

import ast
import concurrent.futures
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags

from experiments.paper import analysis
from experiments.paper import data_files
from experiments.paper import plots
from experiments.paper import sweeps

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SWEEP = flags.DEFINE_list("sweep", None, f"Sweeps to run, from {sweeps.SWEEPS}.")
_OUT = flags.DEFINE_string("out", None, "Results directory (tables, plots, per-run JSON, logs).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "train/valid/ood .jsonl.gz + tokenizer.json.")
_TINY = flags.DEFINE_bool("tiny", False, "CPU-sized runs (paper.py:tiny) on the shipped corpus.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at once.")
_WORKDIR_ROOT = flags.DEFINE_string("workdir_root", "/tmp/engram_paper_runs",
                                    "Workdirs (checkpoints) and the compilation cache.")
_TIME_BUDGET = flags.DEFINE_integer("time_budget_s", 0, "Stop runs after this long (0: never).")
_ONLY = flags.DEFINE_list("only", [], "Run only these run names of the sweeps.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Tables from --out/results; no training.")
_COMMIT = flags.DEFINE_string("commit", "", "Commit printed with the results ('' = git HEAD).")
_GATE_TEXT = flags.DEFINE_multi_string(
    "gate_view_text",
    ["In the beginning God created the heaven and the earth.",
     "To upgrade a Debian system, run apt-get update and then apt-get dist-upgrade."],
    "Texts of the gate view of engram_s0 (an in-domain and an out-of-domain sentence).")

MEASURES = {
    "iso": "Engram vs its iso-parameter MoE baseline over seeds",
    "alloc": "loss against the share rho of the sparse budget in routed experts, total and "
             "activated parameters fixed",
    "slots": "loss against Engram table slots at a fixed backbone",
    "ablate": "one change to the Engram reference per run",
}


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- data ------------------------------------------------------------------------------------


def data_overrides(paths: dict) -> tuple:
  return (("data.train_files", (paths["train"],)), ("data.eval_files", (paths["valid"],)),
          ("data.tokenizer_path", paths["tokenizer"]))


# ---- commands --------------------------------------------------------------------------------


def flag_value(value) -> str:
  """An override as config_flags parses it; tuples without spaces, so commands split on them."""
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def train_command(run: sweeps.Run, tiny: bool, paths: dict, workdir: str) -> list[str]:
  config = sweeps.CONFIG_FILES[run.config] + (":tiny" if tiny else "")
  overrides = data_overrides(paths) + run.overrides + sweeps.seed_overrides(run.seed)
  return ([sys.executable, "-m", "experiments.train", f"--config={config}",
           f"--workdir={workdir}"]
          + [f"--config.{k}={flag_value(v)}" for k, v in overrides])


def eval_command(tiny: bool, paths: dict, workdir: str) -> list[str]:
  cmd = [sys.executable, "-m", "experiments.eval", f"--workdir={workdir}",
         f"--data={paths['ood']}"]
  return cmd + (["--num_batches=2"] if tiny else [])


def printable(cmd: list[str]) -> str:
  """The command as typed in a shell from the repository root."""
  parts = ["python"] + cmd[1:]
  return " ".join(p if re.fullmatch(r"[\w.,:=/+-]+", p) else repr(p) for p in parts)


def commit() -> str:
  if _COMMIT.value:
    return _COMMIT.value
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           check=True, capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown (no git checkout here: pass --commit)"
  return head + (" (uncommitted changes)" if dirty else "")


# ---- running ---------------------------------------------------------------------------------


class Runner:
  """Runs `Run`s N at a time as subprocesses; writes one result JSON per run."""

  def __init__(self, out: str, root: str, tiny: bool, paths: dict, parallel: int,
               deadline: float):
    self.out, self.root, self.tiny, self.paths = out, root, tiny, paths
    self.data = data_files.describe(paths) if paths else ""
    self.parallel, self.deadline = parallel, deadline
    self.stop = threading.Event()
    self._procs: dict[int, subprocess.Popen] = {}
    self._lock = threading.Lock()
    for sub in ("results", "logs", "metrics"):
      os.makedirs(os.path.join(out, sub), exist_ok=True)
    self.env = dict(os.environ)
    self.env["PYTHONPATH"] = REPO + os.pathsep + self.env.get("PYTHONPATH", "")
    self.env.update({
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / parallel:.3f}",
        "JAX_COMPILATION_CACHE_DIR": os.path.join(root, "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    })

  def result_path(self, name: str) -> str:
    return os.path.join(self.out, "results", f"{name}.json")

  def previous(self, run: sweeps.Run, same_command: bool = True) -> dict | None:
    """The finished record of `run` in --out, if its command is this invocation's; for
    --report_only (same_command=False) any record, with the training results of a run stopped
    after its training recovered from its log (`train_results_from_log`)."""
    path = self.result_path(run.name)
    if not os.path.isfile(path):
      return None
    with open(path) as f:
      record = json.load(f)
    if not same_command:
      log_path = os.path.join(self.out, "logs", f"{run.name}.log")
      if record.get("status", "").startswith("stopped") and os.path.isfile(log_path):
        with open(log_path) as f:
          record.update(train_results_from_log(f.read(), record))
      return record  # failed and stopped runs too: the table shows their status
    workdir = os.path.join(self.root, run.name)
    same = record.get("command") == printable(train_command(run, self.tiny, self.paths,
                                                            workdir))
    return record if same and analysis.ok(record) else None

  def run_all(self, runs: list[sweeps.Run]) -> dict[str, dict]:
    records, todo = {}, []
    for run in runs:
      prev = self.previous(run)
      if prev is not None:
        records[run.name] = prev
        log(f"reuse {run.name}: held-out {prev['eval_loss']:.4f}")
      else:
        todo.append(run)
    with concurrent.futures.ThreadPoolExecutor(max_workers=self.parallel) as pool:
      futures = {pool.submit(self._execute, run, i + 1, len(todo)): run
                 for i, run in enumerate(todo)}
      pending = set(futures)
      while pending:
        timeout = None if not self.deadline else max(self.deadline - time.time(), 0.1)
        done, pending = concurrent.futures.wait(pending, timeout=timeout)
        for fut in done:
          records[futures[fut].name] = fut.result()
        if pending and self.deadline and time.time() >= self.deadline and not self.stop.is_set():
          log(f"time budget reached: stopping {len(pending)} run(s)")
          self.stop.set()
          self._terminate_all()
    return records

  def _terminate_all(self):
    with self._lock:
      procs = list(self._procs.values())
    for p in procs:
      p.terminate()
    for p in procs:
      try:
        p.wait(timeout=20)
      except subprocess.TimeoutExpired:
        p.kill()

  def _call(self, cmd: list[str], log_file) -> int:
    with self._lock:
      if self.stop.is_set():
        return -1
      p = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log_file,
                           stderr=subprocess.STDOUT, text=True)
      self._procs[p.pid] = p
    rc = p.wait()
    with self._lock:
      self._procs.pop(p.pid, None)
    return rc

  def _execute(self, run: sweeps.Run, index: int, count: int) -> dict:
    workdir = os.path.join(self.root, run.name)
    shutil.rmtree(workdir, ignore_errors=True)  # every run starts from scratch
    train_cmd = train_command(run, self.tiny, self.paths, workdir)
    ood_cmd = eval_command(self.tiny, self.paths, workdir)
    config = sweeps.run_config(run, self.tiny)
    record = {"name": run.name, "config": run.config, "seed": run.seed, "data": self.data,
              "overrides": {k: v for k, v in run.overrides}, "point": run.point_dict,
              "command": printable(train_cmd), "eval_command": printable(ood_cmd),
              "steps": config.train.num_steps, "batch_size": config.data.batch_size,
              "seq_len": config.data.seq_len,
              "tokens": config.train.num_steps * config.data.batch_size * config.data.seq_len,
              "head_dim": (config.engram.n_embed_per_ngram // config.engram.n_head_per_ngram
                           if config.engram.enabled else None),
              "status": "running"}
    log_path = os.path.join(self.out, "logs", f"{run.name}.log")
    log(f"start {run.name} ({index}/{count})")
    t0 = time.time()
    rc_eval = None
    with open(log_path, "w") as log_file:
      rc = self._call(train_cmd, log_file)
      if rc == 0:
        log_file.write("\n==== out-of-domain evaluation ====\n")
        log_file.flush()
        rc_eval = self._call(ood_cmd, log_file)
    with open(log_path) as f:
      text = f.read()
    if rc == 0:
      record.update(self._collect_train(workdir, text, record))
    if rc == 0 and rc_eval == 0:
      record.update(self._collect_ood(text))
    elif rc == 0 and self.stop.is_set():
      record["status"] = analysis.HELD_OUT_ONLY
    elif self.stop.is_set():
      record["status"] = "stopped (time budget)"
    else:
      record["status"] = "failed"
      record["error"] = text[-1500:]
    record["wall_seconds"] = time.time() - t0
    with open(self.result_path(run.name), "w") as f:
      json.dump(record, f, indent=2)
    if analysis.ok(record):
      log(f"done {run.name}: held-out {record['eval_loss']:.4f}, out-of-domain "
          f"{record['ood_loss']:.4f}, {record['wall_seconds']:.0f}s")
    else:
      tail = "\n    ".join(text.strip().splitlines()[-3:]) if record["status"] == "failed" else ""
      log(f"{record['status']} {run.name} (log: {log_path})" + (f"\n    {tail}" if tail else ""))
    return record

  def _collect_train(self, workdir: str, text: str, record: dict) -> dict:
    """What the finished training run wrote: held-out loss, parameter counts, its curve."""
    with open(os.path.join(workdir, "final_metrics.json")) as f:
      final = json.load(f)
    shutil.copyfile(os.path.join(workdir, "metrics.jsonl"),
                    os.path.join(self.out, "metrics", f"{record['name']}.jsonl"))
    return {**train_results(final, text, record), "train_seconds": final["wall_seconds"]}

  @staticmethod
  def _collect_ood(text: str) -> dict:
    ood = json.loads(text[text.rindex("\n{\n") + 1:])
    return {"status": "ok", "ood_loss": ood["eval_loss"], "ood_tokens": ood["eval_tokens"]}


TRAIN_KEYS = ("eval_loss", "eval_tokens", "train_loss", "total", "activated", "engram",
              "engram_dense", "rho", "flops_per_token", "steps")


def train_results(final: dict, text: str, record: dict) -> dict:
  """A run's record fields from its final metrics (`final`) and its log (`text`): the
  TRAIN_KEYS, the device line and the table slots."""
  device = re.search(r"devices (.+?) x(\d+)", text)
  out = {k: final[k] for k in TRAIN_KEYS if k in final}
  out.update(device=f"{device.group(1)} x{device.group(2)}" if device else "unknown",
             slots=(final["engram"] // record["head_dim"]) if record.get("head_dim") else 0)
  return out


def train_results_from_log(text: str, record: dict) -> dict:
  """The training results a run's log prints, for a run stopped after its training finished
  (e.g. during the out-of-domain evaluation) by a driver that kept no record of them: the
  parameter counts line (`<config>: {'total': ...}`), the final eval line and the `done:` line
  of experiments.train. {} when the log does not show a finished training run."""
  done = re.search(r"\] done: (\{.*\})", text)
  counts = re.search(r"\] \w+: (\{'total': [^}]*\})", text)
  tokens = re.search(r"eval step \d+: loss [\d.]+ \| ppl [\d.]+ \| (\d+) tokens", text)
  if not (done and counts):
    return {}
  final = {**ast.literal_eval(counts.group(1)), **json.loads(done.group(1))}
  if tokens:
    final["eval_tokens"] = int(tokens.group(1))
  return {**train_results(final, text, record), "status": analysis.HELD_OUT_ONLY}


# ---- reporting -------------------------------------------------------------------------------


def report(sweep: str, runs: list[sweeps.Run], records: dict, meta: dict, out: str) -> str:
  lines, data = analysis.ANALYSES[sweep](runs, records)
  finished = {label: sum(analysis.has(records.get(r.name), key) for r in runs)
              for key, label in analysis.METRICS}
  status = ("complete" if min(finished.values()) == len(runs) else "PARTIAL: " + ", ".join(
      f"{label} {n} of {len(runs)}" for label, n in finished.items()) + " runs finished")
  done = [records[r.name] for r in runs if analysis.has(records.get(r.name), "eval_loss")]
  devices = sorted({r.get("device", "?") for r in done})
  data_desc = sorted({r.get("data", "?") for r in done})
  first = next((records[r.name] for r in runs if r.name in records), {})
  png = plots.plot(sweep, data, os.path.join(out, f"{sweep}.png"),
                   f"{sweep}: {MEASURES[sweep]}" + (" (tiny)" if meta["tiny"] else ""))
  md = [f"## {sweep}: {MEASURES[sweep]}", "",
        f"- status: {status}",
        f"- commit {meta['commit']}; device {', '.join(devices) or '-'}; "
        f"{'TINY (CPU smoke run, not a result)' if meta['tiny'] else 'full size'}",
        f"- data: {' | '.join(data_desc) or '-'}",
        f"- per run: {first.get('steps', '-')} steps x {first.get('batch_size', '-')} x "
        f"{first.get('seq_len', '-')} = {first.get('tokens', 0):,} training tokens; "
        f"seeds as listed (seed = init + data order; the hash seed is 0)",
        f"- written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by "
        f"`{meta['argv']}`", ""]
  md += analysis.run_table(runs, records) + [""] + lines + ["", f"plot: {png}", ""]
  md += command_lines(runs, records)
  text = "\n".join(md) + "\n"
  with open(os.path.join(out, f"{sweep}.md"), "w") as f:
    f.write(text)
  return text


def command_lines(runs: list[sweeps.Run], records: dict) -> list[str]:
  """The exact command of every run: the flags they share once, then each run's own."""
  cmds = {r.name: records[r.name]["command"].split(" ") for r in runs if r.name in records}
  if not cmds:
    return []
  shared = [f for f in next(iter(cmds.values())) if all(f in c for c in cmds.values())]
  out = ["commands (python -m experiments.train with the shared flags, the run's own flags and "
         "--workdir=ROOT/RUN; then python -m experiments.eval --workdir=ROOT/RUN "
         "--data=OOD):",
         f"- shared: `{' '.join(f for f in shared if not f.startswith('--workdir='))}`"]
  for name, c in cmds.items():
    own = [f for f in c if f not in shared and not f.startswith("--workdir=")]
    out.append(f"- {name}: `{' '.join(own)}`")
  ood = next(iter(records[n] for n in cmds))["eval_command"]
  out.append(f"- out-of-domain evaluation, e.g. `{ood}`")
  return out


def gate_view(root: str, out: str, env: dict) -> None:
  workdir = os.path.join(root, "engram_s0")
  cmd = [sys.executable, "-m", "experiments.paper.gate_view", f"--workdir={workdir}",
         f"--out={os.path.join(out, 'gate_view')}"] + [f"--text={t}" for t in _GATE_TEXT.value]
  with open(os.path.join(out, "logs", "gate_view.log"), "w") as log_file:
    rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT).returncode
  log(f"gate view of engram_s0: {'written to ' + os.path.join(out, 'gate_view') if rc == 0 else 'FAILED, see logs/gate_view.log'}"
      f" (`{printable(cmd)}`)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  names = list(sweeps.SWEEPS) if _SWEEP.value == ["all"] else _SWEEP.value
  if _PARALLEL.value < 1:
    raise app.UsageError("--parallel must be >= 1")
  start = time.time()
  out, tiny = _OUT.value, _TINY.value
  os.makedirs(out, exist_ok=True)
  root = os.path.join(_WORKDIR_ROOT.value, "tiny" if tiny else "full")
  os.makedirs(root, exist_ok=True)
  if _REPORT_ONLY.value:
    paths = {}
  elif _DATA_DIR.value:
    paths = data_files.data_paths(_DATA_DIR.value)
  elif tiny:
    paths = data_files.tiny_data(out)
  else:
    raise app.UsageError("--data_dir is required without --tiny")
  by_sweep = {s: sweeps.runs_of(s, tiny) for s in names}
  unique = {}
  for runs in by_sweep.values():
    for run in runs:
      unique.setdefault(run.name, run)
  unknown = sorted(set(_ONLY.value) - set(unique))
  if unknown:
    raise app.UsageError(f"--only: {unknown} are not runs of {names}: {sorted(unique)}")
  todo = [r for r in unique.values() if not _ONLY.value or r.name in _ONLY.value]
  deadline = start + _TIME_BUDGET.value if _TIME_BUDGET.value else 0.0
  runner = Runner(out, root, tiny, paths, _PARALLEL.value, deadline)
  meta = {"commit": commit(), "tiny": tiny,
          "argv": printable([sys.executable, "-m", "experiments.paper.sweep"] + sys.argv[1:])}
  log(f"sweeps {names}: {len(todo)} run(s), {_PARALLEL.value} at a time, out {out}")
  if _REPORT_ONLY.value:
    records = {r.name: runner.previous(r, same_command=False) for r in todo}
    records = {k: v for k, v in records.items() if v}
  else:
    records = runner.run_all(todo)
  for s in names:
    print("\n" + report(s, by_sweep[s], records, meta, out), flush=True)
  # The gate view restores and compiles once more: skipped when the budget has < 2 min left.
  time_left = deadline - time.time() if deadline else float("inf")
  if (not _REPORT_ONLY.value and any(r.name == "engram_s0" for r in todo)
      and analysis.ok(records.get("engram_s0"))):
    if time_left > 120:
      gate_view(root, out, runner.env)
    else:
      log(f"gate view skipped: {time_left:.0f}s of the time budget left")
  log(f"wall time {time.time() - start:.0f}s")


if __name__ == "__main__":
  flags.mark_flags_as_required(["sweep", "out"])
  app.run(main)
