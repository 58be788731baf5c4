"""Engram tables in HBM vs in pinned host memory: training step time and decoding tokens/s.

  XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB=110 \
    python -m benchmarks.bench_offload --sizes_gb=1,32,8

Same model, same batches, same table optimiser (`--optimizer`: lazy Adam with bf16 moments,
2x the table bytes of host memory, or row-wise Adagrad, one f32 per row), one run, side by side
per table size (`--modes` picks which of hbm / threads / gen run; hbm always does):

  HBM     one fused jitted step: `prefetch_rows` from the HBM table, forward/backward on the
          rows, SGD on the dense weights, `apply_row_sparse_update` on the whole table (donated).
  threads `host_tables.HostTables.make_step`: the same model step on `PrefetchedRows`, one
          device program per step that also updates the step's U rows; rows of step s+1 are
          deduplicated on the host (NumPy, overlapping step s), and NumPy worker threads gather
          them and write step s-1's update into the pinned_host buffers beside it, outside XLA.

The model is our own stand-in (no grain / ml_collections / EngramLM needed): token embedding,
`--blocks` residual MLP blocks of width `--d` (bf16), two Engram layers whose rows are expanded
and projected into the residual stream before blocks 1 and `blocks//2`, a vocabulary head and
cross-entropy. Tokens are Zipf(1.1)-distributed over a 32k vocabulary and hashed with the real
`NgramHashMapping` (N=3, K=8: H=16 heads, E=64) sized so the two tables hold the requested
bytes. Decoding (`gen`): the HBM tables and, for each of `--gen_fetch`, the pinned_host tables,
decoded by `engram_jax.generate.Decoder` (the prompt in one forward, then a one-token
forward per step; the stand-in model is position-wise, so it needs no cache) with the token's
rows read by the GPU from the host table inside the token's program (`direct`, `dir. tok/s`) or
by XLA's host gather inside it (`step`, `host tok/s`). Tokens/s count the new tokens over the
whole call, prompt forward included; every decoder must sample the HBM decoder's tokens
(`same_tokens`).

Timing: after WARMUP = 4 warm-up steps (one pass over the 4 batches), `--steps` steps with one
block_until_ready at the end; decoding: one warm-up call per decoder, then `--gen_reps` rounds
in which each decoder makes one call in turn (median call per decoder). The last table printed
is the result.

`--table_dtype bfloat16`: bf16 tables in every placement (the optimiser updates rows in f32
and stores them rounded), so each host gather / scatter moves half the bytes.

`--probe`: the host gather / scatter primitives alone and beside a matmul, as XLA host compute
(separate programs, one program, a second GPU stream) and as the threaded step's NumPy work.

`--trace_steps n`: every training mode then runs n more steps under the profiler and prints
the busy time of each GPU stream and host thread against the wall time (benchmarks/
common.py): whether the host gather / scatter overlap the device's compute. Decoding
(`gen`) then also traces one more call, per new token.

Agreement: every run also prints the host step's first-step loss next to the HBM one (equal
inputs, so any difference is a bug), the largest per-step |loss difference| and the largest
|difference| of 4096 updated rows per table after the run.

Results, with their commands: benchmarks/README.md.

Dimension legend: B batch, T time, H hash heads, E row width, U = B*T*H row slots, D width.
"""

import gc
import json
import os
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from engram_jax import host_memory, table_optim
from engram_jax.generate import Decoder
from engram_jax.hashing import NgramHashMapping
from engram_jax.host_rows import HostRowWorker, default_host_threads
from engram_jax.host_tables import HostTables, unique_rows_numpy
from pallas_kernels.engram_lookup.row_sparse import RowSparse, expand_rows, prefetch_rows

VOCAB, N, K, E = 32768, 3, 8, 64
H = (N - 1) * K
LAYERS = (1, 2)      # hash layer ids; block index where each is injected is below
CFG = table_optim.TableOptimizerConfig(moment_dtype="bfloat16")
LR = 1e-3
WARMUP = 4           # warm-up steps: one pass over the `batches` (n=4)


