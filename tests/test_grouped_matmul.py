"""Grouped matmul: the reference (CPU), the Mosaic GPU kernels in interpret mode (CPU) and on a
Hopper GPU, all against one float64 oracle; the choice rule of `implementation=None`; errors.

Dimension legend: M rows, K contraction width, N output width, G groups.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import GpuGroupedMatmulConfig, MosaicBlocks, grouped_matmul
from pallas_kernels.grouped_matmul import api, configs
from tests.kernel_test_base import GroupedMatmulTestBase, grouped_case


class TestReference(GroupedMatmulTestBase):
  gmm_kwargs = dict(implementation="xla")
  dtypes = (jnp.float32, jnp.bfloat16, jnp.float16)


class _WithCoreCount:
  """A CPU device that answers `core_count` (transposed_ragged_dot sizes its grid by it)."""
  core_count = 4

  def __init__(self, device):
    self._device = device

  def __getattr__(self, name):
    return getattr(self._device, name)


class TestInterpretMosaic(GroupedMatmulTestBase):
  """The three Mosaic GPU kernels simulated on CPU: one small case (seconds per kernel call)."""
  gmm_kwargs = dict(implementation="mosaic_gpu", interpret=True)
  dtypes = (jnp.bfloat16,)
  # Two empty groups (one at row 0) and 18 rows past the last group; 64-row tiles.
  cases = ((128, 64, 64, (0, 40, 0, 70)),)

  @pytest.fixture(autouse=True)
  def _cpu_core_count(self, monkeypatch):
    devices = jax.devices
    monkeypatch.setattr(jax, "devices",
                        lambda *a, **kw: [_WithCoreCount(d) for d in devices(*a, **kw)])


@pytest.mark.gpu
class TestMosaicGpu(GroupedMatmulTestBase):
  """On a Hopper GPU (the lead's H200): the kernels against the oracle, small_gpu-like widths."""
  gmm_kwargs = dict(implementation="mosaic_gpu")
  dtypes = (jnp.bfloat16, jnp.float16)
  cases = (
      (1024, 256, 384, (100, 0, 317, 1, 64, 300, 0)),      # 242 rows past the last group
      (4096, 768, 384, (0, 900, 1000, 1100, 0, 1096)),      # every row owned, 128-row tiles
      (2048, 384, 768, (2048, 0, 0)),                        # one full group, then empty ones
      (512, 192, 320, (13, 200, 51, 0, 100)),                # 64-wide tiles only
  )

  def test_default_picks_the_kernel_on_hopper(self):
    platform, capability = api.device_facts()
    assert api.is_hopper(platform, capability), (platform, capability)
    x, w, sizes, _ = grouped_case(0, 256, 128, 128, (100, 156), jnp.bfloat16)
    config = configs.for_shape(256, 128, 128, 2)
    assert api.resolve_implementation(x, w, None, False, config) == "mosaic_gpu"
    np.testing.assert_array_equal(
        np.asarray(grouped_matmul(x, w, sizes).astype(jnp.float32)),
        np.asarray(grouped_matmul(x, w, sizes, implementation="mosaic_gpu").astype(
            jnp.float32)))


H200 = dict(platform="gpu", compute_capability="9.0")
DEFAULT = configs.for_shape(4096, 768, 384, 16)


@pytest.mark.parametrize("dtype, shape, facts, want", [
    (jnp.bfloat16, (4096, 768, 384), H200, "mosaic_gpu"),
    (jnp.float16, (4096, 768, 384), H200, "mosaic_gpu"),
    (jnp.float32, (4096, 768, 384), H200, "xla"),                  # the kernels take 16-bit
    (jnp.bfloat16, (4096, 768, 384), dict(platform="gpu", compute_capability="8.0"), "xla"),
    (jnp.bfloat16, (4096, 768, 384), dict(platform="gpu", compute_capability="10.0"), "xla"),
    (jnp.bfloat16, (4096, 768, 384), dict(platform="cpu", compute_capability=""), "xla"),
    (jnp.bfloat16, (4096, 760, 384), H200, "xla"),                 # K % 64
    (jnp.bfloat16, (4096, 768, 100), H200, "xla"),                 # N % 64
    (jnp.bfloat16, (4000, 768, 384), H200, "xla"),                 # M % 64
])
def test_choice_rule(dtype, shape, facts, want):
  assert api.choose_implementation(dtype, shape, DEFAULT, **facts) == want


def test_tiles_follow_the_shape():
  big = configs.for_shape(65536, 768, 384, 16)
  assert (big.forward.block_m, big.forward.block_n, big.forward.block_k) == (128, 128, 64)
  assert (big.grad_x.block_n, big.grad_w.block_m, big.grad_w.block_n) == (128, 128, 128)
  small = configs.for_shape(1024, 192, 320, 16)      # 64 rows per group on average
  assert (small.forward.block_m, small.forward.block_n, small.grad_x.block_n) == (64, 64, 64)
  assert small.unsupported(1024, 192, 320) is None
  assert small.unsupported(1024, 192, 330) == "N=330 is not a multiple of forward.block_n=64"
  with pytest.raises(ValueError, match="block_n must be a positive multiple of 64"):
    MosaicBlocks(block_m=64, block_n=96)


@pytest.mark.parametrize("bad, error, match", [
    (dict(x=jnp.zeros((4, 8, 2))), ValueError, "x must be"),
    (dict(w=jnp.zeros((8, 4))), ValueError, "w must be"),
    (dict(w=jnp.zeros((3, 6, 4))), ValueError, "contraction widths differ"),
    (dict(group_sizes=jnp.zeros((2,), jnp.int32)), ValueError, "group_sizes must be"),
    (dict(group_sizes=jnp.zeros((3,))), TypeError, "group_sizes must be integers"),
    (dict(x=jnp.zeros((64, 8), jnp.int32)), TypeError, "x dtype"),
    (dict(x=jnp.zeros((64, 8), jnp.bfloat16)), TypeError, "one dtype"),
    (dict(implementation="triton"), ValueError, "implementation must be"),
    (dict(interpret=True), ValueError, "interpret=True simulates"),
    (dict(implementation="mosaic_gpu"), ValueError, "needs a Hopper GPU"),
    (dict(implementation="mosaic_gpu", interpret=True), TypeError, "bfloat16 or float16"),
    (dict(implementation="mosaic_gpu", interpret=True, x=jnp.zeros((64, 8), jnp.bfloat16),
          w=jnp.zeros((3, 8, 64), jnp.bfloat16)), ValueError, "K=8 is not a multiple"),
])
def test_clear_errors(bad, error, match):
  args = dict(x=jnp.zeros((64, 8)), w=jnp.zeros((3, 8, 4)),
              group_sizes=jnp.array([10, 0, 54], jnp.int32))
  kwargs = {k: v for k, v in bad.items() if k not in args}
  args.update({k: v for k, v in bad.items() if k in args})
  with pytest.raises(error, match=match):
    grouped_matmul(args["x"], args["w"], args["group_sizes"], **kwargs)


def test_custom_config_reaches_the_kernel_checks():
  x = jnp.zeros((128, 128), jnp.bfloat16)
  w = jnp.zeros((2, 128, 128), jnp.bfloat16)
  wide = MosaicBlocks(block_m=64, block_n=256)
  config = GpuGroupedMatmulConfig(forward=wide, grad_x=wide, grad_w=wide)
  with pytest.raises(ValueError, match="N=128 is not a multiple of forward.block_n=256"):
    grouped_matmul(x, w, jnp.array([64, 64]), implementation="mosaic_gpu", interpret=True,
                   gpu_config=config)
