"""MoE FFN forward+backward at the small_gpu shapes: ragged_dot vs capacity dispatch.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m benchmarks.bench_moe

Question: is `jax.lax.ragged_dot` (engram_jax/moe.py, dispatch='ragged') what makes the
small_gpu training step slow on a GPU? Times one MoE layer (router, dispatch, routed experts,
shared expert, combine) forward+backward w.r.t. its parameters and input, in bf16 compute with
f32 parameters, for 'ragged' and for 'capacity' at two capacity factors, next to a dense SwiGLU
whose width equals the routed + shared width a token activates (the FLOP floor of the layer).
Also prints the layer's useful TFLOP/s (expert FLOPs actually needed: 6 * S * D * F * 3 per
activated expert) and the fraction of pairs the capacity runs dropped on these random inputs.

Timing: jitted step, 3 warm-up calls, median of 20 timed calls (block_until_ready each).

Dimension legend: S = B*T tokens, D width, E routed experts, k experts per token, F expert width.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from engram_jax.config import MoEConfig
from engram_jax.layers import SwiGLU
from engram_jax.moe import MoE


def time_ms(fn, *args, reps=20):
  out = fn(*args)
  for _ in range(2):
    out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3


def fwd_bwd(module, x, collection_keys=()):
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


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--tokens", type=int, default=32 * 1024)
  p.add_argument("--d", type=int, default=768)
  p.add_argument("--experts", type=int, default=16)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--expert_width", type=int, default=384)
  args = p.parse_args()
  s, d, e, k, f = args.tokens, args.d, args.experts, args.top_k, args.expert_width
  x = jax.random.normal(jax.random.key(1), (1, s, d), jnp.float32).astype(jnp.bfloat16)
  print(f"{jax.devices()[0].device_kind} jax {jax.__version__}: S={s} D={d} E={e} k={k} F={f}")
  useful_flops = 6 * s * d * f * 3 * (k + 1)   # routed k + 1 shared expert, fwd + bwd
  rows = []
  variants = [("ragged", MoEConfig(num_experts=e, top_k=k, expert_hidden_size=f)),
              ("capacity cf=1.25", MoEConfig(num_experts=e, top_k=k, expert_hidden_size=f,
                                             dispatch="capacity", capacity_factor=1.25)),
              ("capacity cf=2.0", MoEConfig(num_experts=e, top_k=k, expert_hidden_size=f,
                                            dispatch="capacity", capacity_factor=2.0))]
  for name, cfg in variants:
    step, params = fwd_bwd(MoE(cfg, dtype=jnp.bfloat16), x)
    ms = time_ms(step, params, x)
    dropped = float(step(params, x)[2])
    rows.append((name, ms, dropped))
    print(f"  {name}: {ms:.3f} ms", flush=True)
  step, params = fwd_bwd(SwiGLU((k + 1) * f, jnp.bfloat16), x)
  rows.append((f"dense SwiGLU width {(k + 1) * f} (floor)", time_ms(step, params, x), 0.0))
  print(f"\n{'variant':<34} {'ms':>8} {'TFLOP/s':>8} {'dropped':>8}")
  for name, ms, dropped in rows:
    print(f"{name:<34} {ms:8.3f} {useful_flops / ms / 1e9:8.1f} {dropped:8.4f}")


if __name__ == "__main__":
  main()
