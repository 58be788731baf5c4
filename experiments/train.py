"""Train (and evaluate) one experiment config; resumes automatically from --workdir.

  python -m experiments.train --config=experiments/configs/quickstart.py --workdir=/tmp/qs \
      [--config.train.num_steps=500 --config.table_optim.kind=dense_adam ...]
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from engram_jax import cli
from engram_jax import distributed
from engram_jax import experiment_config
from engram_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and config.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  # The overrides are applied after get_config's own check; nothing exists in the workdir yet.
  experiment_config.check_config(_CONFIG.value)
  distributed.initialize(_CONFIG.value.train.distributed)  # before anything touches a device
  distributed.run(train.train_and_evaluate, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
