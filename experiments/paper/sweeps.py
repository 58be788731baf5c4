"""The runs of each paper sweep, as config overrides of experiments/paper/configs/paper.py.

A `Run` is one `python -m experiments.train` invocation: a config file (paper or paper_moe,
`:tiny` in tiny mode), a seed, and the overrides that make it the sweep point. Runs with the
same name are the same run (same config, overrides and seed), so a run shared by two sweeps
(the Engram reference, the MoE baseline) is trained once per output directory.

  iso     Engram reference vs paper_moe (engram_jax.param_count.moe_baseline), seeds 0..2.
  alloc   the sparse budget of the reference split rho : 1 - rho between routed experts and
          Engram tables (`config_at_rho`, engram_jax.param_count.engram_at_rho), total and
          activated parameters fixed; rho = 1 is paper_moe, the reference's own rho is a point.
  slots   the reference backbone with the per-head table sizes scaled 1/8x .. 4x (32x).
  ablate  the reference (2 seeds) and one change each: shared gate, no gate, no tokenizer
          compression, no ShortConv, no signed square root, + 4-grams, one Engram layer at the
          reference's first Engram block or at the last block, and a plain additive
          hashed-bigram table; each keeps the table size.

Dimension legend: v per-head table size (engram_vocab_size entry), K heads per order.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from engram_jax import experiment_config
from engram_jax import param_count
from engram_jax import tokenizer as tokenizer_lib
from experiments.paper.configs import paper
from experiments.paper.configs import paper_moe

SWEEPS = ("iso", "alloc", "slots", "ablate")
CONFIG_FILES = {"paper": "experiments/paper/configs/paper.py",
                "paper_moe": "experiments/paper/configs/paper_moe.py"}

ISO_SEEDS = (0, 1, 2)
ABLATE_REFERENCE_SEEDS = (0, 1)
# Routed-expert shares besides rho = 1 (paper_moe) and the reference's own (0.79): denser
# around the paper's optimum (0.75-0.80), down to the paper's "back at the MoE level" 0.4.
ALLOC_RHOS = (0.9, 0.7, 0.55, 0.4)
# Per-head table sizes relative to the reference (v = 32,768 rows; 1 = the reference): with it,
# 5 sizes over 32x of v (the primes above each v make the smallest table a little larger).
SLOTS_SCALES = (0.125, 0.5, 2.0, 4.0)
TINY = {"iso_seeds": (0, 1), "alloc_rhos": (0.4,), "slots_scales": (0.5, 2.0)}


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run. `point` holds what the sweep varies (for its table and plot)."""
  name: str
  config: str                          # key of CONFIG_FILES
  seed: int
  overrides: tuple[tuple[str, Any], ...] = ()
  point: tuple[tuple[str, Any], ...] = ()

  @property
  def point_dict(self) -> dict:
    return dict(self.point)


def base_config(config: str, tiny: bool) -> ml_collections.ConfigDict:
  module = {"paper": paper, "paper_moe": paper_moe}[config]
  return module.get_config("tiny" if tiny else None)


def run_config(run: Run, tiny: bool) -> ml_collections.ConfigDict:
  """The exact config a run trains (without the data files, which the driver adds)."""
  c = base_config(run.config, tiny)
  c.unlock()
  experiment_config.apply_overrides(c, run.overrides + seed_overrides(run.seed))
  c.lock()
  return c


def seed_overrides(seed: int) -> tuple[tuple[str, Any], ...]:
  """A seed fixes the model initialisation and the data order (the hash seed stays 0)."""
  return (("seed", seed), ("data.shuffle_seed", seed))


def _vocab_size(c: ml_collections.ConfigDict) -> int:
  return c.model.vocab_size or tokenizer_lib.load_tokenizer(
      c.data.tokenizer_path or None).get_vocab_size(with_added_tokens=True)


def config_at_rho(c: ml_collections.ConfigDict, rho: float) -> tuple[tuple[str, Any], ...]:
  """Overrides that split `c`'s sparse budget rho : 1 - rho between routed experts and tables.

  Counts come from engram_jax.param_count (`engram_at_rho`): total parameters stay `c`'s (to one
  expert's worth), activated ones too (top_k and the Engram projections do not change).
  """
  model = experiment_config.model_config(c, _vocab_size(c))
  at = param_count.engram_at_rho(model, rho)
  return (("model.moe.num_experts", at.moe.num_experts),
          ("engram.engram_vocab_size", tuple(at.engram.engram_vocab_size)))


