"""MoE FFN forward+backward at the small_gpu shapes: the dropless dispatch's grouped matmul
(Mosaic GPU kernels, XLA's ragged_dot) next to capacity dispatch, in one run.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m benchmarks.bench_moe [--sweep]

Question: how fast is the default dropless dispatch (engram_jax/moe.py, dispatch='ragged':
pairs sorted by expert, one `pallas_kernels.grouped_matmul` per projection) against the
capacity dispatch that drops pairs over capacity? Times one MoE layer (router, dispatch, routed
experts, shared expert, combine) forward+backward w.r.t. its parameters and input, in bf16
compute with f32 parameters, for the dropless dispatch with each grouped-matmul implementation
('mosaic_gpu' only on a Hopper GPU; the table says when it is not run), for 'capacity' at two
capacity factors, and for a dense SwiGLU whose width equals the routed + shared width a token
activates (the FLOP floor of the layer). Prints the layer's useful TFLOP/s (expert FLOPs
actually needed: 6 * S * D * F * 3 per activated expert), the fraction of pairs each run
dropped on these random inputs, and which implementation the default picks on this device.
`--sweep` also times one grouped matmul (fwd+bwd, [S*k, D] x [E, D, F]) under a few tile
configurations of the Mosaic kernels (Hopper only).

Timing: `common.median_ms` (jitted step, 3 warm-up calls, median of `--reps` timed calls).

Dimension legend: S = B*T tokens, D width, E routed experts, k experts per token, F expert width.
"""

import dataclasses

from absl import flags
import jax
import jax.numpy as jnp

from benchmarks import common
from engram_jax.config import MoEConfig
from engram_jax.layers import SwiGLU
from engram_jax.moe import MoE
from pallas_kernels.grouped_matmul import MosaicBlocks, api, configs, grouped_matmul

FLAGS = flags.FlagValues()
flags.DEFINE_integer("tokens", 32 * 1024, "S = B*T tokens", flag_values=FLAGS)
flags.DEFINE_integer("d", 768, "D, the model width", flag_values=FLAGS)
flags.DEFINE_integer("experts", 16, "E routed experts", flag_values=FLAGS)
flags.DEFINE_integer("top_k", 2, "k experts per token", flag_values=FLAGS)
flags.DEFINE_integer("expert_width", 384, "F, the expert width", flag_values=FLAGS)
flags.DEFINE_integer("reps", 20, "timed calls per variant", flag_values=FLAGS)
flags.DEFINE_bool("sweep", False, "also sweep the Mosaic kernels' tiles", flag_values=FLAGS)


def fwd_bwd(module, x):
  variables = module.init(jax.random.key(0), x)
  params = variables["params"]
  rest = {k: v for k, v in variables.items() if k != "params"}

  def loss(p, x):
    out = module.apply({"params": p, **rest}, x)
    y = out[0] if isinstance(out, tuple) else out
    return jnp.mean(jnp.square(y.astype(jnp.float32))), out

  @jax.jit
  def step(p, x):
    (l, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x)
    stats = out[1] if isinstance(out, tuple) else {}
    return l, grads, stats.get("dropped_fraction", jnp.zeros(()))
  return step, params