FLAGS = flags.FlagValues()
flags.DEFINE_string("sizes_gb", "1,32,8", "total table GB (both layers); empty: none",
                    flag_values=FLAGS)
flags.DEFINE_integer("batch", 8, "B", flag_values=FLAGS)
flags.DEFINE_integer("seq", 2048, "T", flag_values=FLAGS)
flags.DEFINE_integer("d", 2048, "model width", flag_values=FLAGS)
flags.DEFINE_integer("blocks", 8, "residual MLP blocks", flag_values=FLAGS)
flags.DEFINE_integer("steps", 10, "timed training steps", flag_values=FLAGS)
flags.DEFINE_bool("remat", False,
                  "recompute each block in the backward (large --d/--blocks in HBM)",
                  flag_values=FLAGS)
flags.DEFINE_integer("gen_batch", 64, "decoding: sequences", flag_values=FLAGS)
flags.DEFINE_integer("gen_prompt", 112, "decoding: prompt tokens", flag_values=FLAGS)
flags.DEFINE_integer("gen_new", 64, "decoding: new tokens", flag_values=FLAGS)
flags.DEFINE_integer("gen_reps", 3, "timed decoding calls (median)", flag_values=FLAGS)
flags.DEFINE_string("gen_fetch", "direct,step",
                    "gen: which host-table decoders run (comma list of direct, step; see "
                    "make_generator)", flag_values=FLAGS)
flags.DEFINE_bool("probe", False, "time the host gather/scatter first", flag_values=FLAGS)
flags.DEFINE_string("modes", "hbm,threads,gen",
                    "what to run per size: hbm (baseline, always), threads, gen",
                    flag_values=FLAGS)
flags.DEFINE_enum("optimizer", "lazy_adam", ["lazy_adam", "adagrad"],
                  "table optimiser: lazy_adam (bf16 moments) or row-wise adagrad",
                  flag_values=FLAGS)
flags.DEFINE_enum("tokens", "zipf", ["zipf", "corpus"],
                  "batch tokens: Zipf(1.1) ids (~94% of row slots unique at the default "
                  "shapes) or windows of the shipped corpus (real n-gram repetition)",
                  flag_values=FLAGS)
flags.DEFINE_enum("table_dtype", "float32", ["float32", "bfloat16"],
                  "dtype of the tables (all placements; updated in f32, stored rounded): "
                  "bfloat16 halves the bytes each host gather / scatter moves", flag_values=FLAGS)
flags.DEFINE_integer("trace_steps", 0,
                     "every training mode then runs this many more steps under the profiler "
                     "and prints busy time per GPU stream / host thread (common.traced); gen "
                     "traces one more call", flag_values=FLAGS)
flags.DEFINE_string("out", os.environ.get("OUT", "/tmp"), "where bench_offload.json goes",
                    flag_values=FLAGS)


def parse():
  return common.parse_flags(FLAGS, __doc__)


def mapping_for(gb: float, itemsize: int = 4) -> NgramHashMapping:
  rows_per_head = max(64, int(gb * 2**30 / (E * itemsize) / (len(LAYERS) * H)))
  return NgramHashMapping((rows_per_head, rows_per_head), N, K, LAYERS, 0, 0, VOCAB)


def batches(mapping, b, t, n=4, seed=0, tokens="zipf"):
  """n batches (tokens, targets, {layer: hash ids}): Zipf(1.1) token ids, or windows of the
  shipped corpus (its 8k-token tokenizer's ids; real n-gram repetition)."""
  rng = np.random.default_rng(seed)
  text = common.corpus_tokens() if tokens == "corpus" else None
  out = []
  for _ in range(n):
    if text is None:
      toks = (rng.zipf(1.1, size=(b, t + 1)) - 1) % VOCAB
    else:
      starts = rng.integers(0, text.size - (t + 1), size=b)
      toks = np.stack([text[s:s + t + 1] for s in starts])
    toks = toks.astype(np.int32)
    ids = mapping.hash_numpy(toks[:, :-1])
    out.append((toks[:, :-1], toks[:, 1:], {l: v.astype(np.int32) for l, v in ids.items()}))
  return out


