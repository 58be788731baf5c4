"""Step time vs Engram table size: dense Adam (optax) vs row-sparse lazy Adam / row-wise Adagrad.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m experiments.bench_train_step [--step=standalone]

Question: does a training step's cost stay flat as the table grows when only the touched rows are
updated (engram_jax/table_optim.py), while dense Adam grows with the table? Goal (issue 5): on an
H200 the sparse step grows <= 5% from a 1M-row table to the largest that fits in HBM.

`--step=standalone` (default; no grain / ml_collections needed): one Engram-sized step of our
own -- hashed ids [B, T, H] -> `prefetch_rows` (unique rows, gathered outside the gradient) ->
`expand_rows` -> [B, T, H*E] -> a dense layer to d -> squared-error loss. 'dense' differentiates
w.r.t. the whole table (table-sized gradient) and applies optax Adam to the whole table; the
sparse kinds differentiate w.r.t. the gathered rows and call `apply_row_sparse_update`. Table,
moments and dense weights are donated, so sparse updates run in place.

Table sizes: powers of 4 rows from 1M, then the largest table whose bytes
(`bytes_per_table_param` x E x rows) fit the device's memory limit minus headroom. Dense runs
only while table + Adam moments + a dense gradient (+ one update-sized temporary) fit. Tables are
filled by a fused iota expression (a random init would need a table-sized temporary).

Prints one table: rows, table GB, ms per step for each optimiser, and sparse growth vs the
smallest table. Timing: AOT-compiled step, 3 warm-up steps, then the median of 5 runs of 10
steps each (block_until_ready at the end of each run).

Dimension legend: B batch, T time, H hash heads, E row width, R table rows, D model width,
U = B*T*H row slots.
"""

import argparse
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from engram_jax import table_optim
from pallas_kernels.engram_lookup import RowSparse, expand_rows, prefetch_rows

_GB = 1e9


def _fill_table(num_rows: int, width: int, dtype):
  # Row-index pattern, computed in one fused kernel (no table-sized temporaries).
  def fill():
    rows = jax.lax.broadcasted_iota(jnp.int32, (num_rows, width), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (num_rows, width), 1)
    return (((rows * 31 + cols) % 977).astype(jnp.float32) * 1e-3 - 0.488).astype(dtype)
  return jax.jit(fill)()


def _loss_from_rows(rows_UxE, inverse_BxTxH, w_KxD, target_BxTxD):
  x_BxTxK = expand_rows(rows_UxE, inverse_BxTxH)
  return jnp.mean(jnp.square(x_BxTxK.astype(jnp.float32) @ w_KxD - target_BxTxD))


def _make_step(kind: str, offsets_H, base_lr: float):
  """Returns (init_opt(table, w), step(table, opt, w, ids, target) -> (table, opt, w, loss))."""
  dense_tx = optax.adam(base_lr)
  if kind == 'dense':
    table_tx = optax.adam(base_lr * 5.0, b1=0.9, b2=0.999, eps=1e-8)

    def init_opt(table, w):
      return table_tx.init(table), dense_tx.init(w)

    def step(table, opt, w, ids_BxTxH, target_BxTxD):
      table_opt, w_opt = opt

      def loss_fn(table, w):
        pre = prefetch_rows(table, ids_BxTxH, offsets_H)
        return _loss_from_rows(pre.rows_UxE, pre.inverse_BxTxH, w, target_BxTxD)

      loss, (g_table, g_w) = jax.value_and_grad(loss_fn, argnums=(0, 1))(table, w)
      u_table, table_opt = table_tx.update(g_table, table_opt, table)
      u_w, w_opt = dense_tx.update(g_w, w_opt, w)
      return (optax.apply_updates(table, u_table), (table_opt, w_opt),
              optax.apply_updates(w, u_w), loss)
    return init_opt, step

  cfg = table_optim.TableOptimizerConfig(kind=kind)

  def init_opt(table, w):
    return table_optim.init_table_state(cfg, table), dense_tx.init(w)

  def step(table, opt, w, ids_BxTxH, target_BxTxD):
    table_state, w_opt = opt
    pre = prefetch_rows(table, ids_BxTxH, offsets_H)
    loss, (g_rows, g_w) = jax.value_and_grad(_loss_from_rows, argnums=(0, 2))(
        pre.rows_UxE, pre.inverse_BxTxH, w, target_BxTxD)
    table, table_state = table_optim.apply_row_sparse_update(
        cfg, table, table_state, RowSparse(pre.row_ids_U, g_rows.astype(jnp.float32)), base_lr)
    u_w, w_opt = dense_tx.update(g_w, w_opt, w)
    return table, (table_state, w_opt), optax.apply_updates(w, u_w), loss
  return init_opt, step


