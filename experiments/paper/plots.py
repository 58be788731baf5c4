"""One PNG per paper sweep (matplotlib, Agg), drawn from `analysis`'s data; two panels, the
held-out split and the out-of-domain text.

Dimension legend: none.
"""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.paper.analysis import METRICS  # noqa: E402


def _iso(ax, d):
  for i, (model, color) in enumerate((("engram", "C0"), ("moe", "C1"))):
    v = d["values"][model]
    ax.plot([i] * len(v), v, "o", color=color, alpha=0.7)
    s = d["summary"][model]
    if s["n"] > 1:
      ax.errorbar([i + 0.15], [s["mean"]], yerr=[s["std"]], fmt="s", color=color, capsize=4)
  ax.set_xticks([0, 1], ["Engram", "MoE (iso-param)"])
  ax.set_xlim(-0.5, 1.5)
  if "gap" in d:
    ax.set_title(f"gap {d['gap']:+.4f} = {d['ratio']:.1f} x seed std")


def _alloc(ax, rho, d):
  ax.plot(rho, d["loss"], "o-")
  if "parabola" in d:
    x = np.linspace(min(rho), max(rho), 100)
    ax.plot(x, np.polyval(d["parabola"], x), "--", color="gray",
            label=f"parabola, R^2 {d['r2']:.2f}")
    i = d["argmin"]
    ax.plot([rho[i]], [d["loss"][i]], "*", ms=14, color="C3", label=f"min at rho {rho[i]:.2f}")
    ax.legend()
  ax.set_xlabel("rho = routed experts / (routed experts + Engram tables)")


def _slots(ax, n_slots, d):
  ax.plot(n_slots, d["loss"], "o")
  if "b" in d:
    x = np.geomspace(min(n_slots), max(n_slots), 50)
    ax.plot(x, d["a"] + d["b"] * np.log(x), "--", color="gray",
            label=f"{d['b'] * math.log(2):+.4f} per doubling, R^2 {d['r2']:.2f}")
    ax.legend()
  ax.set_xscale("log")
  ax.set_xlabel("Engram slots (table rows, all layers)")


def _ablate(ax, d):
  names = sorted(d["delta"], key=lambda k: d["delta"][k])
  ax.barh(range(len(names)), [d["delta"][k] for k in names], color="C0")
  ax.set_yticks(range(len(names)), names)
  ref = d["reference"]
  if ref["n"] > 1 and math.isfinite(ref["std"]):
    ax.axvspan(-ref["std"], ref["std"], color="gray", alpha=0.25, label="± reference seed std")
    ax.legend()
  ax.axvline(0, color="black", lw=0.8)
  ax.set_xlabel("loss minus reference (> 0: the change hurts)")


def plot(sweep: str, data: dict, out_path: str, title: str) -> str:
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for ax, (key, label) in zip(axes, METRICS):
    if sweep == "iso":
      _iso(ax, data[key])
    elif sweep == "alloc":
      _alloc(ax, data[key]["rho"], data[key])
    elif sweep == "slots":
      _slots(ax, data[key]["slots"], data[key])
    else:
      _ablate(ax, data[key])
    ax.set_ylabel(f"{label} loss (nats / token)" if sweep != "ablate" else "")
    ax.set_title(f"{label}" + (f": {ax.get_title()}" if ax.get_title() else ""))
    ax.grid(alpha=0.3)
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  fig.savefig(out_path, dpi=110)
  plt.close(fig)
  return out_path
