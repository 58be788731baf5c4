"""The README's main job: Engram vs its iso-parameter MoE baseline on the embedded corpus.

  python -m experiments.quickstart --workdir=/tmp/quickstart

Trains experiments/configs/quickstart.py and quickstart_moe.py (same data, steps, seed and
dense learning rate), prints a table (model, total / active / Engram params, validation loss)
and writes WORKDIR/loss_curves.png. 2 CPU cores: <= 10 minutes in total.
"""

import os
import time

from absl import app
from absl import flags
from absl import logging

from engram_jax import cli
from engram_jax import experiment_config
from engram_jax import plotting
from engram_jax import train
from experiments.configs import quickstart
from experiments.configs import quickstart_moe

_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (one subdirectory per model).")
_STEPS = flags.DEFINE_integer("num_steps", 0, "Override the number of steps (0 = config's).")
flags.mark_flags_as_required(["workdir"])
flags.register_validator("num_steps", lambda v: v >= 0, "--num_steps must be >= 0")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  t0 = time.perf_counter()
  runs = {"engram": quickstart.get_config(), "moe": quickstart_moe.get_config()}
  for config in runs.values():
    if _STEPS.value:
      config.train.num_steps = config.train.checkpoint_every = _STEPS.value
    experiment_config.check_config(config)  # both, before either workdir exists
  results = {}
  for name, config in runs.items():
    results[name] = train.train_and_evaluate(config, os.path.join(_WORKDIR.value, name))
  png = plotting.plot_loss_curves(
      {f"{n} ({runs[n].name})": os.path.join(_WORKDIR.value, n) for n in runs},
      os.path.join(_WORKDIR.value, "loss_curves.png"), title="quickstart: Engram vs MoE")
  header = f"{'model':<16}{'total':>12}{'active':>12}{'engram':>12}{'val loss':>10}{'val ppl':>10}"
  print("\n" + header + "\n" + "-" * len(header))
  for name, r in results.items():
    print(f"{runs[name].name:<16}{r['total']:>12,}{r['activated']:>12,}{r['engram']:>12,}"
          f"{r['eval_loss']:>10.4f}{r['eval_perplexity']:>10.2f}")
  print(f"\nloss curves: {png}\nwall time: {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
  cli.run(main)
