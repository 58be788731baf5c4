"""Host-offloaded Engram tables: placement, prefetch coherence, updates equal to HBM, checkpoints.

The model here is our own tiny stand-in (not EngramLM): per layer, rows of a table are expanded
with `expand_rows` and a linear head maps the concatenation to vocabulary logits. It is enough
to exercise everything offload does: the forward reads prefetched rows, the gradient w.r.t. the
rows is the row-sparse table gradient, and the lazy-Adam update changes table and state.

Dimension legend: B batch, T time, H heads, E row width, R rows, V vocab, U = B*T*H.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import offload, table_optim
from pallas_kernels.engram_lookup.row_sparse import (RowSparse, expand_rows, prefetch_rows,
                                                     unique_rows)

B, T, H, E, V = 2, 5, 3, 4, 7
HEAD_SIZES = {0: (5, 7, 11), 3: (13, 3, 17)}          # small primes: many repeated rows
LAYERS = tuple(HEAD_SIZES)
CFG = table_optim.TableOptimizerConfig(lr_multiplier=5.0)
LR = 0.01


def _offsets(l):
  return np.concatenate([[0], np.cumsum(HEAD_SIZES[l])[:-1]]).astype(np.int64)


def _rows(l):
  return int(sum(HEAD_SIZES[l]))


def _batches(n, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    ids = {l: rng.integers(0, np.asarray(HEAD_SIZES[l]), size=(B, T, H)).astype(np.int32)
           for l in LAYERS}
    out.append((ids, rng.integers(0, V, size=(B, T)).astype(np.int32)))
  return out


def _loss(w_FxV, rows, inverses, targets_BxT):
  feats = jnp.concatenate([expand_rows(rows[l], inverses[l]) for l in LAYERS], -1)
  logits = feats @ w_FxV
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, targets_BxT[..., None], -1))


_grad = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1)))


def _loss_step(w, targets, rows):
  """A fused / threaded step's model_step: the loss and the row gradients, LR."""
  loss, grows = jax.value_and_grad(_loss, argnums=1)(
      w, {l: p.rows_UxE for l, p in rows.items()},
      {l: p.inverse_BxTxH for l, p in rows.items()}, targets)
  return loss, grows, LR


def _zero_grads_step(state, inputs, rows):
  """A model_step that changes nothing: zero row gradients (for the pipelines' bookkeeping)."""
  return None, {l: jnp.zeros_like(r.rows_UxE) for l, r in rows.items()}, LR
_sgd = jax.jit(lambda w, g: w - 0.1 * g)


def _head():
  return jax.random.normal(jax.random.key(1), (len(LAYERS) * H * E, V)) * 0.3


def _tables(placement):
  return {l: offload.create_table(_rows(l), E, jnp.float32, placement, seed=l, chunk_rows=8)
          for l in LAYERS}


def _reference_run(batches):
  """HBM placement, no pipelining: gather inside the step, update the whole table after it."""
  tables = _tables("device")
  states = {l: table_optim.init_table_state(CFG, tables[l]) for l in LAYERS}
  w = _head()
  losses, looked_up = [], []
  for ids, targets in batches:
    pre = {l: prefetch_rows(tables[l], jnp.asarray(ids[l]), jnp.asarray(_offsets(l), jnp.int32))
           for l in LAYERS}
    looked_up.append({l: np.asarray(pre[l].rows_UxE) for l in LAYERS})
    loss, (gw, grows) = _grad(w, {l: p.rows_UxE for l, p in pre.items()},
                              {l: p.inverse_BxTxH for l, p in pre.items()}, jnp.asarray(targets))
    w = _sgd(w, gw)
    for l in LAYERS:
      tables[l], states[l] = table_optim.apply_row_sparse_update(
          CFG, tables[l], states[l], RowSparse(pre[l].row_ids_U, grows[l]), LR)
    losses.append(float(loss))
  return losses, tables, states, looked_up


def _host_run(batches, placement="pinned_host", prefetch_first=True):
  """The pipelined trainer: prefetch(s+1) is dispatched before (or right after) step s, and
  always before step s's update."""
  trainer = offload.HostTableTrainer(CFG, _tables(placement), {l: _offsets(l) for l in LAYERS})
  dev = offload.placement_sharding("device")
  w = _head()
  losses, looked_up = [], []
  handle = trainer.prefetch(batches[0][0])
  for s, (ids, targets) in enumerate(batches):
    targets = jax.device_put(targets, dev)
    with jax.transfer_guard("disallow"):
      more = s + 1 < len(batches)
      nxt = trainer.prefetch(batches[s + 1][0]) if more and prefetch_first else None
      rows = trainer.rows(handle)
      loss, (gw, grows) = _grad(w, {l: p.rows_UxE for l, p in rows.items()},
                                {l: p.inverse_BxTxH for l, p in rows.items()}, targets)
      if more and not prefetch_first:
        nxt = trainer.prefetch(batches[s + 1][0])
      w = _sgd(w, gw)
      trainer.apply_grad(handle, grows, LR)
    looked_up.append({l: np.asarray(rows[l].rows_UxE) for l in LAYERS})
    losses.append(float(loss))
    handle = nxt
  return losses, trainer, looked_up


