"""Checks, on this machine's device, the row gathers and scatters that host tables rely on.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.check_host_rows [--rows=...]

For a pinned_host table and an HBM table of `--rows` x `--width` f32 (default 16.8M x 64: 4.3 GB,
above 2^31 bytes, so 32-bit byte offsets would overflow) and a small one, with sorted unique row
ids plus padding (the `offload.HostTableTrainer` layout: padding id R, dropped by scatters;
gathers clamp it to R-1), compares with NumPy:
  gather   `offload.fetch_rows` (`table.at[ids].get(mode='promise_in_bounds')` -> device)
  scatter  `table.at[ids].set(rows, mode='drop')` (donated), with the new rows
           * copied to the host inside the scatter's program (the pattern the library avoids:
             on the H200 it writes wrong rows; reported, marked `*`, not required),
           put on the host first, or output to the host by the previous program (the
           library's pattern); then the written and other rows read back,
and then steps of the separate (`HostTableTrainer.prefetch` / `apply_grad`), fused
(`make_fused_step`) and threaded (`make_threaded_step`: NumPy gathers / scatters on views of the
pinned_host buffers) pipelines against the same steps on HBM tables (two layers, as
bench_offload trains): 2 steps, 2 steps whose gradients wait for `--slow` matmuls, and `--steps`
steps.
Prints one line per check (max |difference|, which must be 0 except `*`) and exits non-zero on a
mismatch. Added after bench_offload's first GPU runs, where rows updated through pinned_host
tables differed from the HBM placement's. H200 (jax 0.11.2): the row primitives and every
threaded chain 0 in every run. The XLA chains vary from run to run: at 3ce5d4f 8 separate steps
1.68e7, 8 fused steps 1.23e7, 2 separate steps behind 1000 matmuls 3.48e4; at f518b64 8 separate
steps 0, 8 fused 1.23e7, the 1000-matmul chains 0, and 8 separate / fused steps whose trainer
kept every host operand of its scatters alive (an option since removed) 1.68e7 / 0 (MISMATCH:
why the library refuses those two pipelines on a GPU,
offload.HostTableTrainer(allow_xla_host_writes=...); not a buffer freed early). `*` on the
16.8M rows: 64, 832 and 64 in three runs, 0 at f518b64.

Dimension legend: R table rows, E row width, U row slots.
"""

import argparse
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from engram_jax import offload, table_optim


def _table(rows, width, placement):
  # Row r, column c holds r + c / 1024, computed in HBM, then placed (compared in f32).
  fill = lambda: (jax.lax.broadcasted_iota(jnp.float32, (rows, width), 0)  # noqa: E731
                  + jax.lax.broadcasted_iota(jnp.float32, (rows, width), 1) / 1024)
  return jax.device_put(jax.jit(fill)(), offload.placement_sharding(placement))


def _expected_rows(ids, width):
  return ids.astype(np.float32)[:, None] + np.arange(width, dtype=np.float32)[None] / 1024


