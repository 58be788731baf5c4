"""Continue a prompt with the latest checkpoint of a training workdir.

  python -m experiments.generate --workdir=/tmp/qs_engram --prompt="The history of"
      [--max_new_tokens=64 --temperature=0.8 --top_k=40 --seed=0]
Prints the continuation (up to the first end of document). Temperature 0 is greedy; the same
seed gives the same text. The run's tokenizer, Engram hashing and table placement are used
(engram_jax.generate.TextDecoder).
"""

from absl import app
from absl import flags
from absl import logging

from engram_jax import generate

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (holds config.json).")
_PROMPT = flags.DEFINE_string("prompt", None, "The text to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to sample after the prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Softmax temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flags_as_required(["workdir", "prompt"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore step at INFO
  try:
    text = generate.generate_text(_WORKDIR.value, _PROMPT.value,
                                  max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                                  top_k=_TOP_K.value, seed=_SEED.value)
  except (FileNotFoundError, ValueError) as e:  # a bad workdir or argument: one line, no trace
    raise SystemExit(f"generate: {e}") from None
  print(text)


if __name__ == "__main__":
  app.run(main)
