"""Benchmark of the Engram lookup: forward gather and table gradient, kernel vs XLA.

Run on a GPU (prints tables; the last lines are the summary):

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m benchmarks.bench_lookup [--quick]
      [--parts=forward,backward,segment_sum] [--kernel_time]

Forward: for each table (rows R, width E, dtype) and lookup count N, the time of `jnp.take`
(implementation='xla'), of the Pallas kernel, and of a same-size device copy (`-x` over the
[N, E] output: N*E read + N*E written) as the ceiling. Effective TB/s counts the rows read plus
the rows written, 2*N*E*itemsize bytes. Every kernel output is checked equal to jnp.take's.
A block-size sweep for one case picks the kernel config the table uses (the default config in
pallas_kernels/engram_lookup/configs.py comes from it).

Backward: forward+backward of the lookup w.r.t. the table, dense `jax.grad` of the reference
against the custom VJP (sorted f32 segment-sums, dense [R, E] result) and the row-sparse path
(prefetch_rows + expand_rows: its gradient is [U, E], independent of R) with each segment-sum
(xla, pallas, scan). Determinism: the segment-sum is run twice and compared bit for bit, for
XLA, the scan and the Pallas kernel at three segment counts per program.

Timing: the forward and the segment-sum (`bench`): a jitted program runs the function back to
back once per input set (24 id sets for the forward, 3 for the segment-sum), and a second
program runs a third of them; the difference of their median times over the extra calls is
the time per call, so the fixed cost of launching a program cancels. Distinct inputs keep XLA
from merging calls and the L2 cold. The backward is timed call by call (`bench_calls`), since
the difference of two programs whose outputs are as large as the table misreads the dense
gradient; its columns include each call's launch, which favours the dense baseline. Compare
columns within one run, not across runs. `--kernel_time` adds, for the forward, the GPU time
of each call's kernels read from a `jax.profiler` trace (the 24 calls traced one by one; no
launch gaps or host time), with XLA's command buffers off for the run so that every kernel is
its own event. Imports nothing from grain or ml_collections.

Dimension legend: R table rows, E row width, N = B*T*H lookups, H heads (16), U unique slots.
"""

import statistics
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from pallas_kernels.engram_lookup import (GpuLookupConfig, GpuSegmentSumConfig, engram_lookup,
                                          expand_rows, prefetch_rows, reference, segment_sum)

HEADS = 16

FLAGS = flags.FlagValues()
flags.DEFINE_bool("quick", False, "reduced sweep", flag_values=FLAGS)
flags.DEFINE_list("parts", ["forward", "backward", "segment_sum"],
                  "which parts to run (forward includes the block sweep)", flag_values=FLAGS)
flags.DEFINE_bool("kernel_time", False,
                  "forward: also GPU kernel time per call from a profiler trace (command "
                  "buffers off for the run)", flag_values=FLAGS)


