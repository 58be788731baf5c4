"""One trainer per workdir: the lock, the record of every (re)start's config, restart markers.

  lock              `<workdir>/lock` (JSON: pid, host, start time, command line), made to appear
                    atomically (hard link of a written file) before the trainer writes
                    anything. A second trainer refuses at once
                    naming the holder; a lock whose process is gone (same host, pid not alive or
                    reused by a process started later) is stale and taken over with a warning.
                    A lock held on another host is never taken over: its liveness cannot be
                    checked from here (delete the file by hand once that run is known dead).
                    Released at exit; a workdir the lock created and nothing else wrote into is
                    removed again, so a refused start leaves no empty workdir behind.
  config records    `configs/config_<n>.json`, one per (re)start, never overwritten;
                    `config.json` is the config of the latest start (what `experiments.eval`
                    rebuilds the model from), replaced atomically, and only after the resume
                    checks passed.
  config checks     `config_changes(saved, current)` lists the leaf fields that differ;
                    `refused_changes` keeps those that change what a checkpoint means or which
                    batches follow it (model, Engram hashing and layout, data files and batch
                    layout, optimiser kinds); the trainer refuses those on resume unless
                    `train.allow_config_change` (and logs every change it lets through). Fields
                    that only choose how the same computation runs (placement, host step,
                    kernels, evaluation files, logging, step counts, learning rates) pass.
  metrics log       `MetricsLog`: the trainer's interval records (split 'train') in
                    metrics.jsonl, and their log lines.
  metrics markers   `mark_start` appends `{"split": "start", "step": s, ...}` to metrics.jsonl at
                    each (re)start; a resumed run re-logs the steps after its checkpoint, so
                    `read_metrics` keeps the last record of each (split, step).

Dimension legend: none (no arrays).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Optional

LOCK_NAME = "lock"
CONFIGS_DIR = "configs"
MISSING = "<missing>"  # config_changes' value for a field one config lacks

# Leaf fields (or prefixes ending in '.') whose change on resume is refused: they change the
# shapes or meaning of the checkpointed state, the hash ids of its table rows, or the batches
# that follow it.
REFUSED_PREFIXES = ("model.", "engram.", "data.", "optim.kind",
                    "table_optim.kind", "table_optim.moment_dtype", "table_optim.bias_correction")
# Fields under those prefixes that only choose how the same computation is carried out.
ALLOWED_FIELDS = ("data.eval_files", "engram.placement", "engram.lookup_implementation",
                  "engram.hash_on_device", "model.attention_impl",
                  "model.moe.matmul_implementation", "model.remat_policy")


class WorkdirLockedError(RuntimeError):
  """Another live trainer holds the workdir's lock."""


class ConfigChangedError(ValueError):
  """A resume whose config differs from the workdir's in fields that change the computation."""


def warn(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] WARNING: {msg}", flush=True)


# ---- lock ----------------------------------------------------------------------------------------


