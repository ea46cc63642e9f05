"""The one table that maps Hugging Face tensor names and layouts (`model.layers.0.self_attn.q_proj.weight`,
torch [out, in]) to the lima_jax parameter tree, per parameter kind; every reader and the writer use it."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from lima_jax.config import ModelConfig

TreePath = tuple[str, ...]
LAYER = "model.layers.{i}."  # the per-layer prefix of Hugging Face names


@dataclasses.dataclass(frozen=True)
class Param:
    """One lima_jax parameter kind and its Hugging Face tensor (per layer when `per_layer`)."""

    path: TreePath
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


_L = LAYER
PARAMS: tuple[Param, ...] = (
    Param(("embedding",), "model.embed_tokens.weight", False, *_same(lambda c: (c.vocab_size, c.dim))),
    Param(("layers", "attention_norm", "scale"), _L + "input_layernorm.weight", True, *_same(lambda c: (c.dim,))),
    Param(("layers", "attention", "wq"), _L + "self_attn.q_proj.weight", True, *_heads_in(lambda c: c.n_heads),
          rope=True),
    Param(("layers", "attention", "wk"), _L + "self_attn.k_proj.weight", True, *_heads_in(lambda c: c.n_kv_heads),
          rope=True),
    Param(("layers", "attention", "wv"), _L + "self_attn.v_proj.weight", True, *_heads_in(lambda c: c.n_kv_heads)),
    Param(("layers", "attention", "wo"), _L + "self_attn.o_proj.weight", True,
          lambda w, c: w.T.reshape(c.n_heads, c.head_dim, c.dim), lambda w, c: w.reshape(-1, c.dim).T,
          lambda c: (c.dim, c.n_heads * c.head_dim)),
    Param(("layers", "mlp_norm", "scale"), _L + "post_attention_layernorm.weight", True,
          *_same(lambda c: (c.dim,))),
    Param(("layers", "mlp", "w1"), _L + "mlp.gate_proj.weight", True, *_transpose(lambda c: (c.hidden_dim, c.dim))),
    Param(("layers", "mlp", "w3"), _L + "mlp.up_proj.weight", True, *_transpose(lambda c: (c.hidden_dim, c.dim))),
    Param(("layers", "mlp", "w2"), _L + "mlp.down_proj.weight", True, *_transpose(lambda c: (c.dim, c.hidden_dim))),
    Param(("final_norm", "scale"), "model.norm.weight", False, *_same(lambda c: (c.dim,))),
    Param(("lm_head",), "lm_head.weight", False, *_transpose(lambda c: (c.vocab_size, c.dim))),
)


def params_of(cfg: ModelConfig) -> list[Param]:
    """The parameter kinds of a model (no `lm_head` with tied embeddings)."""
    return [p for p in PARAMS if not (cfg.tie_embeddings and p.path == ("lm_head",))]


def hf_names(param: Param, cfg: ModelConfig) -> list[str]:
    """The Hugging Face tensor names of one kind: one per layer, or one."""
    return [param.hf_name.format(i=i) for i in range(cfg.n_layers)] if param.per_layer else [param.hf_name]


def nest(path: TreePath, value: Any) -> dict:
    """`value` at `path` in an otherwise empty tree."""
    for key in reversed(path):
        value = {key: value}
    return value


def leaf(params: dict, path: TreePath) -> Any:
    """The value at `path` in a tree."""
    for key in path:
        params = params[key]
    return params