def check_primitives(rows, width, slots, placement, seed=0):
  rng = np.random.default_rng(seed)
  ids = np.sort(rng.choice(rows, slots - 16, replace=False)).astype(np.int32)
  ids = np.concatenate([ids[:-1], [rows - 1], np.full(16, rows, np.int32)])  # last row, padding
  home = offload.placement_sharding(placement)
  dev = offload.placement_sharding("device")
  table = _table(rows, width, placement)
  read = lambda t, i: np.asarray(offload.fetch_rows(t, jax.device_put(i, home)))  # noqa: E731
  got = read(table, np.minimum(ids, rows - 1))
  want = _expected_rows(np.minimum(ids, rows - 1), width)
  out = {"gather": float(np.max(np.abs(got - want)))}
  # "*": the pattern the library avoids (in-program D2H copy + host scatter of it); reported,
  # not required to be exact.
  space = jax.typeof(table).memory_space
  scatter = jax.jit(lambda t, i, v: t.at[i].set(jax.device_put(v, space), mode="drop"),
                    donate_argnums=0)
  new = -np.arange(slots * width, dtype=np.float32).reshape(slots, width) - 1
  table = scatter(table, jax.device_put(ids, home), jax.device_put(new, dev))
  got = read(table, np.minimum(ids, rows - 1))
  real = ids < rows
  written = "scatter: written rows" + ("*" if placement != "device" else "")
  out[written] = float(np.max(np.abs(got[real] - new[real])))
  if placement != "device":
    # The same scatter with the new rows moved to the host by a transfer of their own first
    # (the program then has only host operands): tells a race between the in-program
    # device-to-host copy and the host scatter apart from a wrong host scatter.
    scatter_host = jax.jit(lambda t, i, v: t.at[i].set(v, mode="drop"), donate_argnums=0)
    new2 = new - 7
    v = jax.block_until_ready(jax.device_put(new2, home))
    table = scatter_host(table, jax.device_put(ids, home), v)
    got = read(table, np.minimum(ids, rows - 1))
    out["scatter, rows put first"] = float(np.max(np.abs(got[real] - new2[real])))
    # The library's pattern: the rows are computed on the device and output to the host by one
    # program, and the next program scatters them (dispatched back to back, no wait between).
    produce = jax.jit(lambda v: jax.device_put(v - 11, space))
    v = produce(jax.device_put(new, dev))
    table = scatter_host(table, jax.device_put(ids, home), v)
    got = read(table, np.minimum(ids, rows - 1))
    out["scatter, rows output by the previous program"] = float(
        np.max(np.abs(got[real] - (new[real] - 11))))
  # Rows not written keep their values: neighbours of the written ids and a random sample.
  others = np.setdiff1d(np.concatenate([ids[real] + 1, ids[real] - 1,
                                        rng.integers(0, rows, 4096)]), ids)
  others = others[(others >= 0) & (others < rows)].astype(np.int32)
  got = read(table, others)
  out["scatter: other rows"] = float(np.max(np.abs(got - _expected_rows(others, width))))
  return out


LAYERS = (1, 2)  # two tables, as bench_offload trains


def _host_vs_hbm(rows, width, train, train_hbm=None):
  """max |difference| between pinned_host and HBM tables (one per layer of LAYERS) after
  `train(trainer)` (the HBM ones after `train_hbm(trainer)` if given), over the row ids it
  returns per layer (the rows its steps touched; padding ids R are dropped)."""
  cfg = table_optim.TableOptimizerConfig(kind="adagrad")
  results = {}
  for placement in ("pinned_host", "device"):
    trainer = offload.HostTableTrainer(cfg, {l: _table(rows, width, placement) for l in LAYERS},
                                       {l: np.zeros(2, np.int32) for l in LAYERS},
                                       allow_xla_host_writes=True)  # what this checks
    touched = (train_hbm or train)(trainer) if placement == "device" else train(trainer)
    for l in LAYERS:
      rid = np.asarray(touched[l])
      rid = rid[rid < rows].astype(np.int32)
      table = trainer.tables[l]
      results[placement, l] = np.asarray(offload.fetch_rows(
          table, jax.device_put(rid, table.sharding)))
    del trainer
  return max(float(np.max(np.abs(results["pinned_host", l] - results["device", l])))
             for l in LAYERS)


