"""paper: the backbone of the paper sweeps (experiments/paper/sweep.py), Engram + MoE, one H200.

Command (one run; the sweeps add data, seed and the switch under test as overrides):
  python -m experiments.train --config=experiments/paper/configs/paper.py --workdir=/tmp/paper \
      --config.data.train_files="('DATA/train.jsonl.gz',)" \
      --config.data.eval_files="('DATA/valid.jsonl.gz',)" \
      --config.data.tokenizer_path=DATA/tokenizer.json
(DATA from `python -m experiments.paper.prepare_data --data_dir=DATA`.) Hardware: one H200.
Expected result: not measured yet; the sweeps' tables go to experiments/paper/README.md.
`:tiny` (experiments/paper/configs/paper.py:tiny) is the same architecture shrunk to a 2-core CPU
for the sweeps' --tiny mode and CI: D=32, 3 blocks (Engram at 1 and 2), 6 steps of 4 x 32
tokens.

Why smaller than small_gpu: every sweep point is a full training run of >= 20M tokens and the
four sweeps hold 23 distinct runs, while the GPU time for all of them is about 20 minutes of
one H200 shared by 4-9 concurrent runs. small_gpu costs 5.0e8 training FLOPs per token (213-
234 ms per 32k-token step on an H200, README); this backbone costs 5.4e7 (9x fewer: D=256
instead of 768, 6 blocks instead of 12, T=512 instead of 1024), so a 21M-token run is about
1.1e15 FLOPs. The expected time per run is an estimate, not a measurement:
experiments/paper/README.md, "Cost".

Model: D=256, 6 blocks (block 0 dense FFN 768, blocks 1-5 MoE: 1 shared + 32 routed experts of
width 256, top-2, dropless dispatch), 4 heads of 64 (2 KV heads), 4 mHC streams, bf16 compute.
Engram at blocks 1 and 3 (the paper's early + middle placement), 2- and 3-grams, K=4 heads per
order, E=16, d_mem 128 = D/2 (the paper's ratio), per-head tables of the prime just above
32,768 rows: 8.4M table parameters, rho = routed / (routed + tables) = 0.79 (the paper's
optimum is 0.75-0.80). 47.5M total, 7.5M activated parameters (paper_moe: 47.6M / 7.2M).
Training: B=64 x T=512 = 32,768 tokens per step, 640 steps = 20.97M tokens (1.2 epochs of the
large corpus's 17.1M training tokens), AdamW 3e-3 with 64 warmup steps and the paper's step
decay (x0.316 at 80% and 90%); tables lazy Adam at 5x the LR without weight decay.
The iso-parameter MoE baseline is experiments/paper/configs/paper_moe.py.
"""

from experiments.configs import base


def get_config(arg=None):
  if arg not in (None, "", "tiny"):
    raise ValueError(f"paper config: arg must be '' or 'tiny', got {arg!r}")
  c = base.get_config()
  c.name = "paper"
  c.data.seq_len = 512
  c.data.batch_size = 64

  c.model.num_layers = 6
  c.model.hidden_size = 256
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 64
  c.model.ffn_hidden_size = 768
  c.model.num_dense_layers = 1
  c.model.hc_mult = 4
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.moe.num_experts = 32
  c.model.moe.num_shared_experts = 1
  c.model.moe.top_k = 2
  c.model.moe.expert_hidden_size = 256

  c.engram.engram_vocab_size = (32_768, 32_768)
  c.engram.n_embed_per_ngram = 64
  c.engram.n_head_per_ngram = 4
  c.engram.layer_ids = (1, 3)

  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 64
  c.train.num_steps = 640
  c.train.log_every = 64
  c.train.eval_every = 0          # the final evaluation only
  c.train.num_eval_batches = 0    # the whole held-out split
  c.train.checkpoint_every = 640  # one checkpoint, read by the OOD evaluation and gate_view
  c.train.keep_checkpoints = 1
  if arg == "tiny":
    _shrink_to_cpu(c)
  return base.lock(c)


def _shrink_to_cpu(c):
  """Same blocks, switches and Engram layout at CPU-test size (seconds per run)."""
  c.name = "paper_tiny"
  c.data.seq_len = 32
  c.data.batch_size = 4
  c.model.num_layers = 3
  c.model.hidden_size = 32
  c.model.num_heads = 2
  c.model.num_kv_heads = 1
  c.model.head_dim = 16
  c.model.ffn_hidden_size = 64
  c.model.hc_mult = 2
  c.model.sinkhorn_iters = 3
  c.model.dtype = "float32"
  c.model.remat_policy = "none"
  c.model.moe.num_experts = 8
  c.model.moe.expert_hidden_size = 32
  c.engram.engram_vocab_size = (256, 256)
  c.engram.layer_ids = (1, 2)
  c.engram.n_embed_per_ngram = 16
  c.engram.n_head_per_ngram = 2
  c.optim.warmup_steps = 2
  c.train.num_steps = 6
  c.train.log_every = 3
  c.train.num_eval_batches = 2
  c.train.checkpoint_every = 6
  c.train.async_checkpoint = False
