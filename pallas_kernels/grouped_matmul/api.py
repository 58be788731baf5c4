"""Public entry point of the grouped matmul: validation, the choice of implementation, dispatch.

`grouped_matmul(x_MxK, w_GxKxN, group_sizes_G)` returns `[M, N]` with row m equal to
`x[m] @ w[g]` for the group g owning row m (consecutive groups of `group_sizes_G` rows; rows
past the last group are zero), accumulated in float32, in x's dtype. reference.py is the
specification, gradients included.

  implementation=None          'mosaic_gpu' on a Hopper GPU (compute capability 9.x) for
                               bf16/f16 operands whose shapes the kernels' tiles divide
                               (`GpuGroupedMatmulConfig.unsupported`: K and N multiples of 64,
                               M a multiple of 64); 'xla' otherwise (CPU, other GPUs, f32,
                               other shapes). `choose_implementation` is the rule.
  implementation='xla'         `reference.grouped_matmul_reference` (`jax.lax.ragged_dot`);
                               gradients by JAX autodiff of it.
  implementation='mosaic_gpu'  gpu.py: JAX's Mosaic GPU ragged-dot kernels for the forward
                               and both gradients; raises on other platforms, dtypes or shapes.
                               `interpret=True` simulates them on CPU (tests).

Both implementations clip the group sizes the same way (reference.clip_group_sizes), so a
`group_sizes_G` summing past M ends the last groups at row M.

Dimension legend: M rows of x, K contraction width, N output width, G groups.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_matmul import configs, gpu, reference
from pallas_kernels.grouped_matmul.configs import GpuGroupedMatmulConfig

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
MOSAIC_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
IMPLEMENTATIONS = ("xla", "mosaic_gpu")


def device_facts() -> tuple[str, str]:
  """('cpu' | 'gpu' | 'tpu', compute capability or '') of the default device."""
  device = jax.devices()[0]
  platform = "gpu" if device.platform in ("cuda", "rocm", "gpu") else device.platform
  return platform, str(getattr(device, "compute_capability", "") or "")


def is_hopper(platform: str, compute_capability: str) -> bool:
  return platform == "gpu" and compute_capability.split(".")[0] == "9"


def choose_implementation(dtype, shape_MKN: tuple[int, int, int],
                          config: GpuGroupedMatmulConfig, *, platform: str,
                          compute_capability: str) -> str:
  """The rule of `implementation=None` (module docstring)."""
  if (is_hopper(platform, compute_capability) and jnp.dtype(dtype) in MOSAIC_DTYPES
      and config.unsupported(*shape_MKN) is None):
    return "mosaic_gpu"
  return "xla"


def validate(x_MxK: jax.Array, w_GxKxN: jax.Array, group_sizes_G: jax.Array):
  """Raises a clear error for wrong ranks, shapes and dtypes."""
  if x_MxK.ndim != 2:
    raise ValueError(f"x must be [M, K], got shape {x_MxK.shape}")
  if w_GxKxN.ndim != 3:
    raise ValueError(f"w must be [G, K, N], got shape {w_GxKxN.shape}")
  if w_GxKxN.shape[1] != x_MxK.shape[1]:
    raise ValueError(f"x is [M, K={x_MxK.shape[1]}] but w is [G, K={w_GxKxN.shape[1]}, N]: "
                     "the contraction widths differ")
  if group_sizes_G.shape != (w_GxKxN.shape[0],):
    raise ValueError(f"group_sizes must be [G]=({w_GxKxN.shape[0]},), one size per weight "
                     f"matrix, got shape {group_sizes_G.shape}")
  if not jnp.issubdtype(group_sizes_G.dtype, jnp.integer):
    raise TypeError(f"group_sizes must be integers, got {group_sizes_G.dtype}")
  for name, a in (("x", x_MxK), ("w", w_GxKxN)):
    if jnp.dtype(a.dtype) not in SUPPORTED_DTYPES:
      raise TypeError(f"{name} dtype must be one of {[str(d) for d in SUPPORTED_DTYPES]}, got "
                      f"{a.dtype}")
  if x_MxK.dtype != w_GxKxN.dtype:
    raise TypeError(f"x and w must have one dtype, got {x_MxK.dtype} and {w_GxKxN.dtype}")


def resolve_implementation(x_MxK: jax.Array, w_GxKxN: jax.Array, implementation: Optional[str],
                           interpret: bool, config: GpuGroupedMatmulConfig) -> str:
  """The implementation to run, raising on impossible explicit choices."""
  if implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(f"implementation must be None, 'xla' or 'mosaic_gpu', got "
                     f"{implementation!r}")
  if interpret and implementation != "mosaic_gpu":
    raise ValueError("interpret=True simulates the Mosaic GPU kernels: pass "
                     "implementation='mosaic_gpu'")
  (m, k), n = x_MxK.shape, w_GxKxN.shape[2]
  platform, capability = device_facts()
  if implementation is None:
    return choose_implementation(x_MxK.dtype, (m, k, n), config, platform=platform,
                                 compute_capability=capability)
  if implementation == "mosaic_gpu":
    if not interpret and not is_hopper(platform, capability):
      raise ValueError("implementation='mosaic_gpu' needs a Hopper GPU (compute capability "
                       f"9.x), got {platform} {capability!r}; pass interpret=True to simulate "
                       "it on CPU")
    if jnp.dtype(x_MxK.dtype) not in MOSAIC_DTYPES:
      raise TypeError(f"implementation='mosaic_gpu' takes bfloat16 or float16, got "
                      f"{x_MxK.dtype}; use implementation='xla'")
    reason = config.unsupported(m, k, n)
    if reason:
      raise ValueError(f"implementation='mosaic_gpu' cannot take x [{m}, {k}] @ w [G, {k}, "
                       f"{n}]: {reason}; use implementation='xla'")
  return implementation


def grouped_matmul(x_MxK: jax.Array, w_GxKxN: jax.Array, group_sizes_G: jax.Array, *,
                   implementation: Optional[str] = None, interpret: bool = False,
                   gpu_config: Optional[GpuGroupedMatmulConfig] = None) -> jax.Array:
  """`[M, N]` grouped matmul (module docstring); differentiable w.r.t. x and w.

  gpu_config: the Mosaic kernels' tiles; None picks `configs.for_shape(M, K, N, G)`.
  """
  group_sizes_G = jnp.asarray(group_sizes_G)
  validate(x_MxK, w_GxKxN, group_sizes_G)
  (m, k), (g, _, n) = x_MxK.shape, w_GxKxN.shape
  config = gpu_config or configs.for_shape(m, k, n, g)
  chosen = resolve_implementation(x_MxK, w_GxKxN, implementation, interpret, config)
  if chosen == "xla":
    return reference.grouped_matmul_reference(x_MxK, w_GxKxN, group_sizes_G)
  sizes_G = reference.clip_group_sizes(group_sizes_G, m)
  return gpu.grouped_matmul(x_MxK, w_GxKxN, sizes_G, config=config, interpret=interpret)
