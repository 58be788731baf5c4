"""Row-sparse optimisers for Engram tables: a step costs O(rows touched), not O(table).

A training step reads at most B*T*H rows of a table with millions to billions of rows, and its
gradient arrives as a `RowSparse` (sorted unique row ids padded with `num_rows`, f32 values
summed per row, zero in padding). Dense optax Adam would turn that into a table-sized gradient
and rewrite the whole table and both moments every step; here the update gathers only the
touched rows of the table and its state, computes in float32 and scatters them back with
`mode='drop'`, so padding slots never write. Under `jax.jit(..., donate_argnums=...)` of the
table and state, XLA aliases every output to its input and runs the scatters in place: no
per-step copy of the table or its state (checked in tests/test_table_optim.py).

Kinds (`TableOptimizerConfig.kind`):
  'lazy_adam'  Adam with lazy (row-wise) semantics, as in TF's LazyAdam and FBGEMM's sparse
               Adam: a row's value and moments change only in steps whose gradient touches it.
               Dense Adam would keep moving an untouched row with its stale momentum
               (m decays by b1 each step but is still applied); lazy Adam does not.
  'adagrad'    Row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD): one f32 accumulator per row
               that adds the mean over E of the squared gradient; ~1x table memory instead of
               ~3x for Adam. The accumulator starts at 0.
  'dense_adam' The reference: the table stays in the dense optax chain (engram_jax/optim.py).
               Only validated here; `init_table_state`/`apply_row_sparse_update` refuse it.

Bias correction for lazy Adam (`bias_correction`):
  'per_row'  (default) each row keeps its own step count `count_R` (the number of updates that
             touched it), and its moments are corrected with 1 - b^count. A row's moments have
             only seen `count` gradients, so this is exactly Adam run on that row's own gradient
             sequence. The global step would be wrong for rare rows: a row first touched at step
             10,000 gets 1 - b^10000 ~ 1 (no correction) on moments that hold one gradient
             scaled by (1 - b1) and (1 - b2), so its first step is (1 - b1) / sqrt(1 - b2)
             ~ 3.2x Adam's, and v stays under-estimated for its next ~1/(1 - b2) = 1000
             touches -- too-large steps exactly on the rows with the least evidence.
  'global'   1 - b^(step + 1) with the caller's global step, like dense/TF LazyAdam; pass `step`.
  'none'     no correction.
Adagrad has no bias correction; the field is ignored for it.

Learning rate: callers pass the *base* learning rate (a scalar, possibly traced from a
schedule); the table's rate is `learning_rate * cfg.lr_multiplier` (the paper: 5x). Do not
multiply it again outside.

Weight decay (paper: 0) is decoupled (AdamW / optax `adamw` form, `lr * wd * w` added to the
step) and lazy: it is applied only to rows the step touches, so a row's decay depends on how
often it is read. This is the FBGEMM/TorchRec behaviour; decaying untouched rows would cost a
table-sized pass every step.

Moments in bfloat16 (`moment_dtype='bfloat16'`): stored in bf16 (round to nearest), gathered and
computed in f32. Halves Adam's state (8 -> 4 bytes per parameter). Adagrad's accumulator is
one value per row and always f32 (a bf16 running sum stalls once it is large).

Duplicates: `RowSparse` rows are unique and their values already summed (what
`pallas_kernels.engram_lookup.expand_rows` produces). Callers holding raw per-lookup gradients
must call `coalesce` first; passing duplicates to `apply_row_sparse_update` is undefined (the
scatter would keep one of the duplicate rows' updates).

Dimension legend: R table rows, E row width (head dim), U row slots of a RowSparse gradient
(static; padding slots hold R), N raw per-lookup gradient rows.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from pallas_kernels.engram_lookup.row_sparse import RowSparse

KINDS = ('lazy_adam', 'adagrad', 'dense_adam')
SPARSE_KINDS = ('lazy_adam', 'adagrad')
MOMENT_DTYPES = ('float32', 'bfloat16')
BIAS_CORRECTIONS = ('per_row', 'global', 'none')


@dataclasses.dataclass(frozen=True)
class TableOptimizerConfig:
  """How Engram tables are optimised (defaults: the paper's Adam at 5x base LR, no decay)."""
  kind: str = 'lazy_adam'
  lr_multiplier: float = 5.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  moment_dtype: str = 'float32'
  bias_correction: str = 'per_row'

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'TableOptimizerConfig.kind must be one of {KINDS}, got {self.kind!r}')
    if self.moment_dtype not in MOMENT_DTYPES:
      raise ValueError(f'TableOptimizerConfig.moment_dtype must be one of {MOMENT_DTYPES}, '
                       f'got {self.moment_dtype!r}')
    if self.bias_correction not in BIAS_CORRECTIONS:
      raise ValueError(f'TableOptimizerConfig.bias_correction must be one of '
                       f'{BIAS_CORRECTIONS}, got {self.bias_correction!r}')
    if not (np.isfinite(self.lr_multiplier) and self.lr_multiplier > 0):
      raise ValueError(f'TableOptimizerConfig.lr_multiplier must be finite and > 0, '
                       f'got {self.lr_multiplier}')
    for name in ('b1', 'b2'):
      value = getattr(self, name)
      if not 0.0 <= value < 1.0:
        raise ValueError(f'TableOptimizerConfig.{name} must be in [0, 1), got {value}')
    if not self.eps > 0:
      raise ValueError(f'TableOptimizerConfig.eps must be > 0, got {self.eps}')
    if not (np.isfinite(self.weight_decay) and self.weight_decay >= 0):
      raise ValueError(f'TableOptimizerConfig.weight_decay must be finite and >= 0, '
                       f'got {self.weight_decay}')
    if self.kind == 'adagrad' and self.moment_dtype != 'float32':
      raise ValueError("TableOptimizerConfig.moment_dtype must be 'float32' for kind='adagrad' "
                       '(its accumulator is one f32 value per row; bf16 would stall it)')


