"""Step time vs Engram table size: dense Adam (optax) vs row-sparse lazy Adam / row-wise Adagrad.

  XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 \
      python -m benchmarks.bench_train_step [--step=standalone]

(Without MEM_FRACTION, JAX's allocator stops at 75% of HBM: 112.6 GB of the H200's 143.8 GB.)

Question: does a training step's cost stay flat as the table grows when only the touched rows are
updated (engram_jax/table_optim.py), while dense Adam grows with the table? Goal (issue 5): on an
H200 the sparse step grows <= 5% from a 1M-row table to the largest that fits in HBM.

`--step=trainer --config=experiments/configs/small_gpu.py`: the real jitted train step of
engram_jax/train.py (`Trainer.compile`) on synthetic batches, with `table_optim.kind` switched
between 'dense_adam' and the sparse kinds and `engram.engram_vocab_size` set so every Engram
table has the requested rows. Needs ml_collections and grain (engram_jax.train imports them; on
the GPU image carry them as wheels). Dense parameters are initialised once by the trainer at a
tiny table; for each measured size the tables are filled by pattern and their optimiser state is
zero (a random table init needs table-sized temporaries; values do not change the step's work).

`--step=standalone` (no grain / ml_collections needed): one Engram-sized step of our
own -- hashed ids [B, T, H] -> `prefetch_rows` (unique rows, gathered outside the gradient) ->
`expand_rows` -> [B, T, H*E] -> a dense layer to d -> squared-error loss. 'dense' differentiates
w.r.t. the whole table (table-sized gradient) and applies optax Adam to the whole table; the
sparse kinds differentiate w.r.t. the gathered rows and call `apply_row_sparse_update`. Table,
moments and dense weights are donated, so sparse updates run in place.

Table sizes: powers of `--growth` rows from 1M, plus for every optimiser the largest table whose
bytes (`bytes_per_table_param` x E x rows x tables) fit the device's memory limit minus headroom
(trainer: the compiled step's temporaries + arguments at the smallest table, + 4 GB; a fixed
8 GB let small_gpu's ~40 GB of activations OOM at 495M rows per table). Dense runs
only while table + Adam moments + a dense gradient (+ one update-sized temporary) fit. Tables are
filled by a fused iota expression (a random init would need a table-sized temporary).

Sizes run largest first (a fresh allocator holds the one huge table best). Prints one table:
rows, table GB, ms per step for each optimiser, and sparse growth vs the smallest table.
Timing: AOT-compiled step, 3 warm-up steps, then the median of 5 runs of 10 steps each
(block_until_ready at the end of each run).

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


def median_step_ms(step, carry, inputs, loss_of):
  """The timing protocol of both step kinds: `carry = step(carry, inputs[i % 4])`, 3 warm-up
  steps, then 5 runs of 10 steps, each ended by a block_until_ready on `loss_of(carry)`.
  Returns (median ms per step, the last carry)."""
  for i in range(3):
    carry = step(carry, inputs[i % 4])
  jax.block_until_ready(loss_of(carry))
  runs = []
  for _ in range(5):
    start = time.perf_counter()
    for i in range(10):
      carry = step(carry, inputs[i % 4])
    jax.block_until_ready(loss_of(carry))
    runs.append((time.perf_counter() - start) / 10 * 1e3)
  return float(np.median(runs)), carry


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
    print(f'    {kind} {num_rows:,} rows: step temp {mem.temp_size_in_bytes / _GB:.3f} GB, '
          f'aliased {mem.alias_size_in_bytes / _GB:.3f} GB, table '
          f'{num_rows * width * 4 / _GB:.3f} GB', flush=True)
  table = _fill_table(num_rows, width, jnp.float32)
  opt = jax.jit(init_opt)(table, w)
  ms, (table, opt, w, loss) = median_step_ms(
      lambda c, ids_BxTxH: compiled(*c[:3], ids_BxTxH, target), (table, opt, w, None), ids,
      lambda c: c[3])
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f'{kind} at {num_rows} rows: loss {float(loss)}')
  del table, opt, w
  gc.collect()
  return ms


def _apply_overrides(config, overrides):
  """`--set model.moe.dispatch=capacity`: Python literals are parsed, anything else is a str."""
  import ast
  for item in overrides:
    key, sep, text = item.partition('=')
    if not sep:
      raise SystemExit(f'--set expects key=value, got {item!r}')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.split('.')
    node = config
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise SystemExit(f'--set {key}: the config has no such field')
    node[leaf] = value


def _load_config(path: str, kind: str, rows_per_table: int, overrides=()):
  import importlib.util  # the config module needs ml_collections: only on the trainer path
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  _apply_overrides(config, overrides)
  orders = config.engram.max_ngram_size - 1
  per_head = max(rows_per_table // (orders * config.engram.n_head_per_ngram), 2)
  config.engram.engram_vocab_size = (per_head,) * orders
  config.table_optim.kind = kind
  return config


def _filled_state(small_state, abstract):
  """`abstract`'s state: leaves whose shape matches `small_state` come from it; tables (under
  'tables', or a 'table' param) are pattern-filled; other resized leaves (moments) are zeros."""
  def leaf(path, small, want):
    if small.shape == want.shape:
      return small
    name = jax.tree_util.keystr(path)
    is_table = name.startswith('.tables') or (name.startswith('.params') and "'table'" in name)

    def make():
      if is_table:
        rows = jax.lax.broadcasted_iota(jnp.int32, want.shape, 0)
        return (((rows * 31) % 977).astype(jnp.float32) * 1e-3 - 0.488).astype(want.dtype)
      return jnp.zeros(want.shape, want.dtype)
    return jax.jit(make, out_shardings=want.sharding)()
  return jax.tree_util.tree_map_with_path(leaf, small_state, abstract)


_COMPILED = {}


def _compile_trainer(kind, rows_per_table, args):
  """(config, exp, trainer, abstract state, compiled train step, batch shardings), cached."""
  key = (kind, rows_per_table)
  if key not in _COMPILED:
    from engram_jax import train as train_lib  # needs ml_collections + grain
    config = _load_config(args.config, kind, rows_per_table, args.set)
    exp, trainer, abstract = train_lib.setup(config, check_data=False)
    # Before the tables exist; the benchmark never evaluates.
    train_c, _, batch_sh = trainer.compile(abstract, trainer.shapes, evaluate=False)
    # Kept for the run: the headroom pass compiles the smallest size of every kind, which the
    # timing pass then reuses (an executable holds no activation buffers between calls).
    _COMPILED[key] = (config, exp, trainer, abstract, train_c, batch_sh)
  return _COMPILED[key]


def _trainer_overhead_bytes(kind, rows_per_table, args):
  """HBM the trainer step needs besides the tables and their state: XLA's temporaries
  (activations; independent of the table size, tests/test_train.py checks that) plus every
  argument (the whole state, whose tables are small at `rows_per_table`)."""
  mem = _compile_trainer(kind, rows_per_table, args)[4].memory_analysis()
  if mem is None:
    raise SystemExit('no memory_analysis on this backend; pass --headroom_gb')
  return mem.temp_size_in_bytes + mem.argument_size_in_bytes


def prepare_trainer_run(kind, rows_per_table, args, small_states):
  """(compiled train step, filled state, 4 synthetic device batches, table rows per layer) of
  `args.config` with `rows_per_table` rows per Engram table (also used by profile_step.py)."""
  from engram_jax import train as train_lib  # needs ml_collections + grain
  config, exp, trainer, abstract, train_c, batch_sh = _compile_trainer(kind, rows_per_table,
                                                                        args)
  if kind not in small_states:
    small_config = _load_config(args.config, kind, 4096, args.set)
    _, small_trainer, _ = train_lib.setup(small_config, check_data=False)
    small_states[kind] = jax.device_get(small_trainer.init_state())
  state = _filled_state(small_states[kind], abstract)
  b, t = config.data.batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  vocab = exp.model.vocab_size
  batches = []
  for _ in range(4):
    batch = {'inputs': rng.integers(0, vocab, (b, t)), 'targets': rng.integers(0, vocab, (b, t)),
             'segment_ids': np.ones((b, t)), 'positions': np.broadcast_to(np.arange(t), (b, t)),
             'weights': np.ones((b, t), np.float32)}
    batch = {k: np.asarray(v, np.float32 if k == 'weights' else np.int32) for k, v in batch.items()}
    if 'engram_ids' in trainer.shapes:
      batch['engram_ids'] = {
          l: np.stack([rng.integers(0, p, (b, t)) for p in exp.hashing.head_sizes(l)],
                      -1).astype(np.int32) for l in trainer.shapes['engram_ids']}
    batches.append(jax.device_put(batch, batch_sh))
  table_rows = ([exp.hashing.num_rows(l) for l in exp.model.engram.layer_ids]
                if exp.hashing is not None else [])
  return train_c, state, batches, table_rows


def _time_trainer_step(kind, rows_per_table, args, small_states):
  train_c, state, batches, table_rows = prepare_trainer_run(kind, rows_per_table, args,
                                                            small_states)
  ms, (state, metrics) = median_step_ms(lambda c, batch: train_c(c[0], batch), (state, None),
                                        batches, lambda c: c[1]['loss'])
  if not np.isfinite(float(metrics['loss'])):
    raise FloatingPointError(f'{kind} at {rows_per_table} rows: loss {float(metrics["loss"])}')
  del state, metrics, batches
  gc.collect()
  return ms, table_rows


def _dense_bytes_per_param():
  # table + Adam mu + nu (f32) + the table-sized gradient + one table-sized update temporary.
  return table_optim.bytes_per_table_param(
      table_optim.TableOptimizerConfig(kind='dense_adam'), jnp.float32) + 4 + 4


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--step', default='standalone', choices=['standalone', 'trainer'])
  parser.add_argument('--config', default='experiments/configs/small_gpu.py',
                      help='trainer step: config file (get_config())')
  parser.add_argument('--batch', type=int, default=16, help='standalone step')
  parser.add_argument('--seq_len', type=int, default=512, help='standalone step')
  parser.add_argument('--heads', type=int, default=8, help='standalone step')
  parser.add_argument('--row_width', type=int, default=32, help='standalone step')
  parser.add_argument('--model_dim', type=int, default=512, help='standalone step')
  parser.add_argument('--base_lr', type=float, default=4e-4, help='standalone step')
  parser.add_argument('--min_rows', type=int, default=1 << 20)
  parser.add_argument('--max_rows', type=int, default=0, help='0: the largest that fits')
  parser.add_argument('--growth', type=int, default=4, help='ratio between measured sizes')
  parser.add_argument('--headroom_gb', type=float, default=None,
                      help='HBM kept free for activations, the dense params and the allocator '
                           '(default: standalone 8 GB; trainer: measured from the compiled '
                           'step + 4 GB)')
  parser.add_argument('--kinds', default='dense_adam,lazy_adam,adagrad')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='trainer step: config override, repeatable '
                           '(e.g. --set model.moe.dispatch=capacity)')
  args = parser.parse_args()
  kinds = args.kinds.split(',')
  for kind in kinds:
    table_optim.TableOptimizerConfig(kind=kind)  # validates the name
  if args.step == 'trainer':
    config = _load_config(args.config, 'lazy_adam', args.min_rows, args.set)
    width = config.engram.n_embed_per_ngram // config.engram.n_head_per_ngram
    num_tables = len(config.engram.layer_ids)
    what = (f'trainer step of {args.config}: B={config.data.batch_size} '
            f'T={config.data.seq_len} E={width}, {num_tables} Engram table(s)')
  else:
    width, num_tables = args.row_width, 1
    what = (f'standalone step: B={args.batch} T={args.seq_len} H={args.heads} E={width} '
            f'D={args.model_dim}')
  device = jax.devices()[0]
  limit = (device.memory_stats() or {}).get('bytes_limit')
  if limit is None and not args.max_rows:
    raise SystemExit(f'{device}: no memory_stats bytes_limit; pass --max_rows')
  headroom = args.headroom_gb * _GB if args.headroom_gb is not None else 8 * _GB
  if args.step == 'trainer' and args.headroom_gb is None and not args.max_rows:
    # The step's own temporaries are large (~40 GB for small_gpu at B=32, T=1024): measure
    # them from the compiled step at the smallest table instead of guessing.
    over = max(_trainer_overhead_bytes(k, args.min_rows, args) for k in kinds)
    headroom = over + 4 * _GB
    print(f'trainer step needs {over / _GB:.1f} GB besides the tables (XLA temporaries + '
          f'state at {args.min_rows:,} rows); headroom {headroom / _GB:.1f} GB', flush=True)
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
  print(f'device: {device.device_kind}; memory limit '
        f'{limit / _GB if limit else float("nan"):.1f} GB, table budget {budget / _GB:.1f} GB; '
        f'{what}; bytes/param (f32 table): '
        + ', '.join(f'{k} {v:.3f}' for k, v in per_param.items()), flush=True)
  results, small_states = {}, {}
  # Largest first: after the smaller sizes had run, small_gpu's 857,650,217-row table (one
  # 102 GiB buffer) failed to allocate although the byte budget had room for it (H200).
  for num_rows in sorted(sizes, reverse=True):
    for kind in kinds:
      if not args.max_rows and num_rows > fits[kind]:
        results[num_rows, kind] = 'no fit'
        continue
      try:
        if args.step == 'trainer':
          ms, actual = _time_trainer_step(kind, num_rows, args, small_states)
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
      if not isinstance(results[num_rows, kind], float):
        continue
      print(f'  rows={num_rows:,} {kind}: {ms:.3f} ms (table rows {actual})', flush=True)
  print(' '.join([f'{"rows/table":>13}', f'{"GB/table":>9}'] + [f'{k + " ms":>13}' for k in kinds]
                 + [f'{k + " growth":>17}' for k in sparse]))
  for num_rows in sizes:
    cells = [f'{num_rows:>13,}', f'{num_rows * width * 4 / _GB:>9.2f}']
    for kind in kinds:
      ms = results[num_rows, kind]
      cells.append(f'{ms:>13.3f}' if isinstance(ms, float) else f'{ms:>13}')
    for kind in sparse:
      ms, base = results[num_rows, kind], results[sizes[0], kind]
      ok = isinstance(ms, float) and isinstance(base, float)
      cells.append(f'{(ms / base - 1) * 100:>+16.1f}%' if ok else f'{"-":>17}')
    print(' '.join(cells), flush=True)


if __name__ == '__main__':
  main()
