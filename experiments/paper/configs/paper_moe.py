"""paper_moe: the iso-parameter MoE baseline of experiments/paper/configs/paper.py.

Command (same data flags as paper.py):
  python -m experiments.train --config=experiments/paper/configs/paper_moe.py \
      --workdir=/tmp/paper_moe --config.data.train_files=... [:tiny for the CPU size]
Derived with `engram_jax.param_count.moe_baseline`: the Engram layers are removed and their
parameters (tables and projections) become routed experts, so the total parameter count is
paper.py's (to one expert) with the same data, steps, schedule and seed. Its activated count
is lower by the Engram layers' projections, which every token uses and no expert replaces
(the sweep's table prints both counts of every run). Hardware: one H200 (or `:tiny` on CPU).
"""

from experiments.configs import base
from experiments.configs import quickstart_moe
from experiments.paper.configs import paper


def get_config(arg=None):
  c = quickstart_moe.moe_baseline_of(paper.get_config(arg))
  c.name = "paper_moe" if not arg else f"paper_moe_{arg}"
  return base.lock(c)