def init_params(args):
  ks = jax.random.split(jax.random.key(0), 4 + 2 * args.blocks)
  d, f = args.d, 4 * args.d
  bf = jnp.bfloat16
  p = {"emb": jax.random.normal(ks[0], (VOCAB, d), bf) * 0.02,
       "out": jax.random.normal(ks[1], (d, VOCAB), bf) * d ** -0.5,
       "eng": {l: jax.random.normal(ks[2 + i], (H * E, d), bf) * (H * E) ** -0.5
               for i, l in enumerate(LAYERS)},
       "w1": [jax.random.normal(ks[4 + 2 * i], (d, f), bf) * d ** -0.5
              for i in range(args.blocks)],
       "w2": [jax.random.normal(ks[5 + 2 * i], (f, d), bf) * f ** -0.5
              for i in range(args.blocks)]}
  return p


def inject_at(args):
  return {LAYERS[0]: 1, LAYERS[1]: args.blocks // 2}


def _block(x, w1, w2):
  h = x * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True)
                        + 1e-6).astype(x.dtype)
  return x + jax.nn.gelu(h @ w1) @ w2


def _inject(params, x, l, rows_UxE, inverse_BxTxH):
  return x + expand_rows(rows_UxE, inverse_BxTxH).astype(jnp.bfloat16) @ params["eng"][l]


def _blocks(params, x, args, start, stop):
  for i in range(start, stop):
    x = (jax.checkpoint(_block) if args.remat else _block)(x, params["w1"][i], params["w2"][i])
  return x


def forward(params, tokens_BxT, rows, inverses, args):
  x = params["emb"][tokens_BxT]
  at = inject_at(args)
  for i in range(args.blocks):
    for l in LAYERS:
      if at[l] == i:
        x = _inject(params, x, l, rows[l], inverses[l])
    x = _blocks(params, x, args, i, i + 1)
  return (x @ params["out"]).astype(jnp.float32)


def loss_fn(params, rows, inverses, tokens, targets, args):
  logits = forward(params, tokens, rows, inverses, args)
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))


def sgd(params, grads):
  return jax.tree.map(lambda p, g: (p - 1e-3 * g).astype(p.dtype), params, grads)


def make_hbm_step(args, offsets):
  def step(params, tables, states, tokens, targets, ids):
    pre = {l: prefetch_rows(tables[l], ids[l], offsets[l]) for l in LAYERS}
    loss, (gp, grows) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
        params, {l: p.rows_UxE for l, p in pre.items()},
        {l: p.inverse_BxTxH for l, p in pre.items()}, tokens, targets, args)
    tables, states = dict(tables), dict(states)
    for l in LAYERS:
      tables[l], states[l] = table_optim.apply_row_sparse_update(
          CFG, tables[l], states[l], RowSparse(pre[l].row_ids_U, grows[l]), LR)
    return sgd(params, gp), tables, states, loss
  return jax.jit(step, donate_argnums=(0, 1, 2))


_T0 = time.perf_counter()


def log(msg):
  # Phase stamps: large stand-ins compile and fill their tables for minutes without output.
  print(f"  [{time.perf_counter() - _T0:7.1f} s] {msg}", flush=True)


def _trace(args, name, run, state):
  """With --trace_steps: `run(n)` (n more steps, blocking; returns the new state) under the
  profiler, its busy time per line logged. Every training mode runs them, so the end-of-run
  agreement still compares equal step counts. Returns the state after them (or `state`)."""
  if not args.trace_steps:
    return state
  state, rows, wall_ms = common.traced(lambda: run(args.trace_steps))
  log(f"{name}: {args.trace_steps} traced steps\n"
      + common.format_rows(rows, wall_ms, args.trace_steps))
  return state


