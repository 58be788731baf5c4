"""Step time vs Engram table size: dense Adam (optax) vs row-sparse lazy Adam / row-wise Adagrad.

  XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
      python -m benchmarks.bench_train_step [--step=trainer --config=experiments/configs/small_gpu.py]

(Without MEM_FRACTION, JAX's allocator stops at 75% of the device's memory.)

Claim: a step whose table optimiser updates only the touched rows (engram_jax/table_optim.py)
costs the same at any table size, while dense Adam grows with the table and stops fitting;
measured from a 1M-row table to the largest that fits.

`--step=standalone` (the default; no grain needed): one Engram-sized step of its own -- hashed
ids [B, T, H] -> `prefetch_rows` (unique rows, gathered outside the gradient) -> `expand_rows`
-> [B, T, H*E] -> a dense layer to D -> squared-error loss. 'dense_adam' differentiates w.r.t.
the whole table and applies optax Adam to it; the sparse kinds differentiate w.r.t. the
gathered rows and call `apply_row_sparse_update`. Table, moments and dense weights are donated,
so sparse updates run in place.

`--step=trainer --config=...`: the real jitted train step of engram_jax/train.py
(`common.TrainerSteps`) on synthetic batches, with `table_optim.kind` switched between
'dense_adam' and the sparse kinds and every Engram table sized to the requested rows. Any
config field can be overridden: `--config.engram.layer_ids='(1,)'`.

Table sizes: powers of `--growth` rows from `--min_rows`, plus for every optimiser the largest
table whose bytes (`bytes_per_table_param` x E x rows x tables) fit the device's memory limit
minus a headroom (standalone: 8 GB; trainer: the compiled step's temporaries and arguments at
the smallest table + 4 GB, since a trainer step's activations are tens of GB). Dense Adam runs
only while table + moments + a dense gradient + one update-sized temporary fit. Sizes run
largest first: a fresh allocator places the one huge table best. A size that fails is printed
as OOM or error and the sweep goes on.

Prints one table: rows, table GB, ms per step for each optimiser, and each sparse optimiser's
growth over the smallest table. Timing: AOT-compiled step, `common.median_step_ms` (3 warm-up
steps, median of 5 runs of 10 steps).

Dimension legend: B batch, T time, H hash heads, E row width, R table rows, D model width,
U = B*T*H row slots.
"""

import gc

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax

from benchmarks import common
from engram_jax import table_optim
from pallas_kernels.engram_lookup import RowSparse, expand_rows, prefetch_rows

FLAGS = flags.FlagValues()
flags.DEFINE_enum('step', 'standalone', ['standalone', 'trainer'],
                  'standalone: an Engram-sized step of its own; trainer: the config\'s train step',
                  flag_values=FLAGS)
config_flags.DEFINE_config_file('config', None, 'trainer step: experiments/configs/*.py',
                                flag_values=FLAGS)
flags.DEFINE_integer('batch', 16, 'standalone step: B', flag_values=FLAGS)
flags.DEFINE_integer('seq_len', 512, 'standalone step: T', flag_values=FLAGS)
flags.DEFINE_integer('heads', 8, 'standalone step: H', flag_values=FLAGS)
flags.DEFINE_integer('row_width', 32, 'standalone step: E', flag_values=FLAGS)
flags.DEFINE_integer('model_dim', 512, 'standalone step: D', flag_values=FLAGS)
flags.DEFINE_float('base_lr', 4e-4, 'standalone step: learning rate', flag_values=FLAGS)
flags.DEFINE_integer('min_rows', 1 << 20, 'smallest table (rows per table)', flag_values=FLAGS)
flags.DEFINE_integer('max_rows', 0, 'largest table; 0: the largest that fits', flag_values=FLAGS)
flags.DEFINE_integer('growth', 4, 'ratio between measured sizes', flag_values=FLAGS)
flags.DEFINE_float('headroom_gb', None,
                   'device memory kept free for activations, dense parameters and the '
                   'allocator (default: standalone 8 GB; trainer: measured from the compiled '
                   'step + 4 GB)', flag_values=FLAGS)
