"""One mHC sub-layer wrapper (coefficients + stream mixing) forward+backward, three ways.

  XLA_PYTHON_CLIENT_PREALLOCATE=false python -m benchmarks.bench_mhc

Claim: engram_jax/hyper_connections.py's formulation (one coefficient projection with the
RMSNorm folded in; `mix_streams` picks einsum or elementwise stream mixing per platform) is
faster than the three-projection formulation, and the per-platform choice is the faster one.
Timed in one run, each as `HyperConnection`-style coefficients + an identity sub-layer + the
combine, forward + backward w.r.t. the streams and every mHC parameter, outputs and gradients
compared with the baseline's:

  baseline     three einsum projections of the materialised normalised streams,
               einsum stream sums;
  einsum       the library's coefficients (one [M*D, 2M + M^2] projection with the RMSNorm
               folded in), H_res mixing as `hc_combine(how="einsum")`;
  elementwise  the same with `hc_combine(how="elementwise")`: M^2 broadcast products and a
               sum over M.

Default shapes: small_gpu's (B=32, T=1024, M=4, D=768; bf16 streams, f32 coefficients);
small_gpu runs 24 of these per step (2 per block).

Timing: `common.median_ms` (jitted step, 3 warm-up calls, median of `--reps` timed calls).

Dimension legend: B batch, T length, M streams, D width, K = 2M + M^2 projections.
"""

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import common
from engram_jax.hyper_connections import HyperConnection, hc_combine, sinkhorn_knopp

FLAGS = flags.FlagValues()
flags.DEFINE_integer("batch", 32, "B", flag_values=FLAGS)
flags.DEFINE_integer("seq", 1024, "T", flag_values=FLAGS)
flags.DEFINE_integer("streams", 4, "M", flag_values=FLAGS)
flags.DEFINE_integer("width", 768, "D", flag_values=FLAGS)
flags.DEFINE_integer("iters", 20, "Sinkhorn iterations", flag_values=FLAGS)
flags.DEFINE_integer("reps", 20, "timed calls per variant", flag_values=FLAGS)


def baseline_coefficients(p, x_BxTxMxD, iters, eps=1e-6):
  """The three-projection formulation (the baseline): layer input, coeffs."""
  b, t, m, d = x_BxTxMxD.shape
  x32 = x_BxTxMxD.astype(jnp.float32)
  inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=(2, 3)) + eps)
  xn = x32 * inv_rms[:, :, None, None] * p["norm_scale"]
  pre = jax.nn.sigmoid(p["alpha_pre"] * jnp.einsum("btmd,mdk->btk", xn, p["phi_pre"])
                       + p["bias_pre"])
  post = 2.0 * jax.nn.sigmoid(p["alpha_post"] * jnp.einsum("btmd,mdk->btk", xn, p["phi_post"])
                              + p["bias_post"])
  logits = p["alpha_res"] * jnp.einsum("btmd,mdk->btk", xn, p["phi_res"])
  res = sinkhorn_knopp(logits.reshape(b, t, m, m) + p["bias_res"], iters)
  return jnp.einsum("btm,btmd->btd", pre, x32).astype(x_BxTxMxD.dtype), (post, res)


def baseline_combine(x_BxTxMxD, out_BxTxD, coeffs):
  post, res = coeffs
  mixed = jnp.einsum("btij,btjd->btid", res, x_BxTxMxD.astype(jnp.float32))
  new = mixed + post[..., None] * out_BxTxD.astype(jnp.float32)[:, :, None, :]
  return new.astype(x_BxTxMxD.dtype)


def make_steps(iters):
  hc = HyperConnection(sinkhorn_iters=iters)

  def library(how):
    def step(p, x):
      layer_in, coeffs = hc.apply({"params": p}, x)
      return hc_combine(x, layer_in, coeffs, how)
    return step

  def baseline(p, x):
    layer_in, coeffs = baseline_coefficients(p, x, iters)
    return baseline_combine(x, layer_in, coeffs)

  def fwd_bwd(f):
    def loss(p, x):
      return jnp.mean(jnp.square(f(p, x).astype(jnp.float32)))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  return hc, {"baseline": fwd_bwd(baseline), "einsum": fwd_bwd(library("einsum")),
              "elementwise": fwd_bwd(library("elementwise"))}


def run(batch, seq, streams, width, iters, reps):
  x = (jax.random.normal(jax.random.key(0), (batch, seq, streams, width))).astype(jnp.bfloat16)
  hc, steps = make_steps(iters)
  params = nn.unbox(hc.init(jax.random.key(1), x))["params"]
  # Gates away from their 0.01 init so the dynamic terms matter in the comparison.
  params = {k: (jnp.asarray(1.0) if k.startswith("alpha") else v) for k, v in params.items()}
  results = {name: (common.median_ms(fn, params, x, reps=reps), fn(params, x))
             for name, fn in steps.items()}
  (_, (l0, (gp0, gx0))) = results["baseline"]
  agreement = {}
  for name, (_, (l1, (gp1, gx1))) in results.items():
    gdiff = max(float(jnp.max(jnp.abs(gp0[k] - gp1[k])) / (jnp.max(jnp.abs(gp0[k])) + 1e-30))
                for k in gp0)
    xdiff = float(jnp.max(jnp.abs(gx0.astype(jnp.float32) - gx1.astype(jnp.float32)))
                  / jnp.max(jnp.abs(gx0.astype(jnp.float32))))
    agreement[name] = (abs(float(l0 - l1)) / abs(float(l0)), gdiff, xdiff)
  return {name: ms for name, (ms, _) in results.items()}, agreement


def main():
  args = common.parse_flags(FLAGS, __doc__)
  times, agreement = run(args.batch, args.seq, args.streams, args.width, args.iters, args.reps)
  print(f"{common.device_summary()}: one mHC sub-layer wrapper, fwd+bwd, B={args.batch} "
        f"T={args.seq} M={args.streams} D={args.width}, Sinkhorn {args.iters}")
  print("agreement with the baseline (relative): |loss diff|, max |grad diff| params / streams")
  print(common.format_table(
      ["variant", "ms", "vs baseline", "agreement"],
      [(name, f"{ms:.3f}", f"{times['baseline'] / ms:.2f}x",
        "{:.1e}, {:.1e} / {:.1e}".format(*agreement[name])) for name, ms in times.items()]))


if __name__ == "__main__":
  main()