def bench_hbm(args, params, tables, mapping, data, dev):
  offsets = {l: jnp.asarray(mapping.offsets(l), jnp.int32) for l in LAYERS}
  states = {l: host_memory.init_state(CFG, tables[l]) for l in LAYERS}
  step = make_hbm_step(args, offsets)
  dd = [jax.device_put(b, dev) for b in data]  # device_put takes the whole pytree
  losses = []

  def run(n, s0, carry):  # batch s is data[s % 4]: the host runs see the same sequence
    for s in range(s0, s0 + n):
      tok, tgt, ids = dd[s % len(dd)]
      *carry, loss = step(*carry, tok, tgt, ids)
      losses.append(loss)
    jax.block_until_ready((loss, carry[1]))
    return carry

  carry = run(WARMUP, 0, (params, tables, states))
  log(f"hbm: compiled + {WARMUP} warm-up steps")
  t0 = time.perf_counter()
  carry = run(args.steps, WARMUP, carry)
  ms = (time.perf_counter() - t0) / args.steps * 1e3
  params, tables, _ = _trace(args, "hbm", lambda n: run(n, WARMUP + args.steps, carry), carry)
  return ms, [float(x) for x in losses], params, tables


def bench_host(args, params, tables, mapping, data, dev):
  """The same steps as bench_hbm through `HostTables.make_step`: one program per step, the host
  gather of step s+1 and the write of step s-1 on NumPy threads beside it."""
  trainer = HostTables(CFG, tables, {l: mapping.offsets(l) for l in LAYERS})

  def model_step(p, batch, rows):
    tok, tgt = batch
    loss, (gp, grows) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
        p, {l: r.rows_UxE for l, r in rows.items()},
        {l: r.inverse_BxTxH for l, r in rows.items()}, tok, tgt, args)
    return (sgd(p, gp), loss), grows, LR

  name = "host threads"
  run = trainer.make_step(model_step, donate_state=True)
  dd = [(jax.device_put(tok, dev), jax.device_put(tgt, dev)) for tok, tgt, _ in data]

  losses = []

  def steps(n, handle, s0, p):
    for s in range(s0, s0 + n):
      tok, tgt = dd[s % len(dd)]
      (p, loss), handle = run(handle, data[(s + 1) % len(data)][2], p, (tok, tgt))
      losses.append(loss)
    return handle, loss, p

  # Committed params from the start, like the params every later step gets back.
  params = jax.device_put(params, dev)
  handle, loss, params = steps(WARMUP, trainer.prefetch(data[0][2]), 0, params)
  jax.block_until_ready((loss, trainer.tables))    # `tables` waits for the host writes
  log(f"{name}: compiled + {WARMUP} warm-up steps")
  t0 = time.perf_counter()
  handle, loss, params = steps(args.steps, handle, WARMUP, params)
  jax.block_until_ready((loss, trainer.tables))
  ms = (time.perf_counter() - t0) / args.steps * 1e3

  def more(n):
    nxt, loss, _ = steps(n, handle, WARMUP + args.steps, params)
    jax.block_until_ready((loss, trainer.tables))
    return nxt
  handle = _trace(args, name, more, handle)
  return ms, [float(x) for x in losses], trainer


# --gen_fetch choice -> (log label, record key prefix, overhead key prefix)
GEN_FETCH = {"direct": ("host, GPU reads the rows", "host_dir", "gen_dir"),
             "step": ("host, fetch in step", "host", "gen")}


