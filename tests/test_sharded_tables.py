"""Row-sharded tables on 8 fake CPU devices: the sharded lookup reads exactly the single-device
rows, its row gradients and table updates equal the single-device ones, every device holds 1/n
of the rows, no compiled step moves a table-sized array between devices, and rows beyond the
request capacity are counted and refused, never dropped silently.

Dimension legend: B batch, T time, H heads, E row width, R table rows, U unique-row slots.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from engram_jax import sharded_tables as st
from engram_jax import sharding, table_optim
from pallas_kernels.engram_lookup import row_sparse
from tests.kernel_test_base import GRAD_TOLERANCE

# R = 1001 rows in 4 heads; on 8 shards L = 126 rows per shard, 1008 stored rows: none of these
# equals another dimension of the step (B*T*H = 192 lookups, 24 per shard, E = 8).
HEADS = (251, 250, 250, 250)
R, E, B, T = sum(HEADS), 8, 8, 6
OFFSETS = jnp.asarray(np.concatenate([[0], np.cumsum(HEADS)[:-1]]), jnp.int32)
BATCH_AXES = ("data", "fsdp", "expert")

MESHES = {
    "fsdp8": ({"fsdp": 8}, ()),
    # 'tensor' splits rows but not the batch: its two members request the same rows.
    "data2_fsdp2_tensor2": ({"data": 2, "fsdp": 2, "tensor": 2}, ()),
    # Rows over 'fsdp' only: each 'tensor' member holds a whole copy of the sharded table.
    "fsdp4_rows_tensor2_copies": ({"fsdp": 4, "tensor": 2}, ("fsdp",)),
}


def _ids(seed, skew=False):
  high = 40 if skew else min(HEADS)  # skew: every row lives on the first owner(s)
  ids = jax.random.randint(jax.random.key(seed), (B, T, len(HEADS)), 0, high)
  return ids.at[0, 0].set(jnp.asarray(HEADS) - 1)  # the last row of every head


def _table(dtype):
  return jax.random.normal(jax.random.key(1), (R, E), jnp.float32).astype(dtype)


def _sharding(name, capacity_factor=0.0):
  axes, row_axes = MESHES[name]
  mesh = sharding.make_mesh(axes)
  return st.TableSharding(mesh, R, row_axes=row_axes, batch_axes=BATCH_AXES,
                          capacity_factor=capacity_factor)


def _cotangent(seed):
  return jax.random.normal(jax.random.key(100 + seed), (B, T, len(HEADS) * E))


def _sharded_step(ts, cfg):
  def step(table, state, ids, cot, lr):
    pre = st.prefetch(ts, table, ids, OFFSETS)
    e = st.expand(ts, pre.rows_UxE, pre)
    grad = jax.grad(lambda r: jnp.vdot(st.expand(ts, r, pre).astype(jnp.float32), cot))(
        pre.rows_UxE)
    owned = st.to_owners(ts, pre, grad)
    table, state = st.apply_update(ts, cfg, table, state, owned, lr)
    return e, table, state, owned, pre.overflow
  return jax.jit(step)


@jax.jit
def _single_step_rows(table, ids, cot):
  pre = row_sparse.prefetch_rows(table, ids, OFFSETS)
  e = row_sparse.expand_rows(pre.rows_UxE, pre.inverse_BxTxH, plan=pre.plan)
  grad = jax.grad(lambda r: jnp.vdot(row_sparse.expand_rows(
      r, pre.inverse_BxTxH, plan=pre.plan).astype(jnp.float32), cot))(pre.rows_UxE)
  return e, row_sparse.row_sparse_grad(pre, grad)


def _place(ts, table, state, ids):
  rows = ts.table_sharding()
  table = jax.device_put(st.pad_table(table, ts), rows)
  state = jax.tree.map(lambda x: jax.device_put(st.pad_table(x, ts), rows), state)
  return table, state, jax.device_put(ids, NamedSharding(ts.mesh, P(ts.batch_axes)))


def _owned_dense(ts, owned):
  """The owner-local RowSparse of every shard as one dense [R, E] gradient."""
  n, per = ts.num_shards, ts.rows_per_shard
  rows = np.asarray(owned.rows_U).reshape(n, -1)
  vals = np.asarray(owned.values_UxE).reshape(n, rows.shape[1], -1)
  dense = np.zeros((ts.padded_rows, vals.shape[-1]), np.float32)
  for s in range(n):
    keep = rows[s] < per
    assert len(set(rows[s][keep])) == keep.sum(), "an owner's rows must be unique"
    dense[s * per + rows[s][keep]] += vals[s][keep]
  return dense


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_lookup_and_update_equal_one_device(name):
  ts = _sharding(name)
  cfg = table_optim.TableOptimizerConfig()
  table = _table(jnp.float32)
  state = table_optim.init_table_state(cfg, table)
  s_table, s_state, _ = _place(ts, table, state, _ids(0))
  step = _sharded_step(ts, cfg)
  for seed in range(2):  # the second step reads rows the first one updated
    ids, cot = _ids(seed), _cotangent(seed)
    s_table_before = np.asarray(s_table)
    e, s_table, s_state, owned, overflow = step(
        s_table, s_state, jax.device_put(ids, NamedSharding(ts.mesh, P(ts.batch_axes))), cot,
        1e-2)
    # Rows read from the sharded table are bit-identical to one device reading that table;
    # the tables themselves agree to float tolerance (sums in another order).
    want_e, _ = _single_step_rows(jnp.asarray(np.asarray(s_table_before)[:R]), ids, cot)
    np.testing.assert_array_equal(np.asarray(e), np.asarray(want_e))
    _, grad = _single_step_rows(table, ids, cot)
    table, state = table_optim.apply_row_sparse_update(cfg, table, state, grad, 1e-2)
    assert int(overflow) == 0
    got_grad = _owned_dense(ts, owned)
    np.testing.assert_allclose(got_grad[:R], np.asarray(row_sparse.densify(grad, R)),
                               rtol=1e-5, atol=1e-6)
    assert not got_grad[R:].any()
    np.testing.assert_allclose(np.asarray(s_table)[:R], np.asarray(table), rtol=1e-5,
                               atol=1e-6)
    for got, want in zip(jax.tree.leaves(s_state), jax.tree.leaves(state)):
      np.testing.assert_allclose(np.asarray(got)[:R], np.asarray(want), rtol=1e-5, atol=1e-7)
    # Rows past R (padding) are never written.
    assert not np.asarray(s_table)[R:].any()
    assert not any(np.asarray(x)[R:].any() for x in jax.tree.leaves(s_state))


@pytest.mark.parametrize("kind,dtype", [("adagrad", jnp.float32),
                                        ("lazy_adam", jnp.bfloat16)])
def test_sharded_update_other_kinds_and_dtypes(kind, dtype):
  ts = _sharding("data2_fsdp2_tensor2")
  cfg = table_optim.TableOptimizerConfig(kind=kind)
  table = _table(dtype)
  state = table_optim.init_table_state(cfg, table)
  ids, cot = _ids(3), _cotangent(3)
  s_table, s_state, s_ids = _place(ts, table, state, ids)
  e, s_table, s_state, _, _ = _sharded_step(ts, cfg)(s_table, s_state, s_ids, cot, 1e-2)
  want_e, grad = _single_step_rows(table, ids, cot)
  table, state = table_optim.apply_row_sparse_update(cfg, table, state, grad, 1e-2)
  np.testing.assert_array_equal(np.asarray(e), np.asarray(want_e))
  tol = GRAD_TOLERANCE[jnp.dtype(dtype)]
  np.testing.assert_allclose(np.asarray(s_table.astype(jnp.float32))[:R],
                             np.asarray(table.astype(jnp.float32)), rtol=tol, atol=tol)
  for got, want in zip(jax.tree.leaves(s_state), jax.tree.leaves(state)):
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32))[:R],
                               np.asarray(want.astype(jnp.float32)), rtol=tol, atol=tol)


def test_each_device_holds_its_block_of_rows():
  ts = _sharding("data2_fsdp2_tensor2")
  cfg = table_optim.TableOptimizerConfig()
  table = _table(jnp.float32)
  s_table, s_state, _ = _place(ts, table, table_optim.init_table_state(cfg, table), _ids(0))
  assert ts.padded_rows == 1008 and ts.rows_per_shard == 126
  for leaf in [s_table] + jax.tree.leaves(s_state):
    shards = leaf.addressable_shards
    assert len(shards) == 8
    assert all(s.data.shape[0] == ts.rows_per_shard for s in shards)
    starts = sorted(s.index[0].start for s in shards)
    assert starts == [i * ts.rows_per_shard for i in range(8)]  # contiguous blocks
  # A block holds exactly those rows of the table.
  for s in s_table.addressable_shards:
    np.testing.assert_array_equal(np.asarray(s.data),
                                  np.asarray(st.pad_table(table, ts))[s.index[0]])


_COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute",
                "reduce-scatter")


def _collectives(hlo):
  """(opcode, shape) of every cross-device instruction of an HLO module's text."""
  out = []
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%\S+ = (.+?) ([\w-]+)(?:-start)?\(", line)
    if m and m.group(2).replace("-start", "") in _COLLECTIVES:
      out.append((m.group(2), m.group(1)))
  return out


def _table_sized(shape, ts, width):
  sizes = {ts.num_rows, ts.rows_per_shard, ts.padded_rows, ts.rows_per_shard * width,
           ts.padded_rows * width}
  return any(int(d) in sizes for dims in re.findall(r"\[([\d,]+)\]", shape)
             for d in dims.split(",") if d)


def test_no_compiled_step_moves_a_table_between_devices():
  ts = _sharding("data2_fsdp2_tensor2")
  cfg = table_optim.TableOptimizerConfig()
  table = _table(jnp.float32)
  s_table, s_state, s_ids = _place(ts, table, table_optim.init_table_state(cfg, table), _ids(0))
  hlo = _sharded_step(ts, cfg).lower(s_table, s_state, s_ids, _cotangent(0),
                                     1e-2).compile().as_text()
  found = _collectives(hlo)
  assert sum(op.startswith("all-to-all") for op, _ in found) == 3  # ids, rows, gradients
  assert [(op, shape) for op, shape in found if _table_sized(shape, ts, E)] == []
  # The check can fail: replicating the row-sharded table all-gathers it.
  gathered = jax.jit(lambda t: t + 1, out_shardings=NamedSharding(ts.mesh, P())).lower(
      s_table).compile().as_text()
  assert any(op.startswith("all-gather") and _table_sized(shape, ts, E)
             for op, shape in _collectives(gathered))


def test_overflow_is_counted_and_refused_never_silent():
  ids = _ids(5, skew=True)  # 40 distinct rows per head, each head's on one owner
  cfg = table_optim.TableOptimizerConfig()
  table = _table(jnp.float32)
  state = table_optim.init_table_state(cfg, table)
  want_e, _ = _single_step_rows(table, ids, _cotangent(5))
  # Worst-case buffers (the default) deliver every row of even this skewed batch.
  ts = _sharding("data2_fsdp2_tensor2")
  e, *_, overflow = _sharded_step(ts, cfg)(*_place(ts, table, state, ids), _cotangent(5), 0.0)
  assert int(overflow) == 0
  np.testing.assert_array_equal(np.asarray(e), np.asarray(want_e))
  st.check_overflow(overflow)  # no error
  # A capacity sized for uniform ids cannot: the exact number of undelivered rows (over the
  # four batch shards, not counted again by their 'tensor' copies) is reported.
  ts = _sharding("data2_fsdp2_tensor2", capacity_factor=1.0)
  capacity = ts.capacity(B // 4 * T * len(HEADS))
  assert capacity == 8
  e, *_, overflow = _sharded_step(ts, cfg)(*_place(ts, table, state, ids), _cotangent(5), 0.0)
  rows = np.clip(np.asarray(ids + OFFSETS), 0, R - 1)
  want = 0
  for shard in rows.reshape(4, -1):
    counts = np.bincount(np.unique(shard) // ts.rows_per_shard, minlength=8)
    want += np.maximum(counts - capacity, 0).sum()
  assert want > 0 and int(overflow) == want
  with pytest.raises(OverflowError, match=rf"{want} unique rows.*TableSharding\.capacity_factor"):
    st.check_overflow(overflow)


def test_sharding_validation_names_the_field():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  with pytest.raises(ValueError, match=r"batch is split over \['data'\].*row axes"):
    st.TableSharding(mesh, R, row_axes=("fsdp",), batch_axes=BATCH_AXES)
  with pytest.raises(ValueError, match="row_axes"):
    st.TableSharding(mesh, R, row_axes=("rows",))
  with pytest.raises(ValueError, match="capacity_factor"):
    st.TableSharding(mesh, R, capacity_factor=-1.0)
  ts = st.TableSharding(mesh, R, batch_axes=BATCH_AXES)
  with pytest.raises(ValueError, match=r"table must be \[1008, E\]"):
    st.prefetch(ts, _table(jnp.float32), _ids(0), OFFSETS)


def test_bench_counts_the_all_to_all_bytes_of_the_step():
  from benchmarks import bench_sharded_lookup
  from experiments.configs import tiny_test
  config = tiny_test.get_config()
  (r0, r1) = bench_sharded_lookup.measure(config, {"fsdp": 4, "tensor": 2}, [0.0, 2.0])
  width = config.engram.n_embed_per_ngram // config.engram.n_head_per_ngram
  for r in (r0, r1):
    # Per device: n*C request ids, n*C rows back (f32 tables) and n*C f32 row gradients.
    assert r["num_all_to_all"] == 3
    assert r["moved"] == 8 * r["capacity"] * (4 + 4 * width + 4 * width)
    assert r["overflow"] == 0 and 0 < r["unique"] <= r["slots"]
  assert r0["capacity"] == r0["slots"] and r1["capacity"] < r0["capacity"]
