r"""The Engram gate on real text (the paper's Fig. 7), for any trained workdir.

  python -m experiments.paper.gate_view --workdir=W --text="Only Alexander the Great ..." \
      [--text="another sentence"] [--out=DIR]

Restores the latest checkpoint like experiments/eval.py (`engram_jax.train.restore_for_eval`:
the run's tokenizer, compression, hashing and table placement), runs the model once on each
text (one document, no padding) and reads the gate alpha that every Engram layer sows into
'intermediates' (engram_jax/fusion.py): one value per token and branch, a branch being one
residual stream of one Engram layer ('layer l / stream m'; with gate='shared' the streams of a
layer are equal). Token t's value gates the rows of the n-grams ending at t.
Writes DIR/gate_view.png (one heat strip per text and branch, tokens along x) and
DIR/gate_view.html (the text with each token's background coloured by its gate, one paragraph
per branch, the value on hover), and prints the values. A model with gate='none' has no gate
and is refused.

Dimension legend: T tokens of a text, M residual streams, L Engram layers.
"""

from __future__ import annotations

import html
import os

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import numpy as np

from engram_jax import evaluate
from engram_jax import tokenizer as tokenizer_lib
from engram_jax import train
from engram_jax.train_step import HostPlacementTrainer
from pallas_kernels.engram_lookup.row_sparse import prefetch_rows

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (config.json, checkpoints).")
_TEXT = flags.DEFINE_multi_string("text", None, "Text(s) to colour.")
_OUT = flags.DEFINE_string("out", "", "Output directory ('' = WORKDIR/gate_view).")


def gate_values(trainer, state, text: str) -> tuple[list[str], dict[int, np.ndarray]]:
  """(token strings, {Engram layer id: gate float32 [T, M]}) of one text."""
  exp = trainer.exp
  if exp.model.engram is None:
    raise ValueError("gate_view: the workdir's model has no Engram layer")
  if exp.model.engram.gate == "none":
    raise ValueError("gate_view: the model has engram.gate='none': there is no gate to show")
  tok = tokenizer_lib.load_tokenizer(exp.tokenizer_path)
  ids_T = np.asarray(tok.encode(text, add_special_tokens=False).ids, np.int32)
  if ids_T.size == 0:
    raise ValueError(f"--text {text!r} has no tokens")
  inputs_1xT = ids_T[None]
  segments_1xT = np.ones_like(inputs_1xT)
  positions_1xT = np.arange(ids_T.size, dtype=np.int32)[None]
  ids = train.engram_hash_fn(exp, hash_on_device=False)(inputs_1xT, segments_1xT)
  # int32, as the input pipeline hands them to the step (the lookup refuses 64-bit ids).
  ids = {l: np.asarray(v, np.int32) for l, v in ids.items()}
  if isinstance(trainer, HostPlacementTrainer):
    rows = trainer.host.rows(trainer.host.prefetch(ids, for_update=False))
    # On the run's (one-device) mesh: the model's sharding constraints need mesh shardings.
    engram_inputs = jax.device_put(rows, jax.sharding.NamedSharding(
        trainer.mesh, jax.sharding.PartitionSpec()))
  elif exp.sparse_tables:
    engram_inputs = {l: prefetch_rows(state.tables[str(l)], ids[l], trainer.offsets[l])
                     for l in trainer.layer_ids}
  else:
    engram_inputs = ids
  with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
    _, mutated = trainer.model.apply(
        {"params": state.params, **state.model_state}, inputs_1xT, segment_ids=segments_1xT,
        positions=positions_1xT, engram_inputs=engram_inputs, deterministic=True,
        mutable=["intermediates"])
  gates = {}
  for layer_id in exp.model.engram.layer_ids:
    (gate_1xTxM,) = mutated["intermediates"][f"layer_{layer_id}"]["engram"]["gate"]
    gates[layer_id] = np.asarray(gate_1xTxM[0], np.float32)
  tokens = [tok.decode([int(i)]) for i in ids_T]
  return tokens, gates


def _branches(gates: dict) -> list[tuple[str, np.ndarray]]:
  return [(f"layer {l} / stream {m}", g_TxM[:, m]) for l, g_TxM in gates.items()
          for m in range(g_TxM.shape[1])]


def _shown(token: str) -> str:
  return token.replace("\n", "\u23ce").replace("\t", "\u21e5")


def write_png(views, path: str, title: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  heights = [len(_branches(g)) for _, g in views]
  widths = [len(t) for t, _ in views]
  fig, axes = plt.subplots(len(views), 1, squeeze=False,
                           figsize=(min(max(6, 0.42 * max(widths)), 40),
                                    1.2 + sum(0.35 * h + 1.1 for h in heights)),
                           gridspec_kw={"height_ratios": [h + 2 for h in heights]},
                           constrained_layout=True)
  image = None
  for ax, (tokens, gates) in zip(axes[:, 0], views):
    branches = _branches(gates)
    image = ax.imshow(np.stack([v for _, v in branches]), aspect="auto", cmap="viridis",
                      vmin=0.0, vmax=1.0)
    ax.set_yticks(range(len(branches)), [name for name, _ in branches], fontsize=8)
    ax.set_xticks(range(len(tokens)), [_shown(t) for t in tokens], rotation=70, fontsize=8)
    text = "".join(tokens)
    ax.set_title(text if len(text) <= 100 else text[:97] + "...", fontsize=9)
  fig.colorbar(image, ax=axes[:, 0].tolist(), label="gate alpha", shrink=0.8)
  fig.suptitle(title, fontsize=10)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def write_html(views, path: str, title: str) -> str:
  parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:70em}span{padding:1px 0}"
           "p{line-height:1.9;font-family:monospace}</style>",
           f"<h1>Engram gate</h1><p style='font-family:sans-serif'>{html.escape(title)}. "
           "Background: the gate alpha of each token (white 0, red 1); hover for the value.</p>"]
  for tokens, gates in views:
    parts.append(f"<h2>{html.escape(''.join(tokens))}</h2>")
    for name, values in _branches(gates):
      spans = "".join(
          f"<span style='background:rgba(220,40,40,{v:.3f})' title='{v:.3f}'>"
          f"{html.escape(_shown(t))}</span>" for t, v in zip(tokens, values))
      parts.append(f"<h3>{html.escape(name)} (mean {values.mean():.3f})</h3><p>{spans}</p>")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(parts) + "\n")
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  config = evaluate.load_workdir_config(workdir)
  trainer, state, step = train.restore_for_eval(config, workdir)
  views = [gate_values(trainer, state, text) for text in _TEXT.value]
  out = _OUT.value or os.path.join(workdir, "gate_view")
  os.makedirs(out, exist_ok=True)
  title = f"{config.name}, {os.path.basename(os.path.normpath(workdir))}, step {step}"
  for tokens, gates in views:
    print("".join(tokens))
    for name, values in _branches(gates):
      print(f"  {name:22s} mean {values.mean():.3f} | "
            + " ".join(f"{_shown(t).strip() or '_'}:{v:.2f}" for t, v in zip(tokens, values)))
  print(f"wrote {write_png(views, os.path.join(out, 'gate_view.png'), title)} and "
        f"{write_html(views, os.path.join(out, 'gate_view.html'), title)}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "text"])
  app.run(main)
