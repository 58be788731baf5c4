"""Benchmark of one whole Engram layer, forward + backward, at the official demo's shapes.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m benchmarks.bench_layer [--notorch] [--repeats=5]

Shapes: B=4, T=4096, M=4 streams, D=1024, 2 orders x 8 heads x 64 (d_mem 1024), base 646,400
(10,344,164 table rows, f32 parameters). The step is what a user runs: token ids -> hashing on
device (`NgramHashMapping.hash`) -> `Engram.apply` -> the backward from a given output
cotangent in the compute dtype (`jax.vjp`; what a model's residual stream passes back, so no
loss reduction is timed), w.r.t. every parameter (the table too) and the hidden states, under
one jit. Two table placements: 'param' (dense [R, E] table gradient through the lookup's custom
VJP) and 'external' (`prefetch_rows` + `expand_rows`: row-sparse [U, E] gradient; the prefetch
is inside the step). Compute dtype f32 and bf16 (parameters stay f32). Each JAX step is timed
`--repeats` times, interleaved so that drifts of the machine hit every step; the table prints
the median and the range.

Breakdown (each part fwd+bwd alone, same shapes, bf16 compute): hashing, lookup, projections
(value + M keys), gate (norms, score, sigmoid, scaling), conv (ShortConv). The parts do not add
up exactly to the layer: XLA fuses across them inside the whole step.

PyTorch side by side (unless --notorch): a small re-statement of the demo layer written here
(not the official file), hashing precomputed, timed eager f32 and under torch.compile with bf16
autocast, its backward from a given cotangent likewise (`out.backward(cot)`).

`--profile`: also traces the bf16 row-sparse step (`jax.profiler`) and prints its GPU time per
part of the layer and its most expensive HLO instructions with their op_names. It turns XLA:GPU's
command buffers (CUDA graphs) off for the whole run, so that every kernel names its
instruction (as benchmarks/profile_step.py does); the run's times are then without them.

Imports nothing from grain or ml_collections.

Dimension legend: B batch, T time, M streams, D hidden, H = 16 heads, E = 64 row width,
F = H*E = d_mem, R table rows, U unique rows.
"""

import collections
import dataclasses
import re
import statistics

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from engram_jax.config import EngramConfig
from engram_jax.engram_layer import Engram, ShortConv
from engram_jax.hashing import NgramHashMapping
from pallas_kernels.engram_lookup import engram_lookup, prefetch_rows

B, T, LAYER, VOCAB, PAD = 4, 4096, 1, 129_280, 2

FLAGS = flags.FlagValues()
flags.DEFINE_bool("torch", True, "time the PyTorch re-statement too", flag_values=FLAGS)
flags.DEFINE_bool("tiny", False, "B=1, T=128: a CPU smoke run", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 5,
                     "timings of each JAX step, interleaved; the table prints the median",
                     flag_values=FLAGS)
flags.DEFINE_bool("profile", False,
                  "trace the bf16 row-sparse step (command buffers off for the run)",
                  flag_values=FLAGS)


def bench(fn, args):
  """Median ms of a jitted call over 10 calls (`common.median_ms`)."""
  return common.median_ms(fn, *args, reps=10)


def make_step(cfg, hashing, dtype, placement):
  """The jitted fwd+bwd step: (params, table, hidden, tokens, cot) -> (y, grads).

  The backward starts from `cot`, a given cotangent of the output in the compute dtype (what
  the residual stream of a model in that dtype passes back), through `jax.vjp`: no loss
  reduction is timed. The PyTorch side calls `out.backward(cot)` likewise.
  """
  layer = Engram(cfg, hashing.head_sizes(LAYER), table_placement=placement, dtype=dtype)
  offsets_H = jnp.asarray(hashing.offsets(LAYER), jnp.int32)

  def step(params, table, hidden, tokens, cot):
    ids = hashing.hash(tokens)[LAYER]
    if placement == "param":
      def apply(params, table, hidden):
        return layer.apply({"params": {**params["params"], "memory": {"table": table}}},
                           hidden, ids)
      y, vjp = jax.vjp(apply, params, table, hidden)
      return y, vjp(cot)
    # Row-sparse: the gradient is w.r.t. the U prefetched rows, never a dense table.
    pre = prefetch_rows(table, ids, offsets_H)
    y, vjp = jax.vjp(lambda p, rows, h: layer.apply(p, h, pre._replace(rows_UxE=rows)),
                     params, pre.rows_UxE, hidden)
    return y, vjp(cot)

  return layer, jax.jit(step)


