"""Config loading and validation.

The recipe's numbers live in `configs/*.py` (ml_collections files with a `get_config()`); this module only
knows the *shape* of a config: which fields exist, which values are legal, and how to turn a ConfigDict
into the typed `ModelConfig` the model reads. Validation runs before anything is compiled, so a typo in a
200-host launch fails in a second with the file and field named, not after an hour of compilation.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import pathlib
from typing import Any, Sequence

import ml_collections

from lima_jax.errors import ConfigError
from lima_jax.paths import PathLike, as_path

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
LOSS_ON = ("assistant", "all")
ON_BAD_EXAMPLE = ("error", "skip")
SNAPSHOT_MODES = ("full", "params")  # train.snapshots
SNAPSHOT_DTYPES = DTYPES
# data.packing: "none" one example per row; "rows" packed rows, train.batch_size counts rows; "examples" packed
# rows, train.batch_size counts examples (docs/data.md). Configs written before the modes had a bool.
PACKING_MODES = ("none", "rows", "examples")
LEGACY_PACKING = {False: "none", True: "rows"}
# The run lock's timing (train.lock_heartbeat_s / train.lock_stale_s) where a config lacks it (an older
# config.json); configs/lima_65b.py sets the same values.
LOCK_HEARTBEAT_S = 60.0
LOCK_STALE_S = 600.0


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


def packing_mode(value: Any) -> str:
    """`data.packing` as one of PACKING_MODES: a bool of an older config maps to "none" (False) or "rows"
    (True); any other value is returned unchanged (`validate` rejects it)."""
    if isinstance(value, bool):
        return LEGACY_PACKING[value]
    return value


def load_config_file(path: PathLike) -> ml_collections.ConfigDict:
    """The config of a `configs/*.py` file (its `get_config()`) or of a run's `config.json`."""
    text = str(path)
    if text.endswith(".json"):
        return _load_json_config(path)
    path = pathlib.Path(text)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"lima_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: a config file must define get_config() returning an ml_collections.ConfigDict")
    config = module.get_config()
    config.source_file = str(path.resolve())
    return config


def _load_json_config(path: PathLike) -> ml_collections.ConfigDict:
    """A run's `config.json` (written by training) as a ConfigDict; lists become tuples, as in the .py files."""
    path = as_path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a JSON config ({e})") from None
    data = values.get("data") if isinstance(values, dict) else None
    if isinstance(data, dict) and isinstance(data.get("packing"), bool):  # written before the packing modes
        data["packing"] = packing_mode(data["packing"])
    config = ml_collections.ConfigDict(_lists_to_tuples(values))
    config.source_file = str(path)
    return config


def _lists_to_tuples(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists_to_tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_lists_to_tuples(v) for v in value)
    return value


def load_sibling(this_file: str, name: str) -> ml_collections.ConfigDict:
    """Loads another config file in the same folder: presets derive from `lima_65b.py`, the recipe."""
    return load_config_file(pathlib.Path(this_file).resolve().parent / name)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str]],
                    flag: str = "config") -> None:
    """Sets each (dotted field, text) of `--<flag>.a.b=text`, parsed as the field's current type; a field the
    config lacks, or a value that does not parse, raises ConfigError naming the flag and the config file."""
    for field, text in overrides:
        given = f"--{flag}.{field}={text}"
        *parents, leaf = field.split(".")
        node: Any = config
        for part in parents:
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ConfigError(f"{given}: {_where(config)} has no field {field!r}")
        try:
            value = _parse_like(node[leaf], text)
        except ValueError as e:
            raise ConfigError(f"{given}: {e}") from None
        with node.ignore_type():
            node[leaf] = value


