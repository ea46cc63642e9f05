"""LLaMA in Flax Linen, read top to bottom like the paper (Touvron et al. 2023) plus LIMA's residual dropout.

    tokens -> embedding -> L x [ x + drop_l(attention(rmsnorm(x))) ; x + drop_l(mlp(rmsnorm(x))) ]
           -> rmsnorm -> lm_head -> logits

* Every parameter and key activation carries logical axis names ("embed", "heads", "mlp", ...); the mesh
  axes they map to are decided in one place, `lima_jax.sharding`.
* Layers are stacked with `nn.scan` (one compiled layer, whatever the depth; unrolled on the CPU,
  `layer_unroll`), optionally rematerialized.
* Attention takes `segment_ids` and `positions`: a token attends only to earlier tokens of its own segment
  and RoPE positions restart per segment, so packed rows never leak across examples. Segment 0 is padding.
  The attention kernel is `model.attention` (`lima_jax.attention`); decoding with a KV cache uses the
  reference formula over the cache.
* RoPE uses the rotate-half layout of Hugging Face; `lima_jax.convert` permutes Meta/llama2.c weights
  (interleaved pairs) into it. See docs/checkpoints.md.
* LIMA residual dropout: layer l of L (1-based) drops each residual branch output with
  p_l = p_max * (l - 1) / (L - 1) before it is added back. Off when `deterministic`.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lima_jax.attention import attend, attention_mask, default_block_size, grouped_query_attention  # noqa: F401
from lima_jax.config import ModelConfig
from lima_jax.xla_cpu import run_cpu_computations_inline, unroll_threefry

unroll_threefry()  # before any step is traced: on the CPU, dropout masks and sampling draw bits without a loop
run_cpu_computations_inline()  # before any backend exists: a CPU step's temporaries come from the main heap

Array = jax.Array
_init = nn.initializers.normal(stddev=0.02)
ATTENTION_OUT = "attention_out"  # checkpoint_name of each layer's attention output (before its projection)


def _project(x: Array, w: Array, contract: int = 1) -> Array:
    """x times w over x's last `contract` axes and w's first ones ("btd,dnh->btnh", "btnh,nhd->btd"), computed
    as one 2-D matrix product of [batch * length, in] and [in, out]: XLA's CPU backend runs the gradients of
    the 3-D einsum ~1.4x slower than the same product in 2-D (benchmarks/vs_torch.py, docs/performance.md)."""
    lead, inner = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
    if w.shape[:contract] != inner:
        raise ValueError(f"_project: x {x.shape} and w {w.shape} do not share {contract} axes")
    size = math.prod(inner)
    y = x.reshape(-1, size) @ w.reshape(size, -1)
    return y.reshape(*lead, *w.shape[contract:])


def residual_dropout_rates(n_layers: int, p_max: float) -> np.ndarray:
    """LIMA's per-layer rates: 0 at the first layer rising linearly to p_max at the last."""
    if n_layers == 1:
        return np.zeros((1,), np.float32)
    return (p_max * np.arange(n_layers) / (n_layers - 1)).astype(np.float32)


def residual_dropout(x: Array, rate: Array, rng: Array | None) -> Array:
    """Inverted dropout with a traced rate (each scanned layer has its own); identity when rng is None."""
    if rng is None:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, x.shape)
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


