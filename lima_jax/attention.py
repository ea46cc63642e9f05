"""Causal self-attention over packed rows, in several implementations chosen by `model.attention`.

Every implementation computes the same thing: query token i of a row attends to key token j of that row when
j <= i, both carry the same segment id and that id is not 0 (padding), with grouped-query heads (each KV head
serves n_heads / n_kv_heads query heads) and softmax scale 1/sqrt(head_dim). Packed rows lay each example out
contiguously (segment ids 1, 2, ... then 0 for padding, `lima_jax.data.packing`); the fused kernels rely on it.

* "reference": the plain formula, materializing the [batch, kv_heads, group, query, key] float32 scores and a
  boolean mask. Quadratic memory; the yardstick the others are tested against, and the decode path.
* "blocked" (the portable default): flash-style attention in plain JAX/XLA. Queries and keys are cut into
  blocks; an online softmax (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022) visits only the key
  blocks at or below the diagonal and skips a block whose segments cannot meet. The backward pass is a
  `jax.custom_vjp` that recomputes each score tile from the saved log-sum-exp (the FlashAttention-2 backward),
  so neither pass keeps a tile: memory grows linearly with the row length. Runs on every backend.
* "cudnn" (NVIDIA Hopper or later): cuDNN's fused flash attention through JAX's cuDNN binding, with the
  packed rows given as per-segment lengths and offsets (cuDNN's ragged "THD" layout) and a causal mask, so
  no mask array exists.
* "triton" (GPU): the Pallas Triton flash-attention kernel of `jax.experimental.pallas.ops.gpu`, which takes
  segment ids and a causal flag (it has no GQA: KV heads are repeated).
* "splash" (TPU): the Pallas splash-attention kernel with segment ids and a causal mask, one MQA kernel per
  KV head.
* "tokamax" (GPU): the `tokamax` package's flash attention (its Triton or Mosaic GPU kernels) with the mask
  given as each query's segment start and a causal flag, so no mask array exists.

A kernel asked for on a backend that lacks it raises ConfigError when the model is traced.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lima_jax.errors import ConfigError

Array = jax.Array
BLOCK_SIZE = 512  # "blocked" off the CPU: query and key block length (rows shorter than this use one block)
# "blocked" on the CPU: blocks of about a row's eighth, within these bounds (one block up to the smallest). Tiles
# that stay in cache against the scan's per-tile cost: at 512-token rows 64 is fastest (152 ms forward and
# backward for 8 x 512 x 8 heads, against 203 at 128 and 278 at 512), at 2,048 and 4,096 256 is (docs/performance.md).
CPU_BLOCK_RANGE = (64, 256)
_NEG = -1e30  # finite "minus infinity": a fully masked row gives exp(_NEG - _NEG) = 1, zeroed by the mask


# ----------------------------------------------------------------------------------------------- reference
def attention_mask(segment_ids: Array) -> Array:
    """[batch, 1, q, k] boolean: causal, same segment, and never to padding (segment 0)."""
    length = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    not_pad = (segment_ids != 0)[:, None, :]
    return (causal[None] & same_segment & not_pad)[:, None]


def grouped_query_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """softmax(q k^T / sqrt(d)) v with each KV head shared by n_heads / n_kv_heads query heads.

    q: [b, t, n_heads, d]; k, v: [b, s, n_kv_heads, d]; mask: [b, 1, t, s] (True = may attend).
    """
    b, t, nh, d = q.shape
    nkv = k.shape[2]
    q = q.reshape(b, t, nkv, nh // nkv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / np.sqrt(d)
    big_negative = jnp.finfo(jnp.float32).min  # finite, so fully masked (padding) rows give no NaN
    scores = jnp.where(mask[:, :, None], scores, big_negative)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, nh, d)


def reference_attention(q: Array, k: Array, v: Array, segment_ids: Array) -> Array:
    """The plain formula with the full mask (see the module docstring)."""
    return grouped_query_attention(q, k, v, attention_mask(segment_ids))


# ------------------------------------------------------------------------------------------------- blocked
def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_length(x: Array, length: int) -> Array:
    """x padded with zeros along axis 1 (the token axis) to `length`."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad)


