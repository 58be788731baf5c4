"""Loss curves of one or more runs from their `metrics.jsonl` (matplotlib, Agg backend).

Dimension legend: none.
"""

from __future__ import annotations

import os
from typing import Mapping

import matplotlib

from engram_jax import workdir as workdir_lib

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(workdir: str) -> list[dict]:
  """Train and eval records of a workdir's metrics.jsonl, the last one of each step (a resumed
  run logs again the steps after its checkpoint; workdir_lib.read_metrics)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no metrics.jsonl in {workdir!r}")
  return workdir_lib.read_metrics(path, splits=("train", "eval"))


def plot_loss_curves(runs: Mapping[str, str], out_path: str, title: str = "") -> str:
  """One line per run (train loss, solid) plus its eval points (markers); returns out_path.

  `runs` maps a label to a workdir; the last record of each step is plotted (read_metrics).
  """
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, (label, workdir) in enumerate(runs.items()):
    color = f"C{i}"
    train, evals = {}, {}
    for r in read_metrics(workdir):
      if r.get("split") == "train":
        train[r["step"]] = r["loss"]
      elif r.get("split") == "eval":
        evals[r["step"]] = r["eval_loss"]
    steps = sorted(train)
    ax.plot(steps, [train[s] for s in steps], color=color, label=f"{label} (train)")
    if evals:
      es = sorted(evals)
      ax.plot(es, [evals[s] for s in es], "o", color=color,
              label=f"{label} (validation, final {evals[es[-1]]:.3f})")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  ax.set_title(title or "training loss")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  fig.savefig(out_path, dpi=120)
  plt.close(fig)
  return out_path
