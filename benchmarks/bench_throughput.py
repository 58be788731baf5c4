"""Training throughput of several configs side by side: step ms, tokens/s, MFU, dropped pairs,
and where each step's device time goes.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m benchmarks.bench_throughput \
      --configs=experiments/configs/small_gpu.py,experiments/configs/small_gpu_moe.py \
      [--rounds=3 --steps=10 --profile_steps=3 --peak_flops=989e12]

Claim measured: how far the real train step of each config is from the device's bf16 peak
(MFU), and how much slower per token the Engram model is than its iso-parameter MoE baseline,
both measured in one process so that the configs share the machine's state.

Each config (`path` or `path:arg`) is compiled once as the real jitted train step
(`common.TrainerSteps`: engram_jax/train.py's `Trainer.compile`, synthetic batches of uniform
random tokens, tables at the config's own size, pattern-filled). The configs are timed
interleaved: round r times config A, then B, ... (`common.median_step_ms`, one run of
`--steps` steps after warm-up steps); each config reports the median over `--rounds` rounds
and the spread (max - min over rounds, relative to the median). `--moe_baselines` adds, after
each config with Engram, its iso-parameter MoE baseline (experiments/configs/quickstart_moe's
`moe_baseline_of`, as small_gpu_moe is derived from small_gpu).

MFU = tokens/s x FLOPs per token / (peak FLOP/s per device x devices of the mesh). FLOPs per
token are `engram_jax.param_count.flops_per_token(model, T)['total']`, the trainer's count: 6 x the
weights of every matmul one token goes through (the activated non-embedding parameters: q/k/v/o
projections, dense FFNs, shared and top_k routed experts, router, Engram value/key projections,
mHC coefficient projections) + 6 x the LM head + causal attention scores and values
(12 x L x T x heads x head_dim / 2); lookups, norms, elementwise work and remat recomputation
are not counted. Peak: `--peak_flops`, else the trainer's table of dense bf16 peaks by device
kind (`engram_jax.train.PEAK_FLOPS`, e.g. H200 and H100 989e12); on CPU, or a device kind the
table lacks, MFU is 'unknown' unless `--peak_flops` is given.

Dropped: the mean over MoE layers of the share of routed pairs that found no capacity slot,
from the step's `router/dropped_fraction` metric (only 'capacity' dispatch reports it); the
dropless 'ragged' dispatch prints 0 (dropless), a model without MoE '-'. Uniform random tokens
load the experts more evenly than text, so the fraction is a lower bound of a real run's.

Slowdown: for each config with Engram, its MoE baseline is the config without Engram named
`<name>_moe`, else the first config without Engram; slowdown per token =
baseline tokens/s / Engram tokens/s - 1 (the issue's goal: <= 3%; MFU goal: >= 25%).

Profile (`--profile_steps` > 0): each config's step is compiled a second time, on a GPU without
CUDA graphs (`common.NO_COMMAND_BUFFERS`, so every kernel is a profiler event naming its HLO
instruction), and `--profile_steps` steps run under the profiler; device time is attributed to
model parts through the HLO op_name metadata (`common.profile_parts`, as profile_step does).
Printed: a per-part table for each config side by side (fwd + bwd ms per step, share of the
summed event time), then last the summary table: config | step ms | tokens/s | MFU | dropped |
Engram vs MoE slowdown per token.

Dimension legend: B batch, T sequence length, L layers; ms per step, tokens per second.
"""

import ast
import importlib.util
import os

from absl import flags
import jax
import numpy as np

from benchmarks import common

FLAGS = flags.FlagValues()
flags.DEFINE_list("configs", None, "config files experiments/configs/*.py (each `path`, "
                  "`path:arg`, either followed by `@key=value+key=value` overrides), timed "
                  "interleaved", flag_values=FLAGS)
flags.DEFINE_bool("moe_baselines", False, "add each Engram config's iso-parameter MoE baseline",
                  flag_values=FLAGS)
flags.DEFINE_integer("rounds", 3, "interleaved rounds", flag_values=FLAGS)
flags.DEFINE_integer("steps", 10, "timed steps per config and round", flag_values=FLAGS)
flags.DEFINE_integer("warmup", 3, "untimed steps before each config's first round (1 after)",
                     flag_values=FLAGS)