def _causal_block_pairs(n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """(query block, key block) index pairs on or below the diagonal, row by row."""
    qi, kj = np.tril_indices(n_blocks)
    return qi.astype(np.int32), kj.astype(np.int32)


def _segment_ranges(seg_blocks: Array) -> tuple[Array, Array]:
    """Per block and row, the smallest and largest non-padding segment id ([n, b] each); an all-padding
    block gets an empty range (min > max)."""
    real = seg_blocks != 0
    lo = jnp.min(jnp.where(real, seg_blocks, jnp.iinfo(jnp.int32).max), axis=-1)
    hi = jnp.max(jnp.where(real, seg_blocks, 0), axis=-1)
    return lo, hi


def _tile_needed(ranges: tuple[Array, Array], i: Array, j: Array) -> Array:
    """Whether some row of query block i can attend into key block j (their segment ranges meet)."""
    lo, hi = ranges
    return jnp.any((lo[i] <= hi[j]) & (lo[j] <= hi[i]) & (lo[i] <= hi[i]) & (lo[j] <= hi[j]))


def _tile_scores(q: Array, k: Array, seg: Array, i: Array, j: Array, block: int,
                 scale: float) -> tuple[Array, Array]:
    """One tile (query block i, key block j): its mask [b, 1, 1, q, s] (causal by token index, same segment,
    key not padding) and its scaled scores [b, kv_heads, group, q, s] in float32, masked entries at _NEG."""
    q_index = i * block + jnp.arange(block)
    k_index = j * block + jnp.arange(block)
    causal = k_index[None, :] <= q_index[:, None]
    allowed = causal[None] & (seg[i][:, :, None] == seg[j][:, None, :]) & (seg[j] != 0)[:, None, :]
    mask = allowed[:, None, None]
    scores = jnp.einsum("bkgqd,bksd->bkgqs", q[i], k[j], preferred_element_type=jnp.float32) * scale
    return mask, jnp.where(mask, scores, _NEG)


def _blocked_forward(q: Array, k: Array, v: Array, seg: Array, block: int) -> tuple[Array, Array]:
    """Blocked attention on block-major, head-major inputs (each tile's products are then plain batched
    matrix products over [batch, kv_heads], with no transpose: 2x faster on XLA's CPU backend).

    q: [n, b, kv_heads, group, block, d]; k, v: [n, b, kv_heads, block, d]; seg: [n, b, block].
    Returns the output (q's shape and dtype) and the log-sum-exp [n, b, kv_heads, group, block] (float32).
    """
    n, d = q.shape[0], q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    ranges = _segment_ranges(seg)
    acc = jnp.zeros(q.shape, jnp.float32)
    row_max = jnp.full(q.shape[:-1], _NEG, jnp.float32)
    row_sum = jnp.zeros(q.shape[:-1], jnp.float32)

    def visit(carry, ij):
        acc, row_max, row_sum = carry
        i, j = ij

        def update(state):
            o_i, m_i, l_i = state
            mask, s = _tile_scores(q, k, seg, i, j, block, scale)
            m_new = jnp.maximum(m_i, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None]) * mask
            alpha = jnp.exp(m_i - m_new)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), v[j], preferred_element_type=jnp.float32)
            return o_i * alpha[..., None] + pv, m_new, l_i * alpha + p.sum(axis=-1)

        state = (acc[i], row_max[i], row_sum[i])
        o_i, m_i, l_i = jax.lax.cond(_tile_needed(ranges, i, j), update, lambda s: s, state)
        return (acc.at[i].set(o_i), row_max.at[i].set(m_i), row_sum.at[i].set(l_i)), None

    (acc, row_max, row_sum), _ = jax.lax.scan(visit, (acc, row_max, row_sum), _causal_block_pairs(n))
    has_keys = row_sum > 0  # False for padding queries: their output is 0 (the reference averages instead)
    out = jnp.where(has_keys[..., None], acc / jnp.where(has_keys, row_sum, 1.0)[..., None], 0.0)
    lse = jnp.where(has_keys, row_max + jnp.log(jnp.where(has_keys, row_sum, 1.0)), -_NEG)
    return out.astype(q.dtype), lse


