"""NumPy row traffic of host tables on worker threads: `HostRowWorker` and its staging buffers.

The host side of a host-table step (engram_jax/host_tables.py) gathers a batch's rows out of
writable views of pinned_host tables into pinned staging buffers (one DMA to the device each)
and scatters updated rows back, in row chunks on a thread pool (NumPy's take and fancy
assignment release the GIL), all ordered by one queue thread.

Dimension legend: none (row chunks of any [R, ...] array).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import jax
import numpy as np

from engram_jax.host_memory import host_view, zeros


def default_host_threads() -> int:
  """Row-chunk threads of the host side: half the CPUs, at most 8 (the other half keeps feeding
  the device; `bench_offload --probe` times 1, 8 and all threads, benchmarks/README.md)."""
  return max(1, min(8, (os.cpu_count() or 2) // 2))


class _StagingSlot:
  """A pinned_host buffer (and its NumPy view) that rows are gathered into, then sent to the
  device by DMA; it is written again only after that copy is done."""

  def __init__(self, shape, dtype, device):
    self.array = zeros(shape, dtype, "pinned_host", device)
    self.view = host_view(self.array)
    self.in_flight: Optional[jax.Array] = None

  def send(self, sharding) -> jax.Array:
    self.in_flight = jax.device_put(self.array, sharding)
    return self.in_flight


class _Staging:
  """Two staging slots per key, used in turn (one can be in flight while the other fills)."""

  def __init__(self):
    self._slots: dict = {}

  def take(self, key, shape, dtype, device) -> _StagingSlot:
    pair, turn = self._slots.get(key, (None, 0))
    if pair is None or pair[0].array.shape != tuple(shape) or pair[0].array.dtype != dtype:
      pair = (_StagingSlot(shape, dtype, device), _StagingSlot(shape, dtype, device))
    self._slots[key] = (pair, 1 - turn)
    slot = pair[turn]
    if slot.in_flight is not None:
      slot.in_flight.block_until_ready()   # its last copy to the device has been read
    return slot


class HostRowWorker:
  """One ordered queue (its own thread) whose tasks split each gather / scatter into row chunks
  run by a pool of `threads` (NumPy's take and fancy assignment release the GIL), and the pinned
  staging buffers of the gathers. `drain` waits for every task and re-raises the first error."""

  MIN_CHUNK_ROWS = 4096

  def __init__(self, threads: int):
    self.threads = int(threads)
    if self.threads < 1:
      raise ValueError(f"threads must be >= 1, got {threads}")
    self._queue = ThreadPoolExecutor(1, thread_name_prefix="engram-host-queue")
    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="engram-host-rows")
    self._futures: list[Future] = []
    self.staging = _Staging()

  def submit(self, fn, *args) -> Future:
    self._futures = [f for f in self._futures if not f.done() or f.exception() is not None]
    fut = self._queue.submit(fn, *args)
    self._futures.append(fut)
    return fut

  def result(self, fut: Future):
    """`fut.result()`; its error, if any, is then not raised again by `drain`."""
    if fut in self._futures:
      self._futures.remove(fut)
    return fut.result()

  def drain(self) -> None:
    futures, self._futures = self._futures, []
    for f in futures:
      f.result()

  def shutdown(self) -> None:
    """Waits for every task (re-raising the first error) and stops the threads."""
    try:
      self.drain()
    finally:
      self._queue.shutdown()
      self._pool.shutdown()

  def _chunks(self, n: int):
    k = max(1, min(self.threads, n // self.MIN_CHUNK_ROWS))
    bounds = np.linspace(0, n, k + 1).astype(np.int64)
    return list(zip(bounds[:-1], bounds[1:]))

  def gather(self, src: np.ndarray, ids: np.ndarray, out: np.ndarray) -> None:
    """out[:len(ids)] = src[ids] in row chunks."""
    def part(ab):
      a, b = ab
      np.take(src, ids[a:b], axis=0, out=out[a:b])
    list(self._pool.map(part, self._chunks(ids.shape[0])))

  def scatter(self, dst: np.ndarray, ids: np.ndarray, values: np.ndarray) -> None:
    """dst[ids] = values[:len(ids)] in row chunks (ids unique, so chunks never collide)."""
    def part(ab):
      a, b = ab
      dst[ids[a:b]] = values[a:b]
    list(self._pool.map(part, self._chunks(ids.shape[0])))
