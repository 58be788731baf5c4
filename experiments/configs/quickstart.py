"""Quickstart: a small Engram + MoE language model on the embedded corpus, 2 CPU cores.

Command (trains this and its iso-parameter MoE baseline, prints both, plots both curves):
  python -m experiments.quickstart --workdir=/tmp/quickstart
This model alone:
  python -m experiments.train --config=experiments/configs/quickstart.py --workdir=/tmp/qs_engram

Hardware: 2 CPU cores, no accelerator; ~3.5 minutes including compilation.
Expected: validation loss below the MoE baseline's (experiments/configs/quickstart_moe.py) at
the same steps, data and dense learning rate (numbers in README / quickstart output).

Model: D=128, 4 blocks (block 0 dense FFN, blocks 1-3 MoE with 8 routed experts top-2 + 1
shared), 2 residual streams (mHC), one Engram layer at block 1 with 2- and 3-gram heads.
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
  c.engram.table_init_std = 1.0

  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 30
  c.train.num_steps = 200
  c.train.log_every = 25
  c.train.eval_every = 0
  c.train.num_eval_batches = 20
  c.train.checkpoint_every = 300
  return base.lock(c)
