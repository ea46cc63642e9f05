"""The LIMA recipe exactly as in the paper (Zhou et al. 2023, arXiv 2305.11206, section 2/3): LLaMA-1 65B.

Every other preset loads this file and changes only what differs (model shape, batch, dropout).
Paths are placeholders: set them on the command line, e.g.
  python -m lima_jax.train --config configs/lima_65b.py --config.workdir=gs://bucket/run \
      --config.data.train_path=/data/lima/train.jsonl --config.tokenizer.path=/llama/tokenizer.model \
      --config.init_from=/ckpt/llama-65b
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = ""
    c.seed = 0
    c.init_from = ""  # a lima_jax checkpoint made by `python -m lima_jax.convert` (pretrained LLaMA)

    # LLaMA-1 65B (Meta params.json: dim 8192, 80 layers, 64 heads, multiple_of 256, norm_eps 1e-6).
    c.model = ml_collections.ConfigDict()
    c.model.vocab_size = 0  # 0: taken from the tokenizer (32,000 + the new EOT token)
    c.model.dim = 8192
    c.model.n_layers = 80
    c.model.n_heads = 64
    c.model.n_kv_heads = 64
    c.model.hidden_dim = 22016
    c.model.norm_eps = 1e-6
    c.model.rope_theta = 10000.0
    # RoPE scaling (LLaMA-3.1/3.2 presets): "default" none, or "llama3" with the four parameters below.
    c.model.rope_type = "default"
    c.model.rope_scaling_factor = None
    c.model.rope_low_freq_factor = None
    c.model.rope_high_freq_factor = None
    c.model.rope_original_max_seq_len = None
    c.model.max_seq_len = 2048
    c.model.tie_embeddings = False
    # Embedding / LM-head rows padded to a multiple of 128 (32,001 -> 32,128): the vocabulary then splits over
    # any tensor axis up to 128 ways; the padding's logits are -inf (no loss, never sampled), dropped on export.
    c.model.vocab_multiple = 128
    # Residual dropout rises linearly from 0 at the first layer to 0.3 at the last (0.2 for smaller models).
    c.model.residual_dropout_max = 0.3
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "bfloat16"
    c.model.remat_policy = "full"
    # Attention kernel (docs/performance.md): "blocked" runs on every backend in memory linear in the row
    # length; "splash" (TPU) and "cudnn" / "triton" / "tokamax" (GPU) are fused kernels.
    c.model.attention = "blocked"
    c.model.attention_block = 0  # "blocked" kernel's block length; 0: 512 on accelerators, ~row / 8 on the CPU
    # Layers per iteration of the layer scan; 0: 1 on accelerators (one compiled layer, whatever the depth),
    # all of them on the CPU (no stacked residual buffers to fill: ~10% faster steps, docs/performance.md).
    c.model.scan_unroll = 0

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # LLaMA's tokenizer.model (or a folder, or a LLaMA-3 tokenizer.json: docs/model.md)
    # The end-of-turn token: "new_row" (a new id after the tokenizer's, the paper's recipe) or the name of one of
    # the tokenizer's special tokens, e.g. "<|eot_id|>" for LLaMA-3 (no vocabulary growth).
    c.tokenizer.eot = "new_row"
    # A new EOT row starts as "mean" (the mean of the pretrained rows) or "bos" / "eos" (a copy of that token's
    # rows: the token that ended documents in pretraining, so EOT starts out predicted where a text ends).
    c.tokenizer.eot_init = "mean"

    c.data = ml_collections.ConfigDict()
    c.data.train_path = ""  # 1,000 examples (1,030 with the dialogue chains)
    c.data.dev_path = ""  # the 50 author-written dev prompts
    c.data.max_len = 2048  # texts longer than 2,048 tokens are trimmed
    c.data.loss_on = "assistant"  # the paper is silent; we train on responses only ("all" to switch)
    c.data.on_bad_example = "error"
    c.data.max_line_bytes = 4 * 2**20  # a longer JSONL line is a bad example (LIMA's longest: 18 KB)
    c.data.shuffle = True
    # The paper's steps (32 examples each, 32 steps per epoch for 1,022 examples) packed into as few rows as
    # the run's fullest step needs: the same gradients as one example per row ("none") in about half the rows
    # (docs/data.md). "rows" packs batch_size rows per step instead, ~3x the examples: not the recipe.
    c.data.packing = "examples"

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 32  # examples per step (64 for smaller models)
    c.train.num_epochs = 15
    c.train.grad_accum_steps = 1
    c.train.log_every = 1
    # The loss's float32 logits made 512 positions at a time (and recomputed in the backward pass), so the
    # [batch, 2048, 32128] logits never exist at once; the LM head is ~0.4% of a 65B step's FLOPs. 0: off.
    c.train.loss_chunk_length = 512
    c.train.checkpoint_every_steps = 0  # 0: one checkpoint at the end of every epoch, all kept
    # Each epoch kept for choosing by hand as parameters only (bfloat16, 1/6 of the full state), the full train
    # state only in the newest checkpoint (what a resume needs): "full" keeps every epoch's full state instead.
    c.train.snapshots = "params"
    c.train.snapshot_dtype = "bfloat16"
    c.train.checkpoint_every_minutes = 0.0  # > 0: also a mid-epoch checkpoint once this long since the last save
    # Mid-epoch checkpoints written in the background while training goes on (sealed once written); the
    # end-of-epoch and preemption checkpoints are always written before the loop goes on. False: all synchronous.
    c.train.async_checkpointing = True
    c.train.resume_step = 0  # 0: resume from the newest verified checkpoint; N: from checkpoints/N
    # The workdir's run lock (docs/training.md): heartbeat every 60 s; one older than 600 s is stale.
    c.train.lock_heartbeat_s = 60.0
    c.train.lock_stale_s = 600.0
    # JAX's persistent compilation cache (a folder): a restarted or preempted job loads its compiled
    # step instead of compiling it again. "": off (a JAX_COMPILATION_CACHE_DIR in the environment still applies).
    c.train.compilation_cache_dir = ""

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-5  # no warmup, linear decay to 1e-6 at the end of training
    c.optimizer.end_learning_rate = 1e-6
    c.optimizer.warmup_steps = 0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.1
    c.optimizer.grad_clip_norm = 0.0  # the paper uses none; set e.g. 1.0 to clip
    # Adam's moments as stored: "param" (the float32 master weights' dtype), "float32" or "bfloat16" (2 bytes
    # less per parameter each; nu in bfloat16 needs b2 <= 0.984, see lima_jax/optim.py).
    c.optimizer.mu_dtype = "param"
    c.optimizer.nu_dtype = "param"

    # Device mesh: one size may be -1 (all remaining devices). Layout: see docs/sharding.md.
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.mesh.layout = "fsdp"
    c.mesh.rules = ()  # extra (logical_axis, mesh_axes) rules that take precedence over the layout's

    # Per-epoch dev-set answers for choosing a checkpoint by hand (the paper looked at epochs 5 to 10).
    c.dev_report = ml_collections.ConfigDict()
    c.dev_report.epochs = (5, 6, 7, 8, 9, 10)
    c.dev_report.max_new_tokens = 2048  # 0: the 99th percentile of the training answers' lengths
    c.dev_report.reference_path = ""  # dev conversations with reference answers: per-epoch dev perplexity
    c.dev_report.batch_size = 8  # dev prompts answered per batch
    return c
