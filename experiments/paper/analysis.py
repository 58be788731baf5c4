"""What each paper sweep concludes from its runs' losses: statistics, fits and markdown tables.

Input: the sweep's `Run`s (experiments/paper/sweeps.py) and a record per run name (the JSON the
driver writes: status, losses, parameter counts, tokens, command). Runs without an 'ok'
record appear in the tables as such and are left out of every statistic. Every number is
computed here from the records; nothing is typed in.

  iso     per model: mean, sample std (ddof 1), min-max over seeds; the gap (MoE mean - Engram
          mean, > 0 when Engram is better), the pooled seed std sqrt((s_e^2 + s_m^2) / 2) and
          whether |gap| > 3 x pooled std.
  alloc   loss against the measured rho; the arg-min, whether it is interior (neither end of
          the rho range), and the vertex of a least-squares parabola when it opens upwards.
  slots   loss = a + b ln(slots) by least squares (slots = table rows of all Engram layers);
          b ln 2 per doubling, and R^2.
  ablate  each variant minus the reference's seed mean, in units of the reference seed std.

Dimension legend: none.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

METRICS = (("eval_loss", "held-out"), ("ood_loss", "out-of-domain"))


# A run whose training finished but whose out-of-domain evaluation was stopped by the time
# budget: its held-out loss is a result, its OOD loss is missing.
HELD_OUT_ONLY = "held-out only (OOD eval stopped)"


def ok(record: Optional[dict]) -> bool:
  return bool(record) and record.get("status") == "ok"


def has(record: Optional[dict], key: str) -> bool:
  """Whether `record` holds a finished value of metric `key` (eval_loss or ood_loss)."""
  return (bool(record) and record.get("status") in ("ok", HELD_OUT_ONLY)
          and record.get(key) is not None)


def summarize(values: Sequence[float]) -> dict:
  v = np.asarray(values, np.float64)
  return {"n": int(v.size), "mean": float(v.mean()) if v.size else math.nan,
          "std": float(v.std(ddof=1)) if v.size > 1 else math.nan,
          "min": float(v.min()) if v.size else math.nan,
          "max": float(v.max()) if v.size else math.nan}


def _fmt(x, digits=4) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "-"
  return f"{x:.{digits}f}"


def _count(x) -> str:
  return "-" if x is None else f"{x / 1e6:.2f}M"


def run_table(runs, records) -> list[str]:
  """One row per run: what it is, its seed, tokens, parameter counts and both losses."""
  lines = ["| run | point | seed | status | tokens | total | activated | tables | rho "
           "| held-out loss | OOD loss | wall s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for run in runs:
    r = records.get(run.name) or {}
    point = ", ".join(f"{v}" for v in run.point_dict.values())
    rho = r.get("rho")
    lines.append(
        f"| {run.name} | {point} | {run.seed} | {r.get('status', 'not run')} "
        f"| {r.get('tokens', 0):,} | {_count(r.get('total'))} | {_count(r.get('activated'))} "
        f"| {_count(r.get('engram'))} | {_fmt(rho, 3) if rho is not None else '-'} "
        f"| {_fmt(r.get('eval_loss'))} | {_fmt(r.get('ood_loss'))} "
        f"| {_fmt(r.get('wall_seconds'), 0)} |")
  return lines


def _runs_with(runs, records, key):
  return [(run, records[run.name]) for run in runs if has(records.get(run.name), key)]


# ---- iso -------------------------------------------------------------------------------------


def iso(runs, records) -> tuple[list[str], dict]:
  lines, data = [], {}
  for key, label in METRICS:
    done = _runs_with(runs, records, key)
    groups = {m: [r[key] for run, r in done if run.point_dict["model"] == m]
              for m in ("engram", "moe")}
    s = {m: summarize(v) for m, v in groups.items()}
    data[key] = {"values": groups, "summary": s}
    lines.append(f"**{label}** | Engram {_fmt(s['engram']['mean'])} ± "
                 f"{_fmt(s['engram']['std'])} (n={s['engram']['n']}, "
                 f"{_fmt(s['engram']['min'])}-{_fmt(s['engram']['max'])}) | MoE "
                 f"{_fmt(s['moe']['mean'])} ± {_fmt(s['moe']['std'])} (n={s['moe']['n']}, "
                 f"{_fmt(s['moe']['min'])}-{_fmt(s['moe']['max'])})")
    if s["engram"]["n"] < 2 or s["moe"]["n"] < 2:
      lines.append(f"- {label}: fewer than 2 seeds of a model finished: no spread, no verdict.")
      continue
    gap = s["moe"]["mean"] - s["engram"]["mean"]
    pooled = math.sqrt((s["engram"]["std"] ** 2 + s["moe"]["std"] ** 2) / 2)
    ratio = abs(gap) / pooled if pooled > 0 else math.inf
    better = "Engram" if gap > 0 else "MoE"
    verdict = "exceeds" if ratio > 3 else "does not exceed"
    data[key].update(gap=gap, pooled_std=pooled, ratio=ratio)
    lines.append(f"- {label}: gap MoE - Engram = {gap:+.4f} ({better} lower), pooled seed std "
                 f"{pooled:.4f}: |gap| = {ratio:.1f} x std, {verdict} 3 x the seed spread.")
  return lines, data


# ---- alloc -----------------------------------------------------------------------------------


def alloc(runs, records) -> tuple[list[str], dict]:
  lines, data = [], {}
  for key, label in METRICS:
    done = sorted(_runs_with(runs, records, key), key=lambda x: x[1]["rho"])
    rhos = [r["rho"] for _, r in done]
    losses = [r[key] for _, r in done]
    data[key] = {"rho": rhos, "loss": losses}
    if len(done) < 3:
      lines.append(f"- {label}: fewer than 3 points finished: no minimum.")
      continue
    i = int(np.argmin(losses))
    interior = 0 < i < len(losses) - 1
    a, b, c = np.polyfit(rhos, losses, 2)
    fit = np.polyval([a, b, c], rhos)
    r2 = _r2(losses, fit)
    vertex = -b / (2 * a) if a > 0 else None
    data[key].update(argmin=i, parabola=(a, b, c), r2=r2, vertex=vertex)
    at_one = [l for rho, l in zip(rhos, losses) if rho == 1.0]
    moe = f"rho = 1: {at_one[0]:.4f}" if at_one else "rho = 1 did not finish"
    where = (f"interior, at rho = {rhos[i]:.3f}" if interior
             else f"at the {'low' if i == 0 else 'high'} end, rho = {rhos[i]:.3f}")
    vtext = (f"parabola vertex rho = {vertex:.3f}" if vertex is not None
             else "the parabola opens downwards (no vertex minimum)")
    lines.append(f"- {label}: minimum {losses[i]:.4f} {where} ({moe}); {vtext}, "
                 f"R^2 = {r2:.3f}.")
  return lines, data


def _r2(y, fit) -> float:
  y, fit = np.asarray(y, np.float64), np.asarray(fit, np.float64)
  total = float(np.sum((y - y.mean()) ** 2))
  return 1.0 - float(np.sum((y - fit) ** 2)) / total if total > 0 else math.nan


# ---- slots -----------------------------------------------------------------------------------


def slots(runs, records) -> tuple[list[str], dict]:
  lines, data = [], {}
  for key, label in METRICS:
    done = sorted(_runs_with(runs, records, key), key=lambda x: x[1]["slots"])
    n_slots = [r["slots"] for _, r in done]
    losses = [r[key] for _, r in done]
    data[key] = {"slots": n_slots, "loss": losses}
    if len(done) < 3:
      lines.append(f"- {label}: fewer than 3 sizes finished: no fit.")
      continue
    b, a = np.polyfit(np.log(n_slots), losses, 1)
    r2 = _r2(losses, a + b * np.log(n_slots))
    data[key].update(a=a, b=b, r2=r2)
    lines.append(f"- {label}: loss = {a:.4f} {b:+.4f} ln(slots) over {n_slots[0]:,}-"
                 f"{n_slots[-1]:,} slots ({n_slots[-1] / n_slots[0]:.0f}x): "
                 f"{b * math.log(2):+.4f} per doubling, R^2 = {r2:.3f}.")
  return lines, data


# ---- ablate ----------------------------------------------------------------------------------


def ablate(runs, records) -> tuple[list[str], dict]:
  lines, data = [], {}
  for key, label in METRICS:
    done = _runs_with(runs, records, key)
    ref = [(run, r) for run, r in done if run.point_dict["variant"] == "reference"]
    variants = [(run, r) for run, r in done if run.point_dict["variant"] != "reference"]
    s = summarize([r[key] for _, r in ref])
    deltas = {run.point_dict["variant"]: r[key] - s["mean"] for run, r in variants}
    data[key] = {"reference": s, "delta": deltas}
    if not ref:
      lines.append(f"- {label}: the reference did not finish: no deltas.")
      continue
    lines.append(f"**{label}**: reference {s['mean']:.4f} ± {_fmt(s['std'])} (n={s['n']}, "
                 f"{s['min']:.4f}-{s['max']:.4f})")
    lines.append("")
    lines.append("| variant | loss | minus reference | in reference stds |")
    lines.append("|---|---|---|---|")
    for name, d in sorted(deltas.items(), key=lambda kv: -kv[1]):
      z = d / s["std"] if s["n"] > 1 and s["std"] > 0 else math.nan
      lines.append(f"| {name} | {s['mean'] + d:.4f} | {d:+.4f} | {_fmt(z, 1)} |")
    lines.append("")
  return lines, data


ANALYSES = {"iso": iso, "alloc": alloc, "slots": slots, "ablate": ablate}
