"""Checkpointer: state + data iterator round trip, keep-k, and the hash-fingerprint refusal."""

import os
import re

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


# ---- integrity: checksums, fallback to the previous intact step, explicit restore_step ----------


def _two_steps(tmp_path, extra_roots=()):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), fingerprint=_fingerprint(),
                                 save_every=1, keep=5, async_save=False, extra_roots=extra_roots)
  it = _iterator()
  for step in (1, 2):
    next(it)
    ckpt.save(step, {"w": jnp.arange(4096.0) * step, "b": jnp.ones(3) * step}, it, force=True)
  ckpt.close()
  return checkpoint.Checkpointer(str(tmp_path / "checkpoints"), fingerprint=_fingerprint(),
                                 save_every=1, keep=5, extra_roots=extra_roots)


def _largest_array_file(step_dir):
  files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(step_dir, "state", "d"))
           for n in ns]
  return max(files, key=os.path.getsize)


_ABSTRACT = {"w": jax.ShapeDtypeStruct((4096,), jnp.float32),
             "b": jax.ShapeDtypeStruct((3,), jnp.float32)}


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_iterator"])
def test_damaged_latest_step_falls_back_to_the_previous_one(tmp_path, damage):
  ckpt = _two_steps(tmp_path)
  step2 = ckpt.step_directory(2)
  if damage == "delete_iterator":
    victim = os.path.join(step2, "data", "process_0-of-1.json")
    os.remove(victim)
    reason = f"file {victim} is missing"
  else:
    victim = _largest_array_file(step2)
    with open(victim, "r+b") as f:
      if damage == "truncate":
        f.truncate(os.path.getsize(victim) // 2)
        reason = f"file {victim} has .* bytes"
      else:  # an 8-byte overwrite in the middle: same size, different content
        f.seek(os.path.getsize(victim) // 2)
        f.write(b"\xff" * 8)
        reason = f"file {victim} differs from its checksum"
  step, damaged = ckpt.select_step()
  assert step == 1 and [s for s, _ in damaged] == [2]
  assert re.search(f"checkpoint step 2 in .* is damaged: {reason}", damaged[0][1])
  assert "\n" not in damaged[0][1]
  it = _iterator()
  restored = ckpt.restore(step, _ABSTRACT, it)
  np.testing.assert_array_equal(restored["w"], np.arange(4096.0))
  assert next(it) == 1
  # Restoring the damaged step itself is refused in one line, never a TensorStore error.
  with pytest.raises(checkpoint.CheckpointDamagedError, match="checkpoint step 2 .* is damaged"):
    ckpt.restore(2, _ABSTRACT)
  # Set aside, the step can be saved again.
  (dest,) = ckpt.set_aside([2], "damaged")
  assert os.path.basename(dest) == "2_damaged" and ckpt.all_steps() == [1]
  ckpt.save(2, {"w": jnp.zeros(4096), "b": jnp.zeros(3)}, force=True)
  ckpt.close()


def test_explicit_restore_step(tmp_path):
  ckpt = _two_steps(tmp_path)
  assert ckpt.select_step(1) == (1, [])
  np.testing.assert_array_equal(ckpt.restore(1, _ABSTRACT)["b"], np.ones(3))
  with pytest.raises(ValueError, match=r"train.restore_step=5: no such checkpoint .*\[1, 2\]"):
    ckpt.select_step(5)
  with open(_largest_array_file(ckpt.step_directory(1)), "r+b") as f:
    f.truncate(10)
  with pytest.raises(checkpoint.CheckpointDamagedError, match="step 1 .* is damaged"):
    ckpt.select_step(1)  # an explicit step is never replaced by another
  ckpt.close()


def test_step_without_checksums_is_unfinished_unless_the_directory_predates_them(tmp_path,
                                                                                 capsys):
  ckpt = _two_steps(tmp_path)
  os.remove(os.path.join(ckpt.step_directory(2), checkpoint.CHECKSUMS))  # killed before them
  step, damaged = ckpt.select_step()
  assert step == 1 and "has no checksums.json" in damaged[0][1]
  os.remove(os.path.join(ckpt.step_directory(1), checkpoint.CHECKSUMS))
  with pytest.raises(checkpoint.CheckpointDamagedError, match="no intact checkpoint"):
    ckpt.select_step()
  os.remove(os.path.join(ckpt.directory, checkpoint.CHECKSUMS_MARKER))  # an older directory
  assert ckpt.select_step() == (2, [])
  assert "restoring it unverified" in capsys.readouterr().out
  ckpt.close()


def test_extra_root_files_are_checksummed(tmp_path):
  root = tmp_path / "host_tables"
  for step in (1, 2):
    os.makedirs(root / str(step))
    np.save(root / str(step) / "layer1.table.npy", np.full((8, 4), step, np.float32))
  ckpt = _two_steps(tmp_path, extra_roots=[str(root)])
  assert ckpt.select_step() == (2, [])
  ckpt2 = checkpoint.Checkpointer(ckpt.directory, fingerprint=_fingerprint(), save_every=1,
                                  keep=5, extra_roots=[str(root)])
  with open(root / "2" / "layer1.table.npy", "r+b") as f:
    f.seek(-4, os.SEEK_END)
    f.write(b"\x00\x00\xc0\x7f")  # a NaN over the last element
  step, damaged = ckpt2.select_step()
  assert step == 1 and "layer1.table.npy differs from its checksum" in damaged[0][1]
  ckpt2.set_aside([2], "damaged")
  assert not os.path.exists(root / "2")
  ckpt.close()
  ckpt2.close()


def test_restore_into_other_shapes_is_one_line(tmp_path):
  ckpt = _two_steps(tmp_path)
  with pytest.raises(checkpoint.CheckpointRestoreError) as e:
    ckpt.restore(2, {"w": jax.ShapeDtypeStruct((17,), jnp.float32),
                     "b": jax.ShapeDtypeStruct((3,), jnp.float32)})
  assert len(str(e.value)) < 600 and "does not fit the current config" in str(e.value)
  ckpt.close()


def test_nonfinite_leaves_names_them():
  tree = {"a": jnp.ones(3), "b": {"c": jnp.array([1.0, jnp.nan])}, "n": jnp.arange(3)}
  assert checkpoint.nonfinite_leaves(tree) == ["['b']['c']"]
  assert checkpoint.nonfinite_leaves({"a": jnp.ones(2)}) == []
  assert checkpoint.nonfinite_host_arrays({"t": jnp.array([[1.0], [jnp.inf]]),
                                           "ok": jnp.ones((2, 2))}) == ["t"]


def test_async_saves_get_their_checksums_once_on_disk(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), fingerprint=_fingerprint(), save_every=1, keep=2,
                                 async_save=True)
  for step in (1, 2, 3):
    ckpt.save(step, {"w": jnp.ones(1000) * step}, force=True)
  ckpt.close()
  assert ckpt.all_steps() == [2, 3]
  for step in (2, 3):
    assert os.path.isfile(os.path.join(ckpt.step_directory(step), checkpoint.CHECKSUMS))
  again = checkpoint.Checkpointer(str(tmp_path), fingerprint=_fingerprint(), save_every=1, keep=2)
  assert again.select_step() == (3, [])
  again.close()