class TableOptState(NamedTuple):
  """Optimiser state of one table; leaves a kind does not use are None.

  mu_RxE, nu_RxE: Adam first / second moments in `moment_dtype` (lazy_adam).
  acc_R: f32 row-wise Adagrad accumulator (adagrad).
  count_R: int32 number of updates that touched each row (both kinds; per-row bias correction).
  """
  mu_RxE: Any
  nu_RxE: Any
  acc_R: Any
  count_R: jax.Array


def _require_sparse(cfg: TableOptimizerConfig, what: str):
  if cfg.kind not in SPARSE_KINDS:
    raise ValueError(f"{what}: kind={cfg.kind!r} has no row-sparse state; 'dense_adam' tables "
                     'are optimised by the dense optax chain in engram_jax/optim.py')


def init_table_state(cfg: TableOptimizerConfig, table_RxE: jax.Array) -> TableOptState:
  """Zero moments / accumulator and zero per-row counts for `table_RxE` (shapes only used)."""
  _require_sparse(cfg, 'init_table_state')
  if table_RxE.ndim != 2:
    raise ValueError(f'init_table_state: table must be [R, E], got shape {table_RxE.shape}')
  shapes = init_table_state_shapes(cfg, *table_RxE.shape)
  return TableOptState(*(None if s is None else jnp.zeros(*s) for s in shapes))


def table_state_logical_axes(cfg: TableOptimizerConfig) -> TableOptState:
  """Logical axis names per state leaf (PartitionSpecs of logical names, None where unused).

  Same form as `flax.linen.get_partition_spec` of a logically partitioned param, so it maps to
  mesh shardings with `nn.logical_to_mesh_sharding` and the rules in engram_jax/sharding.py.
  """
  _require_sparse(cfg, 'table_state_logical_axes')
  rows_e = PartitionSpec('engram_rows', 'engram_dim')
  rows = PartitionSpec('engram_rows')
  if cfg.kind == 'lazy_adam':
    return TableOptState(rows_e, rows_e, None, rows)
  return TableOptState(None, None, rows, rows)