def _time_step(kind, num_rows, args):
  heads, width = args.heads, args.row_width
  rows_per_head = num_rows // heads
  offsets_H = jnp.arange(heads, dtype=jnp.int32) * rows_per_head
  rng = np.random.default_rng(0)
  ids = [jnp.asarray(rng.integers(0, rows_per_head, size=(args.batch, args.seq_len, heads)),
                     jnp.int32) for _ in range(4)]
  target = jnp.asarray(rng.normal(size=(args.batch, args.seq_len, args.model_dim)), jnp.float32)
  table = _fill_table(num_rows, width, jnp.float32)
  w = jnp.asarray(rng.normal(size=(heads * width, args.model_dim)) * 0.02, jnp.float32)
  init_opt, step = _make_step(kind, offsets_H, args.base_lr)
  opt = jax.jit(init_opt)(table, w)
  compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(table, opt, w, ids[0], target).compile()
  for i in range(3):
    table, opt, w, loss = compiled(table, opt, w, ids[i % 4], target)
  loss.block_until_ready()
  runs = []
  for _ in range(5):
    start = time.perf_counter()
    for i in range(10):
      table, opt, w, loss = compiled(table, opt, w, ids[i % 4], target)
    loss.block_until_ready()
    runs.append((time.perf_counter() - start) / 10 * 1e3)
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f'{kind} at {num_rows} rows: loss {float(loss)}')
  del table, opt, w
  gc.collect()
  return float(np.median(runs))


def _dense_bytes_per_param():
  # table + Adam mu + nu (f32) + the table-sized gradient + one table-sized update temporary.
  return table_optim.bytes_per_table_param(
      table_optim.TableOptimizerConfig(kind='dense_adam'), jnp.float32) + 4 + 4


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--step', default='standalone', choices=['standalone'])
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--seq_len', type=int, default=512)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--row_width', type=int, default=32)
  parser.add_argument('--model_dim', type=int, default=512)
  parser.add_argument('--base_lr', type=float, default=4e-4)
  parser.add_argument('--min_rows', type=int, default=1 << 20)
  parser.add_argument('--max_rows', type=int, default=0, help='0: the largest that fits')
  parser.add_argument('--headroom_gb', type=float, default=8.0)
  parser.add_argument('--kinds', default='dense,lazy_adam,adagrad')
  args = parser.parse_args()
  kinds = args.kinds.split(',')
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  limit = stats.get('bytes_limit')
  if limit is None and not args.max_rows:
    raise SystemExit(f'{device}: no memory_stats bytes_limit; pass --max_rows')
  budget = (limit or 0) - args.headroom_gb * _GB
  per_param = {k: (_dense_bytes_per_param() if k == 'dense' else
                   table_optim.bytes_per_table_param(table_optim.TableOptimizerConfig(kind=k),
                                                     jnp.float32, row_width=args.row_width))
               for k in kinds}
  fits = {k: int(budget // (per_param[k] * args.row_width)) for k in kinds}
  largest = args.max_rows or max(fits[k] for k in kinds if k != 'dense')
  largest -= largest % args.heads
  sizes = []
  rows = args.min_rows
  while rows < largest:
    sizes.append(rows)
    rows *= 4
  sizes.append(largest)
  print(f'device: {device.device_kind}; memory limit {limit / _GB if limit else float("nan"):.1f} '
        f'GB, budget {budget / _GB:.1f} GB; B={args.batch} T={args.seq_len} H={args.heads} '
        f'E={args.row_width} D={args.model_dim}; bytes/param: '
        + ', '.join(f'{k} {v:.3f}' for k, v in per_param.items()), flush=True)
  results = {}
  for num_rows in sizes:
    for kind in kinds:
      if not args.max_rows and num_rows > fits[kind]:
        results[num_rows, kind] = None
        continue
      results[num_rows, kind] = _time_step(kind, num_rows, args)
      print(f'  rows={num_rows:,} {kind}: {results[num_rows, kind]:.3f} ms', flush=True)
  header = (f'{"rows":>13} {"table GB":>9} ' + ' '.join(f'{k + " ms":>13}' for k in kinds)
            + ' ' + ' '.join(f'{k + " growth":>17}' for k in kinds if k != 'dense'))
  print(header)
  for num_rows in sizes:
    cells = [f'{num_rows:>13,}', f'{num_rows * args.row_width * 4 / _GB:>9.2f}']
    for kind in kinds:
      ms = results[num_rows, kind]
      cells.append(f'{ms:>13.3f}' if ms is not None else f'{"no fit":>13}')
    for kind in kinds:
      if kind == 'dense':
        continue
      ms, base = results[num_rows, kind], results[sizes[0], kind]
      cells.append(f'{(ms / base - 1) * 100:>+16.1f}%' if ms is not None and base else
                   f'{"-":>17}')
    print(' '.join(cells))


if __name__ == '__main__':
  main()
