"""Deterministic sorted segment-sum: the reduction behind every table gradient of the lookup.

Given the cotangent of N lookups `g_NxE` and the row each lookup read, the table gradient is,
per distinct row, the sum of its lookups' cotangents. `sort_segments` sorts the lookups by row
once (a stable sort, so duplicates keep their batch order) and describes the runs of equal
rows ("segments"): which lookup sits at each sorted position, its segment, where each segment
starts, and the segment's row. U = N slots are allocated (static shapes); slots past the number
of distinct rows are padding.

Three reductions over that plan, all in float32:
  * 'xla': `jax.ops.segment_sum` on sorted ids. Deterministic on CPU and TPU; on GPU XLA lowers
    scatter-add to atomics, so the order of additions (and the last bits) may vary run to run.
  * 'pallas' (GPU, Triton): owner-computes, no atomics, bit-for-bit reproducible. Program p
    owns slots [p*S, (p+1)*S) and walks their sorted lookups L at a time, adding a one-hot
    [S, L] x [L, C] product per column chunk (IEEE fp32 dot) into f32 accumulators. A row read
    by many lookups makes its program loop longer (dynamic trip count).
  * 'scan': a segmented inclusive scan (`jax.lax.associative_scan`) over the sorted lookups,
    read at each segment's end: pure XLA without scatter-adds, so reproducible on every
    backend; each segment is summed in the scan's fixed tree order.
  The GPU default is 'pallas': bit-reproducible, close to XLA's atomic segment_sum
  in time, and several times faster than the scan (benchmarks/README.md, "Segment-sum alone").

Dimension legend: N lookups, U = N segment slots, E row width, S segments per program, L
lookups per loop step, C column chunk (as in gpu.py).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels.engram_lookup.configs import GpuSegmentSumConfig
from pallas_kernels.engram_lookup.gpu import column_chunks


class SortedSegments(NamedTuple):
  """Lookups sorted by segment id.

  order_N: the lookup at each sorted position (stable argsort).
  segment_N: segment (unique-slot) index of each sorted position, non-decreasing from 0.
  starts_U1: first sorted position of each slot, `N` for unused slots; one extra entry = N.
  keys_U: the key (row id) of each slot; `fill` in unused slots.
  """
  order_N: jax.Array
  segment_N: jax.Array
  starts_U1: jax.Array
  keys_U: jax.Array


def sort_segments(keys_N: jax.Array, fill: int) -> SortedSegments:
  """Sorts int32 keys and groups equal keys into segments."""
  n = keys_N.shape[0]
  order_N = jnp.argsort(keys_N, stable=True).astype(jnp.int32)
  sorted_N = keys_N[order_N]
  is_first_N = jnp.concatenate([jnp.ones((1,), bool), sorted_N[1:] != sorted_N[:-1]])
  segment_N = jnp.cumsum(is_first_N.astype(jnp.int32)) - 1
  # Only each segment's first position writes, so every scatter target is written once; the
  # others aim past both arrays (n + 1) and are dropped.
  slot_N = jnp.where(is_first_N, segment_N, n + 1)
  positions_N = jnp.arange(n, dtype=jnp.int32)
  starts_U1 = jnp.full((n + 1,), n, jnp.int32).at[slot_N].set(positions_N, mode="drop")
  keys_U = jnp.full((n,), fill, jnp.int32).at[slot_N].set(sorted_N, mode="drop")
  return SortedSegments(order_N, segment_N, starts_U1, keys_U)


def segments_of_sorted_ids(segment_ids_N: jax.Array, num_segments: int) -> SortedSegments:
  """The plan for lookups whose segment ids are given (e.g. an inverse index into U slots)."""
  order_N = jnp.argsort(segment_ids_N, stable=True).astype(jnp.int32)
  segment_N = segment_ids_N[order_N]
  starts_U1 = jnp.searchsorted(segment_N, jnp.arange(num_segments + 1, dtype=jnp.int32),
                               side="left").astype(jnp.int32)
  keys_U = jnp.arange(num_segments, dtype=jnp.int32)
  return SortedSegments(order_N, segment_N, starts_U1, keys_U)


def segment_sum_xla(g_NxE: jax.Array, plan: SortedSegments) -> jax.Array:
  """Per-slot f32 sums `[U, E]` via XLA's sorted segment_sum."""
  num_slots = plan.starts_U1.shape[0] - 1
  return jax.ops.segment_sum(g_NxE.astype(jnp.float32)[plan.order_N], plan.segment_N,
                             num_segments=num_slots, indices_are_sorted=True)


