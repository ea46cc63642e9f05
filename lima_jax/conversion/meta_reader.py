"""Reading Meta's original release: params.json (checked field by field) + consolidated.NN.pth shards, merged
across model-parallel ranks and renamed to Hugging Face names; RoPE in interleaved pairs."""
from __future__ import annotations

import json
import os
import re
from typing import Any

import ml_dtypes
import numpy as np

from lima_jax.config import ModelConfig
from lima_jax.conversion.params_table import LAYER as _L
from lima_jax.conversion.rope import meta_rope_fields
from lima_jax.conversion.source import read_json, require
from lima_jax.errors import ConversionError
from lima_jax.paths import PathLike, as_path, is_remote


def torch_to_numpy(tensor: Any) -> np.ndarray:
    import torch
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def meta_hidden_dim(params: dict) -> int:
    """Meta's FeedForward size rule: 2/3 * 4 * dim, times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(2 * 4 * params["dim"] / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple_of = params.get("multiple_of", 256)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# params.json fields the import reads (`meta_hidden_dim`, `MetaSource`, `rope.meta_rope_fields`), or that do
# not change the network (max_batch_size, max_seq_len: inference buffers).
META_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "rope_high_freq_factor",
               "max_batch_size", "max_seq_len")


# The context of LLaMA-3.1/3.2 (scaled RoPE), whose params.json has no max_seq_len; 2,048 otherwise (LLaMA-1).
META_SCALED_CONTEXT = 131072


def check_meta_params(params: Any, where: Any) -> None:
    """Refuses a params.json that would import as another function than Meta's: any field the converter does
    not know (multimodal, mixture-of-experts, QK-norm, chunked attention, quantization, ... in later releases);
    a known-unknown field that is null or false is accepted. Scaled RoPE (`use_scaled_rope`, LLaMA-3.1/3.2) is
    read by `rope.meta_rope_fields`."""
    require(isinstance(params, dict), where, "not a JSON object")
    for key in ("dim", "n_layers", "n_heads"):
        require(key in params, where, f"field '{key}' missing")
    for key, value in params.items():
        require(key in META_FIELDS or value is None or value is False, where,
                f"field '{key}'={json.dumps(value)} is not supported (unknown to the converter, it may change "
                f"the model; supported fields: {', '.join(META_FIELDS)})")


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
    unpickled and tensors are paged in only when read. That memory map needs local files: a gs:// folder is
    refused (copy it to local disk first), since reading the shards whole would hold the entire model.
    """

    rope_layout = "interleaved"

    def __init__(self, folder: PathLike):
        import torch
        self.location = folder = as_path(folder)
        params_path = folder / "params.json"
        params = read_json(params_path, "not found (expected Meta's params.json)")
        check_meta_params(params, params_path)
        rope = meta_rope_fields(params, params_path)  # checked before any shard is opened, like the rest
        self.files = sorted(folder.glob("consolidated.*.pth"))
        require(bool(self.files), folder, "no consolidated.NN.pth files")
        numbers = [int(re.fullmatch(r"consolidated\.(\d+)\.pth", f.name).group(1)) for f in self.files]
        require(numbers == list(range(len(numbers))), folder,
                f"shards must be consolidated.00.pth .. {len(numbers) - 1:02d}: found {[f.name for f in self.files]}")
        require(not is_remote(folder), folder, "the .pth shards are memory-mapped, which needs local files: copy "
                "the folder to local disk first (e.g. gcloud storage cp -r)")
        self.shards = []
        for f in self.files:
            try:
                self.shards.append(torch.load(os.fspath(f), map_location="cpu", weights_only=True, mmap=True))
            except Exception as e:  # noqa: BLE001 - re-raised with the file named
                raise ConversionError(f"{f}: cannot be read as a weights-only torch checkpoint: {e}") from e
        embed = self._shard_shapes("tok_embeddings.weight")
        require(embed is not None, self.files[0], "tensor tok_embeddings.weight missing")
        vocab = params.get("vocab_size", -1)
        if vocab is None or vocab <= 0:  # LLaMA-1 ships vocab_size -1: take it from the embedding
            vocab = embed[0][0] * (len(embed) if self._embed_axis(embed, params["dim"]) == 0 else 1)
        self.dtype = str(self.shards[0]["tok_embeddings.weight"].dtype).replace("torch.", "")
        self.config = ModelConfig(
            vocab_size=int(vocab), dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads") or params["n_heads"], hidden_dim=meta_hidden_dim(params),
            norm_eps=float(params.get("norm_eps", 1e-5)), **rope, max_seq_len=int(params.get(
                "max_seq_len", META_SCALED_CONTEXT if rope["rope_type"] == "llama3" else 2048)),
            tie_embeddings=False, param_dtype=self.dtype)
        self.to_meta = {hf.format(i=i): (meta.format(i=i), axis) for meta, hf, axis in _META_NAMES
                        for i in range(self.config.n_layers if "{i}" in meta else 1)}

    @staticmethod
    def _embed_axis(shapes: list[tuple[int, ...]], dim: int) -> int:
        return 0 if len(shapes) > 1 and shapes[0][1] == dim else 1

    def _shard_shapes(self, meta_name: str) -> list[tuple[int, ...]] | None:
        shapes = []
        for f, shard in zip(self.files, self.shards):
            if meta_name not in shard:
                require(not shapes, f, f"tensor {meta_name} missing (present in {self.files[0].name})")
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
            return torch_to_numpy(self.shards[0][meta_name]).copy()
        return np.concatenate([torch_to_numpy(shard[meta_name]) for shard in self.shards], axis=axis)

    def describe(self, name: str) -> str:
        meta_name = self.to_meta.get(name, (name,))[0]
        return f"{self.files[0].parent}/consolidated.*.pth: tensor {meta_name}"
