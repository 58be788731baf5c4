"""What the benchmark scripts share: flags, device facts, timing, profiler traces, the real
train step of a config, and table printing.

Flags: each script owns an absl `FlagValues` (`FLAGS = flags.FlagValues()`, every definition
with `flag_values=FLAGS`) and parses `sys.argv` into it with `parse_flags` at the start of
`main()`. One namespace per script, not absl's global one, because the tests import several
scripts into one process and their flag names (`batch`, `seq`, `config`) would collide there.
Config overrides are ml_collections `config_flags`:
`--config=experiments/configs/small_gpu.py --config.engram.layer_ids='(1,)'`.

Timing: `median_ms` (a jitted call, warm-up calls, median of timed calls, each blocked on)
and `median_step_ms` (a step that carries its state, timed in runs of 10 steps).

Profiler traces: `profiled` runs a callable under `jax.profiler.trace` and reads the trace back
as `jax.profiler.ProfileData`. `summarize` / `format_rows` give the busy time per profiler line
(a GPU stream or a host thread: the union of its events' intervals, so nested or overlapping
events count once) against the wall time, i.e. how much of a step the device computed and which
host threads ran beside it (on a GPU, host compute of pinned_host operands runs on the host's
XLA thread pools); `traced` is both in one call:

  state, rows, wall_ms = common.traced(lambda: run_steps(3))
  print(common.format_rows(rows, wall_ms, steps=3))

`hlo_events` and `op_names` attribute device time to the HLO instructions of one module and
those to the model code that emitted them; `part_of` / `breakdown` / `profile_parts` sum it
per model part (attention, MoE, mHC, Engram, norms, ..., and `OUTSIDE` the model: loss,
clipping, optimisers) through each instruction's op_name, `part_rows` formats the table
(profile_step, bench_throughput). `command_buffers_off` (for the whole process) or
`NO_COMMAND_BUFFERS` (as one compile's `compiler_options`) makes XLA:GPU launch every kernel as
its own named event.

`TrainerSteps`: the jitted train step of engram_jax/train.py for a config, at any Engram table
size and table optimiser, on synthetic batches (bench_train_step, profile_step,
bench_throughput).

Dimension legend: none (times, bytes and counts only).
"""

import collections
import copy
import gc
import glob
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

GB = 1e9


# ---------------------------------------------------------------------------------- flags


def parse_flags(flag_values: flags.FlagValues, doc: str) -> flags.FlagValues:
  """Parses `sys.argv` into `flag_values` (every flag from its default, so a second parse in
  one process starts afresh) and returns it. `--help` prints `doc` and the flags; an unknown
  flag or a positional argument exits with a message naming it."""
  argv = sys.argv
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
    print(doc.strip() + "\n\nflags:\n"
          + flag_values.get_help(prefix="  ", include_special_flags=False))
    raise SystemExit(0)
  for name in [n for n in flag_values if "." in n]:
    delattr(flag_values, name)  # `--config.a.b` overrides that an earlier parse defined
  flag_values.unparse_flags()
  try:
    rest = flag_values(argv)
  except flags.Error as err:
    raise SystemExit(f"{argv[0]}: {err}") from err
  if len(rest) > 1:
    raise SystemExit(f"{argv[0]}: unexpected positional arguments {rest[1:]}")
  return flag_values


def config_overrides(flag_values: flags.FlagValues, name: str = "config") -> str:
  """The `--config.x=v` overrides given to config flag `name`, as one printable string."""
  from ml_collections import config_flags  # noqa: PLC0415 (only the config scripts need it)
  values = config_flags.get_override_values(flag_values[name])
  return " ".join(f"--{name}.{k}={v!r}" for k, v in values.items())


# --------------------------------------------------------------------------------- device


def device_summary() -> str:
  """'<device kind>, jax <version>': the first line every script prints."""
  return f"{jax.devices()[0].device_kind}, jax {jax.__version__}"


