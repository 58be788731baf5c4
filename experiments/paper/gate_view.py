r"""The Engram gate on real text (the paper's Fig. 7), for any trained workdir.

  python -m experiments.paper.gate_view --workdir=W --text="Only Alexander the Great ..." \
      [--text="another sentence"] [--out=DIR]

Restores the latest checkpoint like experiments/eval.py (`engram_jax.train.restore_for_eval`:
the run's tokenizer, compression, hashing and table placement), runs the model once on each
text (one document, no padding) and reads the gate alpha that every Engram layer sows into
'intermediates' (engram_jax/engram_layer.py; experiments/paper/gates.py reads them): one value per token and branch, a branch being one
residual stream of one Engram layer ('layer l / stream m'; with gate='shared' the streams of a
layer are equal). Token t's value gates the rows of the n-grams ending at t.
Writes DIR/gate_view.png (one heat strip per text and branch, tokens along x) and
DIR/gate_view.html (the text with each token's background coloured by its gate, one paragraph
per branch, the value on hover), and prints the values. A model with gate='none' has no gate
and is refused.

Dimension legend: T tokens of a text, M residual streams, L Engram layers.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging

from engram_jax import evaluate
from engram_jax import train
from experiments.paper import gates as gates_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (config.json, checkpoints).")
_TEXT = flags.DEFINE_multi_string("text", None, "Text(s) to colour.")
_OUT = flags.DEFINE_string("out", "", "Output directory ('' = WORKDIR/gate_view).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  config = evaluate.load_workdir_config(workdir)
  trainer, state, step = train.restore_for_eval(config, workdir)
  views = [gates_lib.gate_values(trainer, state, text) for text in _TEXT.value]
  out = _OUT.value or os.path.join(workdir, "gate_view")
  os.makedirs(out, exist_ok=True)
  title = f"{config.name}, {os.path.basename(os.path.normpath(workdir))}, step {step}"
  for tokens, gates in views:
    print("".join(tokens))
    for name, values in gates_lib.branches(gates):
      print(f"  {name:22s} mean {values.mean():.3f} | "
            + " ".join(f"{gates_lib.shown(t).strip() or '_'}:{v:.2f}"
                       for t, v in zip(tokens, values)))
  print(f"wrote {gates_lib.write_png(views, os.path.join(out, 'gate_view.png'), title)} and "
        f"{gates_lib.write_html(views, os.path.join(out, 'gate_view.html'), title)}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "text"])
  app.run(main)