def bytes_per_table_param(cfg: TableOptimizerConfig, table_dtype, *,
                          row_width: int | None = None) -> float:
  """Bytes of HBM per table parameter: the table itself plus its optimiser state.

  Per-element state is exact. Per-row state (the int32 `count_R`, Adagrad's f32 `acc_R`) costs
  4 or 8 bytes per *row*; it is included (divided by `row_width` = E) only when `row_width` is
  given. For 'dense_adam' the optax moments are counted at `moment_dtype` (optim.py is expected
  to create them so); transient gradients are not state and are not counted.
  """
  if row_width is not None and (not isinstance(row_width, (int, np.integer)) or row_width < 1):
    raise ValueError(f'bytes_per_table_param: row_width must be a positive int, got {row_width!r}')
  table_bytes = float(jnp.dtype(table_dtype).itemsize)
  moment_bytes = float(jnp.dtype(cfg.moment_dtype).itemsize)
  per_row_bytes = 0.0
  if cfg.kind == 'dense_adam':
    per_element = table_bytes + 2 * moment_bytes
  elif cfg.kind == 'lazy_adam':
    per_element = table_bytes + 2 * moment_bytes
    per_row_bytes = 4.0
  else:
    per_element = table_bytes
    per_row_bytes = 8.0
  if row_width is not None:
    per_element += per_row_bytes / row_width
  return per_element


def coalesce(rows_N: jax.Array, values_NxE: jax.Array, num_rows: int) -> RowSparse:
  """Sums duplicate rows of a raw per-lookup gradient into a `RowSparse` with U = N slots.

  `rows_N` are global row ids in any order with repeats. Ids outside `[0, num_rows)` are
  padding by the `RowSparse` convention: they and their values are dropped. Jit-able (N static).
  """
  if rows_N.ndim != 1 or values_NxE.ndim != 2 or values_NxE.shape[0] != rows_N.shape[0]:
    raise ValueError(f'coalesce: need rows [N] and values [N, E], got {rows_N.shape} and '
                     f'{values_NxE.shape}')
  if not jnp.issubdtype(rows_N.dtype, jnp.integer):
    raise ValueError(f'coalesce: rows must be integers, got {rows_N.dtype}')
  n = rows_N.shape[0]
  rows_N = rows_N.astype(jnp.int32)
  valid_N = (rows_N >= 0) & (rows_N < num_rows)
  rows_N = jnp.where(valid_N, rows_N, num_rows)
  rows_U, inverse_N = jnp.unique(rows_N, return_inverse=True, size=n, fill_value=num_rows)
  values_NxE = jnp.where(valid_N[:, None], values_NxE.astype(jnp.float32), 0.0)
  summed_UxE = jax.ops.segment_sum(values_NxE, inverse_N.reshape(-1), num_segments=n)
  summed_UxE = jnp.where((rows_U < num_rows)[:, None], summed_UxE, 0.0)
  return RowSparse(rows_U.astype(jnp.int32), summed_UxE)


def _check_shapes(cfg, table_RxE, state, grad):
  if table_RxE.ndim != 2:
    raise ValueError(f'apply_row_sparse_update: table must be [R, E], got {table_RxE.shape}')
  num_rows, width = table_RxE.shape
  rows_U, values_UxE = grad
  if rows_U.ndim != 1 or not jnp.issubdtype(rows_U.dtype, jnp.integer):
    raise ValueError(f'apply_row_sparse_update: grad.rows_U must be 1-D integers, got '
                     f'{rows_U.shape} {rows_U.dtype}')
  if values_UxE.shape != (rows_U.shape[0], width):
    raise ValueError(f'apply_row_sparse_update: grad.values_UxE must be {(rows_U.shape[0], width)}'
                     f' for {rows_U.shape[0]} rows of a width-{width} table, got '
                     f'{values_UxE.shape}')
  expected = init_table_state_shapes(cfg, num_rows, width)
  for name, want in expected._asdict().items():
    got = getattr(state, name)
    if (want is None) != (got is None):
      raise ValueError(f'apply_row_sparse_update: state.{name} is '
                       f'{"missing" if got is None else "unexpected"} for kind={cfg.kind!r}')
    if want is not None and (got.shape, got.dtype) != want:
      raise ValueError(f'apply_row_sparse_update: state.{name} must be {want[0]} {want[1]} '
                       f'for a {table_RxE.shape} table and {cfg}, got {got.shape} {got.dtype}')


def init_table_state_shapes(cfg: TableOptimizerConfig, num_rows: int, width: int) -> TableOptState:
  """(shape, dtype) of every state leaf, without allocating (None where unused)."""
  _require_sparse(cfg, 'init_table_state_shapes')
  count = ((num_rows,), jnp.dtype(jnp.int32))
  if cfg.kind == 'lazy_adam':
    moment = ((num_rows, width), jnp.dtype(cfg.moment_dtype))
    return TableOptState(moment, moment, None, count)
  return TableOptState(None, None, ((num_rows,), jnp.dtype(jnp.float32)), count)


