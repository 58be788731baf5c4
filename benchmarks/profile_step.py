"""Where a training step's time goes: device time per model part, from a profiler trace.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m benchmarks.profile_step \
      --config=experiments/configs/small_gpu.py [--set model.moe.dispatch=ragged ...]

Compiles the real jitted train step of the config (`benchmarks/bench_train_step.py`'s trainer
path: synthetic batches, tables of `--rows` rows filled by pattern), times it (median, as
bench_train_step), then runs `--steps` steps under `jax.profiler.trace` and reads the trace back
with `jax.profiler.ProfileData`. Every kernel / thunk event that names its HLO instruction
(`hlo_op` stat; GPU stream events, or the CPU client's thunks when there is no GPU) is mapped
through the compiled HLO's `metadata={op_name=...}` to the part of the model that emitted it:
Engram layer, MoE experts, MoE routing/dispatch, attention, mHC, dense FFN, norms, embedding and
logits, or "outside the model" (loss, clipping, optimisers, table updates). Backward ops
(`transpose(...)` in op_name) are counted apart from forward ones.

Prints, last: wall ms per step, summed event ms per step (on a GPU the kernel time; events of
one step may overlap on several streams, and on CPU thunks run on several threads, so the sum
is not the wall time), and a table per part: forward ms, backward ms, share of the summed time;
then the ten most expensive HLO instructions.

XLA:GPU records whole CUDA graphs ("command_buffer_N" events, no op_name) unless command buffers
are off, so this script turns them off (`--xla_gpu_enable_command_buffer=` appended to XLA_FLAGS
before jax is imported; the first H200 run with them on attributed 93% of the step to unnamed
command buffers). The untraced median is therefore the step without CUDA graphs; compare it with
bench_train_step's number for their cost.

Dimension legend: none (times only).
"""

import argparse
import collections
import glob
import re
import tempfile
import time

from benchmarks import common

common.command_buffers_off()  # Before the backend starts.

import jax  # noqa: E402

from benchmarks import bench_train_step  # noqa: E402

# (regex on op_name, part); the first match wins, so specific parts come before general ones.
PARTS = (
    (r"/engram/", "Engram layer"),
    (r"/moe/experts", "MoE routed experts"),
    (r"/moe/shared", "MoE shared expert"),
    (r"/moe/", "MoE router + dispatch"),
    # The stream mixing runs in hc_combine's `hc_combine` named scope (`/hc_`); before it had
    # one, the einsum was `_sublayer/btij,btjd->btid` (52 ms under "model (other)" in the first
    # small_gpu profile).
    (r"/hc_(attn|ffn)/|/hc_|hyper|_sublayer/btij,btjd->btid", "mHC mixing"),
    (r"/attn_norm/|/ffn_norm/|norm", "norms"),
    (r"/attn/", "attention"),
    (r"/ffn/|/mlp/", "dense FFN"),
    (r"embed|logits|lm_head|/head/", "embedding + logits"),
    (r"EngramLM", "model (other)"),
)
OUTSIDE = "outside the model (loss, clip, optimisers)"


def op_names(hlo_text: str) -> dict:
  """{instruction name: op_name} of every HLO instruction that carries metadata."""
  out = {}
  pattern = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?op_name="([^"]*)"')
  for line in hlo_text.splitlines():
    m = pattern.match(line)
    if m:
      out[m.group(1)] = m.group(2)
  return out


def part_of(op_name: str) -> tuple[str, bool]:
  """(model part, is_backward) of an HLO op_name."""
  backward = "transpose(" in op_name
  for pattern, part in PARTS:
    if re.search(pattern, op_name):
      return part, backward
  return OUTSIDE, backward


def hlo_events(profile: "jax.profiler.ProfileData", module_substring: str):
  """(hlo_op, duration_ns) of every event of the module; GPU planes if any, else the host's."""
  planes = [p for p in profile.planes if p.name.startswith("/device:GPU")]
  if not planes:
    planes = [p for p in profile.planes if p.name.startswith("/host:CPU")]
  for plane in planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        op, module = stats.get("hlo_op"), str(stats.get("hlo_module", ""))
        if op and module_substring in module:
          yield str(op), event.duration_ns


def breakdown(events, names: dict, steps: int) -> tuple[dict, collections.Counter, float]:
  """({part: [fwd ms, bwd ms]}, Counter of ms per instruction, summed ms), all per step."""
  parts = collections.defaultdict(lambda: [0.0, 0.0])
  per_op = collections.Counter()
  total = 0.0
  for op, ns in events:
    ms = ns / 1e6 / steps
    part, backward = part_of(names.get(op, ""))
    parts[part][int(backward)] += ms
    per_op[op] += ms
    total += ms
  return dict(parts), per_op, total


def profile(args):
  """Times and profiles the config's train step; see the module docstring. `args` needs
  config, set, kind, rows, steps. Returns (median ms, traced ms, parts, per_op, summed ms,
  op_names, table rows, trace directory)."""
  train_c, state, batches, table_rows = bench_train_step.prepare_trainer_run(
      args.kind, args.rows, args, {})
  step = lambda c, batch: train_c(c[0], batch)  # noqa: E731
  ms, carry = bench_train_step.median_step_ms(step, (state, None), batches,
                                              lambda c: c[1]["loss"])
  directory = tempfile.mkdtemp(prefix="profile_step_")
  with jax.profiler.trace(directory):
    t0 = time.perf_counter()
    for i in range(args.steps):
      carry = step(carry, batches[i % len(batches)])
    jax.block_until_ready(carry[1]["loss"])
    traced_ms = (time.perf_counter() - t0) / args.steps * 1e3
  files = glob.glob(directory + "/**/*.xplane.pb", recursive=True)
  if not files:
    raise SystemExit(f"the profiler wrote no .xplane.pb under {directory}")
  trace = jax.profiler.ProfileData.from_file(files[0])
  names = op_names(train_c.as_text())
  parts, per_op, total = breakdown(hlo_events(trace, "train_step"), names, args.steps)
  if total == 0:
    raise SystemExit("no event of the train step carried an hlo_op stat; nothing to attribute")
  return ms, traced_ms, parts, per_op, total, names, table_rows, directory


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default="experiments/configs/small_gpu.py")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, repeatable (e.g. --set model.moe.dispatch=ragged)")
  p.add_argument("--kind", default="lazy_adam", help="table_optim.kind")
  p.add_argument("--rows", type=int, default=1 << 20, help="rows per Engram table")
  p.add_argument("--steps", type=int, default=5, help="profiled steps")
  args = p.parse_args()
  ms, traced_ms, parts, per_op, total, names, table_rows, directory = profile(args)
  print(f"\n{jax.devices()[0].device_kind}: {args.config} {' '.join(args.set)} | "
        f"table rows {table_rows} | trace {directory}")
  print(f"step: median {ms:.2f} ms (untraced), {traced_ms:.2f} ms traced; summed events "
        f"{total:.2f} ms/step")
  print(f"{'part':<44} {'fwd ms':>8} {'bwd ms':>8} {'share':>6}")
  for part, (fwd, bwd) in sorted(parts.items(), key=lambda kv: -sum(kv[1])):
    print(f"{part:<44} {fwd:8.2f} {bwd:8.2f} {100 * (fwd + bwd) / total:5.1f}%")
  print("\ntop instructions (ms/step, part, op_name):")
  for op, op_ms in per_op.most_common(10):
    name = names.get(op, "")
    print(f"  {op_ms:8.2f}  {op:<32} {part_of(name)[0]:<28} {name[-90:]}")


if __name__ == "__main__":
  main()
