"""Where a training step's time goes: device time per model part, from a profiler trace.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m benchmarks.profile_step \
      --config=experiments/configs/small_gpu.py [--config.model.moe.dispatch=ragged ...]

Compiles the real jitted train step of the config (`common.TrainerSteps`: synthetic batches,
tables of `--rows` rows filled by pattern), times it (`common.median_step_ms`), then runs
`--steps` steps under `jax.profiler.trace`. Every kernel / thunk event that names its HLO
instruction (`hlo_op` stat; GPU stream events, or the CPU client's thunks when there is no GPU)
is mapped through the compiled HLO's `metadata={op_name=...}` to the part of the model that
emitted it (`common.part_of`, `common.breakdown`): Engram layer, MoE experts, MoE routing/dispatch, attention, mHC, dense FFN, norms,
embedding and logits, or "outside the model" (loss, clipping, optimisers, table updates).
Backward ops (`transpose(...)` in op_name) are counted apart from forward ones.

Prints, last: wall ms per step, summed event ms per step (on a GPU the kernel time; events of
one step may overlap on several streams, and on CPU thunks run on several threads, so the sum
is not the wall time), and a table per part: forward ms, backward ms, share of the summed time;
then the ten most expensive HLO instructions.

XLA:GPU records whole CUDA graphs (events named "command_buffer_N", no op_name) unless command
buffers are off, so this script turns them off (`common.command_buffers_off`) and its untraced
median is the step without CUDA graphs; bench_train_step times the step with them.

Dimension legend: none (times only).
"""

from absl import flags
from ml_collections import config_flags

from benchmarks import common

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file("config", None, "experiments/configs/*.py", flag_values=FLAGS)
flags.DEFINE_string("kind", "lazy_adam", "table_optim.kind", flag_values=FLAGS)
flags.DEFINE_integer("rows", 1 << 20, "rows per Engram table", flag_values=FLAGS)
flags.DEFINE_integer("steps", 5, "profiled steps", flag_values=FLAGS)
flags.mark_flag_as_required("config", flag_values=FLAGS)

def profile(config, kind: str, rows: int, steps: int):
  """Times and profiles the config's train step with `rows` rows per table and table
  optimiser `kind`; see the module docstring. Returns (median ms, traced ms, parts, per_op,
  summed ms, op_names, table rows)."""
  train_c, state, batches, table_rows = common.TrainerSteps(config).prepare(kind, rows)
  step = lambda c, batch: train_c(c[0], batch)  # noqa: E731
  loss_of = lambda c: c[1]["loss"]  # noqa: E731
  ms, carry = common.median_step_ms(step, (state, None), batches, loss_of)
  traced_ms, parts, per_op, total, names, _ = common.profile_parts(
      step, carry, batches, loss_of, train_c.as_text(), steps)
  return ms, traced_ms, parts, per_op, total, names, table_rows


def main():
  args = common.parse_flags(FLAGS, __doc__)
  common.command_buffers_off()  # before the backend starts
  ms, traced_ms, parts, per_op, total, names, table_rows = profile(
      args.config, args.kind, args.rows, args.steps)
  print(f"\n{common.device_summary()}: "
        f"{config_flags.get_config_filename(args['config'])} {common.config_overrides(args)} | "
        f"table rows {table_rows}")
  print(f"step: median {ms:.2f} ms (untraced), {traced_ms:.2f} ms traced; summed events "
        f"{total:.2f} ms/step")
  print(common.format_table(["part", "fwd ms", "bwd ms", "share"],
                            common.part_rows(parts, total)))
  print("\ntop instructions (ms/step, part, op_name):")
  for op, op_ms in per_op.most_common(10):
    name = names.get(op, "")
    print(f"  {op_ms:8.2f}  {op:<32} {common.part_of(name)[0]:<28} {name[-90:]}")


if __name__ == "__main__":
  main()