def make_generator(args, params, tables, mapping, fetch="direct"):
  """A decoder of the stand-in model. fetch: 'direct' (the GPU reads the token's rows from the
  host table inside the token's program, `host_memory.direct_rows`) or 'step' (XLA's host
  gather in the token's program). HBM tables: 'direct' (`host_memory.fetch_rows` in the token's
  program)."""
  # The stand-in model is position-wise, so decoding needs no cache: each step is a one-token
  # forward on the rows just fetched for that token (EngramLM's caches: generate.engram_lm_decoder).
  def decode_fn(p, cache, tokens, positions, engram_inputs):
    del positions
    return forward(p, tokens, {l: r.rows_UxE for l, r in engram_inputs.items()},
                   {l: r.inverse_BxTxH for l, r in engram_inputs.items()}, args), cache
  # On CPU (the test suite's smoke run) 'direct''s GPU kernel runs in the Pallas interpreter.
  return Decoder(decode_fn, lambda p, b, t: {}, params, tables, mapping, fetch=fetch,
                 interpret=jax.default_backend() == "cpu")


def bench_gen(args, gens: dict) -> dict:
  """Decoding tokens/s of each generator in `gens` ({label: generator}, the first one the
  HBM baseline) and its tokens: a warm-up call each, then --gen_reps rounds in which every
  generator decodes the same prompt once, one after the other (interleaved, so a slow spell
  of the machine hits all of them); tokens/s from the median call."""
  prompt = (np.random.default_rng(1).zipf(1.1, (args.gen_batch, args.gen_prompt)) - 1) % VOCAB
  prompt = prompt.astype(np.int32)
  first = {name: gen(prompt, args.gen_new) for name, gen in gens.items()}  # compile / warm up
  log(f"generate: {len(gens)} decoders compiled + warm-up calls")
  times = {name: [] for name in gens}
  for _ in range(args.gen_reps):
    for name, gen in gens.items():
      t0 = time.perf_counter()
      out = gen(prompt, args.gen_new)
      times[name].append(time.perf_counter() - t0)
      if not np.array_equal(out, first[name]):
        raise AssertionError(f"{name}: decoding the same prompt twice gave different tokens")
  result = {}
  for name, gen in gens.items():
    if args.trace_steps:  # one more call under the profiler: where a decode step's time goes
      _, rows, wall_ms = common.traced(lambda gen=gen: gen(prompt, args.gen_new))
      log(f"generate ({name}): 1 traced call, per new token\n"
          + common.format_rows(rows, wall_ms, args.gen_new))
    log(f"generate ({name}): calls {', '.join(f'{t * 1e3:.1f}' for t in times[name])} ms")
    result[name] = (args.gen_batch * args.gen_new / float(np.median(times[name])), first[name])
  return result