flags.DEFINE_list('kinds', ['dense_adam', 'lazy_adam', 'adagrad'], 'table optimisers',
                  flag_values=FLAGS)


def _loss_from_rows(rows_UxE, inverse_BxTxH, w_KxD, target_BxTxD, plan=None):
  x_BxTxK = expand_rows(rows_UxE, inverse_BxTxH, plan=plan)
  return jnp.mean(jnp.square(x_BxTxK.astype(jnp.float32) @ w_KxD - target_BxTxD))


def _make_step(kind: str, offsets_H, base_lr: float):
  """Returns (init_opt(table, w), step(table, opt, w, ids, target) -> (table, opt, w, loss))."""
  dense_tx = optax.adam(base_lr)
  if kind == 'dense_adam':
    table_tx = optax.adam(base_lr * 5.0, b1=0.9, b2=0.999, eps=1e-8)

    def init_opt(table, w):
      return table_tx.init(table), dense_tx.init(w)

    def step(table, opt, w, ids_BxTxH, target_BxTxD):
      table_opt, w_opt = opt

      def loss_fn(table, w):
        pre = prefetch_rows(table, ids_BxTxH, offsets_H)
        return _loss_from_rows(pre.rows_UxE, pre.inverse_BxTxH, w, target_BxTxD, pre.plan)

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
        pre.rows_UxE, pre.inverse_BxTxH, w, target_BxTxD, pre.plan)
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
  w = jnp.asarray(rng.normal(size=(heads * width, args.model_dim)) * 0.02, jnp.float32)
  init_opt, step = _make_step(kind, offsets_H, args.base_lr)
  # Compile from shapes before the table exists: XLA's GPU autotuner may allocate scratch
  # operands of an op's size while compiling, which must not compete with the table for HBM.
  table_shape = jax.ShapeDtypeStruct((num_rows, width), jnp.float32)
  opt_shape = jax.eval_shape(init_opt, table_shape, w)
  compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(
      table_shape, opt_shape, w, ids[0], target).compile()
  mem = compiled.memory_analysis()
  if mem is not None:  # an in-place sparse step has no table-sized temporary
    print(f'    {kind} {num_rows:,} rows: step temp {mem.temp_size_in_bytes / common.GB:.3f} GB, '
          f'aliased {mem.alias_size_in_bytes / common.GB:.3f} GB, table '
          f'{num_rows * width * 4 / common.GB:.3f} GB', flush=True)
  table = common.pattern_table((num_rows, width), jnp.float32)
  opt = jax.jit(init_opt)(table, w)
  ms, (table, opt, w, loss) = common.median_step_ms(
      lambda c, ids_BxTxH: compiled(*c[:3], ids_BxTxH, target), (table, opt, w, None), ids,
      lambda c: c[3])
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f'{kind} at {num_rows} rows: loss {float(loss)}')
  del table, opt, w
  gc.collect()
  return ms


def _dense_bytes_per_param():
  # table + Adam mu + nu (f32) + the table-sized gradient + one table-sized update temporary.
  return table_optim.bytes_per_table_param(
      table_optim.TableOptimizerConfig(kind='dense_adam'), jnp.float32) + 4 + 4


