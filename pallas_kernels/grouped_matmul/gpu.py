"""Hopper grouped matmul: JAX's Mosaic GPU ragged-dot kernels under one `jax.custom_vjp`.

The kernels are the library's (`jax.experimental.pallas.ops.gpu`, persistent wgmma kernels with
a TMA pipeline, sm_90 only); this module fixes their semantics to reference.py's:

  forward  y  = ragged_dot(x, w)                           x [M, K], w [G, K, N] -> [M, N]
  grad_x   dx = ragged_dot(dy, w, transpose_rhs=True)      contracts N of w      -> [M, K]
  grad_w   dw = transposed_ragged_dot(x, dy)               x[rows of g]^T dy[rows of g]
                                                                                 -> [G, K, N]
The kernels accumulate in float32 and write x's dtype. They never write the rows past the last
group (the output buffer is uninitialised there), so `y` and `dx` are masked to zero on those
rows, and `dy` is masked before both gradient kernels (the masks are elementwise ops XLA fuses
into the neighbouring fusions). The weight-gradient kernel zeroes the rows of x outside a group
by multiplying them with 0 in the group's first and last row block, so those rows of x must be
finite (NaN * 0 is NaN); in the MoE dispatch every row belongs to a group.

The kernels are custom calls, which XLA's SPMD partitioner does not split: under a multi-device
mesh, call `grouped_matmul` inside `shard_map` on per-device rows, or XLA gathers the operands.

Interpret mode (`interpret=True`) runs the kernels under `plgpu.force_gpu_interpret_mode()`
(CPU simulation of the GPU; slow, for tests on tiny shapes). `transposed_ragged_dot` reads the
SM count from `jax.devices()[0].core_count`, which CPU devices lack; the interpret test
supplies one.

Dimension legend: M rows of x, K contraction width, N output width, G groups.
"""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

from pallas_kernels.grouped_matmul import reference
from pallas_kernels.grouped_matmul.configs import GpuGroupedMatmulConfig, MosaicBlocks


@dataclasses.dataclass(frozen=True)
class MosaicPlan:
  """Static choices of one call (hashable: the nondiff argument of the custom VJP)."""
  config: GpuGroupedMatmulConfig
  interpret: bool = False


def _kernel_mode(plan: MosaicPlan):
  return plgpu.force_gpu_interpret_mode() if plan.interpret else contextlib.nullcontext()


def _blocks(blocks: MosaicBlocks) -> dict:
  return dataclasses.asdict(blocks)


def _ragged_dot(plan, blocks, lhs, rhs, sizes_G, transpose_rhs):
  with _kernel_mode(plan):
    return ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=sizes_G,
                                      transpose_rhs=transpose_rhs, **_blocks(blocks))


def _grouped_outer(plan, x_MxK, dy_MxN, sizes_G):
  with _kernel_mode(plan):
    return transposed_ragged_dot_mgpu.transposed_ragged_dot(
        x_MxK, dy_MxN, group_sizes=sizes_G, **_blocks(plan.config.grad_w))


def _mask_rows(a_MxC, rows_M):
  return jnp.where(rows_M[:, None], a_MxC, jnp.zeros((), a_MxC.dtype))


def _forward(plan, x_MxK, w_GxKxN, sizes_G):
  rows_M = reference.grouped_rows_M(sizes_G, x_MxK.shape[0])
  y_MxN = _ragged_dot(plan, plan.config.forward, x_MxK, w_GxKxN, sizes_G, False)
  return _mask_rows(y_MxN, rows_M)


def _fwd(plan, x_MxK, w_GxKxN, sizes_G):
  return _forward(plan, x_MxK, w_GxKxN, sizes_G), (x_MxK, w_GxKxN, sizes_G)


def _bwd(plan, res, dy_MxN):
  x_MxK, w_GxKxN, sizes_G = res
  rows_M = reference.grouped_rows_M(sizes_G, x_MxK.shape[0])
  dy_MxN = _mask_rows(dy_MxN.astype(x_MxK.dtype), rows_M)
  dx_MxK = _mask_rows(_ragged_dot(plan, plan.config.grad_x, dy_MxN, w_GxKxN, sizes_G, True),
                      rows_M)
  dw_GxKxN = _grouped_outer(plan, x_MxK, dy_MxN, sizes_G)
  return dx_MxK, dw_GxKxN, jnp.zeros(sizes_G.shape, jax.dtypes.float0)


_grouped_matmul = jax.custom_vjp(_forward, nondiff_argnums=(0,))
_grouped_matmul.defvjp(_fwd, _bwd)


def grouped_matmul(x_MxK: jax.Array, w_GxKxN: jax.Array, sizes_G: jax.Array, *,
                   config: GpuGroupedMatmulConfig, interpret: bool = False) -> jax.Array:
  """`[M, N]` grouped matmul on the Mosaic GPU kernels; `sizes_G` int32, already clipped
  (reference.clip_group_sizes), shapes checked against `config` by the caller (api.py)."""
  return _grouped_matmul(MosaicPlan(config, bool(interpret)), x_MxK, w_GxKxN, sizes_G)