def memory_limit_bytes() -> Optional[int]:
  """The allocator's byte limit on the first device (None where the backend reports none)."""
  return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")


# --------------------------------------------------------------------------------- timing


def median_ms(fn: Callable, *args, reps: int = 20, warmup: int = 3) -> float:
  """Median ms of `fn(*args)` over `reps` calls, each blocked on, after `warmup` calls (the
  first compiles). Right for ms-scale calls, where dispatch costs little."""
  for _ in range(warmup):
    out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def median_step_ms(step: Callable, carry, inputs: Sequence, loss_of: Callable,
                   warmup: int = 3, runs: int = 5, steps: int = 10):
  """`carry = step(carry, inputs[i % len(inputs)])`: `warmup` steps, then `runs` runs of
  `steps` steps, each run ended by a block_until_ready on `loss_of(carry)`. Returns (median
  ms per step, the last carry)."""
  for i in range(warmup):
    carry = step(carry, inputs[i % len(inputs)])
  jax.block_until_ready(loss_of(carry))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    for i in range(steps):
      carry = step(carry, inputs[i % len(inputs)])
    jax.block_until_ready(loss_of(carry))
    times.append((time.perf_counter() - start) / steps * 1e3)
  return float(np.median(times)), carry


# ----------------------------------------------------------------------- profiler traces


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
  directory = tempfile.mkdtemp(prefix="benchmarks_trace_")
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


def op_names(hlo_text: str) -> dict:
  """{instruction name: op_name} of every HLO instruction that carries metadata."""
  out = {}
  pattern = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?op_name="([^"]*)"')
  for line in hlo_text.splitlines():
    m = pattern.match(line)
    if m:
      out[m.group(1)] = m.group(2)
  return out


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


# ------------------------------------------------------------- device time per model part

# (regex on op_name, part); the first match wins, so specific parts come before general ones.
PARTS = (
    (r"/engram/", "Engram layer"),
    (r"/moe/experts", "MoE routed experts"),
    (r"/moe/shared", "MoE shared expert"),
    (r"/moe/", "MoE router + dispatch"),
    # The stream mixing runs in hc_combine's named scope (`/hc_`); an einsum outside it is
    # matched by its equation.
    (r"/hc_(attn|ffn)/|/hc_|hyper|_sublayer/btij,btjd->btid", "mHC mixing"),
    (r"/attn_norm/|/ffn_norm/|norm", "norms"),
    (r"/attn/", "attention"),
    (r"/ffn/|/mlp/", "dense FFN"),
    (r"embed|logits|lm_head|/head/", "embedding + logits"),
    (r"EngramLM", "model (other)"),
)
OUTSIDE = "outside the model (loss, clip, optimisers)"

# XLA:GPU debug option that launches every kernel as its own profiler event naming its HLO
# instruction (CUDA graphs show as "command_buffer_N" events without op_name).
NO_COMMAND_BUFFERS = {"xla_gpu_enable_command_buffer": ""}


def part_of(op_name: str) -> tuple[str, bool]:
  """(model part, is_backward) of an HLO op_name; backward ops carry `transpose(`."""
  backward = "transpose(" in op_name
  for pattern, part in PARTS:
    if re.search(pattern, op_name):
      return part, backward
  return OUTSIDE, backward


def breakdown(events, names: dict, steps: int) -> tuple[dict, collections.Counter, float]:
  """({part: [fwd ms, bwd ms]}, Counter of ms per instruction, summed ms), all per step, of
  (hlo_op, ns) `events` whose instructions `names` maps to op_names (`op_names`)."""
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