def _blocked_backward(q: Array, k: Array, v: Array, seg: Array, out: Array, lse: Array, d_out: Array,
                      block: int) -> tuple[Array, Array, Array]:
    """FlashAttention-2 backward on block-major inputs: each tile's probabilities are recomputed from the
    log-sum-exp, and dq, dk, dv accumulate tile by tile (float32)."""
    n, d = q.shape[0], q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    ranges = _segment_ranges(seg)
    delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)  # [n, b, kv, g, q]
    dq = jnp.zeros(q.shape, jnp.float32)
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)

    def visit(carry, ij):
        dq, dk, dv = carry
        i, j = ij

        def update(state):
            dq_i, dk_j, dv_j = state
            mask, s = _tile_scores(q, k, seg, i, j, block, scale)
            p = jnp.exp(s - lse[i][..., None]) * mask
            do_i = d_out[i]
            dv_j = dv_j + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(do_i.dtype), do_i,
                                     preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqd,bksd->bkgqs", do_i, v[j], preferred_element_type=jnp.float32)
            ds = (p * (dp - delta[i][..., None]) * scale).astype(q.dtype)
            dq_i = dq_i + jnp.einsum("bkgqs,bksd->bkgqd", ds, k[j], preferred_element_type=jnp.float32)
            dk_j = dk_j + jnp.einsum("bkgqs,bkgqd->bksd", ds, q[i], preferred_element_type=jnp.float32)
            return dq_i, dk_j, dv_j

        state = (dq[i], dk[j], dv[j])
        dq_i, dk_j, dv_j = jax.lax.cond(_tile_needed(ranges, i, j), update, lambda s: s, state)
        return (dq.at[i].set(dq_i), dk.at[j].set(dk_j), dv.at[j].set(dv_j)), None

    (dq, dk, dv), _ = jax.lax.scan(visit, (dq, dk, dv), _causal_block_pairs(n))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_core(q: Array, k: Array, v: Array, seg: Array, block: int) -> Array:
    return _blocked_forward(q, k, v, seg, block)[0]


def _blocked_core_fwd(q, k, v, seg, block):
    out, lse = _blocked_forward(q, k, v, seg, block)
    return out, (q, k, v, seg, out, lse)


def _blocked_core_bwd(block, residuals, d_out):
    q, k, v, seg, out, lse = residuals
    dq, dk, dv = _blocked_backward(q, k, v, seg, out, lse, d_out, block)
    return dq, dk, dv, None


_blocked_core.defvjp(_blocked_core_fwd, _blocked_core_bwd)


def default_block_size(length: int, backend: str | None = None) -> int:
    """The "blocked" kernel's block length for rows of `length` tokens when `model.attention_block` is 0: on the
    CPU the power of two nearest length / 8 within CPU_BLOCK_RANGE (a row up to the smallest is one block),
    elsewhere BLOCK_SIZE."""
    if (backend or jax.default_backend()) != "cpu":
        return BLOCK_SIZE
    smallest, largest = CPU_BLOCK_RANGE
    if length <= 2 * smallest:
        return _round_up(length, 8)
    return int(np.clip(2 ** round(math.log2(length / 8)), smallest, largest))