def probe(rows=16 * 2**20, slots=262144, mm_n=8192):
  """Primitive costs on a 4 GiB pinned_host table (`--probe`): host gather of `slots` random
  rows into HBM, the host scatter back (donated), and whether either overlaps a ~48 ms matmul:
  dispatched as separate programs (same stream: the times add up), fused into one program, and
  fused with the host work annotated onto a second GPU stream
  (`compute_on('gpu_stream:1')`, XLA's explicit stream annotation)."""
  from jax.experimental.compute_on import compute_on
  dev = host_memory.placement_sharding("device")
  host = host_memory.placement_sharding("pinned_host")
  table = host_memory.zeros((rows, E), np.float32, "pinned_host")
  ids = jax.device_put(np.sort(np.random.default_rng(0).choice(rows, slots, replace=False))
                       .astype(np.int32), host)
  take = lambda t, i: t.at[i].get(mode="promise_in_bounds")  # noqa: E731
  put = lambda t, i, v: t.at[i].set(jax.device_put(v, jax.memory.Space.Host),  # noqa: E731
                                    mode="drop")
  on_stream1 = lambda f: compute_on(  # noqa: E731
      compute_type="gpu_stream:1", out_memory_spaces=jax.memory.Space.Device)(f)
  on_stream1_host = lambda f: compute_on(  # noqa: E731
      compute_type="gpu_stream:1", out_memory_spaces=jax.memory.Space.Host)(f)
  mm_body = lambda x: jax.lax.fori_loop(0, 30, lambda i, y: (y @ x) * 0.01, x)  # noqa: E731
  gather = jax.jit(take, out_shardings=dev)
  scatter = jax.jit(put, donate_argnums=0)
  mm = jax.jit(mm_body)
  variants = {
      "fused mm + gather (one program)": (
          jax.jit(lambda x, t, i: (mm_body(x), jax.device_put(take(t, i), jax.memory.Space.Device))),
          False),
      "fused mm + gather on gpu_stream:1": (
          jax.jit(lambda x, t, i: (mm_body(x), on_stream1(take)(t, i))), False),
      "fused mm + scatter on gpu_stream:1": (
          jax.jit(lambda x, t, i, v: (mm_body(x), on_stream1_host(put)(t, i, v)),
                  donate_argnums=1), True),
  }
  x = jax.random.normal(jax.random.key(1), (mm_n, mm_n), jnp.bfloat16)
  vals = jnp.ones((slots, E), jnp.float32)
  box = [table]

  def timed(name, f, n=5):
    try:
      jax.block_until_ready(f())
      t0 = time.perf_counter()
      for _ in range(n):
        r = f()
      jax.block_until_ready(r)
      print(f"  probe {name}: {(time.perf_counter() - t0) / n * 1e3:.2f} ms", flush=True)
    except Exception as e:  # A probe reports a failing variant and goes on with the next.
      print(f"  probe {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)

  def sc():
    box[0] = scatter(box[0], ids, vals)
    return box[0]
  timed(f"host gather {slots} x {E} f32 rows -> HBM", lambda: gather(box[0], ids))
  timed("host scatter of the same rows (donated)", sc)
  timed("matmul program alone", lambda: mm(x))
  timed("matmul + host gather", lambda: (mm(x), gather(box[0], ids)))
  timed("matmul + host scatter", lambda: (mm(x), sc()))
  for name, (fn, donates) in variants.items():
    if donates:
      def run(fn=fn):
        y, box[0] = fn(x, box[0], ids, vals)
        return y, box[0]
    else:
      run = lambda fn=fn: fn(x, box[0], ids)  # noqa: E731
    timed(name, run)
    if donates:
      ok = bool(np.all(np.asarray(gather(box[0], ids)) == 1.0))
      print(f"    the stream-1 scatter wrote every row: {ok}", flush=True)
  # The threaded step's host side: NumPy on a view of the same pinned_host buffer, outside XLA.
  view, ids_np = host_memory.host_view(box[0]), np.asarray(jax.device_get(ids))
  rows_np = np.empty((slots, E), np.float32)
  for threads in sorted({1, 8, os.cpu_count() or 1}):
    worker = HostRowWorker(threads)
    timed(f"NumPy gather, {threads} threads", lambda: worker.gather(view, ids_np, rows_np))
    timed(f"NumPy scatter, {threads} threads", lambda: worker.scatter(view, ids_np, rows_np))
  worker = HostRowWorker(default_host_threads())
  timed("device_put of the gathered rows (pageable)", lambda: jax.device_put(rows_np, dev))
  on_device = jax.device_put(rows_np, dev)
  timed(f"device_get of {slots} rows", lambda: jax.device_get(on_device + 0))

  def beside():  # what a threaded step does while the device computes
    y = mm(x)
    worker.gather(view, ids_np, rows_np)
    z = jax.device_put(rows_np, dev)
    worker.scatter(view, ids_np, jax.device_get(on_device))
    return y, z
  timed(f"matmul + NumPy gather, put, get, scatter ({worker.threads} threads) beside it", beside)


MODES = ("hbm", "threads", "gen")


def _check_ids(mapping, data, n=4096):
  """{layer: n sorted row ids} touched by the first batch: the rows compared across placements."""
  return {l: unique_rows_numpy(data[0][2][l], mapping.offsets(l),
                                       mapping.num_rows(l))[0][:n] for l in LAYERS}


def _rows_of(tables, ids):
  """{layer: those rows as NumPy}, from HBM or pinned_host tables (never copied whole)."""
  return {l: np.asarray(host_memory.fetch_rows(t, jax.device_put(ids[l], t.sharding)))
          for l, t in tables.items()}


def _max_diff(a, b):
  return max(float(np.max(np.abs(a[l] - b[l]))) for l in a)


def _record_losses(rec, name, losses, hbm_losses):
  """Final loss, first-step loss, the second step's |loss - HBM loss| and the largest over the
  steps: the first step starts from identical tables and weights, so any difference there is
  not accumulated noise; the second sees one update (rounding only: the gradients are summed in
  another order than the HBM program's); later steps of this bf16 stand-in amplify rounding."""
  rec[f"{name}_loss"] = losses[-1]
  rec[f"{name}_loss0"] = losses[0]
  rec[f"{name}_loss1_diff"] = abs(losses[1] - hbm_losses[1])
  rec[f"{name}_loss_maxdiff"] = max(abs(a - b) for a, b in zip(losses, hbm_losses))


def _fmt(rec, key, spec):
  return format(rec[key], spec) if key in rec else format("-", ">" + spec.split(".")[0])


def decode_gen(args, rec, hbm_tables, host_tables, mapping):
  """Decoding from the HBM tables and, interleaved with it, from the pinned_host tables with
  each of --gen_fetch; tokens/s and overheads into `rec`; every decoder must sample the HBM
  decoder's tokens (`same_tokens`)."""
  fetches = args.gen_fetch.split(",")   # checked by main
  params = init_params(args)
  gens = {"HBM": make_generator(args, params, hbm_tables, mapping)}
  for fetch in fetches:
    gens[GEN_FETCH[fetch][0]] = make_generator(args, params, host_tables, mapping, fetch)
  result = bench_gen(args, gens)
  rec["hbm_tok_s"], hbm_tokens = result["HBM"]
  same = True
  for fetch in fetches:
    label, key, pct = GEN_FETCH[fetch]
    tok_s, tokens = result[label]
    rec[f"{key}_tok_s"] = tok_s
    rec[f"{pct}_overhead_pct"] = 100 * (rec["hbm_tok_s"] / tok_s - 1)
    same = same and bool(np.array_equal(hbm_tokens, tokens))
  rec["same_tokens"] = same


def main():
  global CFG
  args = parse()
  if args.probe:
    probe()
    if not args.sizes_gb:
      return
  modes = args.modes.split(",")
  if not set(modes) <= set(MODES) or "hbm" not in modes:
    raise SystemExit(f"--modes: a comma list of {MODES} that includes hbm (the baseline)")
  if not set(args.gen_fetch.split(",")) <= set(GEN_FETCH):
    raise SystemExit(f"--gen_fetch: a comma list of {tuple(GEN_FETCH)}, got {args.gen_fetch!r}")
  CFG = table_optim.TableOptimizerConfig(
      kind=args.optimizer, **({"moment_dtype": "bfloat16"} if args.optimizer == "lazy_adam"
                              else {}))
  dev = host_memory.placement_sharding("device")
  print(f"jax {jax.__version__} {jax.devices()[0].device_kind}; model d={args.d} "
        f"blocks={args.blocks} B={args.batch} T={args.seq} H={H} E={E}; tables "
        f"{args.table_dtype} {args.optimizer} "
        f"({table_optim.bytes_per_table_param(CFG, args.table_dtype, row_width=E):.2f}"
        f" bytes/param); modes {modes}; tokens {args.tokens}; "
        f"host limit {host_memory.host_memory_limit_bytes()[1]}",
        flush=True)
  rows_out = []
  tables_in = lambda mapping, placement: {l: host_memory.create_table(  # noqa: E731
      mapping.num_rows(l), E, args.table_dtype, placement, seed=l, chunk_rows=1 << 20)
      for l in LAYERS}  # same seeds: every placement starts from the same tables
  for gb in [float(s) for s in args.sizes_gb.split(",") if s]:
    itemsize = jnp.dtype(args.table_dtype).itemsize
    mapping = mapping_for(gb, itemsize)
    table_gb = sum(mapping.num_rows(l) for l in LAYERS) * E * itemsize / 2**30
    data = batches(mapping, args.batch, args.seq, tokens=args.tokens)
    rec = {"table_gb": table_gb}
    t0 = time.perf_counter()
    tables = tables_in(mapping, "device")
    log(f"{table_gb:.2f} GB: HBM tables created")
    if "gen" in modes:  # before training, so every placement decodes from the initial tables
      decode_gen(args, rec, tables, tables_in(mapping, "pinned_host"), mapping)
      gc.collect()
    rec["hbm_ms"], hbm_losses, params_h, tables = bench_hbm(
        args, init_params(args), tables, mapping, data, dev)
    check_ids = _check_ids(mapping, data)
    hbm_rows = _rows_of(tables, check_ids)
    _record_losses(rec, "hbm", hbm_losses, hbm_losses)
    del tables, params_h
    gc.collect()
    if "threads" in modes:
      t1 = time.perf_counter()
      tables = tables_in(mapping, "pinned_host")
      rec["host_create_s"] = time.perf_counter() - t1
      log(f"{table_gb:.2f} GB: pinned_host tables created")
      rec["threads_ms"], losses, trainer = bench_host(args, init_params(args), tables, mapping,
                                                      data, dev)
      rec["threads_overhead_pct"] = 100 * (rec["threads_ms"] / rec["hbm_ms"] - 1)
      _record_losses(rec, "threads", losses, hbm_losses)
      rec["threads_rows_maxdiff"] = _max_diff(_rows_of(trainer.tables, check_ids), hbm_rows)
      del trainer, tables
      gc.collect()
    rec["total_s"] = time.perf_counter() - t0
    rows_out.append(rec)
    print(json.dumps(rec), flush=True)
    with open(os.path.join(args.out, "bench_offload.json"), "w") as f:
      json.dump(rows_out, f, indent=1)
  print(f"\n{'table GB':>9} {'HBM ms':>8} {'thr. ms':>8} {'ovh %':>6} | {'HBM tok/s':>9} "
        f"{'dir. tok/s':>10} {'ovh %':>6} {'host tok/s':>10} {'ovh %':>6} | {'loss hbm':>8} "
        f"{'thr.':>8}")
  for r in rows_out:
    print(f"{r['table_gb']:9.2f} {_fmt(r, 'hbm_ms', '8.2f')} {_fmt(r, 'threads_ms', '8.2f')} "
          f"{_fmt(r, 'threads_overhead_pct', '6.1f')} | {_fmt(r, 'hbm_tok_s', '9.0f')} "
          f"{_fmt(r, 'host_dir_tok_s', '10.0f')} {_fmt(r, 'gen_dir_overhead_pct', '6.1f')} "
          f"{_fmt(r, 'host_tok_s', '10.0f')} {_fmt(r, 'gen_overhead_pct', '6.1f')} | "
          f"{_fmt(r, 'hbm_loss', '8.4f')} "
          f"{_fmt(r, 'threads_loss', '8.4f')}")
  print("\nAgreement with the HBM placement (same batches, same initial tables and weights): "
        "first-step losses; |loss diff| at the second step (after one update) / max over steps; "
        "max |row diff| of 4096 rows per table after the run")
  for r in rows_out:
    for name in ("threads",):
      if f"{name}_loss0" in r:
        print(f"  {r['table_gb']:6.2f} GB {name:>7}: loss0 {r['hbm_loss0']:.6f} vs "
              f"{r[name + '_loss0']:.6f}; |dloss| step 2 {r[name + '_loss1_diff']:.2e} / max "
              f"{r[name + '_loss_maxdiff']:.2e}; "
              f"max |drow| {r[name + '_rows_maxdiff']:.2e}")


if __name__ == "__main__":
  main()
