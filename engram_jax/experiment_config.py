"""ml_collections experiment config -> the frozen dataclasses the library consumes (one place).

`resolve(config)` loads the tokenizer, builds the compression table and the n-gram hash mapping,
and returns an `Experiment`: ModelConfig (with MoEConfig, EngramConfig and the resolved Engram
table sizes), OptimConfig, TableOptimizerConfig, and the hashing objects whose fingerprints go
into every checkpoint. Layers never see the ConfigDict.

`check_config(config)` runs at load time (every config file's `get_config`, the entry points
after the command-line overrides, `resolve`): each field against its rule in `FIELD_RULES`,
then the combinations of fields. Every error is a one-line `ConfigError` that names the field
path and what it allows.

Conventions of the ConfigDict (experiments/configs/base.py): '' and 0 stand for "automatic"
where a dataclass field is Optional (attention_impl, lookup_implementation, conv_dilation,
vocab_size, file lists).

Dimension legend: V tokenizer vocabulary, V' compressed vocabulary, H hash heads, R table rows.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Callable, Optional, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np

from engram_jax import data as data_lib
from engram_jax import distributed
from engram_jax import tokenizer as tokenizer_lib
from engram_jax.compression import CompressedTokenizer
from engram_jax.config import (GATE_KINDS, MAX_ENGRAM_VOCAB_SIZE, REMAT_POLICIES, EngramConfig,
                               ModelConfig, MoEConfig)
from engram_jax.hashing import NgramHashMapping
from engram_jax.host_memory import PLACEMENTS
from engram_jax.optim import OptimConfig
from engram_jax.table_optim import (BIAS_CORRECTIONS, KINDS as TABLE_OPTIM_KINDS, MOMENT_DTYPES,
                                    SPARSE_KINDS, TableOptimizerConfig)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything `train_and_evaluate` derives from a config before touching a device.

  model: the backbone with `engram_head_sizes` filled; `engram_table_placement` is 'external'
    for the sparse table optimisers (tables live in the train state, not in the params).
  table_optim: None when the model has no Engram layer.
  table_placement: memory of the Engram tables, 'device' or 'pinned_host' (host tables live in
    a `host_tables.HostTables` outside the train state, on any mesh, each process keeping a
    block of the rows in its host memory; `engram.placement`).
  hashing / compressor: None without Engram.
  """

  model: ModelConfig
  optim: OptimConfig
  table_optim: Optional[TableOptimizerConfig]
  hashing: Optional[NgramHashMapping]
  compressor: Optional[CompressedTokenizer]
  tokenizer_path: str
  train_files: tuple[str, ...]
  eval_files: tuple[str, ...]
  table_placement: str = "device"

  @property
  def sparse_tables(self) -> bool:
    return self.table_optim is not None and self.table_optim.kind in SPARSE_KINDS

  def fingerprint(self) -> dict:
    """What fixes every Engram row id: stored with each checkpoint and checked on restore."""
    if self.hashing is None:
      return {"engram": False}
    return {"engram": True, "hash": self.hashing.fingerprint(),
            "compression": self.compressor.fingerprint()}


def _none_if_empty(x):
  return None if x in ("", 0, None) else x


def _check_files(paths, what: str) -> tuple[str, ...]:
  paths = (paths,) if isinstance(paths, str) else tuple(paths)
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise ConfigFileError(f"config.data.{what}: file(s) not found: {missing}")
  return paths


@functools.lru_cache(maxsize=8)
def _compressor(tokenizer_path: str, mtime_ns: int, compress: bool) -> CompressedTokenizer:
  del mtime_ns  # part of the cache key only
  return CompressedTokenizer.from_file(tokenizer_path, compress)


def load_compressor(tokenizer_path: str, compress: bool = True) -> CompressedTokenizer:
  """The compression table of a tokenizer file (cached: building it decodes every token);
  `compress=False` gives the identity mapping (`EngramConfig.compress_tokenizer`)."""
  return _compressor(os.path.abspath(tokenizer_path), os.stat(tokenizer_path).st_mtime_ns,
                     bool(compress))


