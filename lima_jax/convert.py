"""Checkpoint interop: import pretrained LLaMA weights and export fine-tuned models to Hugging Face.

    python -m lima_jax.convert from_hf      --input /llama-hf   --output /ckpt/llama
    python -m lima_jax.convert from_meta    --input /llama-65b  --output /ckpt/llama-65b
    python -m lima_jax.convert from_llama2c --input stories260K.bin --output /ckpt/stories260k
    python -m lima_jax.convert to_hf        --input /run/checkpoints/300 --tokenizer tokenizer.model --output /hf

An import writes a lima_jax parameter checkpoint (`params/` + `model.json`, see `lima_jax.checkpoint`) that
`config.init_from` reads; the EOT row is added there, at the start of fine-tuning. `to_hf` reads either such a
folder or a training checkpoint (`workdir/checkpoints/<step>`) and writes a folder that
`transformers.AutoModelForCausalLM` / `AutoTokenizer` load offline, with EOT as a special and stop token.

Every reader turns its format into tensors named and laid out as in Hugging Face (`model.layers.0.self_attn
.q_proj.weight`, torch [out, in]); one table (`_PARAMS`) maps those to the lima_jax tree. RoPE: lima_jax and
Hugging Face rotate the two *halves* of each head; Meta and llama2.c rotate interleaved *pairs* (2i, 2i+1).
The q/k projections of an interleaved source are permuted into halves on import (`interleaved_to_halves`);
nothing else needs to change, since permuting q and k alike leaves every attention score unchanged.

Memory: a reader yields one tensor at a time and the checkpoint is written one parameter kind (e.g. all
layers' w1) at a time, so peak host memory is about the largest stacked kind plus one source tensor. Inputs
are validated (config fields, missing files, tensor shapes) before any tensor is read.

Output: every command writes into a sibling `<output>.partial` and renames it onto `--output` only when
complete (`_atomic_folder`), so a crash never leaves a half-written folder at `--output`. An existing non-empty
`--output` is refused unless `--overwrite`; the old folder is then deleted only after the new one is in place.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import struct
import time
from typing import Any, Callable, Iterator, Protocol, Sequence

import ml_dtypes
import numpy as np

from lima_jax import checkpoint
from lima_jax.config import ModelConfig
from lima_jax.tokenizer import EOT_PIECE, Tokenizer


class ConversionError(ValueError):
    """The input checkpoint is malformed or unsupported; the message names the file and the field."""


# ------------------------------------------------------------------------------------------ RoPE layouts


def interleaved_to_halves(w: np.ndarray) -> np.ndarray:
    """Reorders the last (head_dim) axis from pairs (0,1),(2,3),... to halves [0,2,4,...,1,3,5,...]."""
    hd = w.shape[-1]
    return w.reshape(*w.shape[:-1], hd // 2, 2).swapaxes(-1, -2).reshape(w.shape)


def halves_to_interleaved(w: np.ndarray) -> np.ndarray:
    """Inverse of `interleaved_to_halves`."""
    hd = w.shape[-1]
    return w.reshape(*w.shape[:-1], 2, hd // 2).swapaxes(-1, -2).reshape(w.shape)


# ---------------------------------------------------------------------------- parameter table (HF names)

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Param:
    """One lima_jax parameter kind and its Hugging Face tensor (per layer when `per_layer`)."""

    path: Path
    hf_name: str  # with "{i}" for the layer index
    per_layer: bool
    # torch [out, in] tensor <-> lima_jax per-layer array; `rope` tells whether head_dim needs permuting
    to_lima: Callable[[np.ndarray, ModelConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, ModelConfig], np.ndarray]
    hf_shape: Callable[[ModelConfig], tuple[int, ...]]
    rope: bool = False


def _heads_in(n_heads: Callable[[ModelConfig], int]) -> tuple[Callable, Callable, Callable]:
    """q/k/v: torch [n*hd, D] <-> lima [D, n, hd]."""
    return (lambda w, c: w.T.reshape(c.dim, n_heads(c), c.head_dim),
            lambda w, c: w.reshape(c.dim, -1).T,
            lambda c: (n_heads(c) * c.head_dim, c.dim))


def _transpose(shape: Callable[[ModelConfig], tuple[int, int]]) -> tuple[Callable, Callable, Callable]:
    return (lambda w, c: w.T, lambda w, c: w.T, shape)


def _same(shape: Callable[[ModelConfig], tuple[int, ...]]) -> tuple[Callable, Callable, Callable]:
    return (lambda w, c: w, lambda w, c: w, shape)


_L = "model.layers.{i}."
_PARAMS: tuple[_Param, ...] = (
    _Param(("embedding",), "model.embed_tokens.weight", False, *_same(lambda c: (c.vocab_size, c.dim))),
    _Param(("layers", "attention_norm", "scale"), _L + "input_layernorm.weight", True, *_same(lambda c: (c.dim,))),
    _Param(("layers", "attention", "wq"), _L + "self_attn.q_proj.weight", True, *_heads_in(lambda c: c.n_heads),
           rope=True),
    _Param(("layers", "attention", "wk"), _L + "self_attn.k_proj.weight", True, *_heads_in(lambda c: c.n_kv_heads),
           rope=True),
    _Param(("layers", "attention", "wv"), _L + "self_attn.v_proj.weight", True, *_heads_in(lambda c: c.n_kv_heads)),
    _Param(("layers", "attention", "wo"), _L + "self_attn.o_proj.weight", True,
           lambda w, c: w.T.reshape(c.n_heads, c.head_dim, c.dim), lambda w, c: w.reshape(-1, c.dim).T,
           lambda c: (c.dim, c.n_heads * c.head_dim)),
    _Param(("layers", "mlp_norm", "scale"), _L + "post_attention_layernorm.weight", True,
           *_same(lambda c: (c.dim,))),
    _Param(("layers", "mlp", "w1"), _L + "mlp.gate_proj.weight", True, *_transpose(lambda c: (c.hidden_dim, c.dim))),
    _Param(("layers", "mlp", "w3"), _L + "mlp.up_proj.weight", True, *_transpose(lambda c: (c.hidden_dim, c.dim))),
    _Param(("layers", "mlp", "w2"), _L + "mlp.down_proj.weight", True, *_transpose(lambda c: (c.dim, c.hidden_dim))),
    _Param(("final_norm", "scale"), "model.norm.weight", False, *_same(lambda c: (c.dim,))),
    _Param(("lm_head",), "lm_head.weight", False, *_transpose(lambda c: (c.vocab_size, c.dim))),
)


def _params_of(cfg: ModelConfig) -> list[_Param]:
    return [p for p in _PARAMS if not (cfg.tie_embeddings and p.path == ("lm_head",))]


def _hf_names(param: _Param, cfg: ModelConfig) -> list[str]:
    return [param.hf_name.format(i=i) for i in range(cfg.n_layers)] if param.per_layer else [param.hf_name]


# ------------------------------------------------------------------------------------------ readers


class Source(Protocol):
    """A pretrained checkpoint seen as Hugging Face-named torch-layout tensors, read one at a time."""

    config: ModelConfig
    rope_layout: str  # "halves" (Hugging Face) or "interleaved" (Meta, llama2.c)
    dtype: str  # the stored dtype, e.g. "bfloat16"

    def shape(self, name: str) -> tuple[int, ...] | None: ...  # None: no such tensor

    def read(self, name: str) -> np.ndarray: ...

    def describe(self, name: str) -> str: ...  # where the tensor lives, for error messages


_SAFETENSORS_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                       "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64)}
_SAFETENSORS_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class _TensorEntry:
    file: pathlib.Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file


def read_safetensors_header(path: pathlib.Path) -> dict[str, _TensorEntry]:
    """The tensor table of a .safetensors file (no tensor data is read); validates offsets and sizes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise ConversionError(f"{path}: header length {header_len} exceeds the file size {size}")
        header = json.loads(f.read(header_len))
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ConversionError(f"{path}: tensor {name}: dtype {info['dtype']} is not supported "
                                  f"(supported: {sorted(_SAFETENSORS_DTYPES)})")
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        if end - begin != math.prod(shape) * dtype.itemsize or 8 + header_len + end > size:
            raise ConversionError(f"{path}: tensor {name}: data_offsets {info['data_offsets']} do not match "
                                  f"shape {list(shape)} {info['dtype']} within a file of {size} bytes")
        entries[name] = _TensorEntry(path, dtype, shape, 8 + header_len + begin)
    return entries


