"""Evaluate the latest checkpoint of a training workdir on any text / JSONL files.

  python -m experiments.eval --workdir=/tmp/qs --data=my.txt [--data=other.jsonl ...]
Prints loss and perplexity per token (the run's tokenizer and Engram hashing are used).
"""

import json

from absl import app
from absl import flags
from absl import logging

from engram_jax import cli
from engram_jax import train

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (holds config.json).")
_DATA = flags.DEFINE_multi_string("data", None, "Text (.txt[.gz]) or JSONL files to evaluate.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Override the run's batch size (0 = keep).")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 0, "Evaluate at most this many batches.")
flags.mark_flags_as_required(["workdir", "data"])
flags.register_validator("batch_size", lambda v: v >= 0, "--batch_size must be >= 0")
flags.register_validator("num_batches", lambda v: v >= 0, "--num_batches must be >= 0")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  metrics = train.evaluate_workdir(_WORKDIR.value, _DATA.value, batch_size=_BATCH.value,
                                   num_batches=_NUM_BATCHES.value)
  print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
  cli.run(main)
