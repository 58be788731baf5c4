"""Quickstart baseline: the MoE-only model with the same total parameters as `quickstart`.

Derived from quickstart.py with `engram_jax.param_count.moe_baseline`: the Engram layer is
removed and its parameters (tables + projections) become extra routed experts. Same data,
steps, seed and dense learning rate. Trained together with quickstart by
  python -m experiments.quickstart --workdir=/tmp/quickstart
or alone:
  python -m experiments.train --config=experiments/configs/quickstart_moe.py --workdir=/tmp/qs_moe

Hardware: 2 CPU cores. Model: 11 routed experts top-1 instead of 4 + the Engram layer.
Expected: the validation loss in quickstart.py's header (its command trains both models).
"""

from engram_jax import experiment_config
from engram_jax import param_count
from engram_jax import tokenizer
from experiments.configs import base
from experiments.configs import quickstart


def moe_baseline_of(c):
  """Turns an Engram config (ConfigDict) into its iso-total-parameter MoE baseline, in place."""
  vocab = c.model.vocab_size or tokenizer.load_tokenizer(
      c.data.tokenizer_path or None).get_vocab_size(with_added_tokens=True)
  baseline = param_count.moe_baseline(experiment_config.model_config(c, vocab))
  c.engram.enabled = False
  c.model.moe.num_experts = baseline.moe.num_experts
  return c


def get_config(arg=None):
  del arg
  c = moe_baseline_of(quickstart.get_config())
  c.name = "quickstart_moe"
  return base.lock(c)