def engram_config(config: ml_collections.ConfigDict) -> Optional[EngramConfig]:
  e, m = config.engram, config.model
  if not e.enabled:
    return None
  return EngramConfig(
      engram_vocab_size=tuple(e.engram_vocab_size), max_ngram_size=e.max_ngram_size,
      n_embed_per_ngram=e.n_embed_per_ngram, n_head_per_ngram=e.n_head_per_ngram,
      layer_ids=tuple(e.layer_ids), pad_id=e.pad_id, seed=e.seed, kernel_size=e.kernel_size,
      hidden_size=m.hidden_size, hc_mult=m.hc_mult, signed_sqrt_gate=e.signed_sqrt_gate,
      gate=e.gate, use_short_conv=e.use_short_conv, compress_tokenizer=e.compress_tokenizer,
      zero_init_conv=e.zero_init_conv, conv_dilation=_none_if_empty(e.conv_dilation),
      table_init_std=e.table_init_std, segment_reset=e.segment_reset,
      lookup_implementation=_none_if_empty(e.lookup_implementation))


def model_config(config: ml_collections.ConfigDict, vocab_size: int,
                 table_placement: str = "param") -> ModelConfig:
  """The backbone without resolved Engram table sizes (see `resolve`)."""
  m = config.model
  moe = None
  if m.moe.enabled:
    moe = MoEConfig(num_experts=m.moe.num_experts, num_shared_experts=m.moe.num_shared_experts,
                    top_k=m.moe.top_k, expert_hidden_size=m.moe.expert_hidden_size,
                    score_func=m.moe.score_func, routing=m.moe.routing,
                    aux_loss_coef=m.moe.aux_loss_coef, bias_update_rate=m.moe.bias_update_rate,
                    routed_scaling_factor=m.moe.routed_scaling_factor,
                    dispatch=m.moe.dispatch, capacity_factor=m.moe.capacity_factor,
                    matmul_implementation=_none_if_empty(m.moe.matmul_implementation))
  return ModelConfig(
      vocab_size=m.vocab_size or vocab_size, num_layers=m.num_layers, hidden_size=m.hidden_size,
      num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, head_dim=m.head_dim,
      ffn_hidden_size=m.ffn_hidden_size, num_dense_layers=m.num_dense_layers, moe=moe,
      hc_mult=m.hc_mult, sinkhorn_iters=m.sinkhorn_iters, engram=engram_config(config),
      rope_theta=m.rope_theta, norm_eps=m.norm_eps, dtype=m.dtype, param_dtype=m.param_dtype,
      scan_layers=m.scan_layers, remat_policy=m.remat_policy, tie_embeddings=m.tie_embeddings,
      attention_impl=_none_if_empty(m.attention_impl), engram_table_placement=table_placement)


def optim_config(config: ml_collections.ConfigDict) -> OptimConfig:
  o = config.optim
  return OptimConfig(
      kind=o.kind, learning_rate=o.learning_rate, warmup_steps=o.warmup_steps,
      schedule=o.schedule, decay_boundaries=tuple(o.decay_boundaries),
      decay_factor=o.decay_factor, min_lr_ratio=o.min_lr_ratio, b1=o.b1, b2=o.b2, eps=o.eps,
      weight_decay=o.weight_decay, grad_clip_norm=o.grad_clip_norm,
      num_steps=config.train.num_steps)


def table_optim_config(config: ml_collections.ConfigDict) -> TableOptimizerConfig:
  t = config.table_optim
  return TableOptimizerConfig(kind=t.kind, lr_multiplier=t.lr_multiplier, b1=t.b1, b2=t.b2,
                              eps=t.eps, weight_decay=t.weight_decay,
                              moment_dtype=t.moment_dtype, bias_correction=t.bias_correction)


