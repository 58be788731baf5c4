"""Busy time per profiler line (a GPU stream or a host thread) while a piece of code runs.

  state, rows, wall_ms = common.traced(lambda: run_steps(3))
  print(common.format_rows(rows, wall_ms, steps=3))

`traced` runs the callable under `jax.profiler.trace` (it must block until its work is done),
returns what it returned,
and reads the trace back with `jax.profiler.ProfileData`. For every line of every plane that
has events, `summarize` reports the number of events, the busy time (the union of the events'
intervals, so nested or overlapping events count once) and the events that took the most
time. Compared with the wall time, a GPU stream's busy time says how much of a step the device
computed and how much it waited, and the host lines say which host threads ran beside it (on a
GPU, host compute of pinned_host operands runs on the host's XLA thread pools).

Used by `benchmarks/bench_offload.py --trace_steps`. `profiled` (the trace itself) and
`command_buffers_off` are shared with profile_step, bench_layer --profile and bench_lookup
--kernel-time.
"""

import collections
import glob
import os
import tempfile
import time
from typing import Any

import jax


def command_buffers_off() -> None:
  """Appends `--xla_gpu_enable_command_buffer=` to XLA_FLAGS (unless that flag is set): XLA:GPU
  then launches every kernel as its own profiler event naming its HLO instruction, instead of
  recording CUDA graphs. Call it before the backend starts: XLA reads its flags once."""
  if "xla_gpu_enable_command_buffer" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_gpu_enable_command_buffer=").strip()


def profiled(fn) -> tuple[Any, "jax.profiler.ProfileData", float]:
  """(fn's result, the trace as ProfileData, wall ms) of one call of `fn` under the profiler;
  `fn` must block until its work is done."""
  directory = tempfile.mkdtemp(prefix="trace_lines_")
  with jax.profiler.trace(directory):
    t0 = time.perf_counter()
    result = fn()
    wall_ms = (time.perf_counter() - t0) * 1e3
  files = glob.glob(directory + "/**/*.xplane.pb", recursive=True)
  if not files:
    raise RuntimeError(f"the profiler wrote no .xplane.pb under {directory}")
  return result, jax.profiler.ProfileData.from_file(files[0]), wall_ms


def traced(fn) -> tuple[Any, list[dict], float]:
  """(fn's result, summarize(...) rows, wall ms) of one call of `fn` under the profiler."""
  result, profile, wall_ms = profiled(fn)
  return result, summarize(profile), wall_ms


def _union_ns(intervals) -> int:
  total, end = 0, None
  for s, e in sorted(intervals):
    if end is None or s > end:
      total += e - s
      end = e
    elif e > end:
      total += e - end
      end = e
  return total


def summarize(profile, top: int = 3) -> list[dict]:
  """One dict per line with events: plane, line, events, busy_ns, top [(name, ns)]; the busiest
  first. The Python thread's own line (its function-call events) is left out."""
  rows = []
  for plane in profile.planes:
    for line in plane.lines:
      if line.name == "python":
        continue
      events = list(line.events)
      if not events:
        continue
      by_name = collections.Counter()
      for e in events:
        by_name[e.name] += e.duration_ns
      rows.append({"plane": plane.name, "line": line.name, "events": len(events),
                   "busy_ns": _union_ns((e.start_ns, e.end_ns) for e in events),
                   "top": by_name.most_common(top)})
  return sorted(rows, key=lambda r: -r["busy_ns"])


def format_rows(rows: list[dict], wall_ms: float, steps: int, min_share: float = 0.01,
                width: int = 48) -> str:
  """A table: ms per step busy, share of the wall time, events per step, the top events; lines
  busy for less than `min_share` of the wall time are counted in a last line."""
  out = [f"  wall {wall_ms / steps:.2f} ms per step; busy ms per step and share of the wall, "
         "per profiler line (union of its events)"]
  small = 0
  for r in rows:
    busy_ms = r["busy_ns"] / 1e6
    if busy_ms < min_share * wall_ms:
      small += 1
      continue
    top = ", ".join(f"{n[:width]} {ns / 1e6 / steps:.2f}" for n, ns in r["top"])
    out.append(f"  {busy_ms / steps:9.2f} {100 * busy_ms / wall_ms:5.1f}%  "
               f"{r['events'] / steps:7.1f} ev  {r['plane'][:18]:<18} {r['line'][:28]:<28} {top}")
  if small:
    out.append(f"  ({small} more lines busy < {100 * min_share:.0f}% of the wall)")
  return "\n".join(out)