def _gather(x, rows_U):
  # Padding ids (== R) gather zeros; they are never written back.
  return x.at[rows_U].get(mode='fill', fill_value=0)


def _scatter(x, rows_U, new):
  # mode='drop' skips padding (== R); wrap_negative_indices=False makes a negative id drop too
  # instead of silently writing row R - k. Rows are sorted (RowSparse contract).
  return x.at[rows_U].set(new.astype(x.dtype), mode='drop', indices_are_sorted=True,
                          wrap_negative_indices=False)


def apply_row_sparse_update(cfg: TableOptimizerConfig, table_RxE: jax.Array,
                            state: TableOptState, grad: RowSparse, learning_rate,
                            step=None) -> tuple[jax.Array, TableOptState]:
  """One optimiser step on the rows of `grad`; every other row and its state is untouched.

  Args:
    cfg: a sparse kind ('lazy_adam' or 'adagrad').
    table_RxE: the table (any float dtype; updated in f32 and cast back).
    state: from `init_table_state(cfg, table_RxE)`.
    grad: `RowSparse` with unique, summed rows (see `coalesce`), padding rows == R.
    learning_rate: the *base* learning rate (scalar); the table uses `* cfg.lr_multiplier`.
    step: for bias_correction='global' only (required there): int scalar, the number of updates
      applied before this one (optax's `count`); the correction uses `step + 1`.

  Returns: `(new_table_RxE, new_state)`. Jit with `donate_argnums` on table and state to update
  them in place.
  """
  _require_sparse(cfg, 'apply_row_sparse_update')
  _check_shapes(cfg, table_RxE, state, grad)
  if jnp.ndim(learning_rate) != 0:
    raise ValueError(f'apply_row_sparse_update: learning_rate must be a scalar, got shape '
                     f'{jnp.shape(learning_rate)}')
  if cfg.kind == 'lazy_adam' and cfg.bias_correction == 'global' and step is None:
    raise ValueError("apply_row_sparse_update: bias_correction='global' needs `step` "
                     '(number of updates before this one)')
  rows_U = grad.rows_U.astype(jnp.int32)
  g_UxE = grad.values_UxE.astype(jnp.float32)
  lr = jnp.asarray(learning_rate, jnp.float32) * cfg.lr_multiplier
  w_UxE = _gather(table_RxE, rows_U).astype(jnp.float32)
  count_U = _gather(state.count_R, rows_U) + 1

  if cfg.kind == 'lazy_adam':
    mu_UxE = cfg.b1 * _gather(state.mu_RxE, rows_U).astype(jnp.float32) + (1 - cfg.b1) * g_UxE
    nu_UxE = (cfg.b2 * _gather(state.nu_RxE, rows_U).astype(jnp.float32)
              + (1 - cfg.b2) * jnp.square(g_UxE))
    if cfg.bias_correction == 'none':
      mu_hat_UxE, nu_hat_UxE = mu_UxE, nu_UxE
    else:
      if cfg.bias_correction == 'per_row':
        t_U1 = count_U.astype(jnp.float32)[:, None]
      else:
        t_U1 = jnp.asarray(step, jnp.float32) + 1.0
      mu_hat_UxE = mu_UxE / (1 - cfg.b1 ** t_U1)
      nu_hat_UxE = nu_UxE / (1 - cfg.b2 ** t_U1)
    direction_UxE = mu_hat_UxE / (jnp.sqrt(nu_hat_UxE) + cfg.eps)
    new_state = TableOptState(_scatter(state.mu_RxE, rows_U, mu_UxE),
                              _scatter(state.nu_RxE, rows_U, nu_UxE), None,
                              _scatter(state.count_R, rows_U, count_U))
  else:
    acc_U = _gather(state.acc_R, rows_U) + jnp.mean(jnp.square(g_UxE), axis=-1)
    direction_UxE = g_UxE / (jnp.sqrt(acc_U)[:, None] + cfg.eps)
    new_state = TableOptState(None, None, _scatter(state.acc_R, rows_U, acc_U),
                              _scatter(state.count_R, rows_U, count_U))

  if cfg.weight_decay:
    direction_UxE = direction_UxE + cfg.weight_decay * w_UxE
  new_table_RxE = _scatter(table_RxE, rows_U, w_UxE - lr * direction_UxE)
  return new_table_RxE, new_state