def engram_placement(config: ml_collections.ConfigDict) -> str:
  return config.engram.placement


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
  """Sets dotted-path overrides (`(("train.num_steps", 5), ...)` or a dict's items) on a
  ConfigDict, as `--config.train.num_steps=5` does; returns it."""
  for key, value in overrides:
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


# ---- load-time validation of every field ---------------------------------------------------


class ConfigError(ValueError):
  """A config that cannot run. The message is one line that names the field path and what it
  allows; the entry points print it without a traceback (engram_jax/cli.py)."""


class ConfigFileError(ConfigError, FileNotFoundError):
  """A file the config names (data, tokenizer) does not exist."""


@dataclasses.dataclass(frozen=True)
class _Rule:
  """A field's type (`kind`, `is_kind`) and allowed range (`allowed`, `in_range`)."""
  kind: str
  is_kind: Callable[[Any], bool]
  allowed: str
  in_range: Callable[[Any], bool] = lambda v: True

  def error(self, value) -> Optional[str]:
    """None for an allowed value, else 'must be ..., got ...' (the type is named only when
    it is wrong)."""
    if not self.is_kind(value):
      return f"must be {self.kind} {self.allowed}".rstrip() + f", got {value!r}"
    if not self.in_range(value):
      return f"must be {self.allowed}, got {value!r}"
    return None


# jax.random.PRNGKey and NumPy's default_rng both take every seed in [0, 2**31 - 1].
_SEED_MAX = 2**31 - 1


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v) -> bool:
  return _is_int(v) or isinstance(v, (float, np.floating))


def _bounds(lo, hi, lo_open: bool = False, hi_open: bool = False):
  """(text, predicate) of lo <= v <= hi (either side open or absent)."""
  if hi is None:
    text = f"{'>' if lo_open else '>='} {lo}"
  else:
    text = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"

  def ok(v):
    above = v > lo if lo_open else v >= lo
    return above and (hi is None or (v < hi if hi_open else v <= hi))
  return text, ok


def _note(note: str) -> str:
  return f" ({note})" if note else ""


def _int(lo: int, hi: Optional[int] = None, note: str = "") -> _Rule:
  text, ok = _bounds(lo, hi)
  return _Rule("an int", _is_int, text + _note(note), ok)


def _number(lo: float, hi: Optional[float] = None, *, lo_open: bool = False,
            hi_open: bool = False, note: str = "") -> _Rule:
  """A finite int or float within the bounds: NaN and inf are never allowed."""
  text, ok = _bounds(lo, hi, lo_open, hi_open)
  return _Rule("a number", _is_number, f"finite and {text}" + _note(note),
               lambda v: bool(np.isfinite(v)) and ok(v))


def _bool() -> _Rule:
  return _Rule("True or False", lambda v: isinstance(v, (bool, np.bool_)), "")


def _str(note: str = "", non_empty: bool = False) -> _Rule:
  return _Rule("a string", lambda v: isinstance(v, str),
               ("non-empty" if non_empty else "") + _note(note),
               lambda v: bool(v) or not non_empty)


def _choice(options: Sequence[str], note: str = "") -> _Rule:
  options = tuple(options)
  return _Rule("a string", lambda v: isinstance(v, str), f"one of {options}" + _note(note),
               lambda v: v in options)


def _files() -> _Rule:
  # Existence is checked by `resolve` (evaluation replaces the files of a workdir's config).
  return _Rule("a path or a tuple of paths",
               lambda v: isinstance(v, str) or (isinstance(v, (tuple, list))
                                                and all(isinstance(p, str) for p in v)),
               "(() = the embedded corpus)")


def _ints(lo: int, hi: Optional[int] = None) -> _Rule:
  text, ok = _bounds(lo, hi)
  return _Rule("a tuple of ints",
               lambda v: isinstance(v, (tuple, list)) and all(_is_int(x) for x in v),
               f"non-empty, every entry {text}",
               lambda v: len(v) > 0 and all(ok(x) for x in v))