def layer_step(cfg, hashing, dtype, placement, tokens, hidden, cot, table):
  """(jitted step, its arguments) of one layer configuration."""
  layer, step = make_step(cfg, hashing, dtype, placement)
  ids = hashing.hash(tokens)[LAYER]
  init_input = ids if placement == "param" else prefetch_rows(
      table, ids, jnp.asarray(hashing.offsets(LAYER), jnp.int32))
  params = nn.meta.unbox(jax.jit(layer.init)(jax.random.key(0), hidden.astype(dtype), init_input))
  if placement == "param":
    params = {"params": {k: v for k, v in params["params"].items() if k != "memory"}}
  return step, (params, table, hidden.astype(dtype), tokens, cot.astype(dtype))


# (regex on an instruction's op_name, part of the layer); the first match wins.
PROFILE_PARTS = (
    (r"hash", "hashing"),
    (r"short_conv", "conv (norm, taps, SiLU)"),
    (r"key_norm|query_norm", "gate: key/query norms"),
    (r"btf,|fd->|fmd->|mfd", "projections"),
    (r"memory|prefetch|expand|lookup|segment|sort|gather|scatter", "lookup + row gradient"),
    (r"Engram", "gate: score, sigmoid, v = gate * value"),
)


def profile_layer(step, args, calls=5):
  """GPU (else host) event time per call of `step`: ({part: ms}, Counter of ms per
  instruction, {instruction: op_name}, summed ms)."""
  compiled = step.lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  _, profile, _ = common.profiled(
      lambda: jax.block_until_ready([compiled(*args) for _ in range(calls)]))
  names = common.op_names(compiled.as_text())
  per_op = collections.Counter()
  for op, ns in common.hlo_events(profile, "step"):
    per_op[op] += ns / 1e6 / calls
  parts = collections.Counter()
  for op, ms in per_op.items():
    name = names.get(op, "")
    parts[next((part for pattern, part in PROFILE_PARTS if re.search(pattern, name)),
               "outside the layer (loss, cotangent)")] += ms
  return parts, per_op, names, sum(per_op.values())


def print_profile(parts, per_op, names, total, top=15):
  print(f"profile, bf16 compute, table external (row-sparse), summed events {total:.3f} ms:")
  for part, ms in parts.most_common():
    print(f"  {part:<42} {ms:8.3f} ms {100 * ms / total:5.1f}%")
  print(f"  top {top} instructions (ms, name, op_name):")
  for op, ms in per_op.most_common(top):
    print(f"  {ms:8.3f}  {op:<28} {names.get(op, '')[-100:]}")


