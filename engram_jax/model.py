"""EngramLM: decoder-only language model with Engram layers, MoE FFNs and an mHC residual.

  embed -> expand to M streams -> blocks -> mean over streams -> RMSNorm -> logits (float32)

Block l (pre-norm; `sub` = hyper-connected sub-layer, a plain residual when M = 1):
  if l in engram.layer_ids:  x = x + Engram(x, engram_inputs[l])        ([B,T,M,D] in and out)
  x = sub(x, Attention(RMSNorm(.)))
  x = sub(x, SwiGLU(RMSNorm(.)))  if l < num_dense_layers or moe is None  else  MoE(RMSNorm(.))

Compilation: blocks are grouped into segments, split at every Engram layer (an Engram block is
its own unrolled segment; it needs its own table and its own input) and at the dense/MoE
boundary. With `scan_layers`, every other segment is one `nn.scan` over stacked parameters, so
compile time is flat in depth. Parameter names: unrolled block l is `layer_{l}`; a scanned
segment of blocks [a, b) is `layers_{a}_{b}` with a leading axis of size b - a (logical axis
'layers', never sharded). `unstack_scanned_params` maps the scanned tree onto the unrolled one.

Rematerialisation (`remat_policy`) wraps each block with `nn.remat`: 'full' / 'nothing_saveable'
recompute everything, 'dots_saveable' (and the no-batch-dims variant) keep matmul outputs.

Mutable collections: 'moe_stats' (aux-free router biases, see moe.py) and 'intermediates'
(Engram gate statistics). aux returned by __call__:
  moe/tokens_per_expert [L_moe, E], moe/max_over_mean_load [L_moe], moe/aux_loss [L_moe],
  moe/dropped_fraction [L_moe] (routed pairs over capacity; 0 with ragged dispatch),
  moe_aux_loss [] (sum over layers; add it to the loss). Row i of aux['moe'] belongs to block
  `config.moe_layer_ids[i]`. Engram gate values are sown into 'intermediates' by engram_layer.py.
Packed sequences: pass `positions` restarting at 0 per document along with `segment_ids`;
the default positions are 0..T-1 per row.
Decoding: `EngramLM(cfg, decode=True)` keeps each attention layer's KV cache and each Engram
ShortConv's history in the 'cache' collection. Apply it once to inputs of the maximum length
with `mutable=['cache']` to create the caches, then to the prompt and to each new token with
`positions` = their absolute positions, the Engram ids (or PrefetchedRows) of those positions
only, and `mutable=['cache']`; logits equal the full causal forward's (tests/test_model.py).
One document per row (no segment_ids); no remat.

Dimension legend: B batch, T length, M streams (hc_mult), D hidden size, V vocabulary,
H Engram hash heads, E routed experts, L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from engram_jax.config import ModelConfig
from engram_jax.engram_layer import Engram
from engram_jax.hyper_connections import (HyperConnection, contract_streams, expand_streams,
                                          hc_combine)
from engram_jax.layers import Attention, RMSNorm, SwiGLU, dtype_of
from engram_jax.moe import MoE


@dataclasses.dataclass(frozen=True)
class Segment:
  start: int
  stop: int
  use_moe: bool
  engram: bool

  @property
  def scanned_name(self) -> str:
    return f"layers_{self.start}_{self.stop}"


def layer_segments(cfg: ModelConfig) -> tuple[Segment, ...]:
  """Runs of identical blocks, split at Engram layers and at the dense/MoE boundary."""
  segs: list[Segment] = []
  moe_ids, engram_ids = set(cfg.moe_layer_ids), set(cfg.engram_layer_ids)
  for l in range(cfg.num_layers):
    use_moe, eng = l in moe_ids, l in engram_ids
    last = segs[-1] if segs else None
    if last and not eng and not last.engram and last.use_moe == use_moe:
      segs[-1] = dataclasses.replace(last, stop=l + 1)
    else:
      segs.append(Segment(l, l + 1, use_moe, eng))
  return tuple(segs)


def _remat_policy(name: str):
  return {
      "full": None,
      "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
      "dots_saveable": jax.checkpoint_policies.dots_saveable,
      "dots_with_no_batch_dims_saveable":
          jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[name]


class Block(nn.Module):
  """One transformer block on the [B, T, M, D] streams; returns (streams, moe stats)."""

  config: ModelConfig
  use_moe: bool
  engram_layer_id: Optional[int] = None  # the block's index if it carries an Engram layer
  deterministic: bool = True
  decode: bool = False  # attention KV cache and ShortConv history in the 'cache' collection

  def _sublayer(self, x_BxTxMxD, branch, name):
    cfg = self.config
    if cfg.hc_mult == 1:
      out_BxTxD = branch(x_BxTxMxD[:, :, 0, :])
      return x_BxTxMxD + out_BxTxD[:, :, None, :].astype(x_BxTxMxD.dtype)
    layer_in_BxTxD, coeffs = HyperConnection(cfg.sinkhorn_iters, cfg.norm_eps,
                                             dtype_of(cfg.dtype), dtype_of(cfg.param_dtype),
                                             name=f"hc_{name}")(x_BxTxMxD)
    return hc_combine(x_BxTxMxD, branch(layer_in_BxTxD), coeffs)

  @nn.compact
  def __call__(self, x_BxTxMxD, positions_BxT, segment_ids_BxT, engram_input=None):
    cfg = self.config
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    if self.engram_layer_id is not None:
      y_BxTxMxD = Engram(cfg.engram, cfg.engram_head_sizes_for(self.engram_layer_id),
                         cfg.engram_table_placement, dt, pdt, self.decode, name="engram")(
                             x_BxTxMxD, engram_input,
                             # segment_reset keeps n-grams and the ShortConv inside documents.
                             segment_ids_BxT if cfg.engram.segment_reset else None)
      x_BxTxMxD = x_BxTxMxD + y_BxTxMxD.astype(x_BxTxMxD.dtype)

    def attn(h_BxTxD):
      h_BxTxD = RMSNorm(cfg.norm_eps, dt, pdt, name="attn_norm")(h_BxTxD)
      return Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta,
                       cfg.attention_impl, dt, pdt, self.decode, name="attn")(
                           h_BxTxD, positions_BxT, segment_ids_BxT)

    x_BxTxMxD = self._sublayer(x_BxTxMxD, attn, "attn")
    stats = {}

    def ffn(h_BxTxD):
      h_BxTxD = RMSNorm(cfg.norm_eps, dt, pdt, name="ffn_norm")(h_BxTxD)
      if not self.use_moe:
        return SwiGLU(cfg.ffn_hidden_size, dt, pdt, name="mlp")(h_BxTxD)
      mask_BxT = None if segment_ids_BxT is None else segment_ids_BxT > 0
      out, s = MoE(cfg.moe, dt, pdt, name="moe")(h_BxTxD, mask_BxT, self.deterministic)
      stats.update(s)
      return out

    x_BxTxMxD = self._sublayer(x_BxTxMxD, ffn, "ffn")
    x_BxTxMxD = nn.with_logical_constraint(x_BxTxMxD, ("batch", "length", "streams", "embed"))
    return x_BxTxMxD, stats


class EngramLM(nn.Module):
  """`__call__(inputs_BxT, *, segment_ids=None, positions=None, engram_inputs=None,
  deterministic=True) -> (logits_BxTxV float32, aux)`; see the module docstring for aux."""

  config: ModelConfig
  decode: bool = False

  def _block_cls(self):
    cfg = self.config
    if cfg.remat_policy == "none" or self.decode:  # nothing to rematerialise when decoding
      return Block
    return nn.remat(Block, policy=_remat_policy(cfg.remat_policy), prevent_cse=not cfg.scan_layers)

  @nn.compact
  def __call__(self, inputs_BxT: jax.Array, *, segment_ids: Optional[jax.Array] = None,
               positions: Optional[jax.Array] = None,
               engram_inputs: Optional[Mapping[int, Any]] = None, deterministic: bool = True):
    cfg = self.config
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    if inputs_BxT.ndim != 2:
      raise ValueError(f"inputs must be [B, T] token ids, got shape {inputs_BxT.shape}")
    b, t = inputs_BxT.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    for name, arr in (("positions", positions), ("segment_ids", segment_ids)):
      if arr is not None and arr.shape != (b, t):
        raise ValueError(f"{name} must have the inputs' shape {(b, t)}, got {arr.shape}")
    if self.decode and segment_ids is not None:
      raise ValueError("decode=True assumes one document per row: pass segment_ids=None")
    engram_inputs = dict(engram_inputs or {})
    missing = [l for l in cfg.engram_layer_ids if l not in engram_inputs]
    if missing:
      raise ValueError(f"engram_inputs lacks Engram layers {missing} (has "
                       f"{sorted(engram_inputs)}); pass {{layer_id: ids or PrefetchedRows}}")

    # Tied embeddings double as the output projection: a small init and a sqrt(D) input
    # scale keep both the embedding output and the logits at unit scale.
    emb_std = cfg.hidden_size ** -0.5 if cfg.tie_embeddings else 1.0
    embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt,
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(emb_std), ("vocab", "embed")), name="embed")
    x_BxTxD = embed(inputs_BxT)
    if cfg.tie_embeddings:
      x_BxTxD = x_BxTxD * jnp.asarray(cfg.hidden_size ** 0.5, dt)
    x_BxTxMxD = expand_streams(x_BxTxD, cfg.hc_mult)
    x_BxTxMxD = nn.with_logical_constraint(x_BxTxMxD, ("batch", "length", "streams", "embed"))

    block_cls = self._block_cls()
    moe_stats = []
    for seg in layer_segments(cfg):
      if seg.engram or not cfg.scan_layers:
        for l in range(seg.start, seg.stop):
          block = block_cls(cfg, seg.use_moe, l if seg.engram else None, deterministic,
                            self.decode, name=f"layer_{l}")
          x_BxTxMxD, s = block(x_BxTxMxD, positions, segment_ids, engram_inputs.get(l))
          if seg.use_moe:
            moe_stats.append(jax.tree.map(lambda a: a[None], s))
        continue
      scanned = nn.scan(block_cls, variable_axes={"params": 0, "moe_stats": 0, "cache": 0},
                        split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast),
                        length=seg.stop - seg.start,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x_BxTxMxD, s = scanned(cfg, seg.use_moe, None, deterministic, self.decode,
                             name=seg.scanned_name)(
          x_BxTxMxD, positions, segment_ids)
      if seg.use_moe:
        moe_stats.append(s)

    aux: dict[str, Any] = {}
    if moe_stats:
      stacked = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *moe_stats)
      aux["moe"] = stacked
      aux["moe_aux_loss"] = jnp.sum(stacked["aux_loss"])
    else:
      aux["moe_aux_loss"] = jnp.zeros((), jnp.float32)

    h_BxTxD = RMSNorm(cfg.norm_eps, dt, pdt, name="final_norm")(contract_streams(x_BxTxMxD))
    if cfg.tie_embeddings:
      w_VxD = embed.embedding.astype(dt)
      with jax.named_scope("logits"):  # names the projection in profiles (profile_step.py)
        logits = jnp.einsum("btd,vd->btv", h_BxTxD, w_VxD, preferred_element_type=jnp.float32)
    else:
      w_DxV = self.param("lm_head", nn.with_logical_partitioning(
          nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
          ("embed", "vocab")), (cfg.hidden_size, cfg.vocab_size), pdt)
      with jax.named_scope("logits"):
        logits = jnp.einsum("btd,dv->btv", h_BxTxD, w_DxV.astype(dt),
                            preferred_element_type=jnp.float32)
    logits_BxTxV = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return logits_BxTxV, aux


def unstack_scanned_params(tree: Mapping[str, Any], cfg: ModelConfig) -> dict:
  """Maps a scanned variable tree (one collection, e.g. params) to the unrolled layout."""
  out = dict(tree)
  for seg in layer_segments(cfg):
    if seg.engram or seg.scanned_name not in out:
      continue
    stacked = out.pop(seg.scanned_name)
    for i, l in enumerate(range(seg.start, seg.stop)):
      out[f"layer_{l}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
  return out


def with_engram_head_sizes(cfg: ModelConfig, tokenizer_vocab_size: int,
                           compressed_pad_id: int) -> ModelConfig:
  """Fills `engram_head_sizes` from the hash mapping (`tokenizer_vocab_size` = V', compressed)."""
  if cfg.engram is None:
    return cfg
  from engram_jax.hashing import NgramHashMapping
  mapping = NgramHashMapping.from_config(cfg.engram, tokenizer_vocab_size, compressed_pad_id)
  return cfg.replace(engram_head_sizes=tuple(
      tuple(int(s) for s in mapping.head_sizes(l)) for l in cfg.engram.layer_ids))