def _fractions() -> _Rule:
  return _Rule("a tuple of numbers",
               lambda v: isinstance(v, (tuple, list)) and all(_is_number(x) for x in v),
               "increasing fractions in (0, 1)",
               lambda v: all(0 < x < 1 for x in v) and list(v) == sorted(v))


_DTYPES = ("float32", "bfloat16")
_AUTO = "'' = automatic"

# One rule per field of experiments/configs/base.py; `check_fields` applies them and refuses a
# config that lacks one of them (or of MESH_FIELDS). The `train.mesh` axes are checked together
# (at most one -1) and with the batch size in `_check_mesh`.
FIELD_RULES: dict[str, _Rule] = {
    "name": _str(non_empty=True),
    "seed": _int(0, _SEED_MAX),
    "data.train_files": _files(),
    "data.eval_files": _files(),
    "data.tokenizer_path": _str("'' = the shipped tokenizer"),
    "data.seq_len": _int(2),
    "data.batch_size": _int(1),
    "data.shuffle_seed": _int(0, _SEED_MAX),
    "model.vocab_size": _int(0, 2**31, note="0 = the tokenizer's vocabulary"),
    "model.num_layers": _int(1),
    "model.hidden_size": _int(1),
    "model.num_heads": _int(1),
    "model.num_kv_heads": _int(1),
    "model.head_dim": _int(2),
    "model.ffn_hidden_size": _int(1),
    "model.num_dense_layers": _int(0),
    "model.hc_mult": _int(1),
    "model.sinkhorn_iters": _int(1),
    "model.rope_theta": _number(0, lo_open=True),
    "model.norm_eps": _number(0, lo_open=True),
    "model.dtype": _choice(_DTYPES),
    "model.param_dtype": _choice(_DTYPES),
    "model.scan_layers": _bool(),
    "model.remat_policy": _choice(REMAT_POLICIES),
    "model.tie_embeddings": _bool(),
    "model.attention_impl": _choice(("", "xla", "cudnn"), _AUTO),
    "model.moe.enabled": _bool(),
    "model.moe.num_experts": _int(1),
    "model.moe.num_shared_experts": _int(0),
    "model.moe.top_k": _int(1),
    "model.moe.expert_hidden_size": _int(1),
    "model.moe.score_func": _choice(("sigmoid", "softmax")),
    "model.moe.routing": _choice(("aux_free", "plain")),
    "model.moe.aux_loss_coef": _number(0),
    "model.moe.bias_update_rate": _number(0),
    "model.moe.routed_scaling_factor": _number(0, lo_open=True),
    "model.moe.dispatch": _choice(("ragged", "capacity")),
    "model.moe.capacity_factor": _number(0, lo_open=True),
    "model.moe.matmul_implementation": _choice(("", "xla", "mosaic_gpu"), _AUTO),
    "engram.enabled": _bool(),
    "engram.engram_vocab_size": _ints(2, MAX_ENGRAM_VOCAB_SIZE),
    "engram.max_ngram_size": _int(2),
    "engram.n_embed_per_ngram": _int(1),
    "engram.n_head_per_ngram": _int(1),
    "engram.layer_ids": _ints(0),
    "engram.pad_id": _int(0),
    "engram.seed": _int(0, _SEED_MAX),
    "engram.kernel_size": _int(1),
    "engram.signed_sqrt_gate": _bool(),
    "engram.gate": _choice(GATE_KINDS),
    "engram.use_short_conv": _bool(),
    "engram.compress_tokenizer": _bool(),
    "engram.zero_init_conv": _bool(),
    "engram.conv_dilation": _int(0, note="0 = max_ngram_size"),
    "engram.table_init_std": _number(0),
    "engram.segment_reset": _bool(),
    "engram.lookup_implementation": _choice(("", "xla", "pallas"), _AUTO),
    "engram.hash_on_device": _bool(),
    "engram.placement": _choice(PLACEMENTS),
    "engram.shard_capacity_factor": _number(0, note="0 = worst-case buffers"),
    "engram.table_row_axes": _Rule("a tuple of mesh axis names",
                                   lambda v: isinstance(v, (tuple, list))
                                   and all(isinstance(a, str) for a in v),
                                   "distinct names from ('data', 'fsdp', 'tensor', 'expert'); "
                                   "() = every axis",
                                   lambda v: len(set(v)) == len(v)
                                   and set(v) <= {"data", "fsdp", "tensor", "expert"}),
    "optim.kind": _choice(("adamw", "muon")),
    "optim.learning_rate": _number(0, lo_open=True),
    "optim.warmup_steps": _int(0),
    "optim.schedule": _choice(("step", "cosine", "constant")),
    "optim.decay_boundaries": _fractions(),
    "optim.decay_factor": _number(0, 1, lo_open=True),
    "optim.min_lr_ratio": _number(0, 1),
    "optim.b1": _number(0, 1, hi_open=True),
    "optim.b2": _number(0, 1, hi_open=True),
    "optim.eps": _number(0, lo_open=True),
    "optim.weight_decay": _number(0),
    "optim.grad_clip_norm": _number(0, note="0 disables clipping"),
    "table_optim.kind": _choice(TABLE_OPTIM_KINDS),
    "table_optim.lr_multiplier": _number(0, lo_open=True),
    "table_optim.b1": _number(0, 1, hi_open=True),
    "table_optim.b2": _number(0, 1, hi_open=True),
    "table_optim.eps": _number(0, lo_open=True),
    "table_optim.weight_decay": _number(0),
    "table_optim.moment_dtype": _choice(MOMENT_DTYPES),
    "table_optim.bias_correction": _choice(BIAS_CORRECTIONS),
    "train.num_steps": _int(1),
    "train.log_every": _int(1),
    "train.eval_every": _int(0, note="0 = the final evaluation only"),
    "train.num_eval_batches": _int(0, note="0 = the whole held-out set"),
    "train.checkpoint_every": _int(1),
    "train.keep_checkpoints": _int(1),
    "train.restore_step": _int(0, note="0 = the newest intact checkpoint"),
    "train.allow_config_change": _bool(),
    "train.async_checkpoint": _bool(),
    "train.peak_flops": _number(0, note="0 = from the device kind"),
    "train.distributed": _choice(distributed.MODES),
    "train.inject_nan_at_step": _int(0, note="0 = never"),
}