def _host_to_numpy(x):
  return np.asarray(jax.device_put(x, offload.placement_sharding("device")))


def test_pinned_host_is_available():
  kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
  assert "pinned_host" in kinds


def test_create_table_same_values_in_both_placements_and_lands_on_host():
  host = offload.create_table(50, E, jnp.float32, "pinned_host", seed=3, chunk_rows=16)
  dev = offload.create_table(50, E, jnp.float32, "device", seed=3, chunk_rows=16)
  assert host.sharding.memory_kind == "pinned_host"
  assert dev.sharding.memory_kind == "device"
  h = _host_to_numpy(host)
  np.testing.assert_array_equal(h, np.asarray(dev))
  assert np.all(h != 0)                      # every chunk (also the clipped last one) written
  assert 0.7 < h.std() < 1.3


@pytest.mark.parametrize("prefetch_first", [True, False])
def test_host_and_device_placement_give_same_losses_and_rows(prefetch_first):
  batches = _batches(5)
  ref_losses, ref_tables, ref_states, ref_rows = _reference_run(batches)
  losses, trainer, rows = _host_run(batches, prefetch_first=prefetch_first)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  for l in LAYERS:
    assert trainer.tables[l].sharding.memory_kind == "pinned_host"
    for leaf in jax.tree.leaves(trainer.states[l]):
      assert leaf.sharding.memory_kind == "pinned_host"
    np.testing.assert_allclose(_host_to_numpy(trainer.tables[l]), np.asarray(ref_tables[l]),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_host_to_numpy(trainer.states[l].nu_RxE),
                               np.asarray(ref_states[l].nu_RxE), rtol=1e-6, atol=1e-12)
    np.testing.assert_array_equal(_host_to_numpy(trainer.states[l].count_R),
                                  np.asarray(ref_states[l].count_R))
    # The update really moved rows, so equality above is not vacuous.
    assert np.abs(_host_to_numpy(trainer.tables[l]) - _host_to_numpy(
        _tables("pinned_host")[l])).max() > 1e-3


def test_prefetched_rows_are_exactly_what_the_next_step_reads():
  batches = _batches(4, seed=1)
  _, _, _, ref_rows = _reference_run(batches)
  _, trainer, rows = _host_run(batches)
  for s in range(len(batches)):
    for l in LAYERS:
      np.testing.assert_allclose(rows[s][l], ref_rows[s][l], rtol=1e-6, atol=1e-7)
  # And the row ids are those of the batch (sorted unique global rows, padded with R).
  ids = batches[2][0]
  handle = trainer.prefetch(ids)
  for l in LAYERS:
    want_U, want_inv = unique_rows(jnp.asarray(ids[l]), jnp.asarray(_offsets(l), jnp.int32),
                                   _rows(l))
    np.testing.assert_array_equal(np.asarray(handle.row_ids[l]), np.asarray(want_U))
    np.testing.assert_array_equal(np.asarray(handle.inverse[l]), np.asarray(want_inv))


def test_without_patching_the_pipeline_would_read_stale_rows():
  """Guards the coherence test: consecutive batches share rows that step s updates."""
  batches = _batches(2, seed=1)
  for l in LAYERS:
    a = set(offload.unique_rows_numpy(batches[0][0][l], _offsets(l), _rows(l))[0].tolist())
    b = set(offload.unique_rows_numpy(batches[1][0][l], _offsets(l), _rows(l))[0].tolist())
    assert len((a & b) - {_rows(l)}) > 0


def test_device_placement_trainer_matches_too():
  batches = _batches(3, seed=2)
  ref_losses, ref_tables, _, _ = _reference_run(batches)
  losses, trainer, _ = _host_run(batches, placement="device")
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  for l in LAYERS:
    np.testing.assert_allclose(np.asarray(trainer.tables[l]), np.asarray(ref_tables[l]),
                               rtol=1e-6, atol=1e-7)


def _check_tables_stay_on_host(name, text):
  """Table-sized operands of a compiled program live in host memory (S(5)) and no instruction
  copies a table-sized value."""
  header = text.splitlines()[0]
  layout = header[header.index("entry_computation_layout="):]
  for l in LAYERS:
    for shape in (f"f32[{_rows(l)},{E}]", f"s32[{_rows(l)}]"):
      in_layout = re.findall(re.escape(shape) + r"\{[^}]*\}", layout)
      assert in_layout, f"{name}: table shape {shape} not in the entry layout (vacuous)"
      assert all(":S(5)" in h for h in in_layout), f"{name}: {shape} in device memory"
      copies = [line for line in text.splitlines()
                if re.search(r"= " + re.escape(shape) + r"\{[^}]*\} (copy|copy-start|copy-done)\(",
                             line)]
      assert not copies, f"{name}: table-sized copy {copies}"


