"""Reading a Hugging Face LLaMA folder: config.json (transformers 4 or 5 form) + model.safetensors, or
shards with an index. Its tensors already have Hugging Face names and layout (RoPE halves)."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from etils import epath

from lima_jax.config import ModelConfig
from lima_jax.conversion.rope import hf_rope_fields
from lima_jax.conversion.safetensors_io import TensorEntry, read_safetensors_header, read_tensor
from lima_jax.conversion.source import DTYPES, read_json, require
from lima_jax.errors import ConversionError
from lima_jax.paths import PathLike, as_path


class HuggingFaceSource:
    """A Hugging Face LLaMA folder: config.json + model.safetensors or sharded with an index."""

    rope_layout = "halves"

    def __init__(self, folder: PathLike):
        self.location = folder = as_path(folder)
        config_path = folder / "config.json"
        hf = read_json(config_path, "not found (expected a Hugging Face model folder)")
        self.config, self.dtype = hf_config_to_model(hf, config_path)
        self.entries = self._tensor_table(folder)

    @staticmethod
    def _tensor_table(folder: epath.Path) -> dict[str, TensorEntry]:
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.is_file():
            weight_map = read_json(index, "not found").get("weight_map")
            require(isinstance(weight_map, dict), index, "field 'weight_map' missing")
            files = sorted(set(weight_map.values()))
            for name in files:
                require((folder / name).is_file(), index, f"shard {name} is listed but missing from {folder}")
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
        return read_tensor(self.entries[name])

    def describe(self, name: str) -> str:
        entry = self.entries.get(name)
        return f"{entry.file}: tensor {name}" if entry else f"tensor {name}"


_HF_SUPPORTED_ACT = ("silu",)


def hf_config_to_model(hf: dict, where: Any) -> tuple[ModelConfig, str]:
    """(ModelConfig, stored dtype) from a LLaMA config.json, in the transformers 4 form (`rope_theta`,
    `rope_scaling`, `torch_dtype`) or the transformers 5 form (`rope_parameters`, `dtype`); RoPE "default" or
    "llama3" (`rope.hf_rope_fields`)."""
    def field(name: str, default: Any = dataclasses.MISSING) -> Any:
        if name in hf and hf[name] is not None:
            return hf[name]
        require(default is not dataclasses.MISSING, where, f"field '{name}' missing")
        return default

    model_type = field("model_type", "llama")
    require(model_type == "llama", where, f"model_type={model_type!r}: only 'llama' is supported")
    act = field("hidden_act", "silu")
    require(act in _HF_SUPPORTED_ACT, where, f"hidden_act={act!r}: only {_HF_SUPPORTED_ACT} is supported")
    for flag in ("attention_bias", "mlp_bias"):
        require(not field(flag, False), where, f"{flag}=true: lima_jax's LLaMA has no biases")
    dim, n_heads = int(field("hidden_size")), int(field("num_attention_heads"))
    require(dim % n_heads == 0, where, f"hidden_size={dim} is not divisible by num_attention_heads={n_heads}")
    head_dim = field("head_dim", dim // n_heads)
    require(head_dim == dim // n_heads, where, f"head_dim={head_dim}: lima_jax needs hidden_size / "
            f"num_attention_heads = {dim // n_heads}")
    n_kv = int(field("num_key_value_heads", n_heads))
    require(n_heads % n_kv == 0, where, f"num_key_value_heads={n_kv} does not divide num_attention_heads={n_heads}")
    dtype = str(field("dtype", hf.get("torch_dtype") or "float32")).replace("torch.", "")
    require(dtype in DTYPES, where, f"dtype={dtype!r} is not supported")
    cfg = ModelConfig(
        vocab_size=int(field("vocab_size")), dim=dim, n_layers=int(field("num_hidden_layers")), n_heads=n_heads,
        n_kv_heads=n_kv, hidden_dim=int(field("intermediate_size")), norm_eps=float(field("rms_norm_eps", 1e-6)),
        **hf_rope_fields(hf, where), max_seq_len=int(field("max_position_embeddings", 2048)),
        tie_embeddings=bool(field("tie_word_embeddings", False)), param_dtype=dtype)
    return cfg, dtype