def check_trainer_step(rows, width, seed=0, slots=2048, slow=0, steps=2):
  """HostTableTrainer on pinned_host tables vs the same updates of HBM tables (two layers),
  over `steps` steps of each pipeline: separate (`prefetch` of s+1, then `apply_grad` of s),
  fused (make_fused_step: step s's update is output to the host by its program and scattered
  by step s+1's) and threaded (make_threaded_step; the HBM side runs the fused steps: threaded
  steps need host tables). `slow` > 0: every gradient waits for `slow` 2048^2 matmuls first (a
  model step that takes time, as in training; the gradient's values are unchanged)."""
  dev = offload.placement_sharding("device")
  x = jax.device_put(np.full((2048, 2048), 1e-3, np.float32), dev)
  ids = [{l: np.random.default_rng([seed, l, i]).integers(0, rows, (4, slots // 8, 2))
          .astype(np.int32) for l in LAYERS} for i in range(steps)]

  def chain(g, x):  # g + 0 * (a chain of `slow` matmuls): the same values, later
    y = jax.lax.fori_loop(0, slow, lambda i, y: jnp.tanh(y @ x), x) if slow else x
    return g + 0 * y[0, 0]
  delayed = jax.jit(chain)

  def grads(h, s):
    return {l: jax.device_put(np.random.default_rng([seed, l, 1000 + s]).standard_normal(
        (h.row_ids[l].shape[0], width)).astype(np.float32), dev) for l in LAYERS}

  def touched_rows(touched):
    return {l: np.unique(np.concatenate([t[l] for t in touched])) for l in LAYERS}

  def separate_steps(trainer):
    h, touched = trainer.prefetch(ids[0]), []
    for s in range(steps):
      nxt = trainer.prefetch(ids[s + 1]) if s + 1 < steps else None
      touched.append({l: np.asarray(h.row_ids[l]) for l in LAYERS})
      trainer.apply_grad(h, {l: delayed(g, x) for l, g in grads(h, s).items()}, 0.5)
      h = nxt
    return touched_rows(touched)

  def chained_steps(trainer, threaded=False):
    make = trainer.make_threaded_step if threaded else trainer.make_fused_step
    run = make(lambda state, g, rows_: (state, {l: chain(g[l], state) for l in LAYERS}, 0.5))
    h, touched = trainer.prefetch(ids[0]), []
    for s in range(steps):
      touched.append({l: np.asarray(h.row_ids[l]) for l in LAYERS})
      _, h = run(h, ids[s + 1] if s + 1 < steps else None, x, grads(h, s))
    return touched_rows(touched)

  with warnings.catch_warnings():  # their GPU warning (allowed above): this is what they check
    warnings.simplefilter("ignore", RuntimeWarning)
    return {f"{steps} separate steps host vs HBM": _host_vs_hbm(rows, width, separate_steps),
            f"{steps} fused steps host vs HBM": _host_vs_hbm(rows, width, chained_steps),
            # NumPy views of the pinned_host buffers written by worker threads (HBM: fused).
            f"{steps} threaded steps host vs HBM": _host_vs_hbm(
                rows, width, lambda t: chained_steps(t, threaded=True), chained_steps)}


def _verdict(name, diff):
  if diff == 0:
    return ""
  return "   MISMATCH" + (" (expected)" if name.endswith("*") else "")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", type=int, default=(1 << 24) + 12345)
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--slots", type=int, default=262144)
  p.add_argument("--steps", type=int, default=8,
                 help="steps of each pipeline in the long trainer checks")
  p.add_argument("--slow", type=int, default=1000,
                 help="matmuls (2048^2 f32) each gradient waits for in the slow trainer checks")
  args = p.parse_args()
  bad = False
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
  for rows, slots in ((args.rows, args.slots), (4099, 1024)):
    for placement in ("pinned_host", "device"):
      for name, diff in check_primitives(rows, args.width, slots, placement).items():
        bad |= diff != 0 and not name.endswith("*")
        print(f"  R={rows:>11,} {placement:<11} {name:<46} max |diff| {diff:.3g}"
              f"{_verdict(name, diff)}", flush=True)
  for rows, slots, slow, steps in ((args.rows, args.slots, 0, 2),
                                   (args.rows, args.slots, args.slow, 2),
                                   (args.rows, args.slots, 0, args.steps),
                                   (args.rows, 2048, 0, 2), (4099, 2048, 0, 2)):
    for name, diff in check_trainer_step(rows, args.width, slots=slots, slow=slow,
                                         steps=steps).items():
      name += f", {slow} matmuls" if slow else ""
      bad |= diff != 0
      print(f"  R={rows:>11,} U={slots:>7,} {name:<46} max |diff| {diff:.3g}"
            f"{_verdict(name, diff)}",
            flush=True)
  sys.exit(1 if bad else 0)


if __name__ == "__main__":
  main()
