"""The Engram gate on real text (the paper's Fig. 7): gate values of a restored run, and the
PNG and HTML views of them. experiments/paper/gate_view.py is the command.

Dimension legend: T tokens of a text, M residual streams, L Engram layers.
"""

from __future__ import annotations

import html

import flax.linen as nn
import jax
import numpy as np

from engram_jax import tokenizer as tokenizer_lib
from engram_jax import train
from engram_jax.train_step import HostPlacementTrainer
from pallas_kernels.engram_lookup.row_sparse import prefetch_rows


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


def branches(gates: dict) -> list[tuple[str, np.ndarray]]:
  return [(f"layer {l} / stream {m}", g_TxM[:, m]) for l, g_TxM in gates.items()
          for m in range(g_TxM.shape[1])]


def shown(token: str) -> str:
  return token.replace("\n", "\u23ce").replace("\t", "\u21e5")


def write_png(views, path: str, title: str) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  heights = [len(branches(g)) for _, g in views]
  widths = [len(t) for t, _ in views]
  fig, axes = plt.subplots(len(views), 1, squeeze=False,
                           figsize=(min(max(6, 0.42 * max(widths)), 40),
                                    1.2 + sum(0.35 * h + 1.1 for h in heights)),
                           gridspec_kw={"height_ratios": [h + 2 for h in heights]},
                           constrained_layout=True)
  image = None
  for ax, (tokens, gates) in zip(axes[:, 0], views):
    rows = branches(gates)
    image = ax.imshow(np.stack([v for _, v in rows]), aspect="auto", cmap="viridis",
                      vmin=0.0, vmax=1.0)
    ax.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    ax.set_xticks(range(len(tokens)), [shown(t) for t in tokens], rotation=70, fontsize=8)
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
    for name, values in branches(gates):
      spans = "".join(
          f"<span style='background:rgba(220,40,40,{v:.3f})' title='{v:.3f}'>"
          f"{html.escape(shown(t))}</span>" for t, v in zip(tokens, values))
      parts.append(f"<h3>{html.escape(name)} (mean {values.mean():.3f})</h3><p>{spans}</p>")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(parts) + "\n")
  return path