def blocked_attention(q: Array, k: Array, v: Array, segment_ids: Array, block_size: int = 0) -> Array:
    """Flash-style attention in plain XLA (see the module docstring); same contract as `reference_attention`
    except that padding queries (segment 0) get 0 instead of an average. Memory is linear in the row length.
    `block_size` 0: `default_block_size`."""
    b, t, nh, d = q.shape
    nkv = k.shape[2]
    # Inside the model's differentiated layer scan the segment ids are the same for every layer, so JAX's
    # loop-invariant hoisting (scan linearization) would precompute every tile's mask for all layers at once,
    # stacked: [tiles, b, kv, g, block, block], quadratic in the row length. Tied to this layer's queries they
    # vary with the layer, and each tile's mask is made inside the tile loop.
    q, segment_ids = jax.lax.optimization_barrier((q, segment_ids))
    block = min(block_size or default_block_size(t), _round_up(t, 8))
    padded = _round_up(t, block)
    n = padded // block

    def blocks(x: Array) -> Array:  # [b, t, ...] -> [n, b, block, ...]
        x = _pad_length(x, padded)
        x = x.reshape(b, n, block, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    qb = jnp.moveaxis(blocks(q.reshape(b, t, nkv, nh // nkv, d)), 2, 4)  # [n, b, kv, g, block, d]
    kb, vb = (jnp.moveaxis(blocks(x), 2, 3) for x in (k, v))  # [n, b, kv, block, d]
    out = _blocked_core(qb, kb, vb, blocks(segment_ids.astype(jnp.int32)), block)
    out = jnp.moveaxis(out, 4, 2).reshape(n, b, block, nh, d)
    return jnp.moveaxis(out, 0, 1).reshape(b, padded, nh, d)[:, :t]


# ------------------------------------------------------------------------------------ accelerator kernels
def _kernel_segment_ids(segment_ids: Array) -> Array:
    """Segment ids for kernels that only compare ids: each padding token gets an id of its own (negative),
    so it matches no real token and still has one key (itself), which keeps every softmax row non-empty."""
    seg = segment_ids.astype(jnp.int32)
    own = -1 - jnp.arange(seg.shape[1], dtype=jnp.int32)[None, :]
    return jnp.where(seg == 0, own, seg)


def _segment_start(segment_ids: Array) -> Array:
    """[b, t]: index of the first token of each token's segment (a padding token: its own index)."""
    seg = _kernel_segment_ids(segment_ids)
    index = jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32), seg.shape)
    starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


def triton_attention(q: Array, k: Array, v: Array, segment_ids: Array, interpret: bool = False) -> Array:
    """The Pallas Triton flash kernel (`jax.experimental.pallas.ops.gpu.attention.mha`) with segment ids."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

    b, t, nh, d = q.shape
    group = nh // k.shape[2]
    blocks = pallas_gpu.BlockSizes.get_default()
    padded = _round_up(t, max(blocks.block_q, blocks.block_k))
    pad_ids = _pad_length(segment_ids, padded)
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)  # the kernel has no GQA
    out = pallas_gpu.mha(_pad_length(q, padded), _pad_length(k, padded), _pad_length(v, padded),
                         _kernel_segment_ids(pad_ids), sm_scale=1.0 / math.sqrt(d), causal=True,
                         block_sizes=blocks, interpret=interpret)
    return out[:, :t]


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, interpret: bool = False) -> Array:
    """The Pallas TPU splash kernel with segment ids and a causal mask; one MQA kernel per KV head."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    b, t, nh, d = q.shape
    nkv = k.shape[2]
    group = nh // nkv
    padded = _round_up(t, 128)
    block = min(BLOCK_SIZE, padded)
    while padded % block:
        block //= 2
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((padded, padded))] * group)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
    seg = _kernel_segment_ids(_pad_length(segment_ids, padded))
    # [b, t, kv, g, d] -> [b, kv, g, t, d]; the kernel does not scale the scores
    qh = jnp.moveaxis(_pad_length(q, padded).reshape(b, padded, nkv, group, d), 1, 3) / math.sqrt(d)
    kh = jnp.moveaxis(_pad_length(k, padded), 1, 2)
    vh = jnp.moveaxis(_pad_length(v, padded), 1, 2)

    def one_row(q_row, k_row, v_row, seg_row):
        ids = splash.SegmentIds(q=seg_row, kv=seg_row)
        return jax.vmap(lambda qg, kg, vg: kernel(qg, kg, vg, segment_ids=ids))(q_row, k_row, v_row)

    out = jax.vmap(one_row)(qh.astype(q.dtype), kh, vh, seg)  # [b, kv, g, t, d]
    return jnp.moveaxis(out, 3, 1).reshape(b, padded, nh, d)[:, :t]


def cudnn_segments(segment_ids: Array) -> tuple[Array, Array]:
    """cuDNN's packed layout of rows of contiguous segments 1, 2, ... (0 = padding): (seqlen [b, t], the length
    of each segment, and offsets [b, t + 1], the index of its first token), unused entries -1. The static bound
    of t segments per row (every token its own example) keeps the shapes fixed."""
    seg = segment_ids.astype(jnp.int32)
    t = seg.shape[1]
    count = jax.vmap(lambda row: jax.ops.segment_sum(jnp.ones_like(row), row, num_segments=t + 1))(seg)[:, 1:]
    exists = count > 0
    starts = jnp.cumsum(count, axis=1) - count
    seqlen = jnp.where(exists, count, -1)
    offsets = jnp.concatenate([jnp.where(exists, starts, -1), jnp.full((seg.shape[0], 1), -1, jnp.int32)], axis=1)
    return seqlen, offsets


