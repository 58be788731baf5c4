"""small_gpu: a ~250M-total-parameter Engram + MoE model for one GPU (H100/H200 class).

Command:
  python -m experiments.train --config=experiments/configs/small_gpu.py --workdir=/tmp/small_gpu \
      --config.data.train_files="('corpus/train.jsonl',)" \
      --config.data.eval_files="('corpus/valid.jsonl',)"
(default files: the embedded corpus, 2.55M tokens, which this model overfits; build a larger
one with `python -m experiments.build_corpus --preset=large`.)
Baseline with the same total parameters: experiments/configs/small_gpu_moe.py.

Hardware: one NVIDIA H200 (bf16 compute, f32 master weights), B=32 x T=1024 tokens per step.
Expected: a lower validation loss than small_gpu_moe at equal steps (no full run measured yet);
the trainer logs tokens/s and MFU (FLOPs per token: engram_jax.param_count.flops_per_token), and
step times of this config are in benchmarks/README.md (experiments/bench_train_step.py).

Model: D=768, 12 blocks (block 0 dense, 11 MoE blocks with 16 routed experts top-2 + 1 shared,
expert width 384, dropless dispatch: pairs sorted by expert through grouped matmuls, the Mosaic
GPU kernels on Hopper), 4 mHC streams, Engram at blocks 1 and 6 (2/3-grams, 8 heads per order,
d_mem 512) with ~22% of the sparse parameters in the tables (rho ~ 0.78), lazy Adam tables.
"""

from experiments.configs import base


def get_config(arg=None):
  del arg
  c = base.get_config()
  c.name = "small_gpu"
  c.data.seq_len = 1024
  c.data.batch_size = 32

  c.model.num_layers = 12
  c.model.hidden_size = 768
  c.model.num_heads = 12
  c.model.num_kv_heads = 4
  c.model.head_dim = 64
  c.model.ffn_hidden_size = 2048
  c.model.num_dense_layers = 1
  c.model.hc_mult = 4
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat_policy = "dots_with_no_batch_dims_saveable"
  c.model.moe.num_experts = 16
  c.model.moe.top_k = 2
  c.model.moe.expert_hidden_size = 384

  c.engram.engram_vocab_size = (43_000, 43_000)
  c.engram.n_embed_per_ngram = 256
  c.engram.n_head_per_ngram = 8
  c.engram.layer_ids = (1, 6)

  c.optim.learning_rate = 1.5e-3
  c.optim.warmup_steps = 500
  c.train.num_steps = 10_000
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.num_eval_batches = 50
  c.train.checkpoint_every = 1000
  return base.lock(c)