def rope_frequencies(head_dim: int, cfg: ModelConfig) -> Array:
    """RoPE's inverse frequencies [head_dim / 2], float32: theta^(-2i / head_dim), rescaled as LLaMA-3.1/3.2 do
    when `cfg.rope_type` is "llama3" (`llama3_scaled_frequencies`; docs/model.md)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if cfg.rope_type == "default":
        return inv_freq
    return llama3_scaled_frequencies(inv_freq, cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
                                     cfg.rope_high_freq_factor, cfg.rope_original_max_seq_len)


def llama3_scaled_frequencies(inv_freq: Array, factor: float, low_freq_factor: float, high_freq_factor: float,
                              original_max_seq_len: int) -> Array:
    """LLaMA-3.1's RoPE scaling, as Meta's `apply_scaling` and transformers' `_compute_llama3_parameters`
    compute it (float32, same operations): a frequency whose wavelength 2 pi / f is longer than
    original_max_seq_len / low_freq_factor is divided by `factor` (stretched to the longer context), one shorter
    than original_max_seq_len / high_freq_factor is kept, and between the two the frequency blends linearly in
    original_max_seq_len / wavelength from f / factor to f."""
    low_freq_wavelen = original_max_seq_len / low_freq_factor
    high_freq_wavelen = original_max_seq_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    stretched = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_seq_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(medium, blended, stretched)


def apply_rope(x: Array, positions: Array, cfg: ModelConfig) -> Array:
    """Rotary embedding of `cfg` (rope_theta, rope_type), rotate-half layout. x: [batch, length, heads,
    head_dim]; positions: [batch, length]."""
    head_dim = x.shape[-1]
    angles = positions[:, :, None].astype(jnp.float32) * rope_frequencies(head_dim, cfg)  # [b, t, d/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig,
           init=_init) -> Array:
    """A parameter stored in `param_dtype`, annotated with logical axes, returned in `compute_dtype`."""
    value = module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.dtype(cfg.param_dtype))
    return value.astype(cfg.compute_dtype)


def _constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, "scale", (self.cfg.dim,), ("norm",), self.cfg, nn.initializers.ones)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return normed.astype(self.cfg.compute_dtype) * scale


class Attention(nn.Module):
    """Multi-head attention with grouped-query KV heads (n_kv_heads <= n_heads) and RoPE."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, positions: Array, kv_cache: dict | None = None,
                 layer: Array | None = None):
        cfg = self.cfg
        hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        wq = _param(self, "wq", (cfg.dim, nh, hd), ("embed", "heads", "kv"), cfg)
        wk = _param(self, "wk", (cfg.dim, nkv, hd), ("embed", "kv_heads", "kv"), cfg)
        wv = _param(self, "wv", (cfg.dim, nkv, hd), ("embed", "kv_heads", "kv"), cfg)
        wo = _param(self, "wo", (nh, hd, cfg.dim), ("heads", "kv", "embed"), cfg)

        q = _constrain(_project(x, wq), ("batch", "length", "heads", "kv"))
        k = _constrain(_project(x, wk), ("batch", "length", "kv_heads", "kv"))
        v = _constrain(_project(x, wv), ("batch", "length", "kv_heads", "kv"))
        q = apply_rope(q, positions, cfg)
        k = apply_rope(k, positions, cfg)

        if kv_cache is None:  # training / scoring: the kernel chosen by model.attention
            out, new_cache = attend(cfg.attention, q, k, v, segment_ids, cfg.attention_block), None
        else:  # decoding: write this step's keys/values at `index`, attend to everything written so far
            k, v, mask, new_cache = _update_kv_cache(kv_cache, layer, k, v, segment_ids)
            out = grouped_query_attention(q, k, v, mask)
        out = _constrain(out, ("batch", "length", "heads", "kv"))
        out = _project(checkpoint_name(out, ATTENTION_OUT), wo, 2)
        return _constrain(out, ("batch", "length", "embed")), new_cache


def _update_kv_cache(cache: dict, layer: Array, k: Array, v: Array, segment_ids: Array):
    """Writes layer `layer`'s k/v for the new tokens at cache["index"][layer] (per row) into the stacked
    cache of all layers; returns this layer's keys, values and mask, and the updated stack.

    Each row has its own write index, so rows of different lengths share one cache: a row's tokens sit in
    slots [0, index) exactly as they sit in a training row, and a query attends to the filled slots at or
    before its own slot that carry its segment (segment 0 = padding or never written). The caller must keep
    index + t <= cache length (writes past the end are dropped). The stack travels in the layer scan's carry,
    never as a scanned input/output: XLA then scatters into it in place instead of copying every layer's
    cache once per decoded token (10x slower decoding at a few hundred cached tokens).
    """
    index = cache["index"][layer]  # [b]: number of tokens already in the cache per row
    b, t = k.shape[:2]
    rows = jnp.arange(b)[:, None]
    slots = index[:, None] + jnp.arange(t)[None, :]
    new_cache = {"k": cache["k"].at[layer, rows, slots].set(k.astype(cache["k"].dtype), mode="drop"),
                 "v": cache["v"].at[layer, rows, slots].set(v.astype(cache["v"].dtype), mode="drop"),
                 "segment_ids": cache["segment_ids"].at[layer, rows, slots].set(
                     segment_ids.astype(cache["segment_ids"].dtype), mode="drop"),
                 "index": cache["index"].at[layer].add(t)}
    cache_axes = ("batch", "length", "kv_heads", "kv")
    k_all = _constrain(new_cache["k"][layer], cache_axes)
    v_all = _constrain(new_cache["v"][layer], cache_axes)
    seg_all = new_cache["segment_ids"][layer]
    key_pos = jnp.arange(seg_all.shape[1])[None, None, :]
    mask = (key_pos <= slots[:, :, None]) & (seg_all[:, None, :] == segment_ids[:, :, None]) & (seg_all[:, None, :] != 0)
    return k_all.astype(k.dtype), v_all.astype(v.dtype), mask[:, None], new_cache


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        w1 = _param(self, "w1", (cfg.dim, cfg.hidden_dim), ("embed", "mlp"), cfg)
        w3 = _param(self, "w3", (cfg.dim, cfg.hidden_dim), ("embed", "mlp"), cfg)
        w2 = _param(self, "w2", (cfg.hidden_dim, cfg.dim), ("mlp", "embed"), cfg)
        gate = jax.nn.silu(_project(x, w1)) * _project(x, w3)
        gate = _constrain(gate, ("batch", "length", "mlp"))
        return _constrain(_project(gate, w2), ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
    """One pre-norm transformer layer with LIMA's residual dropout on both branches."""

    cfg: ModelConfig
    deterministic: bool

    @nn.compact
    def __call__(self, carry: tuple[Array, dict | None], dropout_rate: Array, segment_ids: Array,
                 positions: Array, layer: Array):
        x, kv_cache = carry  # the KV cache of all layers (or None), see `_update_kv_cache`
        drop_rng = None if self.deterministic else self.make_rng("dropout")
        attn_rng, mlp_rng = jax.random.split(drop_rng) if drop_rng is not None else (None, None)
        attn_out, new_cache = Attention(self.cfg, name="attention")(
            RMSNorm(self.cfg, name="attention_norm")(x), segment_ids, positions, kv_cache, layer)
        x = x + residual_dropout(attn_out, dropout_rate, attn_rng)
        mlp_out = MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x))
        x = x + residual_dropout(mlp_out, dropout_rate, mlp_rng)
        return (_constrain(x, ("batch", "length", "embed")), new_cache), None


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "attention_out": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
}