def profile_parts(step: Callable, carry, inputs: Sequence, loss_of: Callable, hlo_text: str,
                  steps: int, module_substring: str = "train_step"):
  """Runs `steps` steps of `step` (as in `median_step_ms`) under the profiler and attributes
  the events of the module to model parts. Returns (traced ms per step, parts, per_op, summed
  ms, op_names, the last carry); raises SystemExit when no event names an HLO instruction."""
  def run():
    c = carry
    for i in range(steps):
      c = step(c, inputs[i % len(inputs)])
    jax.block_until_ready(loss_of(c))
    return c
  carry, trace, traced_ms = profiled(run)
  names = op_names(hlo_text)
  parts, per_op, total = breakdown(hlo_events(trace, module_substring), names, steps)
  if total == 0:
    raise SystemExit("no event of the train step carried an hlo_op stat; nothing to attribute")
  return traced_ms / steps, parts, per_op, total, names, carry


def part_rows(parts: dict, total: float) -> list[tuple]:
  """(part, fwd ms, bwd ms, share of the summed time) rows of `breakdown`'s parts, the most
  expensive first, formatted for `format_table`."""
  return [(part, f"{fwd:.2f}", f"{bwd:.2f}", f"{100 * (fwd + bwd) / total:.1f}%")
          for part, (fwd, bwd) in sorted(parts.items(), key=lambda kv: -sum(kv[1]))]


# ------------------------------------------------------------------ the real train step


def pattern_table(shape, dtype, sharding=None):
  """A table filled with a row-index pattern by one fused kernel (a random init would need a
  table-sized temporary; the values do not change a step's work)."""
  def fill():
    rows = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    return (((rows * 31 + cols) % 977).astype(jnp.float32) * 1e-3 - 0.488).astype(dtype)
  return jax.jit(fill, out_shardings=sharding)()