def _process_start_time(pid: int) -> Optional[float]:
  """Seconds since the epoch at which `pid` started (Linux /proc), or None if unknown."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    with open("/proc/stat") as f:
      btime = next(int(l.split()[1]) for l in f if l.startswith("btime"))
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError, StopIteration):
    return None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def _describe(holder: Mapping) -> str:
  return (f"pid {holder.get('pid')} on host {holder.get('host')!r}, started "
          f"{holder.get('start_time_utc', '?')} ({' '.join(holder.get('argv', []))[:200]})")


def _create_from(src: str, dst: str) -> None:
  """Creates `dst` with the content of `src`; FileExistsError if `dst` exists."""
  try:
    os.link(src, dst)
  except FileExistsError:
    raise
  except OSError:  # a filesystem without hard links: exclusive create, then write
    fd = os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f, open(src) as s:
      f.write(s.read())


class WorkdirLock:
  """The exclusive lock of one workdir (see module docstring); `acquire()` / `release()`."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self._created_workdir = False
    self._held = False
    self._token: Optional[dict] = None

  def _read(self) -> Optional[dict]:
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # being written by its holder, or damaged

  def _stale(self, holder: Mapping) -> bool:
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
      return False
    pid = holder["pid"]
    if not _alive(pid):
      return True
    started = _process_start_time(pid)
    # The pid was reused by a process that started after the lock was written.
    return started is not None and started > holder.get("start_time", 0) + 1.0

  def acquire(self) -> "WorkdirLock":
    if not os.path.isdir(self.workdir):
      os.makedirs(self.workdir, exist_ok=True)
      self._created_workdir = True
    token = {"pid": os.getpid(), "host": socket.gethostname(), "start_time": time.time(),
             "start_time_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
                 "%Y-%m-%d %H:%M:%S UTC"), "argv": list(sys.argv)}
    # The lock file appears with its content in one step (link of a written file), so a
    # reader never sees a half-written lock.
    tmp = f"{self.path}.{os.getpid()}.{time.monotonic_ns()}"
    with open(tmp, "w") as f:
      json.dump(token, f)
    try:
      for _ in range(5):
        try:
          _create_from(tmp, self.path)
        except FileExistsError:
          holder = self._read()
          if holder is None:
            continue  # released meanwhile
          if holder and self._stale(holder):
            self._take_over(holder)
            continue
          self._cleanup_workdir()
          who = _describe(holder) if holder else "an unreadable lock file"
          raise WorkdirLockedError(
              f"workdir {self.workdir} is in use by {who}; refusing to start a second trainer "
              f"on it. Wait for that run, use another --workdir, or, if that run is dead, "
              f"delete {self.path}.") from None
        self._held, self._token = True, token
        return self
    finally:
      os.remove(tmp)
    self._cleanup_workdir()
    raise WorkdirLockedError(f"could not take the lock {self.path} (other trainers keep "
                             "taking it)")

  def _take_over(self, holder: Mapping) -> None:
    """Moves a stale lock out of the way; puts it back if it turned out to be a fresh one."""
    aside = f"{self.path}.stale.{os.getpid()}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return  # someone else moved it; the link in `acquire` decides
    with open(aside) as f:
      try:
        moved = json.load(f)
      except ValueError:
        moved = {}
    if moved != dict(holder):  # another trainer took it over meanwhile: give theirs back
      try:
        _create_from(aside, self.path)
      except FileExistsError:
        pass
    else:
      warn(f"taking over the stale lock of {self.workdir}: held by {_describe(holder)}, "
           "which is no longer running")
    os.remove(aside)

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    holder = self._read()
    if holder and holder.get("pid") == self._token["pid"] and \
        holder.get("start_time") == self._token["start_time"]:
      os.remove(self.path)
    self._cleanup_workdir()

  def _cleanup_workdir(self) -> None:
    """Removes the workdir again if this lock created it and only empty directories remain."""
    if not self._created_workdir:
      return
    for root, dirs, files in os.walk(self.workdir, topdown=False):
      if files:
        return
      for d in dirs:
        if os.listdir(os.path.join(root, d)):
          return
        os.rmdir(os.path.join(root, d))
    os.rmdir(self.workdir)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


# ---- config records and checks -------------------------------------------------------------------


def _flat(tree: Any, prefix: str = "") -> dict:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_dict(config) -> dict:
  """A config (ConfigDict or mapping) as plain JSON values (tuples become lists)."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config))


def config_changes(saved, current) -> dict:
  """{field path: (saved value, current value)} of every differing leaf field."""
  a, b = _flat(config_dict(saved)), _flat(config_dict(current))
  return {k: (a.get(k, MISSING), b.get(k, MISSING)) for k in sorted(set(a) | set(b))
          if a.get(k, MISSING) != b.get(k, MISSING)}


def refused_changes(changes: Mapping) -> dict:
  """The changes a resume refuses (REFUSED_PREFIXES minus ALLOWED_FIELDS).

  A field one side lacks is not refused: a config.json written before the field existed ran
  with what is now its default (experiment_config reads such workdirs the same way).
  """
  def refused(k):
    if MISSING in changes[k]:
      return False
    if any(k == f or k.startswith(f + ".") for f in ALLOWED_FIELDS):
      return False
    return any(k.startswith(p) if p.endswith(".") else k == p for p in REFUSED_PREFIXES)
  return {k: v for k, v in changes.items() if refused(k)}


def format_changes(changes: Mapping) -> str:
  short = lambda x: (lambda s: s if len(s) <= 60 else s[:57] + "...")(json.dumps(x))  # noqa: E731
  return "; ".join(f"{k}: {short(a)} -> {short(b)}" for k, (a, b) in changes.items())


def check_resume_config(workdir: str, config, step: int, *, allow: bool) -> dict:
  """Compares `config` with the workdir's `config.json` before resuming from `step`.

  Returns the differing fields (logged by the caller); raises ConfigChangedError naming the
  refused ones unless `allow`. A workdir without config.json is not checked ({}).
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    saved = json.load(f)
  changes = config_changes(saved, config)
  refused = refused_changes(changes)
  if refused and not allow:
    raise ConfigChangedError(
        f"refusing to resume {workdir} from checkpoint step {step}: the config differs from the "
        f"one it was trained with in fields that change the computation: "
        f"{format_changes(refused)}. Use the workdir's config ({path}), train in a fresh "
        "workdir, or pass --config.train.allow_config_change=True to resume anyway.")
  return changes


