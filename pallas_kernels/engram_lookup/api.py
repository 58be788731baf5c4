"""Public entry point of the Engram lookup: validation, dispatch and the custom VJP.

The model calls only this module. `engram_lookup(table, ids, offsets)` returns
`table[offsets + clamp(ids)]` flattened over heads to `[B, T, H*E]`:

  implementation=None      'pallas' on TPU; on GPU 'pallas' when E is a power of two and 'xla'
                           otherwise (the kernel reads other widths in several power-of-two
                           chunks and is slower than jnp.take there: benchmarks/README.md,
                           "Lookup forward"); 'xla' on CPU. An explicit 'pallas' with an
                           unsupported shape raises.
  implementation='xla'     `reference.engram_lookup_reference` (jnp.take).
  implementation='pallas'  the Triton gather (gpu.py) on GPU, the DMA gather (tpu.py) on TPU;
                           on CPU pass `interpret=True` (and `pallas_backend='gpu'|'tpu'` to pick
                           which kernel to interpret; the TPU kernel interprets with
                           `pltpu.InterpretParams()`).

Clamping (reference.py's rule, every implementation): heads own consecutive blocks of the
table (head h: rows `[offsets[h], offsets[h+1])`, the last head up to R), and each id is
clamped into its own head's rows before the offset is added. A wrong id reads (and, in the
backward, writes the gradient of) its own head's first or last row, never another head's row
or memory outside the table, and the int32 sum cannot wrap. The kernels receive these clamped
ids (their own clip into `[0, R)` is a bounds guard). Ids must be 32-bit or narrower integers:
64-bit ids are refused (TypeError), because without `jax_enable_x64` jnp wraps them to int32
before any clamp.

Gradient: every implementation is wrapped in one `jax.custom_vjp`. The table cotangent is built
row-sparse first (lookups sorted by row, f32 segment sums per distinct row, segment_sum.py),
then scattered once into a dense `[R, E]` zero table in the table dtype; each row is written
once, so the result is deterministic. `backward='pallas'` (default on GPU when E % 16 == 0)
sums segments with the atomic-free Triton kernel; 'xla' uses XLA's sorted segment_sum. For
large tables use `row_sparse.prefetch_rows` + `expand_rows`, whose gradient stays `[U, E]`.

Dimension legend: B batch, T time, H hash heads, E row width, R table rows, N = B*T*H.
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from pallas_kernels.engram_lookup import gpu, reference, segment_sum, tpu
from pallas_kernels.engram_lookup.configs import GpuLookupConfig, TpuLookupConfig

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_MAX_ROWS = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class LookupPlan:
  """Static choices of one lookup call (hashable: a nondiff argument of the custom VJP)."""
  forward: str  # 'xla', 'gpu' or 'tpu'
  backward: str  # 'xla' or 'pallas'
  interpret: Any = False
  gpu_config: GpuLookupConfig = GpuLookupConfig()
  tpu_config: TpuLookupConfig = TpuLookupConfig()


def current_platform() -> str:
  """'cpu', 'gpu' or 'tpu' for the default backend."""
  platform = jax.default_backend()
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def resolve_plan(width: int, *, implementation: Optional[str] = None, interpret: Any = False,
                 pallas_backend: Optional[str] = None, backward: Optional[str] = None,
                 gpu_config: Optional[GpuLookupConfig] = None,
                 tpu_config: Optional[TpuLookupConfig] = None) -> LookupPlan:
  """Turns the user's options into a `LookupPlan`, raising on impossible combinations."""
  platform = current_platform()
  if implementation is None:
    kernel_pays = platform == "tpu" or (platform == "gpu" and width & (width - 1) == 0)
    implementation = "pallas" if kernel_pays and not interpret else "xla"
  if implementation not in ("xla", "pallas"):
    raise ValueError(f"implementation must be None, 'xla' or 'pallas', got {implementation!r}")
  if implementation == "xla":
    forward = "xla"
  else:
    forward = pallas_backend or platform
    if forward not in ("gpu", "tpu"):
      raise ValueError(f"implementation='pallas' on {platform} needs interpret=True and "
                       "pallas_backend='gpu' or 'tpu' to choose the kernel to interpret")
    if forward != platform and not interpret:
      raise ValueError(f"the {forward} kernel cannot run on {platform}; pass interpret=True")
    if width % 8:
      raise ValueError(f"the Pallas lookup needs E % 8 == 0 (16-byte rows), got E={width}; "
                       "use implementation='xla'")
  if backward is None:
    on_gpu = forward == "gpu" or (forward == "xla" and platform == "gpu")
    backward = "pallas" if on_gpu and width % 16 == 0 else "xla"
  segment_sum.check_backward(backward)
  if backward == "pallas" and platform != "gpu" and not interpret:
    raise ValueError("backward='pallas' is the Triton segment-sum: GPU only, or interpret=True")
  if backward == "pallas" and width % 16:
    raise ValueError(f"backward='pallas' needs E % 16 == 0, got E={width}")
  return LookupPlan(forward, backward, interpret, gpu_config or GpuLookupConfig(),
                    tpu_config or TpuLookupConfig())