flags.DEFINE_integer("profile_steps", 3, "profiled steps per config; 0: no profile",
                     flag_values=FLAGS)
flags.DEFINE_string("kind", "lazy_adam", "table_optim.kind", flag_values=FLAGS)
flags.DEFINE_float("peak_flops", None, "peak FLOP/s per device (default: by device kind)",
                   flag_values=FLAGS)
flags.mark_flag_as_required("configs", flag_values=FLAGS)


def load_config(spec: str):
  """The ConfigDict of `path` or `path:arg` (`get_config(arg)` of the file), then the spec's
  `@key=value+key=value` overrides (values read as Python literals, else as strings), e.g.
  `experiments/configs/small_gpu.py@model.remat_policy=none+data.batch_size=64`."""
  spec, _, overrides = spec.partition("@")
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(
      "bench_config_" + os.path.basename(path)[:-3], path)
  if module_spec is None:
    raise SystemExit(f"--configs: no config file {path}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  pairs = []
  for item in filter(None, overrides.split("+")):
    key, eq, text = item.partition("=")
    if not eq:
      raise SystemExit(f"--configs: override {item!r} is not key=value")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    pairs.append((key, value))
  from engram_jax import experiment_config  # noqa: PLC0415
  return experiment_config.apply_overrides(config, pairs)


def moe_baseline(config):
  """The iso-parameter MoE baseline of an Engram config, named `<name>_moe`."""
  from experiments.configs import quickstart_moe  # noqa: PLC0415 (needs a tokenizer)
  config = quickstart_moe.moe_baseline_of(config.copy_and_resolve_references())
  config.name = config.name + "_moe"
  return config


def peak_flops(override):
  """Peak FLOP/s per device: `override`, else by device kind; None where unknown (CPU)."""
  if override:
    return override
  device = jax.devices()[0]
  if device.platform == "cpu":
    return None
  from engram_jax import train as train_lib  # noqa: PLC0415 (needs grain)
  return train_lib.peak_flops_per_device(device) or None


def table_rows(config) -> int:
  """Rows per Engram table of the config's own size (TrainerSteps resizes to this)."""
  return config.engram.n_head_per_ngram * sum(config.engram.engram_vocab_size)


class Measured:
  """One config: its compiled step, carry, batches and the facts the tables print."""

  def __init__(self, label, config, kind, compiler_options=None):
    from engram_jax import param_count  # noqa: PLC0415
    self.label, self.config, self.kind = label, config, kind
    self.steps = common.TrainerSteps(config)
    self.rows = table_rows(config)
    _, exp, trainer, _, _, _ = self.steps.compiled(kind, self.rows)
    self.engram = exp.model.engram is not None
    self.moe = exp.model.moe is not None and bool(exp.model.moe_layer_ids)
    self.dispatch = exp.model.moe.dispatch if self.moe else None
    self.devices = trainer.mesh.size
    self.tokens_per_step = config.data.batch_size * config.data.seq_len
    self.flops_per_token = float(param_count.flops_per_token(exp.model,
                                                            config.data.seq_len)["total"])
    self.train_c, state, self.batches, _ = self.steps.prepare(kind, self.rows)
    self.carry = (state, None)
    self.round_ms = []
    self.dropped = "-"  # the last timed step's dropped share, printed

  def time_round(self, steps: int, warmup: int):
    ms, self.carry = common.median_step_ms(
        lambda c, b: self.train_c(c[0], b), self.carry, self.batches,
        lambda c: c[1]["loss"], warmup=warmup, runs=1, steps=steps)
    loss = float(self.carry[1]["loss"])
    if not np.isfinite(loss):
      raise FloatingPointError(f"{self.label}: loss {loss}")
    self.round_ms.append(ms)
    metrics = self.carry[1]
    self.dropped = ("0 (dropless)" if self.moe else "-")
    if "router/dropped_fraction" in metrics:
      self.dropped = f"{100 * float(metrics['router/dropped_fraction']):.2f}%"

  @property
  def ms(self) -> float:
    return float(np.median(self.round_ms))

  @property
  def spread(self) -> float:
    return (max(self.round_ms) - min(self.round_ms)) / self.ms

  @property
  def tokens_per_s(self) -> float:
    return self.tokens_per_step / (self.ms / 1e3)

  def mfu(self, peak) -> str:
    if not peak:
      return "unknown"
    return f"{100 * self.flops_per_token * self.tokens_per_s / (peak * self.devices):.1f}%"

  def profile(self, steps: int):
    """(parts, summed ms) of `steps` profiled steps (see the module docstring)."""
    options = common.NO_COMMAND_BUFFERS if jax.devices()[0].platform == "gpu" else None
    train_c, state, batches, _ = self.steps.prepare(self.kind, self.rows, options)
    del self.carry  # the timed state is not needed any more: free its HBM
    _, parts, _, total, _, _ = common.profile_parts(
        lambda c, b: train_c(c[0], b), (state, None), batches, lambda c: c[1]["loss"],
        train_c.as_text(), steps)
    return parts, total


def baseline_of(m: Measured, measured: list) -> "Measured | None":
  """The MoE baseline of an Engram config (see the module docstring)."""
  plain = [o for o in measured if not o.engram]
  named = [o for o in plain if o.config.name == m.config.name + "_moe"]
  return (named or plain or [None])[0]


def main():
  args = common.parse_flags(FLAGS, __doc__)
  configs = []
  for spec in args.configs:
    config = load_config(spec)
    configs.append((spec.rsplit("/", 1)[-1], config))
    if args.moe_baselines and config.engram.enabled:
      configs.append((spec.rsplit("/", 1)[-1] + " (MoE baseline)", moe_baseline(config)))
  peak = peak_flops(args.peak_flops)
  measured = [Measured(label, config, args.kind) for label, config in configs]
  print(f"\n{common.device_summary()}; peak "
        f"{f'{peak:.3g} FLOP/s per device' if peak else 'unknown'}; {args.rounds} rounds of "
        f"{args.steps} steps per config, interleaved", flush=True)
  for m in measured:
    c = m.config
    print(f"  {m.label}: {c.name}, B={c.data.batch_size} T={c.data.seq_len}, "
          f"{m.flops_per_token / 1e9:.3f} GFLOPs/token, table rows {m.rows if m.engram else '-'}, "
          f"MoE dispatch {m.dispatch or '-'}", flush=True)
  for r in range(args.rounds):
    for m in measured:
      m.time_round(args.steps, args.warmup if r == 0 else 1)
    print(f"  round {r + 1}: " + ", ".join(f"{m.label} {m.round_ms[-1]:.2f} ms"
                                           for m in measured), flush=True)

  if args.profile_steps > 0:
    profiles = [m.profile(args.profile_steps) for m in measured]
    names = sorted({p for parts, _ in profiles for p in parts},
                   key=lambda p: -max(sum(parts.get(p, (0, 0))) for parts, _ in profiles))
    header = ["part"] + [h for m in measured for h in (f"{m.label} ms", "share")]
    rows = [[name] + [cell for parts, total in profiles for cell in (
        f"{sum(parts.get(name, (0.0, 0.0))):.2f}",
        f"{100 * sum(parts.get(name, (0.0, 0.0))) / total:.1f}%")] for name in names]
    rows.append(["summed events"] + [c for _, total in profiles for c in (f"{total:.2f}", "")])
    print(f"\nper-part device time, fwd + bwd ms per step ({args.profile_steps} profiled steps"
          + (", no CUDA graphs)" if jax.devices()[0].platform == "gpu" else ")"))
    print(common.format_table(header, rows), flush=True)

  summary = []
  for m in measured:
    base = baseline_of(m, measured) if m.engram else None
    slowdown = (f"{100 * (base.tokens_per_s / m.tokens_per_s - 1):+.1f}% vs {base.label}"
                if base is not None else "-")
    summary.append([m.label, f"{m.ms:.2f} (±{100 * m.spread / 2:.1f}%)",
                    f"{m.tokens_per_s:,.0f}", m.mfu(peak), m.dropped, slowdown])
  print(f"\nsummary (median of {args.rounds} rounds; ± half the spread over rounds; goals: "
        "MFU >= 25%, Engram <= 3% slower per token than its MoE baseline)")
  print(common.format_table(["config", "step ms", "tokens/s", "MFU", "dropped",
                             "Engram slowdown/token"], summary), flush=True)


if __name__ == "__main__":
  main()
