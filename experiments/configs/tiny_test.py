"""Tiny config for tests: trains in seconds on CPU, exercises every code path.

Command: python -m experiments.train --config=experiments/configs/tiny_test.py --workdir=/tmp/t
Hardware: any CPU. Expected: the loss falls over 20 steps (tests/test_train.py).
`arg` picks the table mode, e.g. --config=experiments/configs/tiny_test.py:dense_adam.
"""

from experiments.configs import base


def get_config(arg=None):
  c = base.get_config()
  c.name = "tiny_test"
  c.data.seq_len = 32
  c.data.batch_size = 4
  c.model.num_layers = 2
  c.model.hidden_size = 32
  c.model.num_heads = 2
  c.model.num_kv_heads = 1
  c.model.head_dim = 16
  c.model.ffn_hidden_size = 64
  c.model.num_dense_layers = 1
  c.model.hc_mult = 2
  c.model.sinkhorn_iters = 3
  c.model.moe.num_experts = 4
  c.model.moe.top_k = 2
  c.model.moe.expert_hidden_size = 32
  c.engram.engram_vocab_size = (503, 503)
  c.engram.n_embed_per_ngram = 16
  c.engram.n_head_per_ngram = 2
  c.engram.layer_ids = (1,)
  c.table_optim.kind = arg or "lazy_adam"
  c.optim.learning_rate = 1e-2
  c.optim.warmup_steps = 2
  c.train.num_steps = 20
  c.train.log_every = 5
  c.train.eval_every = 0
  c.train.num_eval_batches = 2
  c.train.checkpoint_every = 10
  c.train.async_checkpoint = False
  # One device, so that runs compare across machines; tests/test_train_mesh.py trains it on
  # meshes (--config.train.mesh.fsdp=-1 for every device).
  c.train.mesh.fsdp = 1
  return base.lock(c)
