"""Base experiment config: every field an experiment can set, with the paper's recipe as default.

Not meant to be trained as is (it is a mid-sized CPU-unfriendly model); the named configs derive
from it with `base.get_config()` and override what differs. Run any of them with

  python -m experiments.train --config=experiments/configs/<name>.py --workdir=/tmp/run \
      [--config.train.num_steps=100 ...]

Sections (converted into frozen dataclasses by `engram_jax.experiment_config.resolve`):
  data         files (empty = the embedded corpus), tokenizer ('' = the shipped one), T, B
  model        backbone (ModelConfig); `model.moe` the MoE FFN (`moe.enabled`)
  engram       EngramConfig (+ `enabled`, `hash_on_device`, `placement` of the tables);
               hidden_size / hc_mult come from model
  optim        dense optimiser and schedule (engram_jax.optim.OptimConfig)
  table_optim  Engram-table optimiser (engram_jax.table_optim.TableOptimizerConfig); 'dense_adam'
               keeps tables in the optax chain, 'lazy_adam' / 'adagrad' update touched rows only
  train        steps, logging, evaluation, checkpointing, mesh, peak FLOP/s override
"""

import ml_collections

from engram_jax import experiment_config


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.name = "base"
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.train_files = ()        # () -> engram_jax.data.default_corpus_paths()['train']
  c.data.eval_files = ()         # () -> default_corpus_paths()['valid']
  c.data.tokenizer_path = ""     # '' -> engram_jax.tokenizer.default_tokenizer_path()
  c.data.seq_len = 512
  c.data.batch_size = 32         # global batch (split over train.mesh data x fsdp x expert)
  c.data.shuffle_seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 0         # 0 -> the tokenizer's vocabulary size
  c.model.num_layers = 8
  c.model.hidden_size = 512
  c.model.num_heads = 8
  c.model.num_kv_heads = 4
  c.model.head_dim = 64
  c.model.ffn_hidden_size = 1536
  c.model.num_dense_layers = 1
  c.model.hc_mult = 4
  c.model.sinkhorn_iters = 20
  c.model.rope_theta = 10000.0
  c.model.norm_eps = 1e-6
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.scan_layers = True
  c.model.remat_policy = "none"
  c.model.tie_embeddings = False
  c.model.attention_impl = ""   # '' -> automatic (None)

  c.model.moe = ml_collections.ConfigDict()
  c.model.moe.enabled = True
  c.model.moe.num_experts = 16
  c.model.moe.num_shared_experts = 1
  c.model.moe.top_k = 2
  c.model.moe.expert_hidden_size = 256
  c.model.moe.score_func = "sigmoid"
  c.model.moe.routing = "aux_free"
  c.model.moe.aux_loss_coef = 0.0
  c.model.moe.bias_update_rate = 1e-3
  c.model.moe.routed_scaling_factor = 1.0
  c.model.moe.dispatch = "ragged"        # 'ragged' (dropless grouped matmul) or 'capacity'
  c.model.moe.capacity_factor = 1.25     # slots per expert in 'capacity' dispatch, see MoEConfig
  c.model.moe.matmul_implementation = ""  # '' -> automatic; 'xla' or 'mosaic_gpu' (MoEConfig)

  c.engram = ml_collections.ConfigDict()
  c.engram.enabled = True
  c.engram.engram_vocab_size = (40_000, 40_000)
  c.engram.max_ngram_size = 3
  c.engram.n_embed_per_ngram = 128
  c.engram.n_head_per_ngram = 4
  c.engram.layer_ids = (1,)
  c.engram.pad_id = 0            # raw <pad> of the shipped tokenizer (tokenizer.PAD_ID)
  c.engram.seed = 0
  c.engram.kernel_size = 4
  c.engram.signed_sqrt_gate = True
  # Ablation switches (engram_jax.config.EngramConfig): 'multi' | 'shared' | 'none' gate, the
  # ShortConv, and tokenizer compression (False hashes raw ids).
  c.engram.gate = "multi"
  c.engram.use_short_conv = True
  c.engram.compress_tokenizer = True
  c.engram.zero_init_conv = True  # paper
  c.engram.conv_dilation = 0      # 0 -> max_ngram_size (demo)
  c.engram.table_init_std = 1.0
  c.engram.segment_reset = True   # packed documents hash independently
  c.engram.lookup_implementation = ""  # '' -> automatic
  c.engram.hash_on_device = False  # False: hash ids computed in the grain pipeline
  # Where the tables and their optimiser state live: 'device' (HBM, in the train state) or
  # 'pinned_host' (host DRAM, engram_jax.host_tables.HostTables: each step is one device program
  # while NumPy worker threads gather the next step's rows and write the previous update back).
  # pinned_host needs a row-sparse table_optim.kind and pipeline hashing; each process keeps a
  # block of the rows in its host memory.
  c.engram.placement = "device"
  # Row-sharded tables (a mesh of > 1 device): 0 sizes the all-to-all request buffers for the
  # worst case (nothing can overflow); f > 0 sizes them for f x the expected rows per owner
  # (less traffic; rows beyond stop the run: engram_jax/sharded_tables.py).
  c.engram.shard_capacity_factor = 0.0
  # Mesh axes the rows of every table are split over (() = every axis of train.mesh); the
  # tables are whole copies along the others. Every axis the batch is split over (data, fsdp,
  # expert) of size > 1 must be one, so only 'tensor' can be left out.
  c.engram.table_row_axes = ()

  c.optim = ml_collections.ConfigDict()
  c.optim.kind = "adamw"
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 100
  c.optim.schedule = "step"
  c.optim.decay_boundaries = (0.8, 0.9)
  c.optim.decay_factor = 0.316
  c.optim.min_lr_ratio = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.1
  c.optim.grad_clip_norm = 1.0

  c.table_optim = ml_collections.ConfigDict()
  c.table_optim.kind = "lazy_adam"
  c.table_optim.lr_multiplier = 5.0   # paper: 5x the base LR
  c.table_optim.b1 = 0.9
  c.table_optim.b2 = 0.999
  c.table_optim.eps = 1e-8
  c.table_optim.weight_decay = 0.0    # paper: no decay on tables
  c.table_optim.moment_dtype = "float32"
  c.table_optim.bias_correction = "per_row"

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000
  c.train.log_every = 50
  c.train.eval_every = 500       # 0 disables intermediate evaluation (the final one always runs)
  c.train.num_eval_batches = 0   # 0 -> the whole held-out set
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 2
  # Resuming: 0 restores the newest intact checkpoint (a damaged newer one is set aside with a
  # warning), k > 0 checkpoint step k (the newer ones are set aside into
  # workdir/checkpoints_set_aside; a one-off: drop it for later restarts). A resume whose config
  # differs from the workdir's in fields that change the computation (engram_jax/workdir.py:
  # model, Engram hashing, data files and batch layout) is refused unless allow_config_change.
  c.train.restore_step = 0
  c.train.allow_config_change = False
  c.train.async_checkpoint = True
  # Device mesh (engram_jax/sharding.py): axis sizes, one of them may be -1 = the devices the
  # others leave. The batch is split over data x fsdp x expert; dense parameters and their
  # optimiser state over fsdp (gathered at use), heads / FFN width / vocabulary over tensor,
  # routed experts over expert; every Engram table and its optimiser state is split by rows
  # over all devices (engram_jax/sharded_tables.py). Default: every device on fsdp.
  c.train.mesh = ml_collections.ConfigDict()
  c.train.mesh.data = 1
  c.train.mesh.fsdp = -1
  c.train.mesh.tensor = 1
  c.train.mesh.expert = 1
  c.train.peak_flops = 0.0       # 0 -> from the device kind (engram_jax.train.PEAK_FLOPS)
  # Multi-process jobs (engram_jax/distributed.py): '' joins the job named by the ENGRAM_*
  # environment (experiments/launch_local.py sets it), if any; 'cluster' lets JAX detect
  # the cluster (Cloud TPU pods, SLURM, Open MPI, Kubernetes).
  c.train.distributed = ""
  # Test hook: the loss is multiplied by NaN from this step on (0 = never); exercises the
  # divergence stop without a numerically fragile config.
  c.train.inject_nan_at_step = 0

  return lock(c)


def lock(config):
  """Checks invariants, then locks (no new fields; typos in overrides fail loudly)."""
  experiment_config.check_config(config)
  config.lock()
  return config