_MISSING = object()


def _field(config: ml_collections.ConfigDict, path: str):
  node = config
  for key in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or key not in node:
      return _MISSING
    node = node[key]
  return node


def _representable(x: float, dtype: str) -> bool:
  """x is finite and nonzero once cast to `dtype` (optax computes the schedule in float32)."""
  with np.errstate(over="ignore", under="ignore"):
    cast = np.asarray(x, dtype=np.float32).astype(jnp.dtype(dtype))
  return bool(np.isfinite(cast) and cast != 0)


def _check_learning_rates(config: ml_collections.ConfigDict) -> Optional[str]:
  lr, dtype = config.optim.learning_rate, config.model.param_dtype
  rates = [("optim.learning_rate", lr)]
  if config.engram.enabled:
    multiplier = config.table_optim.lr_multiplier
    rates += [("table_optim.lr_multiplier", multiplier),
              ("optim.learning_rate * table_optim.lr_multiplier", lr * multiplier)]
  for what, rate in rates:
    if not all(_representable(rate, d) for d in ("float32", dtype)):
      return (f"{what} must be finite and > 0 in float32 and in model.param_dtype={dtype!r}, "
              f"got {rate!r}")
  return None


def check_fields(config: ml_collections.ConfigDict) -> None:
  """Every field against its rule in `FIELD_RULES`, then the learning rates against the
  parameter dtype; raises a one-line ConfigError naming the first bad field."""
  name = _field(config, "name")
  prefix = f"config {name!r}: " if isinstance(name, str) else ""
  missing = [p for p in list(FIELD_RULES) + [f"train.mesh.{a}" for a in MESH_FIELDS]
             if _field(config, p) is _MISSING]
  if missing:
    raise ConfigError(f"{prefix}missing field{'s' * (len(missing) > 1)} {', '.join(missing)} "
                      "(a config.json written by another version of engram-jax? add each "
                      "with the value the run used)")
  for path, rule in FIELD_RULES.items():
    problem = rule.error(_field(config, path))
    if problem is not None:
      raise ConfigError(f"{prefix}{path} {problem}")
  problem = _check_learning_rates(config)
  if problem is not None:
    raise ConfigError(prefix + problem)


