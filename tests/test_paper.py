"""experiments/paper: every run of every sweep is the config it claims, the command line
reproduces it, each sweep's table and plot come out of its records, and the iso sweep's tiny
mode runs end to end on CPU, followed by gate_view on its Engram workdir."""

import json
import math
import os
import subprocess
import sys

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import pytest

from engram_jax import experiment_config
from engram_jax import param_count
from engram_jax.model import EngramLM
from experiments.paper import analysis
from experiments.paper import sweep
from experiments.paper import sweeps
from experiments.paper.configs import paper

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unique_runs(tiny):
  runs = {}
  for s in sweeps.SWEEPS:
    for run in sweeps.runs_of(s, tiny):
      runs.setdefault(run.name, run)
  return runs


def _counts(run, tiny):
  return param_count.count_params(
      experiment_config.resolve(sweeps.run_config(run, tiny), check_data=False).model)


@pytest.mark.parametrize("name", ["paper", "paper_moe"])
def test_paper_configs_load_locked_and_documented(name):
  for tiny in (False, True):
    assert sweeps.base_config(name, tiny).is_locked
  with open(os.path.join(REPO, sweeps.CONFIG_FILES[name])) as f:
    assert "python -m experiments." in f.read().split('"""')[1]


def test_paper_config_rejects_an_unknown_arg():
  with pytest.raises(ValueError, match="arg must be"):
    paper.get_config("huge")


def test_full_size_sweeps_hold_what_they_claim():
  ref = _counts(sweeps.engram(0), False)
  moe = _counts(sweeps.moe(0), False)
  # iso: same total parameters (to one expert), >= 3 seeds, >= 20M tokens per run.
  assert abs(moe["total"] - ref["total"]) / ref["total"] < 0.01
  assert len(sweeps.ISO_SEEDS) >= 3
  c = sweeps.base_config("paper", False)
  assert c.train.num_steps * c.data.batch_size * c.data.seq_len >= 20_000_000
  # alloc: >= 6 rho values from 1 down to ~0.4, totals and activated counts of the Engram
  # points fixed.
  alloc = [_counts(r, False) for r in sweeps.alloc_runs()]
  rhos = sorted(a["rho"] for a in alloc)
  assert len(rhos) >= 6 and rhos[-1] == 1.0 and rhos[0] < 0.42
  for a in alloc:
    assert abs(a["total"] - ref["total"]) / ref["total"] < 0.01
    if a["rho"] < 1:
      assert abs(a["activated"] - ref["activated"]) / ref["activated"] < 0.005
  # slots: >= 5 sizes spanning >= 16x on one backbone.
  slots = sorted(_counts(r, False)["engram"] for r in sweeps.slots_runs())
  assert len(slots) >= 5 and slots[-1] / slots[0] >= 16
  assert len({_counts(r, False)["activated"] for r in sweeps.slots_runs()}) == 1
  # ablate: every variant keeps the table size; the reference has >= 2 seeds.
  ablate = sweeps.ablate_runs()
  assert sum(r.point_dict["variant"] == "reference" for r in ablate) >= 2
  for run in ablate:
    assert abs(_counts(run, False)["engram"] - ref["engram"]) / ref["engram"] < 0.01, run.name


def test_every_tiny_run_builds_with_the_counted_parameters():
  for run in _unique_runs(True).values():
    exp = experiment_config.resolve(sweeps.run_config(run, True), check_data=False)
    engram_inputs = None
    if exp.model.engram is not None:
      h = exp.model.engram.num_heads
      engram_inputs = {l: jax.ShapeDtypeStruct((2, 8, h), jnp.int32)
                       for l in exp.model.engram.layer_ids}
    model = EngramLM(exp.model.replace(engram_table_placement="param"))
    variables = jax.eval_shape(lambda x, e, m=model: m.init(jax.random.PRNGKey(0), x,
                                                            engram_inputs=e),
                               jax.ShapeDtypeStruct((2, 8), jnp.int32), engram_inputs)
    counted = param_count.count_params(exp.model)["total"]
    assert param_count.tree_param_count(variables["params"]) == counted, run.name


def test_command_line_overrides_reproduce_every_run_config():
  for tiny in (False, True):
    for run in _unique_runs(tiny).values():
      cmd = sweep.train_command(run, tiny, {"train": "t.jsonl.gz", "valid": "v.jsonl.gz",
                                            "tokenizer": ""}, "/w")
      argv = ["train"] + [f for f in cmd[3:] if not f.startswith("--workdir")]
      fv = flags.FlagValues()  # experiments/train.py's flag, reading the overrides from argv
      config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True,
                                      sys_argv=argv)
      fv(argv)
      want = sweeps.run_config(run, tiny)
      want.unlock()
      want.data.train_files, want.data.eval_files = ("t.jsonl.gz",), ("v.jsonl.gz",)
      assert fv.config.to_dict() == want.to_dict(), run.name


