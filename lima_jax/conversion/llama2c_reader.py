"""Reading llama2.c's legacy .bin: a 7-int32 header, then fp32 arrays with all layers of one kind together;
RoPE in interleaved pairs."""
from __future__ import annotations

import math
import re
import struct

import numpy as np

from lima_jax.config import ModelConfig
from lima_jax.conversion.params_table import LAYER as _L
from lima_jax.conversion.safetensors_io import read_array
from lima_jax.conversion.source import require
from lima_jax.paths import PathLike, as_path


class Llama2cSource:
    """llama2.c's legacy .bin: a 7-int32 header, then fp32 arrays with all layers of one kind together."""

    rope_layout = "interleaved"
    dtype = "float32"
    _HEADER = struct.Struct("<7i")

    def __init__(self, path: PathLike):
        self.path = self.location = as_path(path)
        require(self.path.is_file(), self.path, "not found")
        with self.path.open("rb") as f:
            raw = f.read(self._HEADER.size)
        require(len(raw) == self._HEADER.size, self.path, "shorter than the 28-byte header")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = self._HEADER.unpack(raw)
        for name, value in (("dim", dim), ("hidden_dim", hidden), ("n_layers", n_layers), ("n_heads", n_heads),
                            ("n_kv_heads", n_kv), ("seq_len", seq_len)):
            require(value > 0, self.path, f"header field {name}={value} must be positive (not a llama2.c "
                    "legacy .bin? the newer versioned format is not supported)")
        require(dim % n_heads == 0 and n_heads % n_kv == 0, self.path,
                f"header: dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv} are inconsistent")
        self.config = ModelConfig(vocab_size=abs(vocab), dim=dim, n_layers=n_layers, n_heads=n_heads,
                                  n_kv_heads=n_kv, hidden_dim=hidden, norm_eps=1e-5, rope_theta=10000.0,
                                  max_seq_len=seq_len, tie_embeddings=vocab > 0)
        self.layout = self._layout(self.config)
        expected = self._HEADER.size + 4 * sum(math.prod(shape) for _, shape in self.layout)
        actual = self.path.stat().length
        require(actual == expected, self.path, f"size {actual} bytes, but the header ({dim=}, {hidden=}, "
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
        return read_array(self.path, offset, np.dtype("<f4"), shape)

    def describe(self, name: str) -> str:
        return f"{self.path}: tensor {name}"