def _parse_like(current: Any, text: str) -> Any:
    """`text` as a value of `current`'s type (bool, int, float, str, tuple, None: a Python literal)."""
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if isinstance(current, str):
        return text
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ValueError(f"expected a Python literal like (5, 10), got {text!r}") from None
    if isinstance(current, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return tuple(value)
    return value


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


def lock_timing(config: ml_collections.ConfigDict) -> tuple[float, float]:
    """(train.lock_heartbeat_s, train.lock_stale_s), the defaults where the config lacks them."""
    train = config.get("train") or {}
    return train.get("lock_heartbeat_s", LOCK_HEARTBEAT_S), train.get("lock_stale_s", LOCK_STALE_S)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(config: ml_collections.ConfigDict, paths: bool = True) -> None:
    """Raises ConfigError naming the config file and field for the first illegal value. With `paths=False`
    the workdir, training-data and tokenizer paths may be empty (tools that compile or generate only)."""
    for field in ("workdir", "model", "data", "train", "optimizer", "mesh", "tokenizer", "dev_report"):
        _check(config, field in config, field, "missing field")
    _check(config, bool(config.workdir) or not paths, "workdir", "set an output folder, e.g. --config.workdir=/tmp/run")
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
    _check(config, bool(d.train_path) or not paths, "data.train_path", "set the training JSONL file")
    _check(config, d.max_len > 1, "data.max_len", "must be > 1")
    _check(config, d.max_len <= m.max_seq_len, "data.max_len", f"exceeds model.max_seq_len={m.max_seq_len}")
    _check(config, d.loss_on in LOSS_ON, "data.loss_on", f"must be one of {LOSS_ON}")
    _check(config, d.on_bad_example in ON_BAD_EXAMPLE, "data.on_bad_example", f"must be one of {ON_BAD_EXAMPLE}")
    packing = packing_mode(d.get("packing", "none"))
    _check(config, isinstance(packing, str) and packing in PACKING_MODES, "data.packing",
           f"must be one of {PACKING_MODES} (\"none\": one example per row; \"rows\": packed, train.batch_size "
           "counts rows; \"examples\": packed, train.batch_size counts examples; an older config's False / True "
           "mean \"none\" / \"rows\")")
    limit = d.get("max_line_bytes", 1)  # absent in a config.json written before it existed: the default
    _check(config, isinstance(limit, int) and not isinstance(limit, bool) and limit > 0, "data.max_line_bytes",
           "must be a positive int (bytes of the longest JSONL line accepted, e.g. 4194304)")
    t = config.train
    _check(config, t.batch_size > 0, "train.batch_size", "must be positive")
    _check(config, t.num_epochs > 0, "train.num_epochs", "must be positive")
    _check(config, t.grad_accum_steps > 0, "train.grad_accum_steps", "must be positive")
    # With packing="examples" the rows per step are rounded up to a multiple of grad_accum_steps instead.
    _check(config, packing == "examples" or t.batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps",
           f"must divide train.batch_size={t.batch_size} (or use data.packing=\"examples\")")
    _check(config, t.log_every > 0, "train.log_every", "must be positive")
    _check(config, t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", "must be >= 0 (0: per epoch only)")
    _check(config, t.get("snapshots", "full") in SNAPSHOT_MODES, "train.snapshots", f"must be one of {SNAPSHOT_MODES}")
    _check(config, t.get("snapshot_dtype", "bfloat16") in SNAPSHOT_DTYPES, "train.snapshot_dtype",
           f"must be one of {SNAPSHOT_DTYPES}")
    minutes = t.get("checkpoint_every_minutes", 0.0)  # absent in a config.json written before it existed
    _check(config, _is_number(minutes) and minutes >= 0, "train.checkpoint_every_minutes",
           "must be a number >= 0 (minutes between time-based mid-epoch checkpoints; 0: off)")
    _check(config, t.get("resume_step", 0) >= 0, "train.resume_step", "must be >= 0 (0: the newest checkpoint)")
    heartbeat_s, stale_s = lock_timing(config)
    _check(config, _is_number(heartbeat_s) and heartbeat_s > 0, "train.lock_heartbeat_s",
           "must be a positive number of seconds (how often a run rewrites the heartbeat of its run.lock)")
    _check(config, _is_number(stale_s) and _is_number(heartbeat_s) and stale_s >= 2 * heartbeat_s,
           "train.lock_stale_s", f"must be at least twice train.lock_heartbeat_s={heartbeat_s!r}: a run.lock whose "
           "heartbeat is older is taken over, which must never happen to a live run")
    o = config.optimizer
    _check(config, o.learning_rate > 0, "optimizer.learning_rate", "must be positive")
    _check(config, 0 <= o.end_learning_rate <= o.learning_rate, "optimizer.end_learning_rate",
           "must be in [0, learning_rate]")
    _check(config, 0 <= o.b1 < 1 and 0 <= o.b2 < 1, "optimizer.b1", "betas must be in [0, 1)")
    _check(config, o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    _check(config, o.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
    _check(config, o.grad_clip_norm >= 0, "optimizer.grad_clip_norm", "must be >= 0 (0: off)")
    _check(config, bool(config.tokenizer.path) or not paths, "tokenizer.path", "set the sentencepiece .model file")
    _check(config, bool(config.get("init_from")) or not paths or not config.get("require_init_from", False),
           "init_from", "this config fine-tunes a pretrained model and require_init_from is set: pass "
           "--config.init_from=<a `python -m lima_jax.convert` output folder or a run directory> (without it "
           "training would start from random weights)")
