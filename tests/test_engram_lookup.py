"""Engram lookup: reference, interpret-mode kernels (CPU) and GPU kernels against one oracle.

Dimension legend: B batch, T time, H heads, E row width, R table rows.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from pallas_kernels.engram_lookup import engram_lookup, segment_sum
from pallas_kernels.engram_lookup.configs import (GpuLookupConfig, GpuSegmentSumConfig,
                                                  TpuLookupConfig, padded_width)
from tests.kernel_test_base import LookupTestBase, random_case, reference_lookup


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
    ids = jnp.array([[[num_rows - 1, num_rows - 2, 0, num_rows // 2]]], jnp.int32)
    table = table.at[ids.ravel()].set(
        jnp.arange(4, dtype=jnp.bfloat16)[:, None] + 1)
    out = engram_lookup(table, ids, jnp.zeros((4,), jnp.int32), implementation="pallas")
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)).reshape(4, width),
                                  np.repeat(np.arange(1, 5, dtype=np.float32)[:, None],
                                            width, 1))


def test_padded_width_and_uneven_batch():
  assert padded_width(80) == 128 and padded_width(64) == 64
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


@pytest.mark.parametrize("method", ["onehot", "walk"])
@pytest.mark.parametrize("width", [32, 80])
def test_interpret_segment_sum_methods_match_numpy(method, width):
  """Both Triton segment-sums, a hot row read by half the lookups, E with two column chunks."""
  keys_N = jax.random.randint(jax.random.key(0), (96,), 0, 40)
  keys_N = keys_N.at[::2].set(7)
  g_NxE = jax.random.normal(jax.random.key(1), (96, width))
  plan = segment_sum.sort_segments(keys_N, fill=40)
  got = segment_sum.segment_sum_pallas(g_NxE, plan, interpret=True,
                                       config=GpuSegmentSumConfig(method, 16, 16))
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