def _layer_class(cfg: ModelConfig):
    if cfg.remat_policy == "none":
        return DecoderLayer
    policy = _REMAT_POLICIES.get(cfg.remat_policy)
    if policy is None:
        raise ValueError(f"model.remat_policy={cfg.remat_policy!r}: not one of {sorted(_REMAT_POLICIES)} or 'none'")
    return nn.remat(DecoderLayer, policy=policy, prevent_cse=False)


def layer_unroll(cfg: ModelConfig, backend: str | None = None) -> int:
    """Layers per iteration of the layer scan: `cfg.scan_unroll`, or for 0 all of them on the CPU (XLA's CPU
    backend spends ~10% of a step filling and copying the scan's stacked residual buffers) and 1 elsewhere."""
    if cfg.scan_unroll:
        return min(cfg.scan_unroll, cfg.n_layers)
    return cfg.n_layers if (backend or jax.default_backend()) == "cpu" else 1


def for_platform(cfg: ModelConfig, platform: str) -> ModelConfig:
    """`cfg` with its automatic (0) speed settings fixed for `platform`, for a step compiled ahead of time for
    devices other than JAX's default backend (a TPU topology from a CPU host): `scan_unroll` by `layer_unroll`,
    and off the CPU the "blocked" kernel's `attention_block` at its fixed size."""
    block = cfg.attention_block or (0 if platform == "cpu" else default_block_size(0, platform))
    return dataclasses.replace(cfg, scan_unroll=layer_unroll(cfg, platform), attention_block=block)


def lm_logits(x: Array, head: Array, cfg: ModelConfig) -> Array:
    """float32 logits [batch, length, padded_vocab] of final hidden states x [batch, length, dim] under the LM
    head [dim, padded_vocab]; the padding columns (ids >= vocab_size) are -inf, so softmax gives them exactly 0
    (no loss, no gradient, never sampled)."""
    logits = _project(x, head).astype(jnp.float32)
    if cfg.padded_vocab_size > cfg.vocab_size:
        logits = jnp.where(jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size, logits, -jnp.inf)
    return _constrain(logits, ("batch", "length", "vocab"))


