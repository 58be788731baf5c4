"""Optimisers for the dense parameters, and the Engram-table policy inside optax.

The paper's recipe (REFERENCE.md section 2): the backbone with Muon (weight decay 0.1), the Engram
tables with Adam at 5x the base learning rate and weight decay 0, warmup then step decay. Here the
backbone defaults to AdamW (`kind='adamw'`); `kind='muon'` uses `optax.contrib.muon` for the
matrices and Adam for everything else.

Two homes for the tables:
  * `table_mode='dense_adam'` (reference): tables are ordinary params; `optax.multi_transform`
    sends them to Adam at `lr_multiplier` x the schedule with their own weight decay (0).
  * sparse table optimisers ('lazy_adam' | 'adagrad', `engram_jax.table_optim`): tables are not
    in the param tree at all, so optax never sees (or allocates moments for) them.

Gradient clipping is *not* in the optax chain: `clip_by_global_norm` below clips dense gradients
and row-sparse table gradients with one joint norm, so dense and sparse table modes clip the
same way (the row-sparse values are per-unique-row sums, so their norm equals the norm of the
dense table gradient).

Master weights are float32 (ModelConfig.param_dtype); the model casts to its compute dtype.

Dimension legend: U unique rows of a batch, E table row width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import optax

OptimizerKind = Literal["adamw", "muon"]
ScheduleKind = Literal["step", "cosine", "constant"]

# Path names that mark an Engram table inside the param tree ('param' placement).
TABLE_PARAM_NAME = "table"
TABLE_PARENT_NAME = "memory"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Dense-parameter optimiser and the learning-rate schedule shared with the tables.

  Attributes:
    kind: 'adamw' or 'muon' (Muon on >= 2-D non-embedding kernels, Adam on the rest).
    learning_rate: peak learning rate of the dense parameters.
    warmup_steps: linear warmup from 0 to the peak.
    schedule: 'step' (paper: constant, then x decay_factor at each boundary), 'cosine'
      (to min_lr_ratio * peak at num_steps) or 'constant'.
    decay_boundaries: fractions of num_steps where the step schedule decays (DeepSeek: 0.8, 0.9).
    decay_factor: multiplier applied at each boundary (DeepSeek: 0.316 = sqrt(0.1)).
    min_lr_ratio: final learning rate of the cosine schedule, as a fraction of the peak.
    b1, b2, eps: Adam(W) moments (also Muon's Adam for non-matrix params).
    weight_decay: decoupled weight decay of the dense >= 2-D parameters (norms, biases: none).
    grad_clip_norm: joint global-norm clip of all gradients (0 disables).
    num_steps: training length (sets the schedule's boundaries).
  """

  kind: OptimizerKind = "adamw"
  learning_rate: float = 3e-3
  warmup_steps: int = 100
  schedule: ScheduleKind = "step"
  decay_boundaries: tuple[float, ...] = (0.8, 0.9)
  decay_factor: float = 0.316
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip_norm: float = 1.0
  num_steps: int = 1000

  def __post_init__(self):
    object.__setattr__(self, "decay_boundaries", tuple(float(b) for b in self.decay_boundaries))
    err = lambda f, m: ValueError(f"OptimConfig.{f}: {m}")  # noqa: E731
    if self.kind not in ("adamw", "muon"):
      raise err("kind", f"must be 'adamw' or 'muon', got {self.kind!r}")
    if self.schedule not in ("step", "cosine", "constant"):
      raise err("schedule", f"must be 'step', 'cosine' or 'constant', got {self.schedule!r}")
    if not self.learning_rate > 0:
      raise err("learning_rate", f"must be > 0, got {self.learning_rate}")
    if self.num_steps < 1:
      raise err("num_steps", f"must be >= 1, got {self.num_steps}")
    if not 0 <= self.warmup_steps <= self.num_steps:
      raise err("warmup_steps", f"must be in [0, num_steps={self.num_steps}], got "
                f"{self.warmup_steps}")
    if any(not 0 < b < 1 for b in self.decay_boundaries) or list(self.decay_boundaries) != sorted(
        self.decay_boundaries):
      raise err("decay_boundaries", f"must be increasing fractions in (0, 1), got "
                f"{self.decay_boundaries}")
    if not 0 < self.decay_factor <= 1:
      raise err("decay_factor", f"must be in (0, 1], got {self.decay_factor}")
    if not 0 <= self.min_lr_ratio <= 1:
      raise err("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
    if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1 and self.eps > 0):
      raise err("b1", f"need 0 <= b1, b2 < 1 and eps > 0, got {self.b1}, {self.b2}, {self.eps}")
    if self.weight_decay < 0 or self.grad_clip_norm < 0:
      raise err("weight_decay", "weight_decay and grad_clip_norm must be >= 0")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
  """Linear warmup to the peak, then the configured decay; a function of the update count."""
  peak, warmup = cfg.learning_rate, cfg.warmup_steps
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_steps=warmup, decay_steps=cfg.num_steps,
        end_value=peak * cfg.min_lr_ratio)
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if cfg.schedule == "constant":
    after = optax.constant_schedule(peak)
  else:
    # Boundaries are absolute steps; a boundary inside the warmup is moved past it.
    bounds = {max(int(b * cfg.num_steps), warmup + 1) - warmup: cfg.decay_factor
              for b in cfg.decay_boundaries}
    after = optax.piecewise_constant_schedule(peak, bounds)
  if warmup == 0:
    return after
  return optax.join_schedules([warm, after], [warmup])