def breakdown(cfg, hashing, tokens, table, dtype):
  """Each part fwd+bwd on its own."""
  key = jax.random.key(1)
  m, d, f = cfg.hc_mult, cfg.hidden_size, cfg.memory_dim
  offsets_H = jnp.asarray(hashing.offsets(LAYER), jnp.int32)
  ids = jax.jit(lambda t: hashing.hash(t)[LAYER])(tokens)
  e = jax.random.normal(key, (B, T, f), dtype)
  h = jax.random.normal(key, (B, T, m, d), dtype)
  v32 = jax.random.normal(key, (B, T, m, d), jnp.float32)
  wv = jax.random.normal(key, (f, d), jnp.float32) / 32
  wk = jax.random.normal(key, (m, f, d), jnp.float32) / 32
  parts = {}
  parts["hashing"] = bench(jax.jit(lambda t: hashing.hash(t)[LAYER]), (tokens,))

  def lookup(table):
    return jnp.sum(engram_lookup(table, ids, offsets_H).astype(dtype).astype(jnp.float32))
  parts["lookup"] = bench(jax.jit(jax.grad(lookup)), (table,))

  def proj(e, wv, wk):
    # As Engram: outputs in the compute dtype, used in f32.
    value = jnp.einsum("btf,fd->btd", e, wv.astype(dtype), preferred_element_type=dtype)
    keys = jnp.einsum("btf,mfd->btmd", e, wk.astype(dtype), preferred_element_type=dtype)
    return jnp.sum(value.astype(jnp.float32)) + jnp.sum(jnp.square(keys.astype(jnp.float32)))
  parts["projections"] = bench(jax.jit(jax.grad(proj, argnums=(0, 1, 2))), (e, wv, wk))

  def rms(x):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)

  def gate(k, h, value):
    s = jnp.sum(rms(k) * rms(h), -1) / np.sqrt(d)
    s = jnp.sign(s) * jnp.sqrt(jnp.maximum(jnp.abs(s), 1e-6))
    return jnp.sum(jax.nn.sigmoid(s)[..., None] * value[:, :, None, :])
  parts["gate"] = bench(jax.jit(jax.grad(gate, argnums=(0, 1, 2))), (v32, h, v32[:, :, 0]))

  # As in the bf16 layer: f32 value and gate, normalised input rounded to bf16.
  conv = ShortConv(dataclasses.replace(cfg, zero_init_conv=False), dtype=dtype)
  value, gate_BxTxM = v32[:, :, 0], jax.nn.sigmoid(v32[:, :, :, 0])
  conv_params = conv.init(key, value, gate_BxTxM)
  parts["conv"] = bench(jax.jit(jax.grad(lambda p, v, g: jnp.sum(conv.apply(p, v, g)),
                                         argnums=(0, 1, 2))), (conv_params, value, gate_BxTxM))
  return parts


def torch_baseline(num_rows, offsets):
  import torch
  import torch.nn.functional as F

  class DemoEngram(torch.nn.Module):
    """Re-statement of the demo's Engram math (REFERENCE.md section 1, steps 6-8)."""

    def __init__(self, rows, e=64, h=16, d=1024, m=4, k=4, dil=3):
      super().__init__()
      self.m, self.d, self.k, self.dil = m, d, k, dil
      self.emb = torch.nn.Embedding(rows, e)
      self.value = torch.nn.Linear(h * e, d)
      self.keys = torch.nn.ModuleList(torch.nn.Linear(h * e, d) for _ in range(m))
      self.n1 = torch.nn.ModuleList(torch.nn.RMSNorm(d) for _ in range(m))
      self.n2 = torch.nn.ModuleList(torch.nn.RMSNorm(d) for _ in range(m))
      self.cn = torch.nn.ModuleList(torch.nn.RMSNorm(d, eps=1e-5) for _ in range(m))
      self.conv = torch.nn.Conv1d(m * d, m * d, k, groups=m * d, bias=False,
                                  padding=(k - 1) * dil, dilation=dil)

    def forward(self, hidden, rows):
      b, t = rows.shape[:2]
      e = self.emb(rows).flatten(2)
      value = self.value(e)
      vs = []
      for i in range(self.m):
        s = (self.n1[i](self.keys[i](e)) * self.n2[i](hidden[:, :, i])).sum(-1) / self.d**0.5
        s = s.abs().clamp_min(1e-6).sqrt() * s.sign()
        vs.append(s.sigmoid()[..., None] * value)
      v = torch.stack(vs, 2)
      x = torch.cat([self.cn[i](v[:, :, i]) for i in range(self.m)], -1).transpose(1, 2)
      y = F.silu(self.conv(x)[..., :t].transpose(1, 2)).reshape(b, t, self.m, self.d)
      return v + y

  dev = "cuda"
  model = DemoEngram(num_rows).to(dev)
  hidden = torch.randn(B, T, 4, 1024, device=dev, requires_grad=True)
  rows = (torch.randint(0, 646_000, (B, T, 16), device=dev)
          + torch.as_tensor(offsets, device=dev))

  cots = {}

  def step(fn, autocast):
    with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
      out = fn(hidden, rows)
    if out.dtype not in cots:  # As the JAX side: a given cotangent in the output's dtype.
      cots[out.dtype] = torch.randn(out.shape, device=dev).to(out.dtype)
    out.backward(cots[out.dtype])

  def timed(fn, autocast, reps=10):
    for _ in range(3):
      step(fn, autocast)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      step(fn, autocast)
      end.record()
      torch.cuda.synchronize()
      times.append(start.elapsed_time(end))
    return statistics.median(times)

  results = {"torch eager f32": timed(model, False)}
  compiled = torch.compile(model)
  results["torch.compile bf16 autocast"] = timed(compiled, True)
  return results