def bench(fn, args_list, rounds=9):
  """Median seconds per call of `fn(*args)`, fixed program costs removed.

  Two jitted programs run fn back to back on the first `len(args_list) // 3` and on all the
  argument sets (distinct inputs, so XLA cannot merge calls and no call re-reads the previous
  call's rows from L2); per call = (time of the long program - time of the short) / (number of
  extra calls), so launch, dispatch and output-allocation costs of a program cancel.
  """
  short = args_list[:max(1, len(args_list) // 3)]
  many = jax.jit(lambda all_args: [fn(*args) for args in all_args])

  def program_time(sets):
    jax.block_until_ready(many(sets))
    times = []
    for _ in range(rounds):
      start = time.perf_counter()
      jax.block_until_ready(many(sets))
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  return (program_time(args_list) - program_time(short)) / (len(args_list) - len(short))


def bench_calls(fn, args_list, rounds=5):
  """Median seconds of one call of jitted `fn(*args)`, each timed alone to its
  block_until_ready (launch and output allocation included: charged to every function alike).
  The backward uses it: for programs whose outputs are as large as the table (the dense
  gradient), `bench`'s difference of two programs is far below the time of one call."""
  jitted = jax.jit(fn)
  jax.block_until_ready(jitted(*args_list[0]))
  times = []
  for _ in range(rounds):
    for args in args_list:
      start = time.perf_counter()
      jax.block_until_ready(jitted(*args))
      times.append(time.perf_counter() - start)
  return statistics.median(times)


def kernel_time(fn, args_list, label):
  """Mean GPU seconds per call of jitted `fn`: the summed durations of the trace's GPU events
  of its module (named after `label`) over the calls, each call run once on its inputs."""
  def timed(*args):
    return fn(*args)
  timed.__name__ = f"ktime_{label}"
  jitted = jax.jit(timed)
  for args in args_list:
    jax.block_until_ready(jitted(*args))
  _, profile, _ = common.profiled(
      lambda: [jax.block_until_ready(jitted(*args)) for args in args_list])
  total_ns = 0
  for plane in profile.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      for event in line.events:
        if timed.__name__ in str(dict(event.stats).get("hlo_module", "")):
          total_ns += event.duration_ns
  if total_ns == 0:
    raise SystemExit(f"no GPU event of module {timed.__name__} in the trace")
  return total_ns / 1e9 / len(args_list)


def make_table(rows, width, dtype, seed=0):
  return jax.random.normal(jax.random.key(seed), (rows, width), jnp.float32).astype(dtype)


def make_ids(num_lookups, rows, seed, sets=24):
  per_head = rows // HEADS
  offsets_H = jnp.arange(HEADS, dtype=jnp.int32) * per_head
  bt = num_lookups // HEADS
  ids = [jax.random.randint(jax.random.key(seed + s), (1, bt, HEADS), 0, per_head)
         for s in range(sets)]
  return ids, offsets_H


def forward_sweep(tables, lookups, dtypes, widths, config, with_kernel_time=False):
  print("\n== forward: [N lookups] x [E] rows from [R, E]; TB/s = 2*N*E*bytes / time ==")
  header = (f"{'R':>11} {'E':>3} {'dtype':>8} {'N':>7} | {'copy us':>8} {'TB/s':>5} | "
            f"{'take us':>8} {'TB/s':>5} | {'pallas us':>9} {'TB/s':>5} | {'x take':>6} "
            f"{'ok':>3}")
  print(header)
  rows_out = []
  take = lambda t, i, o: engram_lookup(t, i, o, implementation="xla")
  kern = lambda t, i, o: engram_lookup(t, i, o, implementation="pallas", gpu_config=config)
  neg = lambda x: -x
  for rows in tables:
    for width in widths:
      for dtype in dtypes:
        table = make_table(rows, width, dtype)
        for n in lookups:
          ids, offsets = make_ids(n, rows, seed=rows + n)
          ok = all(bool(jnp.array_equal(jax.jit(kern)(table, i, offsets),
                                        jax.jit(take)(table, i, offsets))) for i in ids[:2])
          nbytes = 2 * n * width * jnp.dtype(dtype).itemsize
          copies = [(make_table(n, width, dtype, seed=s),) for s in range(len(ids))]
          t_copy = bench(neg, copies)
          t_take = bench(take, [(table, i, offsets) for i in ids])
          t_kern = bench(kern, [(table, i, offsets) for i in ids])
          line = (f"{rows:>11,} {width:>3} {jnp.dtype(dtype).name:>8} {n:>7} | "
                  f"{t_copy * 1e6:>8.1f} {nbytes / t_copy / 1e12:>5.2f} | "
                  f"{t_take * 1e6:>8.1f} {nbytes / t_take / 1e12:>5.2f} | "
                  f"{t_kern * 1e6:>9.1f} {nbytes / t_kern / 1e12:>5.2f} | "
                  f"{t_take / t_kern:>6.2f} {'yes' if ok else 'NO':>3}")
          if with_kernel_time:
            k_copy = kernel_time(neg, copies, "copy")
            k_take = kernel_time(take, [(table, i, offsets) for i in ids], "take")
            k_kern = kernel_time(kern, [(table, i, offsets) for i in ids], "pallas")
            line += (f" || GPU us: copy {k_copy * 1e6:.1f} ({nbytes / k_copy / 1e12:.2f} TB/s)"
                     f" take {k_take * 1e6:.1f} ({nbytes / k_take / 1e12:.2f})"
                     f" pallas {k_kern * 1e6:.1f} ({nbytes / k_kern / 1e12:.2f})"
                     f" x take {k_take / k_kern:.2f}")
          print(line, flush=True)
          rows_out.append(line)
          del copies
        del table
  return header, rows_out


def config_sweep(rows, width, dtype, n):
  print(f"\n== block sweep: R={rows:,} E={width} {jnp.dtype(dtype).name} N={n} ==")
  table = make_table(rows, width, dtype)
  ids, offsets = make_ids(n, rows, seed=1)
  nbytes = 2 * n * width * jnp.dtype(dtype).itemsize
  results = []
  for block_rows in (128, 256, 512, 1024):
    for num_warps in (4, 8):
      for num_stages in (1,):
        cfg = GpuLookupConfig(block_rows=block_rows, num_warps=num_warps,
                              num_stages=num_stages)
        fn = lambda t, i, o, cfg=cfg: engram_lookup(t, i, o, implementation="pallas",
                                                    gpu_config=cfg)
        t = bench(fn, [(table, i, offsets) for i in ids])
        results.append((t, cfg))
        print(f"block_rows={block_rows:>5} warps={num_warps} stages={num_stages}: "
              f"{t * 1e6:7.1f} us {nbytes / t / 1e12:5.2f} TB/s", flush=True)
  best_t, best = min(results, key=lambda r: r[0])
  print(f"best: {best} {best_t * 1e6:.1f} us {nbytes / best_t / 1e12:.2f} TB/s")
  return best


def backward_sweep(tables, n, width, dtype):
  print(f"\n== forward+backward w.r.t. the table: N={n} E={width} {jnp.dtype(dtype).name} ==")
  header = (f"{'R':>11} | {'dense grad(ref) us':>18} | {'custom vjp us':>13} | "
            f"{'row-sparse xla us':>17} | {'row-sparse pallas us':>20} | {'x dense':>7} | "
            f"{'row-sparse scan us':>18} | {'x dense':>7}")
  print(header)
  lines = []
  for rows in tables:
    table = make_table(rows, width, dtype)
    ids, offsets = make_ids(n, rows, seed=rows)
    cot = jax.random.normal(jax.random.key(5), (1, n // HEADS, HEADS * width), dtype)

    def dense_ref(t, i, o):
      return jax.grad(lambda t: jnp.vdot(reference.engram_lookup_reference(t, i, o), cot)
                      .astype(jnp.float32))(t)

    def custom(t, i, o):
      return jax.grad(lambda t: jnp.vdot(engram_lookup(t, i, o), cot).astype(jnp.float32))(t)

    def sparse(backward):
      def fn(t, i, o):
        pre = prefetch_rows(t, i, o)
        return jax.grad(lambda r: jnp.vdot(expand_rows(r, pre.inverse_BxTxH, backward=backward,
                                                       plan=pre.plan),
                                           cot).astype(jnp.float32))(pre.rows_UxE)
      return fn

    args = [(table, i, offsets) for i in ids[:3]]  # 3 dense table-sized grads must fit
    times = [bench_calls(f, args) for f in
             (dense_ref, custom, sparse("xla"), sparse("pallas"), sparse("scan"))]
    line = (f"{rows:>11,} | {times[0] * 1e6:>18.1f} | {times[1] * 1e6:>13.1f} | "
            f"{times[2] * 1e6:>17.1f} | {times[3] * 1e6:>20.1f} | {times[0] / times[3]:>7.1f} | "
            f"{times[4] * 1e6:>18.1f} | {times[0] / times[4]:>7.1f}")
    print(line, flush=True)
    lines.append(line)
    del table
  return header, lines


def segment_sum_sweep(n, width, num_rows):
  """Times the sorted segment-sum alone (plan precomputed) and checks run-to-run bits."""
  print(f"\n== segment-sum of N={n} f32 rows of E={width} over {num_rows:,} table rows ==")
  rows_N = jax.random.randint(jax.random.key(0), (n,), 0, num_rows)
  rows_N = rows_N.at[::64].set(3)  # One hot row read by 1/64 of the lookups.
  g_NxE = jax.random.normal(jax.random.key(1), (n, width))
  plan = jax.jit(segment_sum.sort_segments, static_argnums=1)(rows_N, num_rows)
  order = np.asarray(plan.order_N)
  want = np.zeros((n, width), np.float64)
  np.add.at(want, np.asarray(plan.segment_N), np.asarray(g_NxE, np.float64)[order])
  variants = [("xla", None), ("scan", None)] + [
      ("pallas", GpuSegmentSumConfig(s, 64)) for s in (32, 64, 128)]
  for impl, cfg in variants:
    kwargs = dict(implementation=impl) if cfg is None else dict(implementation=impl, config=cfg)
    fn = lambda g, p, kwargs=kwargs: segment_sum.segment_sum(g, p, **kwargs)
    a = np.asarray(jax.jit(fn)(g_NxE, plan))
    b = np.asarray(jax.jit(fn)(g_NxE, plan))
    t = bench(fn, [(g_NxE * (1 + k), plan) for k in range(3)], rounds=3)
    print(f"{impl:>6} {str(cfg):>80}: {t * 1e6:8.1f} us  bitwise reproducible: "
          f"{np.array_equal(a, b)}  max|err| vs f64: {np.abs(a - want).max():.1e}", flush=True)


def main():
  args = common.parse_flags(FLAGS, __doc__)
  if args.kernel_time:
    common.command_buffers_off()
  parts = set(args.parts)
  if not parts <= {"forward", "backward", "segment_sum"}:
    raise SystemExit(f"--parts: a comma list of forward, backward, segment_sum; got {args.parts}")
  print(common.device_summary())
  if args.quick:
    tables, lookups, bwd_tables = (10_000_000,), (32_768, 524_288), (1_000_000, 100_000_000)
  else:
    tables, lookups = (1_000_000, 10_000_000, 100_000_000), (32_768, 524_288)
    bwd_tables = (1_000_000, 10_000_000, 100_000_000)
  if "forward" in parts:
    best = config_sweep(8_000_000, 64, jnp.bfloat16, 524_288)
    header, fwd = forward_sweep(tables, lookups, (jnp.bfloat16, jnp.float32), (64, 80), best,
                                args.kernel_time)
  if "backward" in parts:
    bheader, bwd = backward_sweep(bwd_tables, 262_144, 64, jnp.bfloat16)
  if "segment_sum" in parts:
    segment_sum_sweep(262_144, 64, 10_000_000)
  print("\n== summary ==")
  if "forward" in parts:
    print(f"kernel config: {best}")
    print(header)
    print("\n".join(fwd))
  if "backward" in parts:
    print(bheader)
    print("\n".join(bwd))


if __name__ == "__main__":
  main()
