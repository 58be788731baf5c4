"""ml_collections experiment config -> the frozen dataclasses the library consumes (one place).

`resolve(config)` loads the tokenizer, builds the compression table and the n-gram hash mapping,
and returns an `Experiment`: ModelConfig (with MoEConfig, EngramConfig and the resolved Engram
table sizes), OptimConfig, TableOptimizerConfig, and the hashing objects whose fingerprints go
into every checkpoint. Layers never see the ConfigDict.

Conventions of the ConfigDict (experiments/configs/base.py): '' and 0 stand for "automatic"
where a dataclass field is Optional (attention_impl, lookup_implementation, conv_dilation,
vocab_size, file lists).

Dimension legend: V tokenizer vocabulary, V' compressed vocabulary, H hash heads, R table rows.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import ml_collections
import numpy as np

from engram_jax import data as data_lib
from engram_jax import tokenizer as tokenizer_lib
from engram_jax.compression import CompressedTokenizer
from engram_jax.config import EngramConfig, ModelConfig, MoEConfig
from engram_jax.hashing import NgramHashMapping
from engram_jax.offload import PLACEMENTS
from engram_jax.optim import OptimConfig
from engram_jax.table_optim import SPARSE_KINDS, TableOptimizerConfig


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything `train_and_evaluate` derives from a config before touching a device.

  model: the backbone with `engram_head_sizes` filled; `engram_table_placement` is 'external'
    for the sparse table optimisers (tables live in the train state, not in the params).
  table_optim: None when the model has no Engram layer.
  table_placement: memory of the Engram tables, 'device' or 'pinned_host' (host tables live in
    an `offload.HostTableTrainer` outside the train state; `engram.placement`).
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
    raise FileNotFoundError(f"config.data.{what}: file(s) not found: {missing}")
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
      # config.json of a workdir without the ablation switches trained their defaults.
      gate=e.get("gate", "multi"), use_short_conv=e.get("use_short_conv", True),
      compress_tokenizer=e.get("compress_tokenizer", True),
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
  # Workdirs written before `engram.placement` existed (config.json) trained on the device.
  return config.engram.get("placement", "device")


HOST_STEPS = ("threads", "fused", "separate")


def host_step(config: ml_collections.ConfigDict) -> str:
  # Workdirs written before `engram.host_step` existed ran the separate programs.
  return config.engram.get("host_step", "separate")


def host_row_buckets(config: ml_collections.ConfigDict) -> int:
  # Workdirs written before `engram.host_row_buckets` existed moved B*T*H slots per step.
  return int(config.engram.get("host_row_buckets", 0))


def _check_placement(config: ml_collections.ConfigDict, err) -> None:
  placement = engram_placement(config)
  if placement not in PLACEMENTS:
    raise err(f"engram.placement must be one of {PLACEMENTS}, got {placement!r}")
  if host_step(config) not in HOST_STEPS:
    raise err(f"engram.host_step must be one of {HOST_STEPS}, got {host_step(config)!r}")
  if host_row_buckets(config) < 0:
    raise err(f"engram.host_row_buckets must be >= 0, got {host_row_buckets(config)}")
  if host_row_buckets(config) and host_step(config) == "separate":
    raise err("engram.host_row_buckets > 0 needs engram.host_step='threads' or 'fused': the "
              "separate step is compiled ahead of time for B*T*H row slots")
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
  sizes = mesh_axis_sizes(config)
  if -1 not in sizes.values() and int(np.prod(list(sizes.values()))) != 1:
    raise err(f"engram.placement='pinned_host' runs on one device (HostTableTrainer is not "
              f"sharded); got train.mesh={sizes}, set every train.mesh field to 1")


MESH_FIELDS = ("data", "fsdp", "tensor", "expert")
# Mesh axes the batch is split over (the 'batch' rule of engram_jax/sharding.py).
BATCH_MESH_FIELDS = ("data", "fsdp", "expert")


def mesh_axis_sizes(config: ml_collections.ConfigDict) -> dict:
  """`train.mesh` as {axis: size}, -1 = the devices the other axes leave.

  A workdir's config.json from before `train.mesh` names `train.data_parallel` data devices.
  """
  train = config.train
  if "mesh" not in train:
    return {"data": int(train.get("data_parallel", 1)), "fsdp": 1, "tensor": 1, "expert": 1}
  return {a: int(train.mesh[a]) for a in MESH_FIELDS}


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


def check_config(config: ml_collections.ConfigDict) -> None:
  """Cross-field invariants, then every dataclass's own validation; raises ValueError."""
  err = lambda m: ValueError(f"config {config.name!r}: {m}")  # noqa: E731
  _check_placement(config, err)
  if config.data.seq_len < 2 or config.data.batch_size < 1:
    raise err("data.seq_len must be >= 2 and data.batch_size >= 1")
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
  model_config(config, vocab_size=max(config.model.vocab_size, 1))
  optim_config(config)
  table_optim_config(config)


def resolve(config: ml_collections.ConfigDict, *, check_data: bool = True) -> Experiment:
  """Validates `config` and builds the typed pieces; every error names the field."""
  check_config(config)
  tokenizer_path = config.data.tokenizer_path or tokenizer_lib.default_tokenizer_path()
  if not os.path.isfile(tokenizer_path):
    raise FileNotFoundError(f"config.data.tokenizer_path: no tokenizer file at "
                            f"{tokenizer_path!r}")
  defaults = data_lib.default_corpus_paths()
  train_files = tuple(config.data.train_files) or tuple(defaults["train"])
  eval_files = tuple(config.data.eval_files) or tuple(defaults["valid"])
  if check_data:
    train_files = _check_files(train_files, "train_files")
    eval_files = _check_files(eval_files, "eval_files")
  vocab_size = tokenizer_lib.load_tokenizer(tokenizer_path).get_vocab_size(with_added_tokens=True)
  if config.model.vocab_size and config.model.vocab_size < vocab_size:
    raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
                     f"tokenizer's vocabulary ({vocab_size})")

  table_cfg = table_optim_config(config) if config.engram.enabled else None
  sparse = table_cfg is not None and table_cfg.kind in SPARSE_KINDS
  model = model_config(config, vocab_size, "external" if sparse else "param")
  hashing = compressor = None
  if model.engram is not None:
    compressor = load_compressor(tokenizer_path, model.engram.compress_tokenizer)
    hashing = NgramHashMapping.from_config(model.engram, len(compressor),
                                           compressor.compress_pad_id(model.engram.pad_id))
    model = model.replace(engram_head_sizes=tuple(
        tuple(int(s) for s in hashing.head_sizes(l)) for l in model.engram.layer_ids))
  return Experiment(model=model, optim=optim_config(config), table_optim=table_cfg,
                    hashing=hashing, compressor=compressor, tokenizer_path=tokenizer_path,
                    train_files=train_files, eval_files=eval_files,
                    # Without Engram layers there is no table to place.
                    table_placement=engram_placement(config) if hashing else "device")
