"""MoE FFN forward+backward at small_gpu's shapes: ragged_dot vs capacity dispatch.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m benchmarks.bench_moe

Claim: the MoE dispatch that small_gpu uses (engram_jax/moe.py, `dispatch='capacity'`) is
faster on a GPU than the dropless `jax.lax.ragged_dot` default. Times one MoE layer (router,
dispatch, routed experts, shared expert, combine) forward+backward w.r.t. its parameters and
input, in bf16 compute with f32 parameters, for 'ragged' and for 'capacity' at two capacity
factors, next to a dense SwiGLU whose width equals the routed + shared width a token activates
(the FLOP floor of the layer). Also prints the layer's useful TFLOP/s (expert FLOPs actually
needed: 6 * S * D * F * 3 per activated expert) and the fraction of pairs the capacity runs
dropped on these random inputs.

Timing: `common.median_ms` (jitted step, 3 warm-up calls, median of 20 timed calls).

Dimension legend: S = B*T tokens, D width, E routed experts, k experts per token, F expert width.
"""

from absl import flags
import jax
import jax.numpy as jnp

from benchmarks import common
from engram_jax.config import MoEConfig
from engram_jax.layers import SwiGLU
from engram_jax.moe import MoE

FLAGS = flags.FlagValues()
flags.DEFINE_integer("tokens", 32 * 1024, "S", flag_values=FLAGS)
flags.DEFINE_integer("d", 768, "D", flag_values=FLAGS)
flags.DEFINE_integer("experts", 16, "E", flag_values=FLAGS)
flags.DEFINE_integer("top_k", 2, "k", flag_values=FLAGS)
flags.DEFINE_integer("expert_width", 384, "F", flag_values=FLAGS)


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


def main():
  args = common.parse_flags(FLAGS, __doc__)
  s, d, e, k, f = args.tokens, args.d, args.experts, args.top_k, args.expert_width
  x = jax.random.normal(jax.random.key(1), (1, s, d), jnp.float32).astype(jnp.bfloat16)
  print(f"{common.device_summary()}: S={s} D={d} E={e} k={k} F={f}")
  useful_flops = 6 * s * d * f * 3 * (k + 1)   # routed k + 1 shared expert, fwd + bwd
  rows = []
  variants = [("ragged", MoEConfig(num_experts=e, top_k=k, expert_hidden_size=f)),
              ("capacity cf=1.25", MoEConfig(num_experts=e, top_k=k, expert_hidden_size=f,
                                             dispatch="capacity", capacity_factor=1.25)),
              ("capacity cf=2.0", MoEConfig(num_experts=e, top_k=k, expert_hidden_size=f,
                                            dispatch="capacity", capacity_factor=2.0))]
  for name, cfg in variants:
    step, params = fwd_bwd(MoE(cfg, dtype=jnp.bfloat16), x)
    ms = common.median_ms(step, params, x)
    dropped = float(step(params, x)[2])
    rows.append((name, ms, dropped))
    print(f"  {name}: {ms:.3f} ms", flush=True)
  step, params = fwd_bwd(SwiGLU((k + 1) * f, jnp.bfloat16), x)
  rows.append((f"dense SwiGLU width {(k + 1) * f} (floor)", common.median_ms(step, params, x),
               0.0))
  print("\n" + common.format_table(
      ["variant", "ms", "TFLOP/s", "dropped"],
      [(name, f"{ms:.3f}", f"{useful_flops / ms / 1e9:.1f}", f"{dropped:.4f}")
       for name, ms, dropped in rows]))


if __name__ == "__main__":
  main()
