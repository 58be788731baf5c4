"""small_gpu_moe: the MoE-only baseline of small_gpu with the same total parameters.

Command:
  python -m experiments.train --config=experiments/configs/small_gpu_moe.py \
      --workdir=/tmp/small_gpu_moe  [same --config.data.* flags as small_gpu]
Derived with `engram_jax.param_count.moe_baseline`: the Engram layers' parameters become routed
experts; everything else (dropless MoE dispatch included) is small_gpu's.
Hardware: one NVIDIA H200. Expected: a higher validation loss than small_gpu at equal steps
(no full run measured yet).
"""

from experiments.configs import base
from experiments.configs import quickstart_moe
from experiments.configs import small_gpu


def get_config(arg=None):
  del arg
  c = quickstart_moe.moe_baseline_of(small_gpu.get_config())
  c.name = "small_gpu_moe"
  return base.lock(c)