class Llama(nn.Module):
    """The LLaMA decoder. `__call__` returns float32 logits [batch, length, padded_vocab] (see `lm_logits`) and
    the new KV cache; with `return_hidden` the final-normed hidden states [batch, length, dim] and the LM head
    [dim, padded_vocab] instead of the logits, for a loss that applies the head chunk by chunk (`lima_jax.loss`)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens: Array, segment_ids: Array | None = None, positions: Array | None = None,
                 deterministic: bool = True, kv_cache: dict | None = None, return_hidden: bool = False):
        cfg = self.cfg
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

        embedding = self.param("embedding", nn.with_logical_partitioning(_init, ("vocab", "embed")),
                               (cfg.padded_vocab_size, cfg.dim), jnp.dtype(cfg.param_dtype))
        x = jnp.take(embedding, tokens, axis=0).astype(cfg.compute_dtype)
        x = _constrain(x, ("batch", "length", "embed"))

        rates = jnp.asarray(residual_dropout_rates(cfg.n_layers, cfg.residual_dropout_max))
        no_dropout = deterministic or cfg.residual_dropout_max == 0  # no masks drawn at rate 0 everywhere
        layers = nn.scan(
            functools.partial(_layer_class(cfg), cfg, no_dropout),
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, 0),
            length=cfg.n_layers,
            unroll=layer_unroll(cfg),
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        (x, new_cache), _ = layers(name="layers")((x, kv_cache), rates, segment_ids, positions,
                                                  jnp.arange(cfg.n_layers))

        x = RMSNorm(cfg, name="final_norm")(x)
        if cfg.tie_embeddings:
            head = embedding.astype(cfg.compute_dtype).T
        else:
            head = _param(self, "lm_head", (cfg.dim, cfg.padded_vocab_size), ("embed", "vocab"), cfg)
        if return_hidden:
            return (x, head), new_cache
        return lm_logits(x, head, cfg), new_cache


KV_CACHE_AXES = {"k": ("layers", "batch", "length", "kv_heads", "kv"),
                 "v": ("layers", "batch", "length", "kv_heads", "kv"),
                 "segment_ids": ("layers", "batch", "length"), "index": ("layers", "batch")}


def init_kv_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
    """An empty per-layer KV cache (leading axis = layer, carried through the layer scan); logical axes in
    `KV_CACHE_AXES`. `index[l, b]` is the number of slots of row b already written."""
    shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
    return {
        "k": jnp.zeros(shape, cfg.compute_dtype),
        "v": jnp.zeros(shape, cfg.compute_dtype),
        "segment_ids": jnp.zeros((cfg.n_layers, batch, length), jnp.int32),
        "index": jnp.zeros((cfg.n_layers, batch), jnp.int32),
    }


def resize_vocab(params: dict, new_vocab_size: int, old_vocab_size: int | None = None,
                padded_size: int | None = None, copy_row: int | None = None) -> dict:
    """Grows embedding (and LM head) from `old_vocab_size` real rows (default: all rows) to `new_vocab_size`;
    new rows are the mean of the real rows, or copies of row `copy_row`. Rows past the real ones (a
    checkpoint's vocabulary padding) are dropped first, and with `padded_size` zero rows are appended up to
    it (padding: never looked up, its logits masked).

    Used when the EOT token is added to a pretrained vocabulary: a mean row starts the new token at the
    centre of the embedding space (a neutral prediction) instead of at a random point; a copy of the token
    that ended documents in pretraining starts it predicted where a text would end.
    """
    params = dict(params)
    old = params["embedding"].shape[0] if old_vocab_size is None else old_vocab_size
    if new_vocab_size < old:
        raise ValueError(f"cannot shrink vocabulary from {old} to {new_vocab_size}")
    padded = new_vocab_size if padded_size is None else padded_size
    if padded < new_vocab_size:
        raise ValueError(f"padded size {padded} is below the vocabulary {new_vocab_size}")
    if copy_row is not None and not 0 <= copy_row < old:
        raise ValueError(f"row {copy_row} to copy is not one of the {old} existing rows")

    def grow(rows: Array) -> Array:  # [vocab, ...] -> [padded, ...]
        real = rows[:old]
        start = real.mean(0, keepdims=True) if copy_row is None else real[copy_row:copy_row + 1]
        new_rows = jnp.repeat(start, new_vocab_size - old, 0)
        zero_rows = jnp.zeros((padded - new_vocab_size, *rows.shape[1:]), rows.dtype)
        return jnp.concatenate([real, new_rows, zero_rows], 0)

    params["embedding"] = grow(params["embedding"])
    if "lm_head" in params:
        params["lm_head"] = grow(params["lm_head"].T).T
    return params


def strip_vocab_padding(params: dict, vocab_size: int) -> dict:
    """The parameters with embedding (and LM head) cut to the real `vocab_size` rows: for export, where the
    padding rows (`ModelConfig.vocab_multiple`) have no meaning."""
    params = dict(params)
    params["embedding"] = params["embedding"][:vocab_size]
    if "lm_head" in params:
        params["lm_head"] = params["lm_head"][:, :vocab_size]
    return params
