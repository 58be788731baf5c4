"""Engram tables in host memory: placement, the host-table step equal to HBM, checkpoints, reads.

The model here is our own tiny stand-in (not EngramLM): per layer, rows of a table are expanded
with `expand_rows` and a linear head maps the concatenation to vocabulary logits. It is enough
to exercise everything host tables do: the forward reads prefetched rows, the gradient w.r.t.
the rows is the row-sparse table gradient, and the lazy-Adam update changes table and state.

Dimension legend: B batch, T time, H heads, E row width, R rows, V vocab, U = B*T*H.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engram_jax import host_checkpoint, host_memory, table_optim
from engram_jax.host_rows import HostRowWorker, _Staging
from engram_jax.host_tables import HostTables, row_block, unique_rows_numpy
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
  """A model_step: the loss and the row gradients, LR."""
  loss, grows = jax.value_and_grad(_loss, argnums=1)(
      w, {l: p.rows_UxE for l, p in rows.items()},
      {l: p.inverse_BxTxH for l, p in rows.items()}, targets)
  return loss, grows, LR


def _zero_grads_step(state, inputs, rows):
  """A model_step that changes nothing: zero row gradients (for the step's bookkeeping)."""
  return None, {l: jnp.zeros_like(r.rows_UxE) for l, r in rows.items()}, LR


def _ones_grads_step(state, inputs, rows):
  """A model_step whose row gradients are all ones (moves every touched row and moment)."""
  return None, {l: jnp.ones(r.rows_UxE.shape, jnp.float32) for l, r in rows.items()}, LR
_sgd = jax.jit(lambda w, g: w - 0.1 * g)


def _head():
  return jax.random.normal(jax.random.key(1), (len(LAYERS) * H * E, V)) * 0.3


def _tables(placement="pinned_host", dtype=jnp.float32):
  return {l: host_memory.create_table(_rows(l), E, dtype, placement, seed=l, chunk_rows=8)
          for l in LAYERS}


def _host_tables(cfg=CFG, dtype=jnp.float32):
  return HostTables(cfg, _tables(dtype=dtype), {l: _offsets(l) for l in LAYERS})


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


def _step_run(batches):
  """The host-table step over `batches`: the host gather of step s+1 and the write of step
  s-1 run on NumPy threads beside step s's program."""
  trainer = _host_tables()
  dev = host_memory.placement_sharding("device")

  def model_step(w, targets, rows):
    loss, (gw, grows) = jax.value_and_grad(_loss, argnums=(0, 1))(
        w, {l: p.rows_UxE for l, p in rows.items()},
        {l: p.inverse_BxTxH for l, p in rows.items()}, targets)
    return (w - 0.1 * gw, loss, {l: p.rows_UxE for l, p in rows.items()}), grows, LR

  run = trainer.make_step(model_step, threads=3)
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


def _host_to_numpy(x):
  return np.asarray(jax.device_put(x, host_memory.placement_sharding("device")))


def test_pinned_host_is_available():
  kinds = {m.kind for m in jax.devices()[0].addressable_memories()}
  assert "pinned_host" in kinds


def test_create_table_same_values_in_both_placements_and_lands_on_host():
  host = host_memory.create_table(50, E, jnp.float32, "pinned_host", seed=3, chunk_rows=16)
  dev = host_memory.create_table(50, E, jnp.float32, "device", seed=3, chunk_rows=16)
  assert host.sharding.memory_kind == "pinned_host"
  assert dev.sharding.memory_kind == "device"
  h = _host_to_numpy(host)
  np.testing.assert_array_equal(h, np.asarray(dev))
  assert np.all(h != 0)                      # every chunk (also the clipped last one) written
  assert 0.7 < h.std() < 1.3


def test_host_steps_equal_the_hbm_placement():
  batches = _batches(5, seed=3)
  ref_losses, ref_tables, ref_states, ref_rows = _reference_run(batches)
  losses, trainer, rows, run = _step_run(batches)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  for s in range(len(batches)):        # step s+1's rows were gathered before s's write: patched
    for l in LAYERS:
      np.testing.assert_allclose(rows[s][l], ref_rows[s][l], rtol=1e-6, atol=1e-7)
  for l in LAYERS:
    assert trainer.tables[l].sharding.memory_kind == "pinned_host"
    for leaf in jax.tree.leaves(trainer.states[l]):
      assert leaf.sharding.memory_kind == "pinned_host"
    np.testing.assert_allclose(_host_to_numpy(trainer.tables[l]), np.asarray(ref_tables[l]),
                               rtol=1e-6, atol=1e-7)
    # The row gradient is computed in the same XLA program as the update, so fusion may order
    # its f32 sums differently than the reference's two programs.
    for name, rtol in (("mu_RxE", 1e-5), ("nu_RxE", 1e-6)):
      np.testing.assert_allclose(_host_to_numpy(getattr(trainer.states[l], name)),
                                 np.asarray(getattr(ref_states[l], name)), rtol=rtol, atol=1e-12)
    np.testing.assert_array_equal(_host_to_numpy(trainer.states[l].count_R),
                                  np.asarray(ref_states[l].count_R))
    # The update really moved rows, so equality above is not vacuous.
    assert np.abs(_host_to_numpy(trainer.tables[l]) - _host_to_numpy(_tables()[l])).max() > 1e-3
  # First step (rows from prefetch, nothing to patch), then steps patching the previous update.
  assert set(run.programs) == {(False, False), (True, False)}


def test_prefetched_rows_are_the_batch_rows():
  """The rows and row ids of a handle: sorted unique global rows padded with R, the inverse
  index of every lookup, and the table's rows (after every step written)."""
  batches = _batches(4, seed=1)
  _, _, _, ref_rows = _reference_run(batches)
  _, trainer, _, _ = _step_run(batches[:3])
  ids = batches[3][0]
  handle = trainer.prefetch(ids)
  rows = trainer.rows(handle)
  for l in LAYERS:
    want_U, want_inv = unique_rows(jnp.asarray(ids[l]), jnp.asarray(_offsets(l), jnp.int32),
                                   _rows(l))
    np.testing.assert_array_equal(np.asarray(handle.row_ids[l]), np.asarray(want_U))
    np.testing.assert_array_equal(np.asarray(handle.inverse[l]), np.asarray(want_inv))
    np.testing.assert_allclose(np.asarray(rows[l].rows_UxE), ref_rows[3][l], rtol=1e-6,
                               atol=1e-7)


def test_without_patching_the_step_would_read_stale_rows():
  """Guards the coherence test: consecutive batches share rows that step s updates."""
  batches = _batches(2, seed=1)
  for l in LAYERS:
    a = set(unique_rows_numpy(batches[0][0][l], _offsets(l), _rows(l))[0].tolist())
    b = set(unique_rows_numpy(batches[1][0][l], _offsets(l), _rows(l))[0].tolist())
    assert len((a & b) - {_rows(l)}) > 0


def test_host_tables_refuse_device_tables():
  with pytest.raises(ValueError, match="every table must be in pinned_host"):
    HostTables(CFG, _tables("device"), {l: _offsets(l) for l in LAYERS})
  with pytest.raises(ValueError, match="optimiser state in device"):
    HostTables(CFG, _tables(), {l: _offsets(l) for l in LAYERS},
               {l: table_optim.init_table_state(CFG, t) for l, t in _tables("device").items()})


def test_the_gather_moves_no_whole_table_between_memories():
  """`prefetch`'s compiled gather: table-sized operands live in host memory (S(5)) and no
  instruction copies a table-sized value."""
  batches = _batches(2)
  _, trainer, _, _ = _step_run(batches)
  text = trainer.compiled_gather_text(batches[0][0])
  header = text.splitlines()[0]
  layout = header[header.index("entry_computation_layout="):]
  for l in LAYERS:
    for shape in (f"f32[{_rows(l)},{E}]", f"s32[{_rows(l)}]"):
      in_layout = re.findall(re.escape(shape) + r"\{[^}]*\}", layout)
      assert in_layout, f"table shape {shape} not in the entry layout (vacuous)"
      assert all(":S(5)" in h for h in in_layout), f"{shape} in device memory"
      copies = [line for line in text.splitlines()
                if re.search(r"= " + re.escape(shape) + r"\{[^}]*\} (copy|copy-start|copy-done)\(",
                             line)]
      assert not copies, f"table-sized copy {copies}"


def test_too_large_request_fails_before_allocating():
  avail = host_memory.mem_available_bytes()
  rows = int(2 * avail // (E * 4)) + 1
  with pytest.raises(ValueError, match="pinned host memory"):
    host_memory.create_table(rows, E, jnp.float32, "pinned_host")
  class FakeCpu:  # on a GPU the pinned pool cap (64 GiB by default) is met first
    platform = "cpu"
  with pytest.raises(ValueError, match="MemAvailable"):
    host_memory.check_host_allocation(2 * avail, what="test", device=FakeCpu())
  host_memory.check_host_allocation(1 << 20)     # a small request passes


def test_gpu_pool_cap_is_enforced(monkeypatch):
  class FakeGpu:
    platform = "gpu"
  monkeypatch.setenv("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "1")
  with pytest.raises(ValueError, match="XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"):
    host_memory.check_host_allocation(2 * 2**30, device=FakeGpu())


def test_a_handle_is_applied_once():
  batches = _batches(1)
  trainer = _host_tables()
  run = trainer.make_step(_zero_grads_step)
  h = trainer.prefetch(batches[0][0])
  run(h, None, None, ())
  with pytest.raises(ValueError, match="not be applied yet"):
    run(h, None, None, ())


@pytest.mark.parametrize("moment_dtype", ["float32", "bfloat16"])
def test_checkpoint_round_trip_of_host_tables(tmp_path, moment_dtype):
  cfg = table_optim.TableOptimizerConfig(moment_dtype=moment_dtype)
  batches = _batches(3, seed=4)
  trainer = _host_tables(cfg)
  run = trainer.make_step(_ones_grads_step)
  handle = trainer.prefetch(batches[0][0])
  for s in range(len(batches)):
    _, handle = run(handle, batches[s + 1][0] if s + 1 < len(batches) else None, None, ())
  # 40-byte chunks: several chunks per table and a clipped last one.
  host_checkpoint.save_host_tables(str(tmp_path), 3, trainer, chunk_bytes=40)
  back = host_checkpoint.restore_host_tables(str(tmp_path), 3, cfg,
                                        {l: _offsets(l) for l in LAYERS}, chunk_bytes=40)
  for l in LAYERS:
    assert back.tables[l].sharding.memory_kind == "pinned_host"
    for a, b in zip(jax.tree.leaves((trainer.tables[l], trainer.states[l])),
                    jax.tree.leaves((back.tables[l], back.states[l]))):
      assert a.dtype == b.dtype and b.sharding.memory_kind == "pinned_host"
      np.testing.assert_array_equal(_host_to_numpy(a).astype(np.float32),
                                    _host_to_numpy(b).astype(np.float32))
    assert np.abs(_host_to_numpy(back.states[l].mu_RxE).astype(np.float32)).max() > 0


def test_host_table_blocks_restore_into_any_number_of_processes(tmp_path):
  """Three processes' blocks (written as a 3-process job writes them) restore into one process
  (the whole tables) and into either process of a 2-process job (its rows only)."""
  full = {l: _host_to_numpy(t) for l, t in _tables().items()}
  offsets = {l: _offsets(l) for l in LAYERS}
  pinned = host_memory.placement_sharding("pinned_host")
  for p in range(3):
    blocks, states = {}, {}
    for l in LAYERS:
      a, b = row_block(_rows(l), p, 3)
      blocks[l] = jax.device_put(full[l][a:b], pinned)
      states[l] = host_memory.init_state(CFG, blocks[l])._replace(
          mu_RxE=jax.device_put(2 * full[l][a:b], pinned))
    host = HostTables(CFG, blocks, offsets, states, num_rows={l: _rows(l) for l in LAYERS},
                      process=(p, 3))
    checkpoint_dir = host_checkpoint.save_host_tables(str(tmp_path), 7, host, chunk_bytes=40)
    assert checkpoint_dir.endswith(f"block_{p}")
    assert host_checkpoint.has_host_tables(str(tmp_path), 7) == (p == 2)  # complete at the last
  for index, count in [(0, 1), (0, 2), (1, 2)]:
    back = host_checkpoint.restore_host_tables(str(tmp_path), 7, CFG, offsets,
                                               process=(index, count), chunk_bytes=40)
    for l in LAYERS:
      a, b = row_block(_rows(l), index, count)
      assert back.blocks[l] == (a, b) and back.num_rows(l) == _rows(l)
      assert back.tables[l].sharding.memory_kind == "pinned_host"
      np.testing.assert_array_equal(_host_to_numpy(back.tables[l]), full[l][a:b])
      np.testing.assert_array_equal(_host_to_numpy(back.states[l].mu_RxE), 2 * full[l][a:b])
  whole = host_checkpoint.read_host_tables(str(tmp_path), 7)
  for l in LAYERS:
    np.testing.assert_array_equal(whole[f"layer{l}.table"], full[l])
  # A block of the wrong rows, or a job with more processes than rows, is refused.
  with pytest.raises(ValueError, match=r"keeps rows \[0, 12\) of 23"):
    HostTables(CFG, {0: jax.device_put(full[0], pinned)}, {0: _offsets(0)},
               num_rows={0: 23}, process=(0, 2))
  with pytest.raises(ValueError, match="cannot give each of 3 processes"):
    row_block(2, 2, 3)


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
  tables = {l: host_memory.create_table(mapping.num_rows(l), E, jnp.float32, placement, seed=l)
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
    tables = {l: host_memory.create_table(mapping.num_rows(l), E, jnp.float32, placement, seed=l)
              for l in mapping.layer_ids}
    prompt = np.random.default_rng(7).integers(0, GEN_V, (2, 3)).astype(np.int32)
    outs.append(Generator(logits_fn, tables, mapping, compression)(prompt, 5, temperature=1.0,
                                                                   seed=3))
  np.testing.assert_array_equal(outs[0], outs[1])


def test_a_step_refuses_a_second_outstanding_handle():
  batches = _batches(2, seed=5)
  trainer = _host_tables()
  run = trainer.make_step(_zero_grads_step)
  h0 = trainer.prefetch(batches[0][0])
  trainer.prefetch(batches[1][0])
  with pytest.raises(ValueError, match="another prefetched handle"):
    run(h0, None, (), ())


def test_programs_close_over_no_device_arrays():
  """As the generators' check (tests/test_generate.py): the gather and the step programs take
  every array as an argument (a closed-over device array is read back to the host at compile
  time, which a GPU refuses under transfer_guard)."""
  from tests.test_generate import _device_array_constants
  trainer = _host_tables()
  batches = _batches(3, seed=9)
  run = trainer.make_step(_loss_step)
  w, targets = _head(), jnp.asarray(batches[0][1])
  box = []

  def go():
    _, nxt = run(trainer.prefetch(batches[0][0]), batches[1][0], w, targets)
    box.append(nxt)
  assert _device_array_constants(trainer, ["_gather"], go) == {"_gather": 0}
  for traced in (run.trace(box[0], batches[2][0], w, targets),            # patches s-1's rows
                 run.trace(box[0], None, w, targets, step=1)):
    assert sum(isinstance(c, jax.Array) for c in traced.jaxpr.consts) == 0
  run(box[0], None, w, targets)
  trainer.flush()


# ---- the step: NumPy gathers / scatters on worker threads beside one device program ------------

def test_bfloat16_tables_a_step_reads_the_rows_as_stored():
  """bf16 tables: the patch stores updated rows rounded as the host arrays store them, so the
  rows step s+1 reads equal the host tables' rows after step s's write, bit for bit."""
  batches = _batches(4, seed=8)
  trainer = _host_tables(dtype=jnp.bfloat16)

  def model_step(w, targets, rows):
    loss, grows = jax.value_and_grad(_loss, argnums=1)(
        w, {l: p.rows_UxE.astype(jnp.float32) for l, p in rows.items()},
        {l: p.inverse_BxTxH for l, p in rows.items()}, targets)
    return (loss, {l: p.rows_UxE for l, p in rows.items()}), grows, LR

  run = trainer.make_step(model_step)
  handle, stored, patched = trainer.prefetch(batches[0][0]), 0, 0
  for s, (_, targets) in enumerate(batches):
    nxt = batches[s + 1][0] if s + 1 < len(batches) else None
    want = None
    if s:   # the tables after step s-1 (flushed: its write is done), at this step's rows
      want = {l: _host_to_numpy(trainer.tables[l])[handle.host_ids[l][0][:handle.host_ids[l][1]]]
              for l in LAYERS}
    ids = handle.host_ids
    (loss, rows), handle = run(handle, nxt, _head(), jnp.asarray(targets))
    assert np.isfinite(float(loss))
    if want is not None:
      for l in LAYERS:
        got = np.asarray(rows[l])
        count = ids[l][1]
        np.testing.assert_array_equal(got[:count], want[l])
        assert not got[count:].astype(np.float32).any()          # padding slots masked
        stored += count
        patched += int(np.isin(ids[l][0][:count], prev_ids[l][0][:prev_ids[l][1]]).sum())
    prev_ids = ids
  assert patched > 0 and stored > patched       # some rows came from the patch, some not


def test_step_program_has_no_table_operand():
  """The device program takes rows only: no host-memory operand (S(5)) and no table-sized
  shape; tables are touched by NumPy on the host, never by XLA."""
  batches = _batches(3, seed=4)
  trainer = _host_tables()

  run = trainer.make_step(_loss_step)
  w, targets = _head(), jnp.asarray(batches[0][1])
  _, handle = run(trainer.prefetch(batches[0][0]), batches[1][0], w, targets)
  text = run.trace(handle, batches[2][0], w, targets).lower().compile().as_text()
  assert ":S(5)" not in text.splitlines()[0]
  for l in LAYERS:
    assert f"f32[{_rows(l)},{E}]" not in text
  trainer.flush()


def test_prefetch_is_refused_while_a_step_handle_is_outstanding():
  batches = _batches(3, seed=5)
  trainer = _host_tables()
  run = trainer.make_step(_zero_grads_step)
  _, nxt = run(trainer.prefetch(batches[0][0]), batches[1][0], None, ())
  with pytest.raises(ValueError, match="handle returned by a host-table step is outstanding"):
    trainer.prefetch(batches[2][0])
  trainer.prefetch(batches[2][0], for_update=False)   # evaluation reads are allowed
  out, last = run(nxt, None, None, ())           # ends the chain
  assert last is None
  trainer.prefetch(batches[2][0])                # allowed again


def test_step_reraises_a_host_task_error():
  batches = _batches(2, seed=6)
  trainer = _host_tables()
  run = trainer.make_step(_zero_grads_step)
  handle = trainer.prefetch(batches[0][0])
  handle.host_ids = {l: (np.full_like(rid, 10**6), count)     # out of the tables' bounds
                     for l, (rid, count) in handle.host_ids.items()}
  run(handle, None, None, ())
  with pytest.raises(IndexError):
    trainer.flush()
  trainer.flush()                                # reported once


def test_host_view_aliases_the_pinned_host_buffer():
  t = host_memory.create_table(37, E, jnp.bfloat16, "pinned_host", seed=2, chunk_rows=8)
  view = host_memory.host_view(t)
  np.testing.assert_array_equal(view, _host_to_numpy(t))
  view[5] = 3.0                                  # seen by a later XLA program
  ids = jax.device_put(np.array([5, 6], np.int32), t.sharding)
  got = np.asarray(host_memory.fetch_rows(t, ids)).astype(np.float32)
  assert (got[0] == 3.0).all() and not (got[1] == 3.0).all()
  with pytest.raises(ValueError, match="needs a pinned_host array"):
    host_memory.host_view(host_memory.create_table(4, E, jnp.float32, "device"))


def test_host_worker_chunks_cover_every_row_once():
  w = HostRowWorker(threads=3)
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
  staging = _Staging()
  a = staging.take("k", (8, E), np.float32, None)
  b = staging.take("k", (8, E), np.float32, None)
  assert a is not b and staging.take("k", (8, E), np.float32, None) is a   # used in turn
  assert a.array.sharding.memory_kind == "pinned_host"
  a.view[:] = 2.0                       # the view is the buffer the DMA reads
  sent = a.send(host_memory.placement_sharding("device"))
  np.testing.assert_array_equal(np.asarray(sent), np.full((8, E), 2.0, np.float32))
  c = staging.take("k", (16, E), np.float32, None)                         # new shape: new slots
  assert c.array.shape == (16, E) and c is not a and c is not b


def test_step_reraises_a_failed_gather_once():
  batches = _batches(3, seed=7)
  trainer = _host_tables()
  run = trainer.make_step(_zero_grads_step)
  _, nxt = run(trainer.prefetch(batches[0][0]), batches[1][0], None, ())
  trainer.flush()
  _, bad = run(nxt, batches[2][0], None, ())
  bad.leaves.result()                     # that gather was fine; stand in a failed one
  bad.leaves = trainer._worker.submit(lambda: (_ for _ in ()).throw(IndexError("gather")))
  with pytest.raises(IndexError, match="gather"):
    run(bad, None, None, ())
  trainer.flush()                         # already raised by run: not again


def test_step_with_other_threads_replaces_the_worker():
  trainer = _host_tables()
  step = _zero_grads_step
  trainer.make_step(step, threads=2)
  first = trainer._worker
  trainer.make_step(step)              # threads=None keeps the worker
  trainer.make_step(step, threads=2)   # so do the same threads
  assert trainer._worker is first
  trainer.make_step(step, threads=3)
  assert trainer._worker.threads == 3 and trainer._worker is not first
  with pytest.raises(RuntimeError):             # the old worker's threads were stopped
    first.submit(lambda: None)


# ---- direct reads of pinned_host tables by the GPU ---------------------------------------------

def _direct_case(rows, width, dtype, n):
  table = host_memory.create_table(rows, width, dtype, "pinned_host", seed=3)
  ids = jax.random.randint(jax.random.key(n), (n,), -5, rows + 5, dtype=jnp.int32)
  want = np.asarray(jax.device_put(table, host_memory.placement_sharding("device")))[
      np.clip(np.asarray(ids), 0, rows - 1)]
  return table, ids, want


@pytest.mark.parametrize("sort", [False, True])
@pytest.mark.parametrize("width,dtype", [(64, jnp.float32), (80, jnp.bfloat16)])
def test_direct_rows_interpreted_equal_numpy_and_clamp(width, dtype, sort):
  table, ids, want = _direct_case(300, width, dtype, 37)   # 37: not a multiple of a block
  got = jax.jit(lambda t, i: host_memory.direct_rows(t, i, interpret=True, sort=sort))(table, ids)
  assert host_memory.placement_of(got) == "device"
  np.testing.assert_array_equal(np.asarray(got), want)


def test_direct_rows_refuses_device_tables_and_non_gpu_platforms():
  table = host_memory.create_table(16, 8, jnp.float32, "device")
  with pytest.raises(ValueError, match="pinned_host"):
    host_memory.direct_rows(table, jnp.zeros((4,), jnp.int32), interpret=True)
  if jax.default_backend() != "gpu":
    host = host_memory.create_table(16, 8, jnp.float32, "pinned_host")
    with pytest.raises(ValueError, match="interpret=True"):
      host_memory.direct_rows(host, jnp.zeros((4,), jnp.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("width,dtype", [(64, jnp.float32), (64, jnp.bfloat16),
                                         (80, jnp.bfloat16)])
def test_direct_rows_on_gpu_read_the_host_table(width, dtype):
  """The GPU kernel reads the pinned_host table in place (UVA): same rows as NumPy."""
  table, ids, want = _direct_case(1 << 20, width, dtype, 5000)
  for sort in (False, True):
    got = jax.jit(functools.partial(host_memory.direct_rows, sort=sort))(table, ids)
    np.testing.assert_array_equal(np.asarray(got), want)
  text = jax.jit(host_memory.direct_rows).lower(table, ids).compile().as_text()
  assert ":S(5)" in text.splitlines()[0]