def unknown_key(config: ml_collections.ConfigDict, path: str) -> Optional[str]:
  """None if `path` ('train.num_steps') names a field of `config`, else a one-line message
  naming the first part of the path that does not exist and the fields that do there."""
  node, walked = config, []
  for key in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      return (f"unknown config key {path!r}: {'.'.join(walked)} is a value, not a section")
    if key not in node:
      where = ".".join(walked) or "the config"
      return (f"unknown config key {path!r}: {where} has no field {key!r} (its fields: "
              f"{', '.join(sorted(node.keys()))})")
    node = node[key]
    walked.append(key)
  return None


def _check_placement(config: ml_collections.ConfigDict, err) -> None:
  # The values themselves are checked by FIELD_RULES; these are their combinations.
  placement = engram_placement(config)
  if placement != "pinned_host" or not config.engram.enabled:
    return
  if config.table_optim.kind not in SPARSE_KINDS:
    raise err(f"engram.placement='pinned_host' needs a row-sparse table optimiser "
              f"(table_optim.kind in {SPARSE_KINDS}), got table_optim.kind="
              f"{config.table_optim.kind!r}: it updates every row each step, so the whole "
              "table would cross PCIe twice per step")
  if config.engram.hash_on_device:
    raise err("engram.placement='pinned_host' needs the hash ids on the host before the step "
              "(rows are deduplicated and gathered there): set engram.hash_on_device=False")


MESH_FIELDS = ("data", "fsdp", "tensor", "expert")
# Mesh axes the batch is split over (the 'batch' rule of engram_jax/sharding.py).
BATCH_MESH_FIELDS = ("data", "fsdp", "expert")


def mesh_axis_sizes(config: ml_collections.ConfigDict) -> dict:
  """`train.mesh` as {axis: size}, -1 = the devices the other axes leave."""
  return {a: int(config.train.mesh[a]) for a in MESH_FIELDS}


def _check_mesh(config: ml_collections.ConfigDict, err) -> None:
  """Every `train.mesh` field >= 1 or -1, at most one -1, the batch divisible by the known
  batch axes (the device count, and so the size of a -1 axis, is checked when the mesh is
  built: engram_jax/train.make_mesh)."""
  sizes = mesh_axis_sizes(config)
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise err(f"train.mesh.{axis}={size} must be >= 1, or -1 for the devices the other "
                "axes leave")
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise err(f"at most one train.mesh field may be -1, got -1 for "
              f"{', '.join('train.mesh.' + a for a in fill)}")
  split = int(np.prod([s for a, s in sizes.items() if a in BATCH_MESH_FIELDS and s != -1]))
  if config.data.batch_size % split:
    raise err(f"data.batch_size={config.data.batch_size} must be divisible by train.mesh."
              f"data x fsdp x expert = {split} (the batch is split over those axes)")
  row_axes = tuple(config.engram.table_row_axes)
  left_out = [a for a in BATCH_MESH_FIELDS if row_axes and a not in row_axes and sizes[a] != 1]
  if config.engram.enabled and left_out:
    raise err(f"engram.table_row_axes={row_axes} leaves out "
              f"{', '.join(f'train.mesh.{a}={sizes[a]}' for a in left_out)}: every axis the batch "
              "is split over must split the table rows too (only 'tensor' may be left out)")


_DATACLASS_SECTIONS = {"EngramConfig": "engram", "ModelConfig": "model", "MoEConfig": "model.moe",
                       "OptimConfig": "optim", "TableOptimizerConfig": "table_optim"}


