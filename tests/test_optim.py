"""Optimiser recipe: schedule shape, table policy (5x LR, no decay), decay mask, joint clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import optim


def _cfg(**kw):
  base = dict(learning_rate=1e-3, warmup_steps=10, num_steps=100, weight_decay=0.1)
  base.update(kw)
  return optim.OptimConfig(**base)


def test_step_schedule_warms_up_then_decays_at_boundaries():
  sched = optim.make_schedule(_cfg(schedule="step", decay_boundaries=(0.8, 0.9),
                                   decay_factor=0.5))
  lr = np.array([float(sched(s)) for s in range(100)])
  assert lr[0] == 0.0
  np.testing.assert_allclose(lr[5], 5e-4, rtol=1e-6)         # linear warmup
  np.testing.assert_allclose(lr[10:80], 1e-3, rtol=1e-6)      # constant plateau
  np.testing.assert_allclose(lr[80:90], 5e-4, rtol=1e-6)      # first decay at 80%
  np.testing.assert_allclose(lr[90:], 2.5e-4, rtol=1e-6)      # second decay at 90%


def test_cosine_schedule_ends_at_min_ratio():
  sched = optim.make_schedule(_cfg(schedule="cosine", min_lr_ratio=0.1))
  np.testing.assert_allclose(float(sched(10)), 1e-3, rtol=1e-5)
  np.testing.assert_allclose(float(sched(100)), 1e-4, rtol=1e-5)


def test_bad_config_names_the_field():
  with pytest.raises(ValueError, match="OptimConfig.schedule"):
    _cfg(schedule="linear")
  with pytest.raises(ValueError, match="OptimConfig.warmup_steps"):
    _cfg(warmup_steps=1000)


def _params():
  return {"layer_1": {"engram": {"memory": {"table": jnp.ones((6, 4))},
                                 "value_kernel": jnp.ones((4, 4)),
                                 "value_bias": jnp.ones((4,))}},
          "embed": {"embedding": jnp.ones((5, 4))},
          "final_norm": {"scale": jnp.ones((4,))}}


def test_labels_find_tables_only():
  labels = optim.param_labels(_params())
  assert labels["layer_1"]["engram"]["memory"]["table"] == "table"
  flat = jax.tree.leaves(labels)
  assert flat.count("table") == 1 and flat.count("dense") == 4


def test_dense_adam_tables_get_5x_lr_and_no_weight_decay():
  cfg = _cfg(warmup_steps=0, schedule="constant", weight_decay=0.5)
  params = _params()
  tx = optim.make_optimizer(cfg, params, table_lr_multiplier=5.0, table_weight_decay=0.0)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step is lr * sign(g) (bias-corrected); weight decay adds lr * wd * w.
  np.testing.assert_allclose(updates["layer_1"]["engram"]["memory"]["table"], -5e-3, rtol=1e-4)
  np.testing.assert_allclose(updates["layer_1"]["engram"]["value_kernel"],
                             -1e-3 * (1 + 0.5), rtol=1e-4)
  # Norm scales and biases are not decayed.
  np.testing.assert_allclose(updates["final_norm"]["scale"], -1e-3, rtol=1e-4)
  np.testing.assert_allclose(updates["layer_1"]["engram"]["value_bias"], -1e-3, rtol=1e-4)


def test_without_tables_the_chain_is_plain_adamw():
  params = {"w": jnp.ones((3, 3))}
  tx = optim.make_optimizer(_cfg(), params)
  state = tx.init(params)
  assert "table" not in str(jax.tree.structure(state))


def test_joint_clip_equals_clipping_the_concatenation():
  rng = np.random.default_rng(0)
  dense = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
           "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
  sparse = [jnp.asarray(rng.normal(size=(7, 2)), jnp.float32)]
  flat = jnp.concatenate([dense["a"].ravel(), dense["b"].ravel(), sparse[0].ravel()])
  d, s, norm = optim.clip_by_global_norm(dense, sparse, max_norm=1.0)
  np.testing.assert_allclose(norm, jnp.linalg.norm(flat), rtol=1e-6)
  clipped = jnp.concatenate([d["a"].ravel(), d["b"].ravel(), s[0].ravel()])
  np.testing.assert_allclose(clipped, flat / jnp.linalg.norm(flat), rtol=1e-5)
  # Under the threshold nothing changes.
  d2, s2, _ = optim.clip_by_global_norm(dense, sparse, max_norm=1e6)
  np.testing.assert_allclose(s2[0], sparse[0], rtol=1e-6)


def test_muon_option_updates_matrices():
  params = {"w": jnp.eye(4) + 0.1, "scale": jnp.ones((4,))}
  tx = optim.make_optimizer(_cfg(kind="muon", warmup_steps=0, schedule="constant"), params)
  grads = {"w": jnp.arange(16.0).reshape(4, 4) / 16, "scale": jnp.ones((4,))}
  updates, _ = tx.update(grads, tx.init(params), params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  assert float(jnp.abs(updates["w"]).sum()) > 0
