"""Engram lookup: reference, interpret-mode kernels (CPU) and GPU kernels against one oracle.

Dimension legend: B batch, T time, H heads, E row width, R table rows.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from pallas_kernels.engram_lookup import engram_lookup, segment_sum
from pallas_kernels.engram_lookup.configs import (GpuLookupConfig, GpuSegmentSumConfig,
                                                  TpuLookupConfig)
from pallas_kernels.engram_lookup.gpu import column_chunks
from tests.kernel_test_base import (LookupTestBase, clamped_rows, overflow_case, random_case,
                                     reference_lookup)


class TestReference(LookupTestBase):
  lookup_kwargs = dict(implementation="xla")


class TestInterpretGpuKernel(LookupTestBase):
  """The Triton gather and the Triton segment-sum, interpreted on CPU (small blocks)."""
  lookup_kwargs = dict(implementation="pallas", interpret=True, pallas_backend="gpu",
                       backward="pallas", gpu_config=GpuLookupConfig(block_rows=16))
  widths = (64, 80)


class TestInterpretTpuKernel(LookupTestBase):
  """The DMA gather, interpreted; 3 calls per lookup exercise the aliased multi-call path."""
  lookup_kwargs = dict(implementation="pallas", interpret=True, pallas_backend="tpu",
                       tpu_config=TpuLookupConfig(block_rows=16, max_rows_per_call=32))
  widths = (64, 80)
  grad_widths = (64,)


@pytest.mark.gpu
class TestGpuKernel(LookupTestBase):
  lookup_kwargs = dict(implementation="pallas")

  def test_table_over_4_gib_last_rows(self):
    # 36M rows x 64 bf16 = 4.6 GB > 2^32 bytes: the 64-bit offset path of the lowering.
    num_rows, width = 36_000_000, 64
    table = jnp.zeros((num_rows, width), jnp.bfloat16)
    # One head that owns the whole table, four lookups.
    ids = jnp.array([[[num_rows - 1], [num_rows - 2], [0], [num_rows // 2]]], jnp.int32)
    table = table.at[ids.ravel()].set(
        jnp.arange(4, dtype=jnp.bfloat16)[:, None] + 1)
    out = engram_lookup(table, ids, jnp.zeros((1,), jnp.int32), implementation="pallas")
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)).reshape(4, width),
                                  np.repeat(np.arange(1, 5, dtype=np.float32)[:, None],
                                            width, 1))


def test_column_chunks_and_uneven_batch():
  assert column_chunks(80) == [(0, 64), (64, 16)] and column_chunks(64) == [(0, 64)]
  table, ids, offsets = random_case(2, 20, 80, jnp.bfloat16, batch=1, length=5, heads=3)
  out = engram_lookup(table, ids, offsets, implementation="pallas", interpret=True,
                      pallas_backend="gpu", gpu_config=GpuLookupConfig(block_rows=16))
  np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)),
                                reference_lookup(table, ids, offsets))


@pytest.mark.parametrize("bad, error, match", [
    (dict(table=jnp.zeros((4, 8, 2))), ValueError, "table must be"),
    (dict(table=jnp.zeros((8, 64), jnp.int32)), TypeError, "table dtype"),
    (dict(ids=jnp.zeros((2, 3), jnp.int32)), ValueError, "ids must be"),
    (dict(ids=jnp.zeros((1, 2, 2), jnp.float32)), TypeError, "ids must be integers"),
    (dict(offsets=jnp.zeros((3,), jnp.int32)), ValueError, "offsets must be"),
    (dict(offsets=jnp.zeros((2,), jnp.float32)), TypeError, "offsets must be integers"),
    (dict(implementation="cuda"), ValueError, "implementation must be"),
    (dict(implementation="pallas"), ValueError, "needs interpret=True"),
    (dict(implementation="pallas", interpret=True, pallas_backend="gpu",
          table=jnp.zeros((8, 12))), ValueError, "E % 8"),
    (dict(backward="atomic"), ValueError, "backward must be"),
])
def test_clear_errors(bad, error, match):
  args = dict(table=jnp.zeros((8, 64)), ids=jnp.zeros((1, 2, 2), jnp.int32),
              offsets=jnp.zeros((2,), jnp.int32))
  kwargs = {k: v for k, v in bad.items() if k not in args}
  args.update({k: v for k, v in bad.items() if k in args})
  with pytest.raises(error, match=match):
    engram_lookup(args["table"], args["ids"], args["offsets"], **kwargs)


OVERFLOW_CASES = {
    "xla": dict(implementation="xla"),
    "interpret_gpu": dict(implementation="pallas", interpret=True, pallas_backend="gpu",
                          backward="pallas", gpu_config=GpuLookupConfig(block_rows=16)),
    "interpret_tpu": dict(implementation="pallas", interpret=True, pallas_backend="tpu",
                          tpu_config=TpuLookupConfig(block_rows=16, max_rows_per_call=16)),
    "gpu": dict(implementation="pallas"),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.gpu] if c == "gpu" else [])
                                  for c in OVERFLOW_CASES])
def test_each_id_clamps_into_its_own_head_at_int32_limits(case):
  """An id past its head's rows reads that head's last row (not the next head's), and ids near
  2**31 do not wrap to row 0 of head 0, forward and gradient alike."""
  table, ids, offsets = overflow_case()
  rows = clamped_rows(ids, offsets, table.shape[0])
  # The oracle's own promise, spelled out: head 0 id -1 -> row 0, head 1 id 7 -> its last
  # row 11, head 2 id 2**31 - 2 -> its last row 14, head 1 id -2**31 -> its first row 5.
  assert rows[0, 0].tolist() == [0, 11, 14] and rows[0, 1].tolist() == [4, 5, 14]
  lookup = lambda t: engram_lookup(t, ids, offsets, **OVERFLOW_CASES[case])  # noqa: E731
  np.testing.assert_array_equal(np.asarray(lookup(table)), reference_lookup(table, ids, offsets))
  cot = jax.random.normal(jax.random.key(0), (1, 4, 3 * table.shape[1]))
  grad = np.asarray(jax.grad(lambda t: jnp.vdot(lookup(t), cot))(table))
  want = np.zeros(table.shape, np.float32)
  np.add.at(want, rows.ravel(), np.asarray(cot).reshape(-1, table.shape[1]))
  np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-6)


def test_uint32_ids_above_int32_clamp_into_their_head():
  table, _, offsets = overflow_case()
  ids = jnp.asarray([[[2**32 - 1, 2**31, 2**31 + 5]]], jnp.uint32)
  out = engram_lookup(table, ids, offsets, implementation="xla")
  np.testing.assert_array_equal(np.asarray(out), reference_lookup(table, ids, offsets))
  assert clamped_rows(ids, offsets, table.shape[0]).tolist() == [[[4, 11, 14]]]


def test_64_bit_ids_are_refused():
  table, ids, offsets = overflow_case()
  with pytest.raises(TypeError, match="32-bit"):
    engram_lookup(table, np.asarray(ids, np.int64), offsets)
  from pallas_kernels.engram_lookup import api
  with pytest.raises(TypeError, match="32-bit"):
    api.global_rows_N(np.asarray(ids, np.uint64), offsets, table.shape[0])


@pytest.mark.parametrize("width", [32, 80])
def test_interpret_segment_sum_matches_numpy(width):
  """The Triton segment-sum, a hot row read by half the lookups, E with two column chunks."""
  keys_N = jax.random.randint(jax.random.key(0), (96,), 0, 40)
  keys_N = keys_N.at[::2].set(7)
  g_NxE = jax.random.normal(jax.random.key(1), (96, width))
  plan = segment_sum.sort_segments(keys_N, fill=40)
  got = segment_sum.segment_sum_pallas(g_NxE, plan, interpret=True,
                                       config=GpuSegmentSumConfig(16, 16))
  want = np.zeros((40, width), np.float32)
  np.add.at(want, np.asarray(keys_N), np.asarray(g_NxE))
  dense = np.zeros((41, width), np.float32)
  dense[np.asarray(plan.keys_U)] = np.asarray(got)
  np.testing.assert_allclose(dense[:40], want, rtol=1e-5, atol=1e-5)
  assert not dense[40].any(), "padding slots must sum to zero"


@pytest.mark.parametrize("platform, width, want", [
    ("gpu", 64, "gpu"), ("gpu", 128, "gpu"), ("gpu", 80, "xla"), ("tpu", 80, "tpu"),
    ("cpu", 64, "xla")])
def test_automatic_forward_follows_the_measurements(monkeypatch, platform, width, want):
  """On GPU the Triton gather only where it measured faster than jnp.take (power-of-two E)."""
  from pallas_kernels.engram_lookup import api
  monkeypatch.setattr(api, "current_platform", lambda: platform)
  assert api.resolve_plan(width, backward="xla").forward == want
