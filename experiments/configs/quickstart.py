"""Quickstart: a small Engram + MoE language model on the embedded corpus, 2 CPU cores.

Command (trains this and its iso-parameter MoE baseline, prints both, plots both curves):
  python -m experiments.quickstart --workdir=/tmp/quickstart
This model alone:
  python -m experiments.train --config=experiments/configs/quickstart.py --workdir=/tmp/qs_engram

Hardware: 2 CPU cores, no accelerator; 300 steps of 16 x 128 tokens per model. The command
took 360 s for both models on an idle 2-core machine (the wall time it prints), longer when the
cores are shared.
Expected (deterministic, seed 0), validation loss over the whole held-out set (82,562 tokens):
  quickstart 4.9126 (ppl 135.99) < quickstart_moe 4.9739 (ppl 144.60), at 3.80M / 3.79M total
  and 1.81M / 1.76M activated parameters.

Model: D=128, 4 blocks (blocks 0-1 dense FFN, blocks 2-3 MoE with 4 routed experts top-1 + 1
shared), 2 residual streams (mHC), one Engram layer at block 1 with 2- and 3-gram heads
(K=4 heads per order, ~5k rows each, E=16): 0.64M table parameters, rho = 0.38. The MoE is kept
small because `jax.lax.ragged_dot` on CPU costs as much as running every expert on every token,
so the baseline's step time grows with its expert count.
"""

from experiments.configs import base


def get_config(arg=None):
  del arg
  c = base.get_config()
  c.name = "quickstart"
  c.data.seq_len = 128
  c.data.batch_size = 16

  c.model.num_layers = 4
  c.model.hidden_size = 128
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 32
  c.model.ffn_hidden_size = 384
  c.model.num_dense_layers = 2
  c.model.hc_mult = 2
  c.model.sinkhorn_iters = 10
  c.model.moe.num_experts = 4
  c.model.moe.top_k = 1
  c.model.moe.expert_hidden_size = 128

  c.engram.engram_vocab_size = (5_000, 5_000)
  c.engram.n_embed_per_ngram = 64
  c.engram.n_head_per_ngram = 4
  c.engram.layer_ids = (1,)
  # The demo's N(0, 1) rows would need ~1/(5 * lr) = 70 touches of lazy Adam to be
  # overwritten by what they learn; 300 steps touch most rows only a few times.
  c.engram.table_init_std = 0.01

  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 30
  c.train.num_steps = 300
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.num_eval_batches = 0  # the whole held-out set
  c.train.checkpoint_every = 300
  return base.lock(c)
