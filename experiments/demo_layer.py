r"""Builds one Engram layer on the shipped tokenizer and real text and runs it under jit.

  python -m experiments.demo_layer                        # CPU, ~20 s
  python -m experiments.demo_layer --seq_len=1024 --batch=4 --dtype=bfloat16

Steps shown: tokenizer compression (V -> V'), n-gram hashing on the host (NumPy, int64) and on
the device (32-bit emulation) with a bit-for-bit check between the two, forward and backward of
the layer under `jax.jit`, gate statistics and timings. No training happens here; the full
language model is `experiments/train.py` / `experiments/quickstart.py`.
"""

import time

from absl import app
from absl import flags
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import compression
from engram_jax import data as data_lib
from engram_jax import hashing
from engram_jax import param_count
from engram_jax import tokenizer as tokenizer_lib
from engram_jax.config import EngramConfig
from engram_jax.engram_layer import Engram

_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_BATCH = flags.DEFINE_integer("batch", 2, "Sequences per batch.")
_HIDDEN = flags.DEFINE_integer("hidden", 256, "Backbone width D.")
_HC_MULT = flags.DEFINE_integer("hc_mult", 4, "Residual streams M.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions after the compile.")


def _time(fn, *args, repeats):
  out = jax.block_until_ready(fn(*args))  # compile + first run
  start = time.perf_counter()
  for _ in range(repeats):
    out = jax.block_until_ready(fn(*args))
  return out, (time.perf_counter() - start) / repeats * 1e3


def main(argv):
  del argv
  b, t = _BATCH.value, _SEQ_LEN.value
  tok_path = tokenizer_lib.default_tokenizer_path()
  tok = tokenizer_lib.load_tokenizer(tok_path)
  ctok = compression.CompressedTokenizer(tok)
  print(f"tokenizer   {tok_path}")
  print(f"compression V={ctok.raw_vocab_size} -> V'={len(ctok)} "
        f"({100 * (1 - len(ctok) / ctok.raw_vocab_size):.2f}% fewer ids)")

  text = " ".join(data_lib.read_documents(data_lib.default_corpus_paths()["valid"][0])[:200])
  ids = np.asarray(tok.encode(text).ids[: b * t], np.int64)
  if ids.size < b * t:
    raise app.UsageError(f"validation text has only {ids.size} tokens; lower --batch/--seq_len")
  raw_BxT = ids.reshape(b, t)
  compressed_BxT = ctok(raw_BxT)

  cfg = EngramConfig(engram_vocab_size=(len(ctok) * 5, len(ctok) * 5), max_ngram_size=3,
                     n_embed_per_ngram=256, n_head_per_ngram=8, layer_ids=(1,),
                     pad_id=tokenizer_lib.PAD_ID,
                     hidden_size=_HIDDEN.value, hc_mult=_HC_MULT.value, zero_init_conv=False)
  mapping = hashing.NgramHashMapping.from_config(cfg, len(ctok), ctok.compress_pad_id(cfg.pad_id))
  layer_id = cfg.layer_ids[0]
  print(f"hashing     layer {layer_id}: {mapping.num_heads} heads, primes "
        f"{mapping.head_sizes(layer_id)[:3]}..., {mapping.num_rows(layer_id):,} table rows")

  start = time.perf_counter()
  host_ids = mapping.hash_numpy(compressed_BxT)[layer_id]
  host_ms = (time.perf_counter() - start) * 1e3
  device_hash = jax.jit(lambda x: mapping.hash(x)[layer_id])
  dev_ids, dev_ms = _time(device_hash, jnp.asarray(compressed_BxT, jnp.int32),
                          repeats=_REPEATS.value)
  same = np.array_equal(np.asarray(dev_ids), host_ids)
  print(f"hash ids    {host_ids.shape} int64 host {host_ms:.2f} ms | int32 device "
        f"{dev_ms:.2f} ms | identical: {same}")
  if not same:
    raise SystemExit("device hash ids differ from the host reference")

  dtype = jnp.dtype(_DTYPE.value)
  layer = Engram(config=cfg, head_sizes=mapping.head_sizes(layer_id), dtype=dtype)
  hidden = jax.random.normal(jax.random.key(0), (b, t, cfg.hc_mult, cfg.hidden_size), dtype)
  # Params carry logical-axis boxes for sharding; unbox them for plain arithmetic.
  params = nn.unbox(jax.jit(layer.init)(jax.random.key(1), hidden, dev_ids)["params"])
  n_params = param_count.tree_param_count(params)
  table = params["memory"]["table"] if "memory" in params else None
  print(f"layer       {n_params:,} params"
        + (f" (table {table.shape[0]:,} x {table.shape[1]})" if table is not None else ""))

  fwd = jax.jit(lambda p, h, i: layer.apply({"params": p}, h, i, mutable=["intermediates"]))
  (out, inter), fwd_ms = _time(fwd, params, hidden, dev_ids, repeats=_REPEATS.value)
  gates = np.asarray(jax.tree.leaves(inter)[0], np.float32)

  def loss(p, h):
    return jnp.mean(jnp.square(layer.apply({"params": p}, h, dev_ids).astype(jnp.float32)))

  grads, bwd_ms = _time(jax.jit(jax.grad(loss, argnums=(0, 1))), params, hidden,
                        repeats=_REPEATS.value)
  finite = all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  print(f"forward     out {out.shape} {out.dtype}: {fwd_ms:.2f} ms")
  print(f"gates       mean {gates.mean():.3f} std {gates.std():.3f} "
        f"min {gates.min():.3f} max {gates.max():.3f} over {gates.shape}")
  print(f"fwd+bwd     {bwd_ms:.2f} ms, gradients finite: {finite} "
        f"({jax.devices()[0].platform}, {_DTYPE.value})")


if __name__ == "__main__":
  app.run(main)