def _read_entry(entry: _TensorEntry) -> np.ndarray:
    """Reads one tensor with a plain file read (no mmap: the pages do not linger in this process)."""
    count = math.prod(entry.shape)
    return np.fromfile(entry.file, dtype=entry.dtype, count=count, offset=entry.offset).reshape(entry.shape)


def write_safetensors(path: pathlib.Path, tensors: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray]) -> None:
    """Writes a .safetensors file tensor by tensor: the header is computed from shapes, then each tensor
    is produced, written and dropped, so only one tensor is in memory at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _SAFETENSORS_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape, dtype in tensors:
            array = np.ascontiguousarray(produce(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise AssertionError(f"{name}: produced shape {array.shape}, header says {shape}")
            f.write(array.tobytes())


def _require(cond: bool, where: Any, message: str) -> None:
    if not cond:
        raise ConversionError(f"{where}: {message}")


# ------------------------------------------------------------------------------------------ output folder


def _check_output(output: str | pathlib.Path, overwrite: bool,
                  inputs: Sequence[str | pathlib.Path | None] = ()) -> pathlib.Path:
    """The absolute `output` folder, refused when it exists non-empty without `overwrite`, or when replacing it
    would delete one of `inputs`. Creates nothing."""
    output = pathlib.Path(os.path.abspath(output))
    if not (output.exists() or output.is_symlink()):
        return output
    _require(output.is_dir(), output, "exists and is not a folder")
    if any(output.iterdir()):
        _require(overwrite, output, "exists and is not empty: pass --overwrite to replace it (the old folder "
                 "is deleted only once the new one is complete)")
        for path in inputs:
            if path is not None:
                path = pathlib.Path(path).resolve()
                _require(not path.is_relative_to(output.resolve()), output,
                         f"--overwrite would delete the input {path}")
    return output


def _remove(path: pathlib.Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def _atomic_folder(output: str | pathlib.Path, overwrite: bool,
                   inputs: Sequence[str | pathlib.Path | None] = ()) -> Iterator[pathlib.Path]:
    """Yields an empty sibling folder `<output>.partial` to write into (one left over from a crashed run is
    removed first). When the block completes it is renamed onto `output`; an existing `output` (allowed by
    `_check_output`) is first renamed to `<output>.old`, and deleted once the new folder is in place. When the
    block raises, `<output>.partial` is removed and `output` is left as it was."""
    output = _check_output(output, overwrite, inputs)
    partial = output.with_name(output.name + ".partial")
    _remove(partial)
    partial.mkdir(parents=True)
    try:
        yield partial
        output = _check_output(output, overwrite, inputs)  # again: it may have been filled meanwhile
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = None
    if output.exists() or output.is_symlink():
        if output.is_dir() and not output.is_symlink() and not any(output.iterdir()):
            output.rmdir()
        else:
            old = output.with_name(output.name + ".old")
            _remove(old)
            os.rename(output, old)
    os.rename(partial, output)
    if old is not None:
        _remove(old)


class HuggingFaceSource:
    """A Hugging Face LLaMA folder: config.json + model.safetensors or sharded with an index."""

    rope_layout = "halves"

    def __init__(self, folder: str | pathlib.Path):
        folder = pathlib.Path(folder)
        self.location = folder
        config_path = folder / "config.json"
        _require(config_path.is_file(), config_path, "not found (expected a Hugging Face model folder)")
        hf = json.loads(config_path.read_text())
        self.config, self.dtype = hf_config_to_model(hf, config_path)
        self.entries = self._tensor_table(folder)

    @staticmethod
    def _tensor_table(folder: pathlib.Path) -> dict[str, _TensorEntry]:
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            _require(isinstance(weight_map, dict), index, "field 'weight_map' missing")
            files = sorted(set(weight_map.values()))
            for name in files:
                _require((folder / name).is_file(), index, f"shard {name} is listed but missing from {folder}")
            entries = {}
            for name in files:
                entries.update(read_safetensors_header(folder / name))
            return entries
        if single.is_file():
            return read_safetensors_header(single)
        found = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        raise ConversionError(f"{folder}: no model.safetensors or model.safetensors.index.json"
                              + (f" (found {found}: re-save with safe_serialization=True)" if found else ""))

    def shape(self, name: str) -> tuple[int, ...] | None:
        entry = self.entries.get(name)
        return None if entry is None else entry.shape

    def read(self, name: str) -> np.ndarray:
        return _read_entry(self.entries[name])

    def describe(self, name: str) -> str:
        entry = self.entries.get(name)
        return f"{entry.file}: tensor {name}" if entry else f"tensor {name}"


_HF_SUPPORTED_ACT = ("silu",)


def hf_config_to_model(hf: dict, where: Any) -> tuple[ModelConfig, str]:
    """(ModelConfig, stored dtype) from a LLaMA config.json, in the transformers 4 form (`rope_theta`,
    `rope_scaling`, `torch_dtype`) or the transformers 5 form (`rope_parameters`, `dtype`)."""
    def field(name: str, default: Any = dataclasses.MISSING) -> Any:
        if name in hf and hf[name] is not None:
            return hf[name]
        _require(default is not dataclasses.MISSING, where, f"field '{name}' missing")
        return default

    model_type = field("model_type", "llama")
    _require(model_type == "llama", where, f"model_type={model_type!r}: only 'llama' is supported")
    act = field("hidden_act", "silu")
    _require(act in _HF_SUPPORTED_ACT, where, f"hidden_act={act!r}: only {_HF_SUPPORTED_ACT} is supported")
    for flag in ("attention_bias", "mlp_bias"):
        _require(not field(flag, False), where, f"{flag}=true: lima_jax's LLaMA has no biases")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    field_name = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    _require(rope_type == "default", where, f"{field_name}.rope_type={rope_type!r}: only 'default' RoPE is "
             "supported (no scaled RoPE)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    dim, n_heads = int(field("hidden_size")), int(field("num_attention_heads"))
    _require(dim % n_heads == 0, where, f"hidden_size={dim} is not divisible by num_attention_heads={n_heads}")
    head_dim = field("head_dim", dim // n_heads)
    _require(head_dim == dim // n_heads, where, f"head_dim={head_dim}: lima_jax needs hidden_size / "
             f"num_attention_heads = {dim // n_heads}")
    n_kv = int(field("num_key_value_heads", n_heads))
    _require(n_heads % n_kv == 0, where, f"num_key_value_heads={n_kv} does not divide num_attention_heads={n_heads}")
    dtype = str(field("dtype", hf.get("torch_dtype") or "float32")).replace("torch.", "")
    _require(dtype in ("float32", "bfloat16", "float16"), where, f"dtype={dtype!r} is not supported")
    cfg = ModelConfig(
        vocab_size=int(field("vocab_size")), dim=dim, n_layers=int(field("num_hidden_layers")), n_heads=n_heads,
        n_kv_heads=n_kv, hidden_dim=int(field("intermediate_size")), norm_eps=float(field("rms_norm_eps", 1e-6)),
        rope_theta=float(theta), max_seq_len=int(field("max_position_embeddings", 2048)),
        tie_embeddings=bool(field("tie_word_embeddings", False)), param_dtype=dtype)
    return cfg, dtype


def model_to_hf_config(cfg: ModelConfig, dtype: str, bos_id: int, eos_id: int, pad_id: int | None) -> dict:
    """A transformers LlamaConfig dict (written in the transformers 5 form, with `rope_theta` kept too
    so transformers 4 reads the same value)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "dtype": dtype,
        "torch_dtype": dtype, "use_cache": True,
    }


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    import torch
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _meta_hidden_dim(params: dict) -> int:
    """Meta's FeedForward size rule: 2/3 * 4 * dim, times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(2 * 4 * params["dim"] / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple_of = params.get("multiple_of", 256)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# params.json fields the import reads (`_meta_hidden_dim` and `MetaSource`), or that do not change the network
# (max_batch_size, max_seq_len: inference buffers). rope_scaling_factor / rope_high_freq_factor are only used
# by Meta's code with use_scaled_rope, which is refused.
_META_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "rope_high_freq_factor",
                "max_batch_size", "max_seq_len")


def _check_meta_params(params: Any, where: Any) -> None:
    """Refuses a params.json that would import as another function than Meta's: scaled RoPE (LLaMA-3.1/3.2)
    and any field the converter does not know (multimodal, mixture-of-experts, QK-norm, chunked attention,
    quantization, ... in later releases); a known-unknown field that is null or false is accepted."""
    _require(isinstance(params, dict), where, "not a JSON object")
    for key in ("dim", "n_layers", "n_heads"):
        _require(key in params, where, f"field '{key}' missing")
    _require(not params.get("use_scaled_rope"), where, "use_scaled_rope=true: only default RoPE is supported "
             "(no scaled RoPE, as in LLaMA-3.1/3.2)")
    for key, value in params.items():
        _require(key in _META_FIELDS or value is None or value is False, where,
                 f"field '{key}'={json.dumps(value)} is not supported (unknown to the converter, it may change "
                 f"the model; supported fields: {', '.join(_META_FIELDS)})")


# Meta name -> (Hugging Face name, model-parallel concat axis; None = replicated on every shard)
_META_NAMES = (
    ("tok_embeddings.weight", "model.embed_tokens.weight", "embedding"),
    ("norm.weight", "model.norm.weight", None),
    ("output.weight", "lm_head.weight", 0),
    ("layers.{i}.attention_norm.weight", _L + "input_layernorm.weight", None),
    ("layers.{i}.ffn_norm.weight", _L + "post_attention_layernorm.weight", None),
    ("layers.{i}.attention.wq.weight", _L + "self_attn.q_proj.weight", 0),
    ("layers.{i}.attention.wk.weight", _L + "self_attn.k_proj.weight", 0),
    ("layers.{i}.attention.wv.weight", _L + "self_attn.v_proj.weight", 0),
    ("layers.{i}.attention.wo.weight", _L + "self_attn.o_proj.weight", 1),
    ("layers.{i}.feed_forward.w1.weight", _L + "mlp.gate_proj.weight", 0),
    ("layers.{i}.feed_forward.w3.weight", _L + "mlp.up_proj.weight", 0),
    ("layers.{i}.feed_forward.w2.weight", _L + "mlp.down_proj.weight", 1),
)


class MetaSource:
    """Meta's original release: params.json + consolidated.NN.pth, one file per model-parallel rank.

    Column-parallel weights (wq, wk, wv, w1, w3, output) are split on the output axis, row-parallel ones
    (wo, w2) on the input axis, the embedding on the model axis (LLaMA 1/2) or the vocabulary (LLaMA 3);
    norms are replicated. Files are opened with `torch.load(weights_only=True, mmap=True)`: no code is
    unpickled and tensors are paged in only when read.
    """

    rope_layout = "interleaved"

    def __init__(self, folder: str | pathlib.Path):
        import torch
        folder = pathlib.Path(folder)
        self.location = folder
        params_path = folder / "params.json"
        _require(params_path.is_file(), params_path, "not found (expected Meta's params.json)")
        params = json.loads(params_path.read_text())
        _check_meta_params(params, params_path)
        self.files = sorted(folder.glob("consolidated.*.pth"))
        _require(bool(self.files), folder, "no consolidated.NN.pth files")
        numbers = [int(re.fullmatch(r"consolidated\.(\d+)\.pth", f.name).group(1)) for f in self.files]
        _require(numbers == list(range(len(numbers))), folder,
                 f"shards must be consolidated.00.pth .. {len(numbers) - 1:02d}: found {[f.name for f in self.files]}")
        self.shards = []
        for f in self.files:
            try:
                self.shards.append(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:  # noqa: BLE001 - re-raised with the file named
                raise ConversionError(f"{f}: cannot be read as a weights-only torch checkpoint: {e}") from e
        embed = self._shard_shapes("tok_embeddings.weight")
        _require(embed is not None, self.files[0], "tensor tok_embeddings.weight missing")
        vocab = params.get("vocab_size", -1)
        if vocab is None or vocab <= 0:  # LLaMA-1 ships vocab_size -1: take it from the embedding
            vocab = embed[0][0] * (len(embed) if self._embed_axis(embed, params["dim"]) == 0 else 1)
        self.dtype = str(self.shards[0]["tok_embeddings.weight"].dtype).replace("torch.", "")
        self.config = ModelConfig(
            vocab_size=int(vocab), dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads") or params["n_heads"], hidden_dim=_meta_hidden_dim(params),
            norm_eps=float(params.get("norm_eps", 1e-5)), rope_theta=float(params.get("rope_theta", 10000.0)),
            max_seq_len=int(params.get("max_seq_len", 2048)), tie_embeddings=False, param_dtype=self.dtype)
        self.to_meta = {hf.format(i=i): (meta.format(i=i), axis) for meta, hf, axis in _META_NAMES
                        for i in range(self.config.n_layers if "{i}" in meta else 1)}

    @staticmethod
    def _embed_axis(shapes: list[tuple[int, ...]], dim: int) -> int:
        return 0 if len(shapes) > 1 and shapes[0][1] == dim else 1

    def _shard_shapes(self, meta_name: str) -> list[tuple[int, ...]] | None:
        shapes = []
        for f, shard in zip(self.files, self.shards):
            if meta_name not in shard:
                _require(not shapes, f, f"tensor {meta_name} missing (present in {self.files[0].name})")
                return None
            shapes.append(tuple(shard[meta_name].shape))
        return shapes

    def _axis(self, hf_name: str) -> tuple[str, int | None]:
        meta_name, axis = self.to_meta[hf_name]
        if axis == "embedding":
            axis = self._embed_axis(self._shard_shapes(meta_name), self.config.dim)
        return meta_name, axis if len(self.shards) > 1 else None

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name not in self.to_meta:
            return None
        meta_name, axis = self._axis(name)
        shapes = self._shard_shapes(meta_name)
        if shapes is None:
            return None
        if axis is None:
            return shapes[0]
        merged = list(shapes[0])
        merged[axis] = sum(s[axis] for s in shapes)
        return tuple(merged)

    def read(self, name: str) -> np.ndarray:
        meta_name, axis = self._axis(name)
        if axis is None:  # replicated (or a single shard): copy out of the memory map
            return _torch_to_numpy(self.shards[0][meta_name]).copy()
        return np.concatenate([_torch_to_numpy(shard[meta_name]) for shard in self.shards], axis=axis)

    def describe(self, name: str) -> str:
        meta_name = self.to_meta.get(name, (name,))[0]
        return f"{self.files[0].parent}/consolidated.*.pth: tensor {meta_name}"


class Llama2cSource:
    """llama2.c's legacy .bin: a 7-int32 header, then fp32 arrays with all layers of one kind together."""

    rope_layout = "interleaved"
    dtype = "float32"
    _HEADER = struct.Struct("<7i")

    def __init__(self, path: str | pathlib.Path):
        self.path = self.location = pathlib.Path(path)
        _require(self.path.is_file(), self.path, "not found")
        with open(self.path, "rb") as f:
            raw = f.read(self._HEADER.size)
        _require(len(raw) == self._HEADER.size, self.path, "shorter than the 28-byte header")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = self._HEADER.unpack(raw)
        for name, value in (("dim", dim), ("hidden_dim", hidden), ("n_layers", n_layers), ("n_heads", n_heads),
                            ("n_kv_heads", n_kv), ("seq_len", seq_len)):
            _require(value > 0, self.path, f"header field {name}={value} must be positive (not a llama2.c "
                     "legacy .bin? the newer versioned format is not supported)")
        _require(dim % n_heads == 0 and n_heads % n_kv == 0, self.path,
                 f"header: dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv} are inconsistent")
        self.config = ModelConfig(vocab_size=abs(vocab), dim=dim, n_layers=n_layers, n_heads=n_heads,
                                  n_kv_heads=n_kv, hidden_dim=hidden, norm_eps=1e-5, rope_theta=10000.0,
                                  max_seq_len=seq_len, tie_embeddings=vocab > 0)
        self.layout = self._layout(self.config)
        expected = self._HEADER.size + 4 * sum(math.prod(shape) for _, shape in self.layout)
        actual = self.path.stat().st_size
        _require(actual == expected, self.path, f"size {actual} bytes, but the header ({dim=}, {hidden=}, "
                 f"{n_layers=}, {n_heads=}, {n_kv=}, {vocab=}, {seq_len=}) implies {expected}")
        self.offsets, offset = {}, self._HEADER.size
        for name, shape in self.layout:
            self.offsets[name] = (offset, shape)
            offset += 4 * math.prod(shape)

    @staticmethod
    def _layout(c: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in file order; stacked [L, out, in] arrays carry the HF template name."""
        kv_dim, L, hd = c.n_kv_heads * c.head_dim, c.n_layers, c.head_dim
        layout = [("model.embed_tokens.weight", (c.vocab_size, c.dim)),
                  (_L + "input_layernorm.weight", (L, c.dim)),
                  (_L + "self_attn.q_proj.weight", (L, c.dim, c.dim)),
                  (_L + "self_attn.k_proj.weight", (L, kv_dim, c.dim)),
                  (_L + "self_attn.v_proj.weight", (L, kv_dim, c.dim)),
                  (_L + "self_attn.o_proj.weight", (L, c.dim, c.dim)),
                  (_L + "post_attention_layernorm.weight", (L, c.dim)),
                  (_L + "mlp.gate_proj.weight", (L, c.hidden_dim, c.dim)),
                  (_L + "mlp.down_proj.weight", (L, c.dim, c.hidden_dim)),
                  (_L + "mlp.up_proj.weight", (L, c.hidden_dim, c.dim)),
                  ("model.norm.weight", (c.dim,)),
                  ("rope_tables", (2, c.max_seq_len * hd // 2))]  # legacy RoPE tables, unused
        if not c.tie_embeddings:
            layout.append(("lm_head.weight", (c.vocab_size, c.dim)))
        return layout

    def _locate(self, name: str) -> tuple[int, tuple[int, ...]] | None:
        """(byte offset, shape) of one (per-layer) tensor."""
        match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if match is None:
            return self.offsets.get(name) if name != "rope_tables" else None
        layer, rest = int(match.group(1)), match.group(2)
        stacked = self.offsets.get(_L + rest)
        if stacked is None or layer >= self.config.n_layers:
            return None
        offset, shape = stacked
        return offset + 4 * layer * math.prod(shape[1:]), shape[1:]

    def shape(self, name: str) -> tuple[int, ...] | None:
        located = self._locate(name)
        return None if located is None else located[1]

    def read(self, name: str) -> np.ndarray:
        offset, shape = self._locate(name)
        return np.fromfile(self.path, dtype="<f4", count=math.prod(shape), offset=offset).reshape(shape)

    def describe(self, name: str) -> str:
        return f"{self.path}: tensor {name}"


# ---------------------------------------------------------------------------------------------- import


def check_source(source: Source) -> None:
    """Every tensor the model needs is present with the expected shape (cheap: shapes only)."""
    cfg = source.config
    for param in _params_of(cfg):
        want = param.hf_shape(cfg)
        for name in _hf_names(param, cfg):
            got = source.shape(name)
            _require(got is not None, source.describe(name), "missing")
            _require(tuple(got) == want, source.describe(name), f"shape {list(got)}, but the config implies "
                     f"{list(want)} ({cfg})")


def _to_lima(source: Source, param: _Param, name: str, dtype: np.dtype) -> np.ndarray:
    w = param.to_lima(source.read(name), source.config)
    if param.rope and source.rope_layout == "interleaved":
        w = interleaved_to_halves(w)
    return w.astype(dtype, copy=False)


def _kind_arrays(source: Source, dtype: np.dtype) -> Iterator[tuple[Path, np.ndarray]]:
    """One stacked lima_jax array per parameter kind, built layer by layer into one preallocated buffer."""
    cfg = source.config
    for param in _params_of(cfg):
        names = _hf_names(param, cfg)
        first = _to_lima(source, param, names[0], dtype)
        if not param.per_layer:
            yield param.path, first
            continue
        stacked = np.empty((cfg.n_layers, *first.shape), dtype)
        stacked[0] = first
        for i, name in enumerate(names[1:], start=1):
            stacked[i] = _to_lima(source, param, name, dtype)
        yield param.path, stacked


def _nest(path: Path, value: Any) -> dict:
    for key in reversed(path):
        value = {key: value}
    return value


def import_checkpoint(source: Source, output: str | pathlib.Path, dtype: str | None = None,
                      extra: dict | None = None, overwrite: bool = False) -> ModelConfig:
    """Validates `source` and writes it as a lima_jax parameter checkpoint in `dtype` (default: as stored),
    atomically (see `_atomic_folder`): an existing non-empty `output` is refused unless `overwrite`."""
    check_source(source)
    inputs = [getattr(source, "location", None)]
    _check_output(output, overwrite, inputs)
    dtype = dtype or source.dtype
    cfg = dataclasses.replace(source.config, param_dtype=dtype)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    meta = {"source_rope_layout": source.rope_layout, **(extra or {})}
    with _atomic_folder(output, overwrite, inputs) as folder:
        checkpoint.save_params_incrementally(
            folder, (_nest(path, array) for path, array in _kind_arrays(source, np_dtype)), cfg, meta)
    return cfg


# ---------------------------------------------------------------------------------------------- export


def _leaf(params: dict, path: Path) -> np.ndarray:
    for key in path:
        params = params[key]
    return params


def hf_tensors(params: dict, cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(Hugging Face name, shape, producer of the torch-layout tensor) for every tensor, in file order."""
    for param in _params_of(cfg):
        for layer, name in enumerate(_hf_names(param, cfg)):
            def produce(param=param, layer=layer):
                value = np.asarray(_leaf(params, param.path))
                return param.to_hf(value[layer] if param.per_layer else value, cfg)
            yield name, param.hf_shape(cfg), produce


def write_hf_weights(folder: pathlib.Path, params: dict, cfg: ModelConfig, dtype: np.dtype,
                     max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000K-of-0000N.safetensors + index when larger than `max_shard_bytes`."""
    entries = list(hf_tensors(params, cfg))
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    for file, shard in zip(names, shards):
        producers = {name: produce for name, _, produce in shard}
        write_safetensors(folder / file, [(name, shape, dtype) for name, shape, _ in shard],
                          lambda name: producers[name]())
    if len(shards) > 1:
        total = sum(math.prod(shape) * dtype.itemsize for _, shape, _ in entries)
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: file for file, shard in zip(names, shards) for name, _, _ in shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


_SP_NORMAL, _SP_USER_DEFINED, _SP_BPE = 1, 4, 2
CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}<eot>{% endfor %}"


def _bpe_merges(pieces: Sequence[Any]) -> list[tuple[str, str]]:
    """Merge rules that make Hugging Face's rank-based BPE pick what sentencepiece's score-based BPE picks:
    a pair ranks by the score of the piece it forms (higher first)."""
    mergeable = {p.piece: (-p.score, i) for i, p in enumerate(pieces) if p.type == _SP_NORMAL}
    ranked = []
    for piece, rank in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((rank, mergeable[left][1], mergeable[right][1], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def write_hf_tokenizer(tok: Tokenizer, folder: pathlib.Path, with_eot: bool) -> None:
    """tokenizer.json (+ config) reproducing the sentencepiece BPE encoding exactly: same normalization
    (charsmap, whitespace, dummy prefix), byte fallback, BOS added; `<eot>` special when `with_eot`, with a
    chat template that yields `Tokenizer.encode_dialog`'s ids."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, decoders, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.path.read_bytes())
    _require(proto.trainer_spec.model_type == _SP_BPE, tok.path, f"trainer_spec.model_type="
             f"{proto.trainer_spec.model_type}: only BPE sentencepiece models (LLaMA's kind) can be exported")
    _require(not any(p.type == _SP_USER_DEFINED for p in proto.pieces), tok.path,
             "user-defined pieces are not supported")
    _require(not proto.trainer_spec.treat_whitespace_as_suffix, tok.path, "treat_whitespace_as_suffix=true "
             "is not supported")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    hf = HFTokenizer(BPE(vocab=vocab, merges=_bpe_merges(proto.pieces), unk_token=unk, fuse_unk=True,
                         byte_fallback=proto.trainer_spec.byte_fallback))
    spec = proto.normalizer_spec
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:  # strip and collapse spaces; \A and \z, as ^ and $ match at every line
        steps += [normalizers.Replace(Regex(r"\A +"), ""), normalizers.Replace(Regex(r" +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "\u2581"))
    hf.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(decode)
    bos = proto.pieces[tok.bos_id].piece
    eos = proto.pieces[tok.eos_id].piece
    specials = [unk, bos, eos] + ([EOT_PIECE] if with_eot else [])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if with_eot:
        _require(hf.token_to_id(EOT_PIECE) == tok.eot_id, tok.path, "EOT id mismatch")
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                      special_tokens=[(bos, tok.bos_id)])
    hf.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "unk_token": unk,
              "eos_token": EOT_PIECE if with_eot else eos, "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000}
    if with_eot:
        config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {k: config[k] for k in ("bos_token", "eos_token", "unk_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))


def load_lima_params(path: str | pathlib.Path) -> tuple[dict, ModelConfig]:
    """Parameters (numpy) and model config of a parameter checkpoint, a training checkpoint step folder, or
    a training workdir (its chosen epoch, else the latest; see `checkpoint.resolve_checkpoint`)."""
    try:
        return checkpoint.load_checkpoint_params(path)
    except FileNotFoundError as e:
        raise ConversionError(str(e)) from None


def export_hf(input_path: str | pathlib.Path, tokenizer_path: str | pathlib.Path, output: str | pathlib.Path,
              dtype: str | None = None, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> ModelConfig:
    """Writes a Hugging Face LLaMA folder (weights, config, tokenizer, generation config) for a lima_jax
    checkpoint. When the vocabulary includes lima_jax's EOT (sentencepiece size + 1), EOT becomes the
    tokenizer's special `<eot>`, the eos token and the generation stop token.

    The folder is written atomically (see `_atomic_folder`): an existing non-empty `output` is refused unless
    `overwrite`, and is then replaced as a whole, so no file of an earlier export survives."""
    tok = Tokenizer(tokenizer_path)  # fails early, before the weights are read
    inputs = [input_path, tokenizer_path]
    _check_output(output, overwrite, inputs)  # likewise (creates nothing)
    params, cfg = load_lima_params(input_path)
    has_eot = cfg.vocab_size == tok.vocab_size
    if not has_eot and cfg.vocab_size != tok.eot_id:
        raise ConversionError(f"{input_path}: model vocabulary {cfg.vocab_size} matches neither the tokenizer "
                              f"{tokenizer_path} ({tok.eot_id} pieces) nor it plus EOT ({tok.vocab_size})")
    dtype = dtype or cfg.param_dtype
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    stop_id = tok.eot_id if has_eot else tok.eos_id
    hf_config = model_to_hf_config(cfg, dtype, tok.bos_id, stop_id, None)
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": stop_id, "do_sample": False}
    with _atomic_folder(output, overwrite, inputs) as folder:
        write_hf_weights(folder, params, cfg, np_dtype, max_shard_bytes)
        (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
        write_hf_tokenizer(tok, folder, with_eot=has_eot)
    return cfg


# ------------------------------------------------------------------------------------------------- CLI

_SOURCES: dict[str, Callable[[str], Source]] = {
    "from_hf": HuggingFaceSource, "from_meta": MetaSource, "from_llama2c": Llama2cSource}
_DTYPES = ("float32", "bfloat16", "float16")
_OVERWRITE_HELP = ("replace a non-empty --output (as a whole, once the new folder is complete); without it such "
                   "an --output is refused")


def _peak_rss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lima_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"from_hf": "Hugging Face LLaMA folder (config.json + safetensors) -> lima_jax checkpoint",
             "from_meta": "Meta's params.json + consolidated.NN.pth -> lima_jax checkpoint",
             "from_llama2c": "llama2.c legacy .bin -> lima_jax checkpoint"}
    for command, text in helps.items():
        p = sub.add_parser(command, help=text, description=text)
        p.add_argument("--input", required=True, help="the source folder (or .bin file for llama2.c)")
        p.add_argument("--output", required=True, help="the lima_jax checkpoint folder to write")
        p.add_argument("--dtype", choices=_DTYPES, default=None, help="stored dtype (default: as in the source)")
        p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    text = "lima_jax parameter or training checkpoint -> Hugging Face folder (weights, config, tokenizer)"
    p = sub.add_parser("to_hf", help=text, description=text)
    p.add_argument("--input", required=True, help="a converted/saved params folder or workdir/checkpoints/<step>")
    p.add_argument("--tokenizer", required=True, help="the sentencepiece .model the model was trained with")
    p.add_argument("--output", required=True, help="the Hugging Face folder to write")
    p.add_argument("--dtype", choices=_DTYPES, default=None, help="weights dtype (default: as stored)")
    p.add_argument("--max_shard_gb", type=float, default=5.0, help="split safetensors above this size")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    args = parser.parse_args(argv)

    tic = time.perf_counter()
    if args.command == "to_hf":
        cfg = export_hf(args.input, args.tokenizer, args.output, args.dtype, int(args.max_shard_gb * 2**30),
                        overwrite=args.overwrite)
    else:
        _check_output(args.output, args.overwrite, [args.input])  # before the source is opened
        cfg = import_checkpoint(_SOURCES[args.command](args.input), args.output, args.dtype,
                                overwrite=args.overwrite)
    print(f"{args.command}: wrote {args.output} ({cfg.num_params():,} parameters, {cfg.param_dtype}) in "
          f"{time.perf_counter() - tic:.1f} s, peak host memory {_peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