def config_path_of(message: str) -> str:
  """A dataclass's error ('MoEConfig.top_k: ...') with the config path it comes from
  ('model.moe.top_k: ...')."""
  return re.sub(r"^(\w+)\.", lambda m: _DATACLASS_SECTIONS.get(m.group(1), m.group(1)) + ".",
                message)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Every field's own rule (`check_fields`), the cross-field invariants, then every
  dataclass's own validation; raises a one-line ConfigError that names the field path."""
  check_fields(config)
  err = lambda m: ConfigError(f"config {config.name!r}: {m}")  # noqa: E731
  _check_placement(config, err)
  if config.engram.enabled and max(config.engram.layer_ids) >= config.model.num_layers:
    raise err(f"engram.layer_ids {tuple(config.engram.layer_ids)} must be < model.num_layers "
              f"({config.model.num_layers})")
  if config.model.moe.enabled and config.model.num_dense_layers >= config.model.num_layers:
    raise err("model.moe.enabled but num_dense_layers >= num_layers leaves no MoE layer")
  if config.train.num_steps < 1:
    raise err("train.num_steps must be >= 1")
  for name in ("log_every", "checkpoint_every"):
    if config.train[name] < 1:
      raise err(f"train.{name} must be >= 1")
  _check_mesh(config, err)
  # Field-level checks of the dataclasses, at load time (the vocabulary comes from the
  # tokenizer later; any positive placeholder validates the rest).
  try:
    model_config(config, vocab_size=max(config.model.vocab_size, 1))
    optim_config(config)
    table_optim_config(config)
  except ValueError as e:
    raise err(config_path_of(str(e))) from e


def resolve(config: ml_collections.ConfigDict, *, check_data: bool = True) -> Experiment:
  """Validates `config` and builds the typed pieces; every error names the field."""
  check_config(config)
  tokenizer_path = config.data.tokenizer_path or tokenizer_lib.default_tokenizer_path()
  if not os.path.isfile(tokenizer_path):
    raise ConfigFileError(f"config.data.tokenizer_path: no tokenizer file at "
                          f"{tokenizer_path!r}")
  defaults = data_lib.default_corpus_paths()
  train_files = tuple(config.data.train_files) or tuple(defaults["train"])
  eval_files = tuple(config.data.eval_files) or tuple(defaults["valid"])
  if check_data:
    train_files = _check_files(train_files, "train_files")
    eval_files = _check_files(eval_files, "eval_files")
  vocab_size = tokenizer_lib.load_tokenizer(tokenizer_path).get_vocab_size(with_added_tokens=True)
  if config.model.vocab_size and config.model.vocab_size < vocab_size:
    raise ConfigError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
                      f"tokenizer's vocabulary ({vocab_size})")

  table_cfg = table_optim_config(config) if config.engram.enabled else None
  sparse = table_cfg is not None and table_cfg.kind in SPARSE_KINDS
  model = model_config(config, vocab_size, "external" if sparse else "param")
  hashing = compressor = None
  if model.engram is not None:
    compressor = load_compressor(tokenizer_path, model.engram.compress_tokenizer)
    try:
      hashing = NgramHashMapping.from_config(model.engram, len(compressor),
                                             compressor.compress_pad_id(model.engram.pad_id))
    except ValueError as e:  # its messages start with the engram field they concern
      raise ConfigError(f"config {config.name!r}: engram.{e}") from e
    model = model.replace(engram_head_sizes=tuple(
        tuple(int(s) for s in hashing.head_sizes(l)) for l in model.engram.layer_ids))
  return Experiment(model=model, optim=optim_config(config), table_optim=table_cfg,
                    hashing=hashing, compressor=compressor, tokenizer_path=tokenizer_path,
                    train_files=train_files, eval_files=eval_files,
                    # Without Engram layers there is no table to place.
                    table_placement=engram_placement(config) if hashing else "device")