def _atomic_write(path: str, text: str) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def record_config(workdir: str, config) -> str:
  """Writes `configs/config_<n>.json` (next free n) and replaces `config.json`; returns the
  record's path relative to the workdir."""
  directory = os.path.join(workdir, CONFIGS_DIR)
  previous = os.path.join(workdir, "config.json")
  if not os.path.isdir(directory) and os.path.isfile(previous):
    # A workdir from before these records: keep its config as the first one.
    os.makedirs(directory)
    with open(previous) as f:
      _atomic_write(os.path.join(directory, "config_0.json"), f.read())
  os.makedirs(directory, exist_ok=True)
  taken = [int(n[len("config_"):-len(".json")]) for n in os.listdir(directory)
           if n.startswith("config_") and n.endswith(".json")
           and n[len("config_"):-len(".json")].isdigit()]
  n = max(taken, default=-1) + 1
  text = (config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort")
          else json.dumps(config, indent=2))
  name = os.path.join(CONFIGS_DIR, f"config_{n}.json")
  _atomic_write(os.path.join(workdir, name), text)
  _atomic_write(os.path.join(workdir, "config.json"), text)
  return name


# ---- metrics.jsonl -------------------------------------------------------------------------------


def mark_start(path: str, step: int, *, resumed_from: Optional[int], config_record: str,
               **extra) -> dict:
  """Appends a start record to metrics.jsonl (after ending a line a kill left unfinished)."""
  rec = {"step": int(step), "split": "start", "resumed_from": resumed_from,
         "config": config_record, "pid": os.getpid(), "host": socket.gethostname(),
         "time": time.time(), **extra}
  with open(path, "ab+") as f:
    f.seek(0, os.SEEK_END)
    if f.tell():
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b"\n":
        f.write(b"\n")
    f.write((json.dumps(rec) + "\n").encode())
  return rec


def read_metrics(path: str, *, splits: Optional[Iterable[str]] = None) -> list[dict]:
  """The records of a metrics.jsonl, the last one of each (split, step), in step order.

  A resumed run logs again the steps between its checkpoint and the stop; the later record is
  the one the checkpointed run continued from. Start markers are kept (one per start, in file
  order) when `splits` includes 'start'; a line a kill left unfinished is skipped.
  """
  keep = None if splits is None else set(splits)
  last: dict = {}
  starts = []
  with open(path) as f:
    for line in f:
      try:
        r = json.loads(line)
      except ValueError:
        continue
      if not isinstance(r, dict) or (keep is not None and r.get("split") not in keep):
        continue
      if r.get("split") == "start":
        starts.append(r)
      else:
        last[(r.get("split"), r.get("step"))] = r
  out = sorted(last.values(), key=lambda r: (r.get("step", 0), str(r.get("split"))))
  return starts + out if starts else out


class MetricsLog:
  """Interval means of the training step metrics; one line through `log` and one
  metrics.jsonl record per interval. Only the writer (process 0 of a job: every process holds
  the same metrics) opens the file."""

  def __init__(self, path: str, tokens_per_step: int, flops_per_token: float, peak: float, *,
               writer: bool, log: Callable[[str], None]):
    self._file = open(path, "a") if writer else None
    self._log = log
    self._tokens_per_step, self._flops, self._peak = tokens_per_step, flops_per_token, peak
    self.reset_timer()
    self._sums: dict = {}
    self._n = 0
    self.last: dict = {}

  def reset_timer(self):
    self._t0, self._steps_in_timer = time.perf_counter(), 0

  def add(self, step: int, m: dict):
    for k, v in m.items():
      self._sums[k] = self._sums.get(k, 0.0) + float(v)
    self._n += 1
    self._steps_in_timer += 1

  def write(self, record: dict):
    if self._file is None:
      return
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def emit(self, step: int, num_steps: int):
    if not self._n:
      return
    means = {k: v / self._n for k, v in self._sums.items()}
    dt = max(time.perf_counter() - self._t0, 1e-9)
    tok_s = self._tokens_per_step * self._steps_in_timer / dt
    mfu = self._flops * tok_s / self._peak if self._peak else float("nan")
    rec = {"step": step, "split": "train", "loss": means["loss"], "xent": means["xent"],
           "tokens_per_s": tok_s, "mfu": mfu, "time": time.time()}
    rec.update({k: v for k, v in means.items()
                if k not in ("loss", "xent", "loss_sum", "num_tokens")})
    self.write(rec)
    parts = [f"step {step}/{num_steps}", f"loss {rec['loss']:.4f}",
             f"{tok_s / 1e3:.1f}k tok/s", f"MFU {100 * mfu:.2f}%",
             f"lr {rec['learning_rate']:.2e}", f"gnorm {rec['grad_norm']:.3f}"]
    if "gate/mean" in rec:
      parts.append(f"gate {rec['gate/mean']:.3f}±{rec['gate/std']:.3f}")
    if "router/max_over_mean_load" in rec:
      parts.append(f"load max/mean {rec['router/max_over_mean_load']:.2f} "
                   f"(worst {rec['router/max_over_mean_load_worst']:.2f})")
    if "router/dropped_fraction" in rec:  # capacity dispatch: always shown, 0 included
      parts.append(f"dropped {100 * rec['router/dropped_fraction']:.2f}%")
    self._log(" | ".join(parts))
    self.last = rec
    self._sums, self._n = {}, 0
    self.reset_timer()

  def close(self):
    if self._file is not None:
      self._file.close()