def segment_sum_scan(g_NxE: jax.Array, plan: SortedSegments) -> jax.Array:
  """Per-slot f32 sums `[U, E]` by a segmented inclusive scan over the sorted lookups
  (`jax.lax.associative_scan`, restarting at each segment's first position), read at each
  segment's last position. Pure XLA, no scatter-add: deterministic on every backend. Each
  segment is summed in the scan's fixed tree order (not strictly left to right)."""
  n = g_NxE.shape[0]
  g_sorted_NxE = g_NxE.astype(jnp.float32)[plan.order_N]
  is_first_N = jnp.concatenate([jnp.ones((1,), bool),
                                plan.segment_N[1:] != plan.segment_N[:-1]])

  def combine(left, right):
    (v_left, f_left), (v_right, f_right) = left, right
    return jnp.where(f_right[..., None], v_right, v_left + v_right), f_left | f_right

  scanned_NxE, _ = jax.lax.associative_scan(combine, (g_sorted_NxE, is_first_N))
  starts_U1 = plan.starts_U1
  used_U = starts_U1[:-1] < n
  last_U = jnp.clip(starts_U1[1:] - 1, 0, n - 1)
  return jnp.where(used_U[:, None], scanned_NxE[last_U], 0.0)


def _segment_sum_kernel(starts_ref, segment_ref, order_ref, g_ref, out_ref, *,
                        block_segments: int, block_lookups: int, width: int):
  first_slot = pl.program_id(0) * block_segments
  begin = starts_ref[first_slot]
  end = starts_ref[first_slot + block_segments]
  slots_S = first_slot + jax.lax.iota(jnp.int32, block_segments)
  col_chunks = [start + jax.lax.iota(jnp.int32, chunk)[None, :]
                for start, chunk in column_chunks(width)]
  num_steps = pl.cdiv(end - begin, block_lookups)

  def step(i, accs_SxC):
    pos_L = begin + i * block_lookups + jax.lax.iota(jnp.int32, block_lookups)
    valid_L = pos_L < end
    pos_L = jnp.minimum(pos_L, end - 1)  # Stay in bounds; invalid lanes are zeroed below.
    segment_L = segment_ref[pos_L]
    source_L = order_ref[pos_L]
    onehot_SxL = ((slots_S[:, None] == segment_L[None, :]) & valid_L[None, :]).astype(
        jnp.float32)
    return tuple(
        acc_SxC + pl_triton.dot(onehot_SxL, g_ref[source_L[:, None], cols].astype(jnp.float32),
                         allow_tf32=False)
        for acc_SxC, cols in zip(accs_SxC, col_chunks))

  zeros = tuple(jnp.zeros((block_segments, c.shape[1]), jnp.float32) for c in col_chunks)
  accs_SxC = jax.lax.fori_loop(0, num_steps, step, zeros)
  for acc_SxC, cols in zip(accs_SxC, col_chunks):
    out_ref[slots_S[:, None], cols] = acc_SxC


def segment_sum_pallas(g_NxE: jax.Array, plan: SortedSegments, *,
                       config: GpuSegmentSumConfig = GpuSegmentSumConfig(),
                       interpret: bool = False) -> jax.Array:
  """Per-slot f32 sums `[U, E]`, deterministic (Pallas-Triton, no atomics)."""
  n, width = g_NxE.shape
  if width % 16:
    raise NotImplementedError(f"the Pallas segment-sum needs E divisible by 16, got {width}")
  num_slots = plan.starts_U1.shape[0] - 1
  s = config.block_segments
  padded_slots = pl.cdiv(num_slots, s) * s
  starts = jnp.pad(plan.starts_U1, (0, padded_slots - num_slots), constant_values=n)
  kernel = functools.partial(_segment_sum_kernel, block_segments=s,
                             block_lookups=config.block_lookups, width=width)
  out_UxE = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((padded_slots, width), jnp.float32),
      grid=(padded_slots // s,),
      compiler_params=pl_triton.CompilerParams(num_warps=config.num_warps, num_stages=1),
      interpret=interpret,
      name="engram_segment_sum",
  )(starts, plan.segment_N, plan.order_N, g_NxE)
  return out_UxE[:num_slots]


IMPLEMENTATIONS = ("xla", "scan", "pallas")  # every `backward=` of the lookups


def check_backward(backward: str) -> None:
  """The lookups' `backward=` check (after None is resolved): one of IMPLEMENTATIONS."""
  if backward not in IMPLEMENTATIONS:
    names = ", ".join(repr(i) for i in IMPLEMENTATIONS[:-1]) + f" or {IMPLEMENTATIONS[-1]!r}"
    raise ValueError(f"backward must be None, {names}, got {backward!r}")


def segment_sum(g_NxE: jax.Array, plan: SortedSegments, *, implementation: str = "xla",
                interpret: bool = False,
                config: GpuSegmentSumConfig = GpuSegmentSumConfig()) -> jax.Array:
  """Dispatches to `segment_sum_xla`, `segment_sum_scan` or `segment_sum_pallas`."""
  if implementation == "xla":
    return segment_sum_xla(g_NxE, plan)
  if implementation == "scan":
    return segment_sum_scan(g_NxE, plan)
  if implementation == "pallas":
    return segment_sum_pallas(g_NxE, plan, config=config, interpret=interpret)
  raise ValueError(f"segment-sum implementation must be 'xla', 'scan' or 'pallas', got "
                   f"{implementation!r}")