def _records(runs, skip=()):
  """Made-up finished records (the tables' code paths, not their values)."""
  out = {}
  for i, run in enumerate(runs):
    if run.name in skip:
      continue
    rho = 1.0 if run.config == "paper_moe" else 0.4 + 0.05 * i
    out[run.name] = {"name": run.name, "status": "ok", "command": f"python -m x --config={i} "
                     "--config.seed=0", "eval_command": "python -m y", "tokens": 1024,
                     "steps": 8, "batch_size": 4, "seq_len": 32, "total": 1e6,
                     "activated": 5e5, "engram": 1e4 * (i + 1), "rho": rho,
                     "slots": 1000 * 2 ** i, "eval_loss": 3 + math.sin(i),
                     "ood_loss": 4 + math.cos(i), "wall_seconds": 10.0, "device": "cpu x1",
                     "data": "d"}
  return out


@pytest.mark.parametrize("name", sweeps.SWEEPS)
def test_every_sweep_writes_its_table_and_plot(name, tmp_path):
  runs = sweeps.runs_of(name, tiny=False)
  meta = {"commit": "abc", "tiny": False, "argv": "python -m experiments.paper.sweep"}
  text = sweep.report(name, runs, _records(runs), meta, str(tmp_path))
  assert "status: complete" in text
  for run in runs:
    assert f"| {run.name} |" in text and f"- {run.name}: `" in text
  assert os.path.getsize(tmp_path / f"{name}.png") > 10_000
  assert (tmp_path / f"{name}.md").read_text() == text
  conclusions = {"iso": "seed spread", "alloc": "minimum", "slots": "per doubling",
                 "ablate": "minus reference"}[name]
  assert conclusions in text
  # A run that did not finish is listed and the table is marked partial.
  text = sweep.report(name, runs, _records(runs, skip={runs[-1].name}), meta, str(tmp_path))
  assert (f"PARTIAL: held-out {len(runs) - 1} of {len(runs)}, out-of-domain {len(runs) - 1} "
          f"of {len(runs)} runs finished") in text
  assert f"| {runs[-1].name} | " in text and "not run" in text


def test_iso_analysis_verdict_uses_the_pooled_seed_spread():
  runs = sweeps.iso_runs()
  losses = {"engram_s0": 2.90, "engram_s1": 2.91, "engram_s2": 2.92,
            "moe_s0": 2.95, "moe_s1": 2.96, "moe_s2": 2.97}
  records = {n: {"status": "ok", "eval_loss": v, "ood_loss": v} for n, v in losses.items()}
  lines, data = analysis.iso(runs, records)
  assert data["eval_loss"]["gap"] == pytest.approx(0.05)
  assert data["eval_loss"]["pooled_std"] == pytest.approx(0.01)
  assert any("exceeds 3 x the seed spread" in line for line in lines)


@pytest.mark.slow
def test_tiny_iso_sweep_end_to_end_then_gate_view(tmp_path):
  out, root = tmp_path / "out", tmp_path / "runs"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  r = subprocess.run([sys.executable, "-m", "experiments.paper.sweep", "--sweep=iso", "--tiny",
                      "--parallel=1", f"--out={out}", f"--workdir_root={root}",
                      "--gate_view_text=In the beginning God created the heaven."],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "status: complete" in r.stdout and "| moe_s1 |" in r.stdout
  for run in sweeps.iso_runs(tiny=True):
    record = json.loads((out / "results" / f"{run.name}.json").read_text())
    assert record["status"] == "ok" and math.isfinite(record["ood_loss"])
    assert record["tokens"] == 6 * 4 * 32
  assert (out / "iso.png").stat().st_size > 10_000
  assert (out / "gate_view" / "gate_view.png").stat().st_size > 10_000
  page = (out / "gate_view" / "gate_view.html").read_text()
  assert page.count("<h3>layer ") == 2 * 2  # 2 Engram layers x 2 streams
  assert "title='" in page


def test_train_results_from_log_keeps_held_out_of_a_run_stopped_in_its_ood_eval():
  from experiments.paper import sweep as sweep_lib
  text = ("[13:47:10] paper: {'total': 100, 'activated': 40, 'engram': 60, 'engram_dense': 5, "
          "'rho': 0.5, 'flops_per_token': 7.0} | tables: lazy_adam | mesh {'data': 1}\n"
          "[13:52:30] devices NVIDIA H200 x1\n"
          "[13:55:39] eval step 640: loss 3.2081 | ppl 24.73 | 461285 tokens in 4.5s\n"
          '[13:55:39] done: {"steps": 640, "train_loss": 3.25, "eval_loss": 3.2081}\n'
          "==== out-of-domain evaluation ====\n*** SIGTERM received ***\n")
  rec = sweep_lib.train_results_from_log(text, {"head_dim": 4})
  assert rec["status"] == analysis.HELD_OUT_ONLY
  assert rec["eval_loss"] == 3.2081 and rec["eval_tokens"] == 461285 and rec["slots"] == 15
  assert rec["total"] == 100 and rec["device"] == "NVIDIA H200 x1" and "ood_loss" not in rec
  assert analysis.has(rec, "eval_loss") and not analysis.has(rec, "ood_loss")
  assert not analysis.ok(rec)
  # A log without a finished training run gives nothing.
  assert sweep_lib.train_results_from_log(text.split("[13:55:39] done")[0], {}) == {}