def sweep(s, d, e, k, f, reps):
  """Fwd+bwd of one grouped matmul [S*k, D] x [E, D, F] under several Mosaic tile configs."""
  m = s * k
  x = jax.random.normal(jax.random.key(2), (m, d), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(3), (e, d, f), jnp.bfloat16)
  sizes = jnp.full((e,), m // e, jnp.int32).at[-1].add(m - e * (m // e))
  base = configs.for_shape(m, d, f, e)
  variants = {"default": base}
  for bm, bn, steps in ((64, 128, 4), (128, 64, 4), (128, 128, 2), (128, 128, 6),
                        (128, 192, 4), (192, 128, 4)):
    blocks = MosaicBlocks(block_m=bm, block_n=bn, max_concurrent_steps=steps)
    variants[f"forward+grad_x {bm}x{bn}x64, {steps} steps"] = dataclasses.replace(
        base, forward=blocks, grad_x=blocks)
    variants[f"grad_w {bm}x{bn}x64, {steps} steps"] = dataclasses.replace(base, grad_w=blocks)
  print(f"\ngrouped matmul [{m}, {d}] x [{e}, {d}, {f}] fwd+bwd, Mosaic tile sweep")
  for name, config in variants.items():
    reason = config.unsupported(m, d, f)
    if reason:
      print(f"  {name:<40} not run: {reason}")
      continue
    step = jax.jit(jax.grad(lambda x, w, c=config: jnp.sum(grouped_matmul(
        x, w, sizes, implementation="mosaic_gpu", gpu_config=c).astype(jnp.float32)),
                            argnums=(0, 1)))
    try:
      ms = common.median_ms(step, x, w, reps=reps)
    except Exception as err:  # e.g. "exceeds available shared memory": report, keep sweeping
      print(f"  {name:<40} failed: {str(err).splitlines()[0][:80]}")
      continue
    print(f"  {name:<40} {ms:8.3f} ms {6 * m * d * f / ms / 1e9:8.1f} TFLOP/s")


def main():
  args = common.parse_flags(FLAGS, __doc__)
  s, d, e, k, f = args.tokens, args.d, args.experts, args.top_k, args.expert_width
  x = jax.random.normal(jax.random.key(1), (1, s, d), jnp.float32).astype(jnp.bfloat16)
  print(f"{jax.devices()[0].device_kind} jax {jax.__version__}: S={s} D={d} E={e} k={k} F={f}")
  platform, capability = api.device_facts()
  default = {shape: api.choose_implementation(
      jnp.bfloat16, shape, configs.for_shape(*shape, e), platform=platform,
      compute_capability=capability) for shape in ((s * k, d, f), (s * k, f, d))}
  print(f"default dropless grouped matmul here: {sorted(set(default.values()))}")
  useful_flops = 6 * s * d * f * 3 * (k + 1)   # routed k + 1 shared expert, fwd + bwd
  moe = lambda **kw: MoEConfig(num_experts=e, top_k=k, expert_hidden_size=f, **kw)  # noqa: E731
  variants = [
      ("dropless, Mosaic GPU kernels", moe(matmul_implementation="mosaic_gpu")),
      ("dropless, XLA ragged_dot", moe(matmul_implementation="xla")),
      ("capacity cf=1.25", moe(dispatch="capacity", capacity_factor=1.25)),
      ("capacity cf=2.0", moe(dispatch="capacity", capacity_factor=2.0))]
  rows = []
  for name, cfg in variants:
    if cfg.matmul_implementation == "mosaic_gpu" and not api.is_hopper(platform, capability):
      rows.append((name, None, None))
      print(f"  {name}: not run (needs a Hopper GPU, this is {platform} {capability!r})")
      continue
    step, params = fwd_bwd(MoE(cfg, dtype=jnp.bfloat16), x)
    ms = common.median_ms(step, params, x, reps=args.reps)
    dropped = float(step(params, x)[2])
    rows.append((name, ms, dropped))
    print(f"  {name}: {ms:.3f} ms", flush=True)
  step, params = fwd_bwd(SwiGLU((k + 1) * f, jnp.bfloat16), x)
  rows.append((f"dense SwiGLU width {(k + 1) * f} (floor)",
               common.median_ms(step, params, x, reps=args.reps), 0.0))
  print(f"\n{'variant':<34} {'ms':>8} {'TFLOP/s':>8} {'dropped':>8}")
  for name, ms, dropped in rows:
    if ms is None:
      print(f"{name:<34} {'not run':>8}")
      continue
    print(f"{name:<34} {ms:8.3f} {useful_flops / ms / 1e9:8.1f} {dropped:8.4f}")
  if args.sweep:
    if api.is_hopper(platform, capability):
      sweep(s, d, e, k, f, args.reps)
    else:
      print(f"--sweep: not run (the Mosaic kernels need a Hopper GPU, this is {platform})")


if __name__ == "__main__":
  main()