def _check_every_host_array_aliased(text, trainer):
  header = text.splitlines()[0]
  aliases = header[header.index("input_output_alias="):header.index("entry_computation_layout=")]
  n_arrays = sum(len(trainer._arrays(l)) for l in LAYERS)
  assert aliases.count("may-alias") + aliases.count("must-alias") == n_arrays


def test_no_program_moves_a_whole_table_between_memories():
  """Compiled gather/scatter programs: table-sized operands stay in host memory (S(5)), no
  instruction copies a table-sized value, and the scatter updates every host array in place."""
  batches = _batches(2)
  _, trainer, _ = _host_run(batches)
  handle = trainer.prefetch(batches[0][0])
  texts = trainer.compiled_texts(handle, None)
  for name, text in texts.items():
    _check_tables_stay_on_host(name, text)
  _check_every_host_array_aliased(texts["scatter"], trainer)


def test_too_large_request_fails_before_allocating():
  avail = offload.mem_available_bytes()
  rows = int(2 * avail // (E * 4)) + 1
  with pytest.raises(ValueError, match="pinned host memory"):
    offload.create_table(rows, E, jnp.float32, "pinned_host")
  class FakeCpu:  # on a GPU the pinned pool cap (64 GiB by default) is met first
    platform = "cpu"
  with pytest.raises(ValueError, match="MemAvailable"):
    offload.check_host_allocation(2 * avail, what="test", device=FakeCpu())
  offload.check_host_allocation(1 << 20)     # a small request passes


def test_gpu_pool_cap_is_enforced(monkeypatch):
  class FakeGpu:
    platform = "gpu"
  monkeypatch.setenv("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "1")
  with pytest.raises(ValueError, match="XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"):
    offload.check_host_allocation(2 * 2**30, device=FakeGpu())


def test_apply_grad_twice_is_an_error():
  batches = _batches(1)
  trainer = offload.HostTableTrainer(CFG, _tables("pinned_host"), {l: _offsets(l) for l in LAYERS})
  h = trainer.prefetch(batches[0][0])
  g = {l: jnp.zeros(h.leaves[l][0].shape, jnp.float32) for l in LAYERS}
  trainer.apply_grad(h, g, LR)
  with pytest.raises(ValueError, match="already applied"):
    trainer.apply_grad(h, g, LR)


@pytest.mark.parametrize("moment_dtype", ["float32", "bfloat16"])
def test_checkpoint_round_trip_of_host_tables(tmp_path, moment_dtype):
  cfg = table_optim.TableOptimizerConfig(moment_dtype=moment_dtype)
  batches = _batches(3, seed=4)
  trainer = offload.HostTableTrainer(cfg, _tables("pinned_host"), {l: _offsets(l) for l in LAYERS})
  for ids, _ in batches:
    h = trainer.prefetch(ids)
    g = {l: jnp.ones(h.leaves[l][0].shape, jnp.float32) for l in LAYERS}
    trainer.apply_grad(h, g, LR)
  # 40-byte chunks: several chunks per table and a clipped last one.
  offload.save_trainer(str(tmp_path), trainer, chunk_bytes=40)
  back = offload.restore_trainer(str(tmp_path), cfg, {l: _offsets(l) for l in LAYERS},
                                 {l: "pinned_host" for l in LAYERS}, chunk_bytes=40)
  for l in LAYERS:
    assert back.tables[l].sharding.memory_kind == "pinned_host"
    for a, b in zip(jax.tree.leaves((trainer.tables[l], trainer.states[l])),
                    jax.tree.leaves((back.tables[l], back.states[l]))):
      assert a.dtype == b.dtype and b.sharding.memory_kind == "pinned_host"
      np.testing.assert_array_equal(_host_to_numpy(a).astype(np.float32),
                                    _host_to_numpy(b).astype(np.float32))
    assert np.abs(_host_to_numpy(back.states[l].mu_RxE).astype(np.float32)).max() > 0


# ---- generation ----------------------------------------------------------------------------------

from tests.windowed_decoder import WindowedDecoder as Generator  # noqa: E402
from engram_jax.hashing import NgramHashMapping                 # noqa: E402

GEN_V, GEN_VC = 20, 12        # raw and compressed vocab


def _gen_setup():
  mapping = NgramHashMapping((31, 37), 3, 2, (0, 2), 0, 0, GEN_VC)
  compression = np.random.default_rng(5).integers(0, GEN_VC, GEN_V)
  rng = np.random.default_rng(6)
  h = mapping.num_heads
  # NumPy, not jax arrays: a jax array closed over by logits_fn becomes a constant of the traced
  # program, which on a GPU is a device-to-host copy that transfer_guard("disallow") refuses.
  w_FxV = rng.normal(size=(len(mapping.layer_ids) * h * E, GEN_V)).astype(np.float32)
  emb_VxV = rng.normal(size=(GEN_V, GEN_V)).astype(np.float32)

  def logits_fn(tokens_BxT, engram_inputs):        # position-wise, hence causal
    feats = jnp.concatenate([expand_rows(engram_inputs[l].rows_UxE,
                                         engram_inputs[l].inverse_BxTxH)
                             for l in mapping.layer_ids], -1)
    # HIGHEST: a GPU's default f32 matmul (TF32) would change argmaxes vs the NumPy reference.
    return jnp.matmul(feats, w_FxV, precision="highest") + jnp.asarray(emb_VxV)[tokens_BxT]

  def reference(tables_np, prompt, new):
    toks = prompt.copy()
    for _ in range(new):
      ids = mapping.hash_numpy(compression[toks])
      feats = np.concatenate([tables_np[l][ids[l] + mapping.offsets(l)].reshape(
          toks.shape + (-1,)) for l in mapping.layer_ids], -1)
      logits = feats @ w_FxV + emb_VxV[toks]
      toks = np.concatenate([toks, logits[:, -1].argmax(-1)[:, None].astype(np.int32)], 1)
    return toks
  return mapping, compression, logits_fn, reference


@pytest.mark.parametrize("placement", ["pinned_host", "device"])
def test_generation_fetches_the_rows_of_each_new_position(placement):
  mapping, compression, logits_fn, reference = _gen_setup()
  tables = {l: offload.create_table(mapping.num_rows(l), E, jnp.float32, placement, seed=l)
            for l in mapping.layer_ids}
  tables_np = {l: _host_to_numpy(t) for l, t in tables.items()}
  prompt = np.random.default_rng(7).integers(0, GEN_V, (3, 4)).astype(np.int32)
  gen = Generator(logits_fn, tables, mapping, compression)
  with jax.transfer_guard("disallow"):
    out = gen(prompt, 6)
  np.testing.assert_array_equal(out, reference(tables_np, prompt, 6))
  assert len(set(out[:, 4:].ravel().tolist())) > 1          # not a degenerate constant run


def test_temperature_sampling_is_placement_independent():
  mapping, compression, logits_fn, _ = _gen_setup()
  outs = []
  for placement in ("pinned_host", "device"):
    tables = {l: offload.create_table(mapping.num_rows(l), E, jnp.float32, placement, seed=l)
              for l in mapping.layer_ids}
    prompt = np.random.default_rng(7).integers(0, GEN_V, (2, 3)).astype(np.int32)
    outs.append(Generator(logits_fn, tables, mapping, compression)(prompt, 5, temperature=1.0,
                                                                   seed=3))
  np.testing.assert_array_equal(outs[0], outs[1])


def _fused_run(batches, placement="pinned_host", row_buckets=0, threaded=False):
  """One program per step: host scatter of step s-1 and gather of step s+1 fused with step s
  (`threaded`: done by NumPy worker threads beside it, make_threaded_step)."""
  trainer = offload.HostTableTrainer(CFG, _tables(placement), {l: _offsets(l) for l in LAYERS},
                                     row_buckets=row_buckets)
  dev = offload.placement_sharding("device")

  def model_step(w, targets, rows):
    loss, (gw, grows) = jax.value_and_grad(_loss, argnums=(0, 1))(
        w, {l: p.rows_UxE for l, p in rows.items()},
        {l: p.inverse_BxTxH for l, p in rows.items()}, targets)
    return (w - 0.1 * gw, loss, {l: p.rows_UxE for l, p in rows.items()}), grows, LR

  run = (trainer.make_threaded_step(model_step, threads=3) if threaded
         else trainer.make_fused_step(model_step))
  w = _head()
  losses, looked_up = [], []
  handle = trainer.prefetch(batches[0][0])
  for s, (ids, targets) in enumerate(batches):
    targets = jax.device_put(targets, dev)
    with jax.transfer_guard("disallow"):
      nxt_ids = batches[s + 1][0] if s + 1 < len(batches) else None
      (w, loss, rows), handle = run(handle, nxt_ids, w, targets)
    looked_up.append({l: np.asarray(rows[l]) for l in LAYERS})
    losses.append(float(loss))
  assert handle is None
  return losses, trainer, looked_up, run


def test_fused_steps_equal_the_hbm_placement():
  batches = _batches(5, seed=3)
  ref_losses, ref_tables, ref_states, ref_rows = _reference_run(batches)
  losses, trainer, rows, run = _fused_run(batches)
  assert trainer._pending is not None          # the last update waits for a flush ...
  # ... already moved to the host: a device-to-host copy inside the program of the host scatter
  # raced with it on the H200 (offload.HostTableTrainer._scatter_fn).
  for l in LAYERS:
    assert {leaf.sharding.memory_kind for leaf in trainer._pending[1][l]} == {"pinned_host"}
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  for s in range(len(batches)):
    for l in LAYERS:
      np.testing.assert_allclose(rows[s][l], ref_rows[s][l], rtol=1e-6, atol=1e-7)
  for l in LAYERS:                             # ... which reading the tables performs
    np.testing.assert_allclose(_host_to_numpy(trainer.tables[l]), np.asarray(ref_tables[l]),
                               rtol=1e-6, atol=1e-7)
    # Here the row gradient is computed in the same XLA program as the update, so fusion may
    # order its f32 sums differently than the reference's two programs (seen: 3e-6 relative
    # on the first moment; the tables above agree to 1e-6).
    np.testing.assert_allclose(_host_to_numpy(trainer.states[l].mu_RxE),
                               np.asarray(ref_states[l].mu_RxE), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(_host_to_numpy(trainer.states[l].nu_RxE),
                               np.asarray(ref_states[l].nu_RxE), rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(_host_to_numpy(trainer.states[l].count_R),
                                  np.asarray(ref_states[l].count_R))
    assert trainer.tables[l].sharding.memory_kind == "pinned_host"
  assert trainer._pending is None
  # First step (nothing pending), middle steps, last step (nothing to gather) were compiled.
  assert set(run.programs) == {(False, True, False), (True, True, False), (True, False, False)}


def test_fused_program_keeps_tables_on_the_host_and_updates_them_in_place():
  """The middle-step program (scatter s-1, gather s+1, model s): table-sized operands stay in
  host memory (S(5)), nothing copies a table-sized value, every host array is aliased."""
  batches = _batches(3, seed=4)
  trainer = offload.HostTableTrainer(CFG, _tables("pinned_host"), {l: _offsets(l) for l in LAYERS})
  dev = offload.placement_sharding("device")

  run = trainer.make_fused_step(_loss_step)
  w, targets = _head(), jax.device_put(batches[0][1], dev)
  _, handle = run(trainer.prefetch(batches[0][0]), batches[1][0], w, targets)
  text = run.compiled_text(handle, batches[2][0], w, targets)
  _check_tables_stay_on_host("fused", text)
  _check_every_host_array_aliased(text, trainer)


def test_bucketed_slots():
  assert offload.bucketed_slots(17, 30, 0) == 30        # off: always U
  assert offload.bucketed_slots(17, 30, 6) == 20        # buckets of 5
  assert offload.bucketed_slots(20, 30, 6) == 20
  assert offload.bucketed_slots(0, 30, 6) == 5          # never empty
  assert offload.bucketed_slots(29, 30, 4) == 30        # never above U
  assert offload.bucketed_slots(262_144 // 2 + 1, 262_144, 16) == 147_456


def test_row_buckets_move_fewer_slots_and_give_the_same_results():
  """With row_buckets the fused steps gather, update and scatter only ~the unique rows; losses,
  looked-up rows and the final tables equal the HBM placement's all the same."""
  batches = _batches(5, seed=9)
  ref_losses, ref_tables, _, ref_rows = _reference_run(batches)
  losses, trainer, rows, _ = _fused_run(batches, row_buckets=6)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  sizes = set()
  for s in range(len(batches)):
    for l in LAYERS:
      u = rows[s][l].shape[0]
      sizes.add(u)
      np.testing.assert_allclose(rows[s][l], ref_rows[s][l][:u], rtol=1e-6, atol=1e-7)
      assert not ref_rows[s][l][u:].any()          # only padding was left out
  assert max(sizes) < B * T * H and len(sizes) <= 6  # fewer slots; at most `buckets` shapes
  for l in LAYERS:
    np.testing.assert_allclose(_host_to_numpy(trainer.tables[l]), np.asarray(ref_tables[l]),
                               rtol=1e-6, atol=1e-7)


def test_host_scatter_refuses_rows_still_on_the_device():
  trainer = offload.HostTableTrainer(CFG, _tables("pinned_host"), {l: _offsets(l) for l in LAYERS})
  handle = trainer.prefetch(_batches(1, seed=6)[0][0])
  arrays = {l: trainer._arrays(l) for l in LAYERS}
  with pytest.raises(ValueError, match="move them with _to_home"):
    trainer._scatter(arrays, handle.row_ids_home, {l: handle.leaves[l] for l in LAYERS})
  out = trainer._scatter(arrays, handle.row_ids_home,
                         trainer._to_home({l: handle.leaves[l] for l in LAYERS}))
  assert {a.sharding.memory_kind for l in LAYERS for a in out[l]} == {"pinned_host"}


def test_fused_step_refuses_a_second_outstanding_handle():
  batches = _batches(2, seed=5)
  trainer = offload.HostTableTrainer(CFG, _tables("pinned_host"), {l: _offsets(l) for l in LAYERS})
  run = trainer.make_fused_step(_zero_grads_step)
  h0 = trainer.prefetch(batches[0][0])
  trainer.prefetch(batches[1][0])
  with pytest.raises(ValueError, match="another prefetched handle"):
    run(h0, None, (), ())


def test_trainer_programs_close_over_no_device_arrays():
  """As the generators' check (tests/test_generate.py): the gather, update and scatter programs
  take every array as an argument (a closed-over device array is read back to the host at
  compile time, which a GPU refuses under transfer_guard)."""
  from tests.test_generate import _device_array_constants
  trainer = offload.HostTableTrainer(CFG, _tables("pinned_host"), {l: _offsets(l) for l in LAYERS})
  batches = _batches(2, seed=9)

  def run():
    h = trainer.prefetch(batches[0][0])
    nxt = trainer.prefetch(batches[1][0])                     # patched by the update
    trainer.apply_grad(h, {l: jnp.ones(h.leaves[l][0].shape, jnp.float32) for l in LAYERS}, LR)
    trainer.apply_grad(nxt, {l: jnp.ones(nxt.leaves[l][0].shape, jnp.float32) for l in LAYERS},
                       LR)
  found = _device_array_constants(trainer, ["_gather", "_update", "_scatter"], run)
  assert found == {"_gather": 0, "_update": 0, "_scatter": 0}


# ---- threaded steps: NumPy gathers / scatters on worker threads beside one device program ----

def test_threaded_steps_equal_the_hbm_placement():
  batches = _batches(5, seed=3)
  ref_losses, ref_tables, ref_states, ref_rows = _reference_run(batches)
  losses, trainer, rows, run = _fused_run(batches, threaded=True)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  for s in range(len(batches)):        # step s+1's rows were gathered before s's write: patched
    for l in LAYERS:
      np.testing.assert_allclose(rows[s][l], ref_rows[s][l], rtol=1e-6, atol=1e-7)
  for l in LAYERS:
    # As the fused step: gradient and update share one program (fusion may reorder f32 sums).
    np.testing.assert_allclose(_host_to_numpy(trainer.tables[l]), np.asarray(ref_tables[l]),
                               rtol=1e-6, atol=1e-7)
    for name in ("mu_RxE", "nu_RxE"):
      np.testing.assert_allclose(_host_to_numpy(getattr(trainer.states[l], name)),
                                 np.asarray(getattr(ref_states[l], name)), rtol=1e-5, atol=1e-12)
    np.testing.assert_array_equal(_host_to_numpy(trainer.states[l].count_R),
                                  np.asarray(ref_states[l].count_R))
    assert trainer.tables[l].sharding.memory_kind == "pinned_host"
  # First step (rows from prefetch, nothing to patch), then steps patching the previous update.
  assert set(run.programs) == {(False, False), (True, False)}


def test_threaded_step_equals_the_fused_step_with_bfloat16_tables():
  """bf16 tables: the patch stores updated rows rounded as the host arrays store them, so the
  rows a step reads equal those of the fused pipeline (which writes, then gathers)."""
  batches = _batches(4, seed=8)
  outs = []
  for threaded in (False, True):
    trainer = offload.HostTableTrainer(
        CFG, {l: offload.create_table(_rows(l), E, jnp.bfloat16, "pinned_host", seed=l,
                                      chunk_rows=8) for l in LAYERS},
        {l: _offsets(l) for l in LAYERS})

    def model_step(w, targets, rows):
      loss, grows = jax.value_and_grad(_loss, argnums=1)(
          w, {l: p.rows_UxE.astype(jnp.float32) for l, p in rows.items()},
          {l: p.inverse_BxTxH for l, p in rows.items()}, targets)
      return (loss, {l: p.rows_UxE for l, p in rows.items()}), grows, LR

    run = (trainer.make_threaded_step(model_step) if threaded
           else trainer.make_fused_step(model_step))
    handle, seen = trainer.prefetch(batches[0][0]), []
    for s, (_, targets) in enumerate(batches):
      nxt = batches[s + 1][0] if s + 1 < len(batches) else None
      (loss, rows), handle = run(handle, nxt, _head(), jnp.asarray(targets))
      seen.append((float(loss), {l: np.asarray(rows[l].astype(jnp.float32)) for l in LAYERS}))
    outs.append((seen, {l: _host_to_numpy(trainer.tables[l]).astype(np.float32)
                        for l in LAYERS}))
  (fused, fused_tables), (threaded, threaded_tables) = outs
  for (lf, rf), (lt, rt) in zip(fused, threaded):
    np.testing.assert_allclose(lt, lf, rtol=1e-6)
    for l in LAYERS:
      np.testing.assert_array_equal(rt[l], rf[l])
  for l in LAYERS:
    np.testing.assert_array_equal(threaded_tables[l], fused_tables[l])


def test_threaded_program_has_no_table_operand():
  """The device program takes rows only: no host-memory operand (S(5)) and no table-sized
  shape; tables are touched by NumPy on the host, never by XLA."""
  batches = _batches(3, seed=4)
  trainer = offload.HostTableTrainer(CFG, _tables("pinned_host"), {l: _offsets(l) for l in LAYERS})

  run = trainer.make_threaded_step(_loss_step)
  w, targets = _head(), jnp.asarray(batches[0][1])
  _, handle = run(trainer.prefetch(batches[0][0]), batches[1][0], w, targets)
  text = run.compiled_text(handle, batches[2][0], w, targets)
  assert ":S(5)" not in text.splitlines()[0]
  for l in LAYERS:
    assert f"f32[{_rows(l)},{E}]" not in text
  trainer.flush()


def test_threaded_step_refuses_mixing_and_device_tables():
  batches = _batches(3, seed=5)
  step = _zero_grads_step
  with pytest.raises(ValueError, match="every table must be in pinned_host"):
    offload.HostTableTrainer(CFG, _tables("device"),
                             {l: _offsets(l) for l in LAYERS}).make_threaded_step(step)
  trainer = offload.HostTableTrainer(CFG, _tables("pinned_host"), {l: _offsets(l) for l in LAYERS})
  run = trainer.make_threaded_step(step)
  _, nxt = run(trainer.prefetch(batches[0][0]), batches[1][0], None, ())
  with pytest.raises(ValueError, match="handle returned by a threaded step is outstanding"):
    trainer.prefetch(batches[2][0])
  with pytest.raises(ValueError, match="handle returned by a threaded step is outstanding"):
    trainer.apply_grad(nxt, {l: jnp.zeros((B * T * H, E)) for l in LAYERS}, LR)
  fused = trainer.make_fused_step(step)
  with pytest.raises(ValueError, match="handle returned by a threaded step is outstanding"):
    fused(nxt, None, None, ())
  out, last = run(nxt, None, None, ())           # ends the chain
  assert last is None
  trainer.prefetch(batches[2][0])                # allowed again


def test_threaded_step_reraises_a_host_task_error():
  batches = _batches(2, seed=6)
  trainer = offload.HostTableTrainer(CFG, _tables("pinned_host"), {l: _offsets(l) for l in LAYERS})
  run = trainer.make_threaded_step(_zero_grads_step)
  handle = trainer.prefetch(batches[0][0])
  handle.host_ids = {l: (np.full_like(rid, 10**6), count)     # out of the tables' bounds
                     for l, (rid, count) in handle.host_ids.items()}
  run(handle, None, None, ())
  with pytest.raises(IndexError):
    trainer.flush()
  trainer.flush()                                # reported once


def test_host_view_aliases_the_pinned_host_buffer():
  t = offload.create_table(37, E, jnp.bfloat16, "pinned_host", seed=2, chunk_rows=8)
  view = offload.host_view(t)
  np.testing.assert_array_equal(view, _host_to_numpy(t))
  view[5] = 3.0                                  # seen by a later XLA program
  ids = jax.device_put(np.array([5, 6], np.int32), t.sharding)
  got = np.asarray(offload.fetch_rows(t, ids)).astype(np.float32)
  assert (got[0] == 3.0).all() and not (got[1] == 3.0).all()
  with pytest.raises(ValueError, match="needs a pinned_host array"):
    offload.host_view(offload.create_table(4, E, jnp.float32, "device"))


def test_host_worker_chunks_cover_every_row_once():
  w = offload._HostWorker(threads=3)
  for n in (0, 1, 4095, 4096 * 3 + 5, 100_000):
    chunks = w._chunks(n)
    assert chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(a == b_prev for (a, _), (_, b_prev) in zip(chunks[1:], chunks[:-1]))
    assert len(chunks) <= 3
  src = np.arange(50_000 * 2, dtype=np.float32).reshape(50_000, 2)
  ids = np.sort(np.random.default_rng(0).choice(50_000, 20_000, replace=False))
  out = np.zeros((20_000, 2), np.float32)
  w.gather(src, ids, out)
  np.testing.assert_array_equal(out, src[ids])
  dst = np.zeros_like(src)
  w.scatter(dst, ids, out)
  np.testing.assert_array_equal(dst[ids], src[ids])
  assert np.count_nonzero(dst[np.setdiff1d(np.arange(50_000), ids)]) == 0


def test_staging_slots_alternate_and_follow_the_shape():
  staging = offload._Staging()
  a = staging.take("k", (8, E), np.float32, None)
  b = staging.take("k", (8, E), np.float32, None)
  assert a is not b and staging.take("k", (8, E), np.float32, None) is a   # used in turn
  assert a.array.sharding.memory_kind == "pinned_host"
  a.view[:] = 2.0                       # the view is the buffer the DMA reads
  sent = a.send(offload.placement_sharding("device"))
  np.testing.assert_array_equal(np.asarray(sent), np.full((8, E), 2.0, np.float32))
  c = staging.take("k", (16, E), np.float32, None)                         # new shape: new slots
  assert c.array.shape == (16, E) and c is not a and c is not b


def test_xla_host_write_paths_refused_on_a_gpu_unless_allowed(monkeypatch):
  step = lambda state, inputs, rows: (None, {}, LR)  # noqa: E731
  import warnings
  gpu = type("Gpu", (), {"platform": "gpu"})()
  trainer = offload.HostTableTrainer(CFG, _tables("pinned_host"), {l: _offsets(l) for l in LAYERS})
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    trainer.make_fused_step(step)                  # CPU: allowed, no warning
  handle = trainer.prefetch(_batches(1)[0][0])
  monkeypatch.setattr(trainer, "_device", gpu)
  with pytest.raises(RuntimeError, match="allow_xla_host_writes=True"):
    trainer.make_fused_step(step)
  with pytest.raises(RuntimeError, match="make_threaded_step"):
    trainer.apply_grad(handle, {l: jnp.zeros_like(handle.leaves[l][0]) for l in LAYERS}, LR)
  hbm = offload.HostTableTrainer(CFG, _tables("device"), {l: _offsets(l) for l in LAYERS})
  monkeypatch.setattr(hbm, "_device", gpu)
  hbm.make_fused_step(step)                        # HBM tables: nothing to refuse
  allowed = offload.HostTableTrainer(CFG, _tables("pinned_host"), {l: _offsets(l) for l in LAYERS},
                                     allow_xla_host_writes=True)
  monkeypatch.setattr(allowed, "_device", gpu)
  with pytest.warns(RuntimeWarning, match="make_threaded_step"):
    allowed.make_fused_step(step)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    allowed.make_fused_step(step)                  # warned once per trainer


def test_threaded_step_reraises_a_failed_gather_once():
  batches = _batches(3, seed=7)
  trainer = offload.HostTableTrainer(CFG, _tables("pinned_host"), {l: _offsets(l) for l in LAYERS})
  run = trainer.make_threaded_step(_zero_grads_step)
  _, nxt = run(trainer.prefetch(batches[0][0]), batches[1][0], None, ())
  trainer.flush()
  _, bad = run(nxt, batches[2][0], None, ())
  bad.leaves.result()                     # that gather was fine; stand in a failed one
  bad.leaves = trainer._worker.submit(lambda: (_ for _ in ()).throw(IndexError("gather")))
  with pytest.raises(IndexError, match="gather"):
    run(bad, None, None, ())
  trainer.flush()                         # already raised by run: not again


def test_threaded_step_with_other_threads_replaces_the_worker():
  trainer = offload.HostTableTrainer(CFG, _tables("pinned_host"), {l: _offsets(l) for l in LAYERS})
  step = _zero_grads_step
  trainer.make_threaded_step(step, threads=2)
  first = trainer._worker
  trainer.make_threaded_step(step)              # threads=None keeps the worker
  trainer.make_threaded_step(step, threads=2)   # so do the same threads
  assert trainer._worker is first
  trainer.make_threaded_step(step, threads=3)
  assert trainer._worker.threads == 3 and trainer._worker is not first
  with pytest.raises(RuntimeError):             # the old worker's threads were stopped
    first.submit(lambda: None)


# ---- direct reads of pinned_host tables by the GPU ---------------------------------------------

def _direct_case(rows, width, dtype, n):
  table = offload.create_table(rows, width, dtype, "pinned_host", seed=3)
  ids = jax.random.randint(jax.random.key(n), (n,), -5, rows + 5, dtype=jnp.int32)
  want = np.asarray(jax.device_put(table, offload.placement_sharding("device")))[
      np.clip(np.asarray(ids), 0, rows - 1)]
  return table, ids, want


@pytest.mark.parametrize("sort", [False, True])
@pytest.mark.parametrize("width,dtype", [(64, jnp.float32), (80, jnp.bfloat16)])
def test_direct_rows_interpreted_equal_numpy_and_clamp(width, dtype, sort):
  table, ids, want = _direct_case(300, width, dtype, 37)   # 37: not a multiple of a block
  got = jax.jit(lambda t, i: offload.direct_rows(t, i, interpret=True, sort=sort))(table, ids)
  assert offload.placement_of(got) == "device"
  np.testing.assert_array_equal(np.asarray(got), want)


def test_direct_rows_refuses_device_tables_and_non_gpu_platforms():
  table = offload.create_table(16, 8, jnp.float32, "device")
  with pytest.raises(ValueError, match="pinned_host"):
    offload.direct_rows(table, jnp.zeros((4,), jnp.int32), interpret=True)
  if jax.default_backend() != "gpu":
    host = offload.create_table(16, 8, jnp.float32, "pinned_host")
    with pytest.raises(ValueError, match="interpret=True"):
      offload.direct_rows(host, jnp.zeros((4,), jnp.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("width,dtype", [(64, jnp.float32), (64, jnp.bfloat16),
                                         (80, jnp.bfloat16)])
def test_direct_rows_on_gpu_read_the_host_table(width, dtype):
  """The GPU kernel reads the pinned_host table in place (UVA): same rows as NumPy."""
  table, ids, want = _direct_case(1 << 20, width, dtype, 5000)
  for sort in (False, True):
    got = jax.jit(functools.partial(offload.direct_rows, sort=sort))(table, ids)
    np.testing.assert_array_equal(np.asarray(got), want)
  text = jax.jit(offload.direct_rows).lower(table, ids).compile().as_text()
  assert ":S(5)" in text.splitlines()[0]
