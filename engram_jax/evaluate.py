"""Held-out evaluation: token-weighted loss and perplexity, in training and from a workdir.

`evaluate` runs a compiled eval step over batches, summing the loss and the target-token count
on device and syncing once at the end. Padding (weight 0, including the rows that pad the last
batch) contributes nothing, so the result is the exact mean over every real target token.

`load_workdir_config` reads a training run's config (`workdir/config.json`, the config of its
latest start); `engram_jax.train.evaluate_workdir` (what `python -m experiments.eval` calls)
rebuilds the model from it, restores the newest intact checkpoint (refusing one that holds NaN
or Inf parameters) and evaluates any text/JSONL files with `evaluate`.

Dimension legend: B batch, T sequence length.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Callable, Iterable

import jax.numpy as jnp
import ml_collections
import numpy as np

from engram_jax import experiment_config


def evaluate(eval_step: Callable, state, batches: Iterable[dict], put_batch: Callable,
             num_batches: int = 0) -> dict:
  """Mean loss and perplexity over `batches` (all of them when num_batches is 0)."""
  if num_batches:
    batches = itertools.islice(batches, num_batches)
  loss_sum = jnp.zeros((), jnp.float32)
  num_tokens = jnp.zeros((), jnp.float32)
  count = 0
  start = time.perf_counter()
  for batch in batches:
    out = eval_step(state, put_batch(batch))
    loss_sum, num_tokens = loss_sum + out["loss_sum"], num_tokens + out["num_tokens"]
    count += 1
  if count == 0:
    raise ValueError("evaluation got no batches (is the held-out set empty?)")
  loss_sum, num_tokens = float(loss_sum), float(num_tokens)
  if num_tokens == 0:
    raise ValueError("evaluation batches contain no target tokens")
  loss = loss_sum / num_tokens
  return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0))),
          "eval_tokens": int(num_tokens), "eval_batches": count,
          "eval_seconds": time.perf_counter() - start}


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """`workdir/config.json`, every field checked (`experiment_config.check_fields`: one missing
  or out of range raises a ConfigError naming the file and the field)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config.json in workdir {workdir!r}: is it a training workdir "
                            "(python -m experiments.train ... --workdir=DIR)?")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  try:
    experiment_config.check_fields(config)
  except experiment_config.ConfigError as e:
    raise experiment_config.ConfigError(f"{path}: {e}") from None
  return config
