"""Config loading and validation.

The recipe's numbers live in `configs/*.py` (ml_collections files with a `get_config()`); this module only
knows the *shape* of a config: which fields exist, which values are legal, and how to turn a ConfigDict
into the typed `ModelConfig` the model reads. Validation runs before anything is compiled, so a typo in a
200-host launch fails in a second with the file and field named, not after an hour of compilation.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from typing import Any

import ml_collections

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
LOSS_ON = ("assistant", "all")
ON_BAD_EXAMPLE = ("error", "skip")


class ConfigError(ValueError):
    """A config value is missing or illegal; the message names the config file and the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The LLaMA architecture. Field names follow Meta's params.json where one exists."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    residual_dropout_max: float = 0.0
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat_policy: str = "none"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def num_params(self) -> int:
        """Exact parameter count of `lima_jax.model.Llama` built from this config."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.hidden_dim
        per_layer = attn + mlp + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + head


def model_config(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> ModelConfig:
    """Typed model config from `config.model`; `vocab_size` overrides (tokenizer size incl. EOT)."""
    m = config.model
    return ModelConfig(
        vocab_size=int(vocab_size if vocab_size is not None else m.vocab_size),
        dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
        hidden_dim=m.hidden_dim, norm_eps=m.norm_eps, rope_theta=m.rope_theta,
        max_seq_len=m.max_seq_len, tie_embeddings=m.tie_embeddings,
        residual_dropout_max=m.residual_dropout_max, param_dtype=m.param_dtype,
        compute_dtype=m.compute_dtype, remat_policy=m.remat_policy)


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a config file by path (what `config_flags` does for `--config`)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"lima_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.source_file = str(path.resolve())
    return config


def load_sibling(this_file: str, name: str) -> ml_collections.ConfigDict:
    """Loads another config file in the same folder: presets derive from `lima_65b.py`, the recipe."""
    return load_config_file(pathlib.Path(this_file).resolve().parent / name)


def config_from_flag(holder, argv: list[str]) -> ml_collections.ConfigDict:
    """The ConfigDict of a `config_flags.DEFINE_config_file` flag, with `source_file` set for error messages;
    raises absl's UsageError when the flag is missing or stray arguments are given."""
    from absl import app, flags
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = holder.value
    if config is None:
        raise app.UsageError(f"--{holder.name} is required, e.g. --{holder.name} configs/toy.py")
    config.source_file = flags.FLAGS[holder.name].config_filename
    return config


def _where(config: ml_collections.ConfigDict) -> str:
    return config.get("source_file", "") or "<config>"


def _check(config: ml_collections.ConfigDict, ok: bool, field: str, message: str) -> None:
    if not ok:
        value = _lookup(config, field)
        raise ConfigError(f"{_where(config)}: config.{field}={value!r}: {message}")


def _lookup(config: ml_collections.ConfigDict, field: str) -> Any:
    node: Any = config
    for part in field.split("."):
        node = node.get(part) if hasattr(node, "get") else None
    return node


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the config file and field for the first illegal value."""
    for field in ("workdir", "model", "data", "train", "optimizer", "mesh", "tokenizer"):
        _check(config, field in config, field, "missing field")
    _check(config, bool(config.workdir), "workdir", "set an output folder, e.g. --config.workdir=/tmp/run")
    m = config.model
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
        _check(config, isinstance(m[field], int) and m[field] > 0, f"model.{field}", "must be a positive int")
    _check(config, m.dim % m.n_heads == 0, "model.dim", f"must be divisible by n_heads={m.n_heads}")
    _check(config, (m.dim // m.n_heads) % 2 == 0, "model.n_heads", "head_dim must be even for RoPE")
    _check(config, m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads", f"must divide n_heads={m.n_heads}")
    _check(config, 0.0 <= m.residual_dropout_max < 1.0, "model.residual_dropout_max", "must be in [0, 1)")
    _check(config, m.rope_theta > 0, "model.rope_theta", "must be positive")
    _check(config, m.param_dtype in DTYPES, "model.param_dtype", f"must be one of {DTYPES}")
    _check(config, m.compute_dtype in DTYPES, "model.compute_dtype", f"must be one of {DTYPES}")
    _check(config, m.remat_policy in REMAT_POLICIES, "model.remat_policy", f"must be one of {REMAT_POLICIES}")
    d = config.data
    _check(config, bool(d.train_path), "data.train_path", "set the training JSONL file")
    _check(config, d.max_len > 1, "data.max_len", "must be > 1")
    _check(config, d.max_len <= m.max_seq_len, "data.max_len", f"exceeds model.max_seq_len={m.max_seq_len}")
    _check(config, d.loss_on in LOSS_ON, "data.loss_on", f"must be one of {LOSS_ON}")
    _check(config, d.on_bad_example in ON_BAD_EXAMPLE, "data.on_bad_example", f"must be one of {ON_BAD_EXAMPLE}")
    t = config.train
    _check(config, t.batch_size > 0, "train.batch_size", "must be positive")
    _check(config, t.num_epochs > 0, "train.num_epochs", "must be positive")
    _check(config, t.grad_accum_steps > 0, "train.grad_accum_steps", "must be positive")
    _check(config, t.batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps",
           f"must divide train.batch_size={t.batch_size}")
    _check(config, t.log_every > 0, "train.log_every", "must be positive")
    _check(config, t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", "must be >= 0 (0: per epoch only)")
    o = config.optimizer
    _check(config, o.learning_rate > 0, "optimizer.learning_rate", "must be positive")
    _check(config, 0 <= o.end_learning_rate <= o.learning_rate, "optimizer.end_learning_rate",
           "must be in [0, learning_rate]")
    _check(config, 0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optimizer.b1", "betas must be in [0, 1)")
    _check(config, o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    _check(config, o.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
    _check(config, o.grad_clip_norm >= 0, "optimizer.grad_clip_norm", "must be >= 0 (0: off)")
    _check(config, bool(config.tokenizer.path), "tokenizer.path", "set the sentencepiece .model file")