def engram(seed: int) -> Run:
  return Run(f"engram_s{seed}", "paper", seed, point=(("model", "engram"),))


def moe(seed: int) -> Run:
  return Run(f"moe_s{seed}", "paper_moe", seed, point=(("model", "moe"),))


def iso_runs(tiny: bool = False) -> list[Run]:
  seeds = TINY["iso_seeds"] if tiny else ISO_SEEDS
  return [engram(s) for s in seeds] + [moe(s) for s in seeds]


def alloc_runs(tiny: bool = False) -> list[Run]:
  ref = base_config("paper", tiny)
  runs = [dataclasses.replace(moe(0), point=(("variant", "rho=1 (paper_moe)"),)),
          dataclasses.replace(engram(0), point=(("variant", "reference"),))]
  for rho in (TINY["alloc_rhos"] if tiny else ALLOC_RHOS):
    runs.append(Run(f"rho{rho:.2f}_s0", "paper", 0, config_at_rho(ref, rho),
                    point=(("variant", f"rho target {rho:.2f}"),)))
  return runs


def slots_runs(tiny: bool = False) -> list[Run]:
  ref = base_config("paper", tiny)
  runs = [dataclasses.replace(engram(0), point=(("variant", "reference"),))]
  for scale in (TINY["slots_scales"] if tiny else SLOTS_SCALES):
    sizes = tuple(int(round(v * scale)) for v in ref.engram.engram_vocab_size)
    runs.append(Run(f"slots{sizes[0]}_s0", "paper", 0, (("engram.engram_vocab_size", sizes),),
                    point=(("variant", f"v = {sizes[0]}"),)))
  return runs


def ablation_overrides(c: ml_collections.ConfigDict) -> dict[str, tuple[tuple[str, Any], ...]]:
  """Each ablation of the reference `c` as overrides; every one keeps the table parameters."""
  e = c.engram
  v = tuple(e.engram_vocab_size)
  first, last = e.layer_ids[0], c.model.num_layers - 1
  return {
      "shared_gate": (("engram.gate", "shared"),),
      "no_gate": (("engram.gate", "none"),),
      "no_compression": (("engram.compress_tokenizer", False),),
      "no_short_conv": (("engram.use_short_conv", False),),
      "no_signed_sqrt": (("engram.signed_sqrt_gate", False),),
      # Orders 2..4 with 2/3 of the rows each: K * sum(v) rows per layer as the reference.
      "plus_4grams": (("engram.max_ngram_size", 4),
                      ("engram.engram_vocab_size", (int(round(2 * v[0] / 3)),) * 3)),
      # One Engram layer holding both layers' rows.
      f"single_layer{first}": (("engram.layer_ids", (first,)),
                               ("engram.engram_vocab_size", tuple(2 * x for x in v))),
      f"single_layer{last}": (("engram.layer_ids", (last,)),
                              ("engram.engram_vocab_size", tuple(2 * x for x in v))),
      # Bigrams only, 2K heads of the same width (same rows, rows read and d_mem), no gate and
      # no conv: y = e W_V + b added to every stream.
      "additive_bigram": (("engram.max_ngram_size", 2),
                          ("engram.n_head_per_ngram", 2 * e.n_head_per_ngram),
                          ("engram.n_embed_per_ngram", 2 * e.n_embed_per_ngram),
                          ("engram.engram_vocab_size", (v[0],)),
                          ("engram.gate", "none"), ("engram.use_short_conv", False)),
  }


def ablate_runs(tiny: bool = False) -> list[Run]:
  ref = base_config("paper", tiny)
  runs = [dataclasses.replace(engram(s), point=(("variant", "reference"),))
          for s in ABLATE_REFERENCE_SEEDS]
  for name, overrides in ablation_overrides(ref).items():
    runs.append(Run(f"{name}_s0", "paper", 0, overrides, point=(("variant", name),)))
  return runs


def runs_of(sweep: str, tiny: bool = False) -> list[Run]:
  if sweep not in SWEEPS:
    raise ValueError(f"--sweep: unknown sweep {sweep!r}; choose from {SWEEPS}")
  return {"iso": iso_runs, "alloc": alloc_runs, "slots": slots_runs,
          "ablate": ablate_runs}[sweep](tiny)
