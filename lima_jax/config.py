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
from lima_jax.tokenizer import EOT_INIT_CHOICES, EOT_NEW_ROW, eot_choice, eot_init

# model.remat_policy: what the backward pass keeps of each layer's forward (docs/performance.md): "none" keeps
# everything, "full" nothing (recomputes the layer), "dots" / "dots_no_batch" the matmul outputs, "attention_out"
# only the attention output (before the output projection).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "attention_out")
# model.attention: the kernel of `lima_jax.attention`. "blocked" runs everywhere in linear memory (the default);
# "cudnn", "triton", "tokamax" need a GPU, "splash" a TPU; "reference" materializes the scores.
ATTENTION_IMPLEMENTATIONS = ("blocked", "reference", "cudnn", "triton", "splash", "tokamax")
DEFAULT_ATTENTION = "blocked"
DTYPES = ("float32", "bfloat16", "float16")
LOSS_ON = ("assistant", "all")
# optimizer.mu_dtype / optimizer.nu_dtype: Adam's moments as stored; "param": the parameters' dtype (optax's default)
MOMENT_DTYPES = ("param", "float32", "bfloat16")
NU_BF16_MIN_STEP = 2.0 ** -6  # smallest 1 - b2 for which a bfloat16 second moment still tracks g**2
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
# model.rope_type: "default" (plain RoPE) or "llama3" (LLaMA-3.1/3.2's frequency scaling, with the four
# ModelConfig fields below; docs/model.md).
ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE_FIELDS = ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                      "rope_original_max_seq_len")


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
    # RoPE frequency scaling (`model.rope_frequencies`): "default" none; "llama3" (LLaMA-3.1/3.2) divides the
    # frequencies whose wavelength exceeds rope_original_max_seq_len / rope_low_freq_factor by
    # rope_scaling_factor, keeps those below rope_original_max_seq_len / rope_high_freq_factor and blends
    # between. The four parameters are None with "default" (and in a model.json written before them).
    rope_type: str = "default"
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_max_seq_len: int | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # Embedding / LM-head rows padded to a multiple of this (the padded logits are -inf, never trained or
    # sampled, stripped on export): 128 lets the vocabulary split over any tensor axis up to 128 ways.
    vocab_multiple: int = 1
    residual_dropout_max: float = 0.0
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat_policy: str = "none"
    attention: str = DEFAULT_ATTENTION
    attention_block: int = 0  # the "blocked" kernel's block length; 0: chosen by backend and row length
    scan_unroll: int = 0  # layers per iteration of the layer scan; 0: all of them on the CPU, 1 elsewhere

    def __post_init__(self):
        problem = rope_problem(self.rope_type, *(getattr(self, f) for f in LLAMA3_ROPE_FIELDS))
        if problem is None and self.rope_type == "default":
            given = [f for f in LLAMA3_ROPE_FIELDS if getattr(self, f) is not None]
            problem = (given[0], "is only used with rope_type='llama3': None with 'default'") if given else None
        if problem is not None:
            field, message = problem
            raise ConfigError(f"ModelConfig.{field}={getattr(self, field)!r}: {message}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and LM head: `vocab_size` rounded up to a multiple of `vocab_multiple`."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def num_params(self) -> int:
        """Exact parameter count of `lima_jax.model.Llama` built from this config."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.hidden_dim
        per_layer = attn + mlp + 2 * self.dim
        head = 0 if self.tie_embeddings else self.padded_vocab_size * self.dim
        return self.padded_vocab_size * self.dim + self.n_layers * per_layer + self.dim + head


def rope_problem(rope_type: Any, factor: Any, low_freq_factor: Any, high_freq_factor: Any,
                 original_max_seq_len: Any) -> tuple[str, str] | None:
    """(ModelConfig field, what is wrong) for the first illegal RoPE setting, None when legal. With "default"
    the four scaling parameters are not read."""
    if rope_type not in ROPE_TYPES:
        return "rope_type", f"must be one of {ROPE_TYPES}"
    if rope_type == "default":
        return None
    if not (_is_number(factor) and factor >= 1):
        return "rope_scaling_factor", ("must be a number >= 1 with rope_type='llama3' (LLaMA-3.1: 8, LLaMA-3.2 "
                                       "1B/3B: 32)")
    if not (_is_number(low_freq_factor) and low_freq_factor > 0):
        return "rope_low_freq_factor", "must be a number > 0 with rope_type='llama3' (LLaMA-3.1/3.2: 1)"
    if not (_is_number(high_freq_factor) and high_freq_factor > low_freq_factor):
        return "rope_high_freq_factor", (f"must be a number > rope_low_freq_factor={low_freq_factor!r} with "
                                         "rope_type='llama3' (LLaMA-3.1/3.2: 4)")
    if not (isinstance(original_max_seq_len, int) and not isinstance(original_max_seq_len, bool)
            and original_max_seq_len > 0):
        return "rope_original_max_seq_len", ("must be a positive int with rope_type='llama3': the context of "
                                             "pretraining before the scaling (LLaMA-3: 8192)")
    return None


def _rope_fields(m: ml_collections.ConfigDict) -> dict[str, Any]:
    """ModelConfig's RoPE scaling fields of `config.model`: the four parameters only with "llama3" (None with
    "default", whatever the config holds, so an override --config.model.rope_type=default suffices); "default"
    for a config.json written before the fields existed."""
    rope_type = m.get("rope_type", "default")
    if rope_type == "default":
        return {"rope_type": rope_type}
    values = {f: m.get(f) for f in LLAMA3_ROPE_FIELDS}
    for f in ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
        values[f] = float(values[f]) if _is_number(values[f]) else values[f]
    return {"rope_type": rope_type, **values}


def model_config(config: ml_collections.ConfigDict, vocab_size: int | None = None) -> ModelConfig:
    """Typed model config from `config.model`; `vocab_size` overrides (tokenizer size incl. EOT)."""
    m = config.model
    return ModelConfig(
        vocab_size=int(vocab_size if vocab_size is not None else m.vocab_size),
        dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
        hidden_dim=m.hidden_dim, norm_eps=m.norm_eps, rope_theta=m.rope_theta, **_rope_fields(m),
        max_seq_len=m.max_seq_len, tie_embeddings=m.tie_embeddings, vocab_multiple=m.get("vocab_multiple", 1),
        residual_dropout_max=m.residual_dropout_max, param_dtype=m.param_dtype,
        compute_dtype=m.compute_dtype, remat_policy=m.remat_policy,
        # absent in configs written before they existed:
        attention=m.get("attention", DEFAULT_ATTENTION), attention_block=m.get("attention_block", 0),
        scan_unroll=m.get("scan_unroll", 0))


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


def _check_int(config: ml_collections.ConfigDict, value: Any, least: int, field: str, meaning: str) -> None:
    """`value` must be an int (not a bool) >= `least`; `meaning` says what the field does."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= least
    bound = "a positive int" if least == 1 else f"an int >= {least}"
    _check(config, ok, field, f"must be {bound} ({meaning})")


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
    rope = rope_problem(m.get("rope_type", "default"), *(m.get(f) for f in LLAMA3_ROPE_FIELDS))
    if rope is not None:
        _check(config, False, f"model.{rope[0]}", rope[1])
    _check(config, m.param_dtype in DTYPES, "model.param_dtype", f"must be one of {DTYPES}")
    _check(config, m.compute_dtype in DTYPES, "model.compute_dtype", f"must be one of {DTYPES}")
    # m.get: absent in a config.json written before the field existed
    _check_int(config, m.get("vocab_multiple", 1), 1, "model.vocab_multiple",
               "embedding rows padded to a multiple of it; 1: no padding")
    _check(config, m.remat_policy in REMAT_POLICIES, "model.remat_policy", f"must be one of {REMAT_POLICIES}")
    _check(config, m.get("attention", DEFAULT_ATTENTION) in ATTENTION_IMPLEMENTATIONS, "model.attention",
           f"must be one of {ATTENTION_IMPLEMENTATIONS} (\"blocked\": linear-memory XLA attention on every backend; "
           "\"cudnn\" / \"triton\" / \"tokamax\": GPU kernels; \"splash\": TPU; \"reference\": the plain formula)")
    _check_int(config, m.get("attention_block", 0), 0, "model.attention_block",
               "the \"blocked\" kernel's block length; 0: chosen by backend and row length")
    _check_int(config, m.get("scan_unroll", 0), 0, "model.scan_unroll",
               "layers per iteration of the layer scan; 0: all on the CPU, 1 elsewhere")
    _check(config, m.get("attention") != "cudnn" or m.compute_dtype != "float32", "model.attention",
           "\"cudnn\" takes bfloat16 or float16 only: set model.compute_dtype=bfloat16 or use \"blocked\"")
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
    _check_int(config, d.get("max_line_bytes", 1), 1, "data.max_line_bytes",
               "bytes of the longest JSONL line accepted, e.g. 4194304")
    t = config.train
    _check(config, t.batch_size > 0, "train.batch_size", "must be positive")
    _check(config, t.num_epochs > 0, "train.num_epochs", "must be positive")
    _check(config, t.grad_accum_steps > 0, "train.grad_accum_steps", "must be positive")
    # With packing="examples" the rows per step are rounded up to a multiple of grad_accum_steps instead.
    _check(config, packing == "examples" or t.batch_size % t.grad_accum_steps == 0, "train.grad_accum_steps",
           f"must divide train.batch_size={t.batch_size} (or use data.packing=\"examples\")")
    _check(config, t.log_every > 0, "train.log_every", "must be positive")
    _check_int(config, t.get("loss_chunk_length", 0), 0, "train.loss_chunk_length",
               "sequence positions per chunk of the loss; 0: the whole sequence at once")
    _check(config, t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", "must be >= 0 (0: per epoch only)")
    _check(config, t.get("snapshots", "full") in SNAPSHOT_MODES, "train.snapshots", f"must be one of {SNAPSHOT_MODES}")
    _check(config, t.get("snapshot_dtype", "bfloat16") in SNAPSHOT_DTYPES, "train.snapshot_dtype",
           f"must be one of {SNAPSHOT_DTYPES}")
    minutes = t.get("checkpoint_every_minutes", 0.0)  # absent in a config.json written before it existed
    _check(config, _is_number(minutes) and minutes >= 0, "train.checkpoint_every_minutes",
           "must be a number >= 0 (minutes between time-based mid-epoch checkpoints; 0: off)")
    _check(config, isinstance(t.get("async_checkpointing", True), bool), "train.async_checkpointing",
           "must be true or false (true: mid-epoch checkpoints are written in the background while training goes on)")
    _check(config, t.get("resume_step", 0) >= 0, "train.resume_step", "must be >= 0 (0: the newest checkpoint)")
    _check(config, isinstance(t.get("compilation_cache_dir", ""), str), "train.compilation_cache_dir",
           "must be a folder path or gs:// URL (\"\": off)")
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
    for field in ("mu_dtype", "nu_dtype"):  # absent in a config.json written before they existed: "param"
        _check(config, o.get(field, "param") in MOMENT_DTYPES, f"optimizer.{field}", f"must be one of {MOMENT_DTYPES}")
    _check(config, o.get("nu_dtype", "param") != "bfloat16" or 1 - o.b2 >= NU_BF16_MIN_STEP, "optimizer.nu_dtype",
           f"bfloat16 (8 significant bits) cannot store Adam's second moment with b2={o.b2}: each step moves it by "
           f"(1 - b2) of the gap, below half a bfloat16 ulp, so it stops moving; needs 1 - b2 >= {NU_BF16_MIN_STEP} "
           "(b2 <= 0.984), or nu_dtype=\"float32\"")
    _check(config, bool(config.tokenizer.path) or not paths, "tokenizer.path",
           "set the tokenizer: a sentencepiece or tiktoken tokenizer.model, a tokenizer.json, or a folder holding one")
    eot = eot_choice(config)  # absent in a config.json written before it existed: the default
    _check(config, isinstance(eot, str) and bool(eot), "tokenizer.eot",
           "must be \"new_row\" (a new id after the tokenizer's: the paper's recipe) or the name of one of the "
           "tokenizer's special tokens, e.g. \"<|eot_id|>\" (docs/model.md)")
    init = eot_init(config)  # absent in a config.json written before it existed: "mean"
    _check(config, init in EOT_INIT_CHOICES, "tokenizer.eot_init",
           f"must be one of {EOT_INIT_CHOICES}: a new EOT row starts as the mean of the pretrained rows or as a copy "
           "of the BOS / EOS row (docs/model.md)")
    _check(config, init == "mean" or eot == EOT_NEW_ROW, "tokenizer.eot_init",
           f"{init!r} sets the start of a new EOT row, but tokenizer.eot={eot!r} is an existing token whose row "
           "keeps its pretrained values: use \"mean\" (the default) or tokenizer.eot=\"new_row\"")
    _check(config, bool(config.get("init_from")) or not paths or not config.get("require_init_from", False),
           "init_from", "this config fine-tunes a pretrained model and require_init_from is set: pass "
           "--config.init_from=<a `python -m lima_jax.convert` output folder or a run directory> (without it "
           "training would start from random weights)")
