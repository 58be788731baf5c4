"""Checkpointer: state + data iterator round trip, keep-k, and the hash-fingerprint refusal."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import checkpoint


def _iterator():
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def _fingerprint(seed=0):
  return {"engram": True, "hash": {"seed": seed, "primes": {"1": [503, 509]}},
          "compression": "abc"}


def test_round_trip_restores_state_and_data_position(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), fingerprint=_fingerprint(), save_every=1,
                                 keep=2, async_save=True)
  it = _iterator()
  for _ in range(7):
    next(it)
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(7)}
  assert ckpt.save(7, state, it, force=True)
  ckpt.wait()
  expected_next = next(it)

  it2 = _iterator()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  restored = ckpt.restore(7, abstract, it2)
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert int(restored["step"]) == 7
  assert next(it2) == expected_next
  ckpt.close()


def test_keeps_only_k(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), fingerprint=_fingerprint(), save_every=1,
                                 keep=2, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, {"w": jnp.ones(2) * step}, force=True)
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
  ckpt.close()


def test_different_hash_is_refused_with_the_differing_field(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), fingerprint=_fingerprint(seed=0), save_every=1,
                                 keep=1, async_save=False)
  ckpt.save(1, {"w": jnp.ones(2)}, force=True)
  ckpt.close()
  other = checkpoint.Checkpointer(str(tmp_path), fingerprint=_fingerprint(seed=1), save_every=1,
                                  keep=1)
  with pytest.raises(checkpoint.FingerprintMismatchError, match=r"hash\.seed: checkpoint 0 != config 1"):
    other.restore(1, {"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
  other.close()