def _path_names(path) -> tuple[str, ...]:
  # Boxed (logically partitioned) params add a GetAttrKey('value') below the param's name.
  return tuple(str(k.key) if isinstance(k, jax.tree_util.DictKey) else str(getattr(k, "name", k))
               for k in path if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value"))


def is_table_path(path) -> bool:
  """True for an Engram table ('param' placement): `.../memory/table`."""
  names = _path_names(path)
  return len(names) >= 2 and names[-1] == TABLE_PARAM_NAME and names[-2] == TABLE_PARENT_NAME


def param_labels(params) -> Any:
  """'table' for Engram tables, 'dense' for everything else (a pytree of strings)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: "table" if is_table_path(p) else "dense", params)


def _decay_mask(params):
  # Norm scales and biases (1-D per layer; 2-D when scanned over layers) are not decayed. A
  # scanned layer adds a leading axis, so look at the name, not only the rank.
  def decay(path, x):
    name = _path_names(path)[-1]
    return x.ndim >= 2 and name not in ("scale", "bias") and not name.endswith("_bias")
  return jax.tree_util.tree_map_with_path(decay, params)


def _muon_dims(params):
  """Muon for >= 2-D kernels (last two axes = in, out); Adam for embeddings, norms, tables."""
  def dims(path, x):
    names = _path_names(path)
    if x.ndim < 2 or "embed" in "/".join(names) or is_table_path(path) or names[-1] in (
        "scale", "bias"):
      return None
    return optax.contrib.MuonDimensionNumbers(reduction_axis=x.ndim - 2, output_axis=x.ndim - 1)
  return jax.tree_util.tree_map_with_path(dims, params)


def _dense_transform(cfg: OptimConfig, schedule: optax.Schedule, params) -> optax.GradientTransformation:
  if cfg.kind == "adamw":
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                       weight_decay=cfg.weight_decay, mask=_decay_mask)
  return optax.contrib.muon(
      schedule, weight_decay=cfg.weight_decay, weight_decay_mask=_decay_mask,
      adam_b1=cfg.b1, adam_b2=cfg.b2, eps=cfg.eps, adam_weight_decay=cfg.weight_decay,
      muon_weight_dimension_numbers=_muon_dims)


def make_optimizer(cfg: OptimConfig, params, *, table_lr_multiplier: float = 5.0,
                   table_b1: float = 0.9, table_b2: float = 0.999, table_eps: float = 1e-8,
                   table_weight_decay: float = 0.0,
                   table_moment_dtype: Any = None) -> optax.GradientTransformation:
  """The optax transformation of `params` (no clipping: see `clip_by_global_norm`).

  Tables found in `params` ('dense_adam' mode) get Adam at `table_lr_multiplier` x the schedule;
  with the sparse table optimisers the tables are not in `params` and the table arguments are
  unused.
  """
  schedule = make_schedule(cfg)
  labels = param_labels(params)
  if "table" not in jax.tree_util.tree_leaves(labels):
    return _dense_transform(cfg, schedule, params)
  # optax keeps the second moment in the param dtype; only the first follows moment_dtype.
  table_tx = optax.adamw(lambda s: table_lr_multiplier * schedule(s), b1=table_b1, b2=table_b2,
                         eps=table_eps, weight_decay=table_weight_decay,
                         mu_dtype=table_moment_dtype)
  return optax.multi_transform(
      {"dense": _dense_transform(cfg, schedule, params), "table": table_tx}, labels)


def global_norm(dense_grads, sparse_values: Sequence[jax.Array] = ()) -> jax.Array:
  """sqrt of the summed squares of every dense gradient and every row-sparse value block."""
  sq = sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
           for g in jax.tree_util.tree_leaves(dense_grads))
  sq = sq + sum(jnp.sum(jnp.square(v.astype(jnp.float32))) for v in sparse_values)
  return jnp.sqrt(sq)


def clip_by_global_norm(dense_grads, sparse_values: Sequence[jax.Array], max_norm: float):
  """Scales dense and row-sparse gradients together so their joint norm is <= max_norm.

  Returns `(dense_grads, sparse_values, norm_before_clipping)`; max_norm 0 disables clipping.
  """
  norm = global_norm(dense_grads, sparse_values)
  if max_norm <= 0:
    return dense_grads, list(sparse_values), norm
  scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
  dense = jax.tree_util.tree_map(lambda g: (g * scale).astype(g.dtype), dense_grads)
  sparse = [(v * scale).astype(v.dtype) for v in sparse_values]
  return dense, sparse, norm