def main():
  args = common.parse_flags(FLAGS, __doc__)
  if args.profile:
    common.command_buffers_off()
  if args.tiny:
    global B, T
    B, T = 1, 128
  print(common.device_summary())
  cfg = EngramConfig(layer_ids=(LAYER,))
  hashing = NgramHashMapping.from_config(cfg, tokenizer_vocab_size=VOCAB, compressed_pad_id=PAD)
  num_rows = hashing.num_rows(LAYER)
  key = jax.random.key(0)
  tokens = jax.random.randint(key, (B, T), 0, VOCAB)
  hidden = jax.random.normal(key, (B, T, cfg.hc_mult, cfg.hidden_size), jnp.float32)
  cot = jax.random.normal(key, hidden.shape, jnp.float32)
  table = jax.random.normal(key, (num_rows, cfg.head_dim), jnp.float32)
  print(f"table rows {num_rows:,}, lookups {B * T * cfg.num_heads:,}")
  results, profiled, steps = {}, None, {}
  for dtype in (jnp.float32, jnp.bfloat16):
    for placement in ("param", "external"):
      step, step_args = layer_step(cfg, hashing, dtype, placement, tokens, hidden, cot, table)
      name = f"jax {jnp.dtype(dtype).name} compute, table {placement}"
      steps[name] = (step, step_args)
      results[name] = [bench(step, step_args)]
      print(f"{name}: {results[name][0]:.2f} ms", flush=True)
      if args.profile and dtype == jnp.bfloat16 and placement == "external":
        profiled = profile_layer(step, step_args)
  for _ in range(args.repeats - 1):  # Interleaved, so drifts of the machine hit every step.
    for name, (step, step_args) in steps.items():
      results[name].append(bench(step, step_args))
  parts = breakdown(cfg, hashing, tokens, table, jnp.bfloat16)
  torch_results = {}
  if args.torch:
    try:
      torch_results = torch_baseline(num_rows, hashing.offsets(LAYER))
    except Exception as err:  # The baseline is optional; say why it is missing.
      print(f"torch baseline failed: {type(err).__name__}: {err}")
  print(f"\n== Engram layer fwd+bwd, B={B} T={T} M=4 D=1024, 16 heads x 64 ==")
  print(f"(median of {args.repeats} interleaved timings, each a median of 10 calls; "
        "min-max in brackets)")
  for name, ts in results.items():
    print(f"{name:<45} {statistics.median(ts):8.2f} ms  [{min(ts):.2f}-{max(ts):.2f}]")
  for name, ms in torch_results.items():
    print(f"{name + ' (measured here)':<45} {ms:8.2f} ms")
  compiled = torch_results.get("torch.compile bf16 autocast")
  if compiled:
    best = statistics.median(results["jax bfloat16 compute, table external"])
    print(f"torch.compile bf16 / jax bf16 row-sparse: {compiled / best:.2f}x")
  print("breakdown, bf16 compute, each part fwd+bwd alone:")
  for name, ms in parts.items():
    print(f"  {name:<12} {ms:8.3f} ms")
  if profiled:
    print("(--profile: command buffers were off for every time above)")
    print_profile(*profiled)


if __name__ == "__main__":
  main()