class TrainerSteps:
  """The compiled train step of `config` (`Trainer.compile` of engram_jax/train.py) with
  `rows_per_table` rows per Engram table and `table_optim.kind = kind`, on 4 synthetic batches.

  Dense parameters come from a trainer initialised once per kind at a tiny table; at the
  measured size the tables are pattern-filled and their optimiser state is zero. Each
  (kind, size) is compiled once, before its tables exist (XLA's GPU autotuner may allocate
  scratch operands while compiling, which must not compete with the tables for HBM), and kept
  for the run (an executable holds no activation buffers between calls). Needs grain and
  ml_collections (engram_jax.train imports them).
  """

  def __init__(self, config):
    self.config = config
    self._compiled = {}
    self._small_states = {}

  def sized_config(self, kind: str, rows_per_table: int):
    """A copy of the config with ~`rows_per_table` rows per table (the mapping rounds each
    head up to a prime) and table optimiser `kind`."""
    config = copy.deepcopy(self.config)
    orders = config.engram.max_ngram_size - 1
    per_head = max(rows_per_table // (orders * config.engram.n_head_per_ngram), 2)
    config.engram.engram_vocab_size = (per_head,) * orders
    config.table_optim.kind = kind
    return config

  def compiled(self, kind: str, rows_per_table: int, compiler_options: Optional[dict] = None):
    """(config, experiment, trainer, abstract state, compiled train step, batch shardings);
    `compiler_options` are XLA debug options of this compile (e.g. NO_COMMAND_BUFFERS)."""
    key = (kind, rows_per_table, tuple(sorted((compiler_options or {}).items())))
    if key not in self._compiled:
      from engram_jax import train as train_lib  # noqa: PLC0415 (needs grain)
      config = self.sized_config(kind, rows_per_table)
      exp, trainer, abstract = train_lib.setup(config, check_data=False)
      train_c, _, batch_sh = trainer.compile(abstract, trainer.shapes, evaluate=False,
                                             compiler_options=compiler_options)
      self._compiled[key] = (config, exp, trainer, abstract, train_c, batch_sh)
    return self._compiled[key]

  def overhead_bytes(self, kind: str, rows_per_table: int) -> int:
    """HBM the step needs besides the tables and their state: XLA's temporaries (activations;
    independent of the table size, tests/test_train.py checks that) plus every argument (the
    whole state, whose tables are small at `rows_per_table`)."""
    mem = self.compiled(kind, rows_per_table)[4].memory_analysis()
    if mem is None:
      raise SystemExit("no memory_analysis on this backend; pass --headroom_gb")
    return mem.temp_size_in_bytes + mem.argument_size_in_bytes

  def prepare(self, kind: str, rows_per_table: int, compiler_options: Optional[dict] = None):
    """(compiled train step, filled state, 4 device batches, table rows per Engram layer)."""
    from engram_jax import train as train_lib  # noqa: PLC0415 (needs grain)
    config, exp, trainer, abstract, train_c, batch_sh = self.compiled(kind, rows_per_table,
                                                                      compiler_options)
    if kind not in self._small_states:
      _, small_trainer, _ = train_lib.setup(self.sized_config(kind, 4096), check_data=False)
      self._small_states[kind] = jax.device_get(small_trainer.init_state())
    state = _filled_state(self._small_states[kind], abstract)
    b, t = config.data.batch_size, config.data.seq_len
    rng = np.random.default_rng(0)
    vocab = exp.model.vocab_size
    batches = []
    for _ in range(4):
      batch = {"inputs": rng.integers(0, vocab, (b, t)),
               "targets": rng.integers(0, vocab, (b, t)),
               "segment_ids": np.ones((b, t)), "positions": np.broadcast_to(np.arange(t), (b, t)),
               "weights": np.ones((b, t), np.float32)}
      batch = {k: np.asarray(v, np.float32 if k == "weights" else np.int32)
               for k, v in batch.items()}
      if "engram_ids" in trainer.shapes:
        batch["engram_ids"] = {
            l: np.stack([rng.integers(0, p, (b, t)) for p in exp.hashing.head_sizes(l)],
                        -1).astype(np.int32) for l in trainer.shapes["engram_ids"]}
      batches.append(jax.device_put(batch, batch_sh))
    table_rows = ([exp.hashing.num_rows(l) for l in exp.model.engram.layer_ids]
                  if exp.hashing is not None else [])
    return train_c, state, batches, table_rows

  def time(self, kind: str, rows_per_table: int):
    """(median ms per step, table rows per Engram layer); a non-finite loss raises."""
    train_c, state, batches, table_rows = self.prepare(kind, rows_per_table)
    ms, (state, metrics) = median_step_ms(lambda c, batch: train_c(c[0], batch), (state, None),
                                          batches, lambda c: c[1]["loss"])
    if not np.isfinite(float(metrics["loss"])):
      raise FloatingPointError(f"{kind} at {rows_per_table} rows: loss {float(metrics['loss'])}")
    del state, metrics, batches
    gc.collect()
    return ms, table_rows


def _filled_state(small_state, abstract):
  """`abstract`'s state: leaves whose shape matches `small_state` come from it; tables (under
  'tables', or a 'table' param) are pattern-filled; other resized leaves (moments) are zeros."""
  def leaf(path, small, want):
    if small.shape == want.shape:
      return small
    name = jax.tree_util.keystr(path)
    if name.startswith(".tables") or (name.startswith(".params") and "'table'" in name):
      return pattern_table(want.shape, want.dtype, want.sharding)
    return jax.jit(lambda: jnp.zeros(want.shape, want.dtype), out_shardings=want.sharding)()
  return jax.tree_util.tree_map_with_path(leaf, small_state, abstract)


# ------------------------------------------------------------------------- data, tables


def corpus_tokens() -> np.ndarray:
  """The shipped training corpus as token ids of the shipped tokenizer."""
  from engram_jax import data as data_lib  # noqa: PLC0415 (needs grain)
  from engram_jax import tokenizer as tokenizer_lib  # noqa: PLC0415
  return data_lib.TokenizedCorpus(data_lib.default_corpus_paths()["train"],
                                  tokenizer_lib.default_tokenizer_path()).tokens


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """Columns as wide as their widest cell, the first left-aligned, the others right-aligned;
  cells are printed with str() (format numbers before)."""
  cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
  return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:])