def main():
  args = common.parse_flags(FLAGS, __doc__)
  kinds = args.kinds
  for kind in kinds:
    table_optim.TableOptimizerConfig(kind=kind)  # validates the name
  trainer = None
  if args.step == 'trainer':
    if args.config is None:
      raise SystemExit('--step=trainer needs --config=experiments/configs/<name>.py')
    trainer = common.TrainerSteps(args.config)
    config = trainer.sized_config('lazy_adam', args.min_rows)
    width = config.engram.n_embed_per_ngram // config.engram.n_head_per_ngram
    num_tables = len(config.engram.layer_ids)
    what = (f'trainer step of {config_flags.get_config_filename(args["config"])} '
            f'{common.config_overrides(args)}: B={config.data.batch_size} '
            f'T={config.data.seq_len} E={width}, {num_tables} Engram table(s)')
  else:
    width, num_tables = args.row_width, 1
    what = (f'standalone step: B={args.batch} T={args.seq_len} H={args.heads} E={width} '
            f'D={args.model_dim}')
  limit = common.memory_limit_bytes()
  if limit is None and not args.max_rows:
    raise SystemExit(f'{jax.devices()[0]}: no memory_stats bytes_limit; pass --max_rows')
  headroom = args.headroom_gb * common.GB if args.headroom_gb is not None else 8 * common.GB
  if trainer is not None and args.headroom_gb is None and not args.max_rows:
    over = max(trainer.overhead_bytes(k, args.min_rows) for k in kinds)
    headroom = over + 4 * common.GB
    print(f'trainer step needs {over / common.GB:.1f} GB besides the tables (XLA temporaries '
          f'+ state at {args.min_rows:,} rows); headroom {headroom / common.GB:.1f} GB',
          flush=True)
  budget = (limit or 0) - headroom
  per_param = {k: (_dense_bytes_per_param() if k == 'dense_adam' else
                   table_optim.bytes_per_table_param(table_optim.TableOptimizerConfig(kind=k),
                                                     jnp.float32, row_width=width))
               for k in kinds}
  fits = {k: int(budget // (per_param[k] * width * num_tables)) for k in kinds}
  sparse = [k for k in kinds if k != 'dense_adam']
  largest = args.max_rows or max(fits[k] for k in (sparse or kinds))
  sizes, rows = {largest}, args.min_rows
  while rows < largest:
    sizes.add(rows)
    rows *= args.growth
  if not args.max_rows:  # every kind is also measured at the largest table it fits
    sizes |= {fits[k] for k in kinds if args.min_rows < fits[k] < largest}
  sizes = sorted(sizes)
  print(f'{common.device_summary()}; memory limit '
        f'{limit / common.GB if limit else float("nan"):.1f} GB, table budget '
        f'{budget / common.GB:.1f} GB; {what}; bytes/param (f32 table): '
        + ', '.join(f'{k} {v:.3f}' for k, v in per_param.items()), flush=True)
  results = {}
  for num_rows in sorted(sizes, reverse=True):
    for kind in kinds:
      if not args.max_rows and num_rows > fits[kind]:
        results[num_rows, kind] = 'no fit'
        continue
      try:
        if trainer is not None:
          ms, actual = trainer.time(kind, num_rows)
        else:
          ms, actual = _time_step(kind, num_rows, args), [num_rows]
      except Exception as e:  # noqa: BLE001 -- one failed size is a result; the sweep goes on
        results[num_rows, kind] = 'OOM' if 'RESOURCE_EXHAUSTED' in str(e) else 'error'
        print(f'  rows={num_rows:,} {kind}: {results[num_rows, kind]}: '
              f'{type(e).__name__}: {str(e)[:400]}', flush=True)
      else:
        results[num_rows, kind] = ms
      # Only after the except block is the exception (and the arrays its traceback's frames
      # hold) released; collect then, or the next, larger table fails for lack of memory.
      gc.collect()
      if isinstance(results[num_rows, kind], float):
        print(f'  rows={num_rows:,} {kind}: {ms:.3f} ms (table rows {actual})', flush=True)
  table = []
  for num_rows in sizes:
    cells = [f'{num_rows:,}', f'{num_rows * width * 4 / common.GB:.2f}']
    for kind in kinds:
      ms = results[num_rows, kind]
      cells.append(f'{ms:.3f}' if isinstance(ms, float) else ms)
    for kind in sparse:
      ms, base = results[num_rows, kind], results[sizes[0], kind]
      ok = isinstance(ms, float) and isinstance(base, float)
      cells.append(f'{(ms / base - 1) * 100:+.1f}%' if ok else '-')
    table.append(cells)
  print(common.format_table(['rows/table', 'GB/table'] + [f'{k} ms' for k in kinds]
                            + [f'{k} growth' for k in sparse], table), flush=True)


if __name__ == '__main__':
  main()