def validate(table_RxE: jax.Array, ids_BxTxH: jax.Array, offsets_H: jax.Array):
  """Raises a clear error for wrong ranks, dtypes and shapes."""
  if table_RxE.ndim != 2:
    raise ValueError(f"table must be [rows, E], got shape {table_RxE.shape}")
  if jnp.dtype(table_RxE.dtype) not in SUPPORTED_DTYPES:
    raise TypeError(f"table dtype must be one of {[str(d) for d in SUPPORTED_DTYPES]}, got "
                    f"{table_RxE.dtype}")
  if table_RxE.shape[0] > _MAX_ROWS or table_RxE.shape[0] == 0:
    raise ValueError(f"table rows must be in [1, 2^31), got {table_RxE.shape[0]}")
  if ids_BxTxH.ndim != 3:
    raise ValueError(f"ids must be [B, T, H], got shape {ids_BxTxH.shape}")
  reference.check_id_dtype(ids_BxTxH.dtype)
  if offsets_H.shape != (ids_BxTxH.shape[-1],):
    raise ValueError(f"offsets must be [H]={ids_BxTxH.shape[-1]}, got {offsets_H.shape}")
  if not jnp.issubdtype(offsets_H.dtype, jnp.integer):
    raise TypeError(f"offsets must be integers, got {offsets_H.dtype}")


def gather_flat(table_RxE: jax.Array, ids_N: jax.Array, offsets_H: jax.Array,
                plan: LookupPlan) -> jax.Array:
  """Forward only: `[N, E]` rows of `offsets[n % H] + ids_N`, no custom VJP; ids_N are int32
  local ids already clamped into their heads (`reference.clamp_to_heads`)."""
  if plan.forward == "gpu":
    return gpu.gather(table_RxE, ids_N, offsets_H, config=plan.gpu_config,
                      interpret=bool(plan.interpret))
  if plan.forward == "tpu":
    interpret = plan.interpret
    if interpret is True:
      from jax.experimental.pallas import tpu as pltpu  # Only needed to interpret on CPU.
      interpret = pltpu.InterpretParams()
    return tpu.gather(table_RxE, ids_N, offsets_H, config=plan.tpu_config, interpret=interpret)
  h = offsets_H.shape[0]
  return reference.engram_lookup_reference(table_RxE, ids_N.reshape(1, -1, h),
                                           offsets_H).reshape(-1, table_RxE.shape[1])


def global_rows_N(ids_BxTxH: jax.Array, offsets_H: jax.Array, num_rows: int) -> jax.Array:
  """Flattened int32 global rows, each id clamped into its own head first: the rows every
  implementation reads (`reference.global_rows`)."""
  return reference.global_rows(ids_BxTxH, offsets_H, num_rows).reshape(-1)


def dense_table_grad(g_NxE: jax.Array, rows_N: jax.Array, num_rows: int, dtype,
                     backward: str, interpret: Any = False) -> jax.Array:
  """Sorted f32 segment sums per distinct row, written once each into a zero `[R, E]`."""
  plan = segment_sum.sort_segments(rows_N, fill=num_rows)
  sums_UxE = segment_sum.segment_sum(g_NxE, plan, implementation=backward,
                                     interpret=bool(interpret))
  zeros_RxE = jnp.zeros((num_rows, g_NxE.shape[1]), dtype)
  return zeros_RxE.at[plan.keys_U].set(sums_UxE.astype(dtype), mode="drop")


def _lookup_impl(plan, table_RxE, ids_BxTxH, offsets_H):
  b, t, h = ids_BxTxH.shape
  ids_N = reference.clamp_to_heads(ids_BxTxH, offsets_H, table_RxE.shape[0]).reshape(-1)
  out_NxE = gather_flat(table_RxE, ids_N, offsets_H, plan)
  return out_NxE.reshape(b, t, h * table_RxE.shape[1])


def _lookup_fwd(plan, table_RxE, ids_BxTxH, offsets_H):
  # The table itself is not a residual: only its shape and dtype, through an empty witness.
  witness_Rx0 = jnp.zeros((table_RxE.shape[0], 0), table_RxE.dtype)
  out = _lookup_impl(plan, table_RxE, ids_BxTxH, offsets_H)
  return out, (witness_Rx0, ids_BxTxH, offsets_H)


def _lookup_bwd(plan, res, g_BxTxHE):
  witness_Rx0, ids_BxTxH, offsets_H = res
  num_rows = witness_Rx0.shape[0]
  width = g_BxTxHE.shape[-1] // ids_BxTxH.shape[-1]
  rows_N = global_rows_N(ids_BxTxH, offsets_H, num_rows)
  grad_RxE = dense_table_grad(g_BxTxHE.reshape(-1, width), rows_N, num_rows,
                              witness_Rx0.dtype, plan.backward, plan.interpret)
  return (grad_RxE, jnp.zeros(ids_BxTxH.shape, jax.dtypes.float0),
          jnp.zeros(offsets_H.shape, jax.dtypes.float0))


_lookup = jax.custom_vjp(_lookup_impl, nondiff_argnums=(0,))
_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def engram_lookup(table_RxE: jax.Array, ids_BxTxH: jax.Array, offsets_H: jax.Array, *,
                  implementation: Optional[str] = None, interpret: Any = False,
                  pallas_backend: Optional[str] = None, backward: Optional[str] = None,
                  gpu_config: Optional[GpuLookupConfig] = None,
                  tpu_config: Optional[TpuLookupConfig] = None) -> jax.Array:
  """Gathers one row per (token, head) and concatenates heads: returns `[B, T, H*E]`.

  `ids_BxTxH` are per-head local row ids (integers of at most 32 bits), `offsets_H` each
  head's first table row; an id outside its head's rows is clamped to the nearest valid row of
  that head. Differentiable w.r.t. the table (dense `[R, E]` cotangent).
  See the module docstring for the options.
  """
  offsets_H = jnp.asarray(offsets_H)
  validate(table_RxE, ids_BxTxH, offsets_H)
  plan = resolve_plan(table_RxE.shape[1], implementation=implementation, interpret=interpret,
                      pallas_backend=pallas_backend, backward=backward, gpu_config=gpu_config,
                      tpu_config=tpu_config)
  return _lookup(plan, table_RxE, ids_BxTxH, offsets_H)