def cudnn_attention(q: Array, k: Array, v: Array, segment_ids: Array) -> Array:
    """cuDNN fused flash attention with the packed rows as per-segment lengths and offsets (ragged layout)
    and a causal mask. Needs an NVIDIA Hopper GPU or later and bfloat16/float16 inputs."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # the binding behind jax.nn's "cudnn"

    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ConfigError(f"model.attention='cudnn': cuDNN flash attention takes bfloat16 or float16, not "
                          f"{q.dtype}; set model.compute_dtype=bfloat16 or choose model.attention='blocked'")
    seqlen, offsets = cudnn_segments(segment_ids)
    return cudnn.dot_product_attention(q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets,
                                       kv_offsets=offsets, scale=1.0 / math.sqrt(q.shape[-1]),
                                       mask_type=cudnn.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")


def tokamax_attention(q: Array, k: Array, v: Array, segment_ids: Array) -> Array:
    """tokamax's flash attention (its fastest GPU kernel that accepts the shapes) with the mask given as
    each query's segment start and a causal flag."""
    try:
        from tokamax._src.ops.attention import api as tokamax_api
        from tokamax._src.ops.attention import base as tokamax_base
    except ImportError as e:
        raise ConfigError(f"model.attention='tokamax': the tokamax package is not importable ({e}); install "
                          "the tokamax extra (pip install -e .[tokamax]) or choose model.attention='blocked'") from None
    mask = tokamax_base.Mask(k_start=_segment_start(segment_ids)[:, None, :], is_causal=True)
    errors = []
    for name in ("mosaic_gpu", "triton"):
        implementation = tokamax_api.IMPLEMENTATIONS.get(name)
        if implementation is None:
            continue
        try:
            return implementation(q, k, v, bias=None, mask=mask, logits_scale=1.0 / math.sqrt(q.shape[-1]),
                                  precision=None, logits_soft_cap=None, q_sharding=None)
        except NotImplementedError as e:
            errors.append(f"{name}: {e}")
    raise ConfigError(f"model.attention='tokamax': no tokamax GPU kernel accepts these shapes "
                      f"({'; '.join(errors) or 'none installed'}); choose model.attention='blocked'")


# ---------------------------------------------------------------------------------------------- dispatch
AttentionFn = Callable[..., Array]  # (q, k, v, segment_ids) -> output
# name -> (function, the backends it runs on; None: every backend)
IMPLEMENTATIONS: dict[str, tuple[AttentionFn, tuple[str, ...] | None]] = {
    "reference": (reference_attention, None),
    "blocked": (blocked_attention, None),
    "cudnn": (cudnn_attention, ("gpu", "cuda")),
    "triton": (triton_attention, ("gpu", "cuda")),
    "splash": (splash_attention, ("tpu",)),
    "tokamax": (tokamax_attention, ("gpu", "cuda")),
}


def check_backend(implementation: str, backend: str | None = None) -> None:
    """Raises ConfigError naming `model.attention` when `implementation` is unknown or cannot run on
    `backend` (default: JAX's default backend)."""
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"model.attention={implementation!r}: must be one of {tuple(IMPLEMENTATIONS)}")
    platforms = IMPLEMENTATIONS[implementation][1]
    backend = backend or jax.default_backend()
    if platforms is not None and backend not in platforms:
        raise ConfigError(f"model.attention={implementation!r}: this kernel runs on {'/'.join(platforms)}, but "
                          f"JAX's backend here is {backend!r}; use model.attention='blocked' (every backend) "
                          "or run on that accelerator")


def attend(implementation: str, q: Array, k: Array, v: Array, segment_ids: Array, block_size: int = 0) -> Array:
    """Causal packed self-attention by the named implementation. q: [b, t, n_heads, d]; k, v:
    [b, t, n_kv_heads, d]; segment_ids: [b, t] (0 = padding). Returns [b, t, n_heads, d]; outputs at padding
    queries are unspecified (they never reach the loss). `block_size`: the "blocked" kernel's (0: its default)."""
    check_backend(implementation)
    if implementation == "blocked":
        return blocked_attention(q, k, v, segment_ids, block_size)
    return IMPLEMENTATIONS[implementation][0](q, k, v, segment_ids)
