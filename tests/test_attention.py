"""Attention implementations against the reference formula: outputs and q/k/v gradients on packed rows.

Rows hold several segments, padding, lengths that are no block multiple, grouped-query heads. Tolerances:
float32 outputs and gradients within 2e-5 (max abs; values and gradients are O(1)); bfloat16 within 3e-2 of the
float32 reference (bfloat16 keeps 8 bits of mantissa, ~4e-3 relative per rounding, and the reference itself
rounds its scores to bfloat16). Padding queries (segment 0) are left out: their output never reaches the loss
and the implementations legitimately differ there.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lima_jax import attention
from lima_jax.config import ATTENTION_IMPLEMENTATIONS
from lima_jax.errors import ConfigError

F32_TOL = 2e-5
BF16_TOL = 3e-2


def packed_inputs(length=45, n_heads=4, n_kv_heads=2, head_dim=8, dtype=jnp.float32, seed=0):
    """Two rows: 3 segments + padding, and 2 segments + padding; q, k, v, segment ids, a cotangent that is 0
    at padding queries."""
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (2, length, n_heads, head_dim), jnp.float32)
    k = jax.random.normal(keys[1], (2, length, n_kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(keys[2], (2, length, n_kv_heads, head_dim), jnp.float32)
    seg = np.zeros((2, length), np.int32)
    seg[0, :11], seg[0, 11:30], seg[0, 30:length - 3] = 1, 2, 3
    seg[1, :21], seg[1, 21:length - 9] = 1, 2
    seg = jnp.asarray(seg)
    cotangent = jax.random.normal(keys[3], q.shape) * (seg != 0)[:, :, None, None]
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), seg, cotangent


def output_and_grads(fn, q, k, v, seg, cotangent):
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
    return (out, *vjp(cotangent.astype(out.dtype)))


def assert_close_on_real_tokens(results, expected, seg, tol):
    real = np.asarray(seg != 0)
    out, expected_out = (np.asarray(x, np.float32) for x in (results[0], expected[0]))
    np.testing.assert_allclose(out[real], expected_out[real], atol=tol, rtol=0)
    for name, got, want in zip("qkv", results[1:], expected[1:]):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=0,
                                   err_msg=f"d{name}")


@pytest.mark.parametrize("block_size", [16, 512])
def test_blocked_equals_reference_float32(block_size):
    q, k, v, seg, cot = packed_inputs()
    expected = output_and_grads(attention.reference_attention, q, k, v, seg, cot)
    got = output_and_grads(lambda *a: attention.blocked_attention(*a, block_size=block_size), q, k, v, seg, cot)
    assert_close_on_real_tokens(got, expected, seg, F32_TOL)
    assert float(jnp.abs(expected[2]).max()) > 0.1  # the comparison is not between zeros


def test_blocked_bfloat16_is_close_to_float32_reference():
    q, k, v, seg, cot = packed_inputs()
    expected = output_and_grads(attention.reference_attention, q, k, v, seg, cot)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = output_and_grads(lambda *a: attention.blocked_attention(*a, block_size=16), *bf16, seg, cot)
    assert all(x.dtype == jnp.bfloat16 for x in got)
    assert_close_on_real_tokens(got, expected, seg, BF16_TOL)
    reference_bf16 = output_and_grads(attention.reference_attention, *bf16, seg, cot)
    assert_close_on_real_tokens(reference_bf16, expected, seg, BF16_TOL)  # the tolerance fits the reference too


def test_blocked_isolates_segments_and_is_causal():
    """Changing a later token, or a token of another segment, leaves a query's output unchanged."""
    q, k, v, seg, _ = packed_inputs()
    out = attention.blocked_attention(q, k, v, seg, block_size=8)
    k2, v2 = k.at[0, 20].add(5.0), v.at[0, 20].add(5.0)  # row 0, segment 2
    out2 = attention.blocked_attention(q, k2, v2, seg, block_size=8)
    changed = np.abs(np.asarray(out2 - out)).max(axis=(2, 3))[0]
    assert changed[:20].max() == 0.0  # segment 1 and the earlier part of segment 2
    assert changed[20:30].min() > 0.0  # the rest of segment 2 sees it
    assert changed[30:].max() == 0.0  # segment 3 and padding


def test_blocked_skips_key_blocks_of_other_segments():
    """A row of one-block segments needs only the diagonal tiles; the result stays exact."""
    q, k, v, _, _ = packed_inputs(length=32)
    seg = jnp.asarray(np.repeat(np.arange(1, 5), 8)[None].repeat(2, 0))
    ranges = attention._segment_ranges(jnp.moveaxis(seg.reshape(2, 4, 8), 1, 0))
    needed = [bool(attention._tile_needed(ranges, i, j)) for i, j in zip(*attention._causal_block_pairs(4))]
    assert needed == [i == j for i, j in zip(*attention._causal_block_pairs(4))]
    np.testing.assert_allclose(attention.blocked_attention(q, k, v, seg, block_size=8),
                               attention.reference_attention(q, k, v, seg), atol=F32_TOL)


def test_blocked_backward_keeps_no_score_tiles():
    """The compiled gradient's temporaries grow linearly with the row length (the reference's grow
    quadratically): 4x the length gives < 6x the temporaries (the reference's: > 8x)."""
    def temp_bytes(fn, length):
        q, k, v, seg, cot = packed_inputs(length=length, head_dim=16)
        grad = jax.jit(lambda q, k, v: jax.vjp(lambda *a: fn(*a, seg), q, k, v)[1](cot))
        return grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    blocked = lambda *a: attention.blocked_attention(*a, block_size=32)
    assert temp_bytes(blocked, 512) < 6 * temp_bytes(blocked, 128)
    assert temp_bytes(attention.reference_attention, 512) > 8 * temp_bytes(attention.reference_attention, 128)


def test_blocked_keeps_no_score_tiles_inside_a_differentiated_layer_scan():
    """As the model runs it: the kernel inside a scan over layers that share the segment ids. JAX's
    loop-invariant hoisting must not precompute every tile's mask for all layers ([tiles, b, kv, g, block,
    block], quadratic): 2x the row length gives < 2.5x the temporaries (with the hoisted masks: 3.3x)."""
    def temp_bytes(length):
        q, k, v, seg, _ = packed_inputs(length=length, head_dim=16)

        def loss(q, k, v):
            def layer(x, _):
                return attention.blocked_attention(x, k, v, seg, block_size=64), None
            return jnp.sum(jax.lax.scan(layer, q, None, length=2)[0] ** 2)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(1024) < 2.5 * temp_bytes(512)


@pytest.mark.parametrize("name", ["triton", "splash"])
def test_pallas_kernels_in_interpret_mode_equal_reference(name):
    """The GPU Triton and TPU splash kernels, run by Pallas' interpreter on CPU (slow: small shapes)."""
    q, k, v, seg, cot = packed_inputs(length=70, n_heads=2, n_kv_heads=1, head_dim=16)
    fn = {"triton": attention.triton_attention, "splash": attention.splash_attention}[name]
    got = output_and_grads(lambda *a: fn(*a, interpret=True), q, k, v, seg, cot)
    expected = output_and_grads(attention.reference_attention, q, k, v, seg, cot)
    assert_close_on_real_tokens(got, expected, seg, 1e-4)


def test_cudnn_segments_are_lengths_and_offsets_of_each_packed_example():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    seqlen, offsets = attention.cudnn_segments(seg)
    np.testing.assert_array_equal(seqlen, [[3, 2, -1, -1, -1, -1], [6, -1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(offsets, [[0, 3, -1, -1, -1, -1, -1], [0, -1, -1, -1, -1, -1, -1]])


def test_segment_start_gives_each_query_its_first_key():
    """The tokamax mask (keys from the segment start, causal) is the reference mask on real tokens."""
    _, _, _, seg, _ = packed_inputs()
    start = np.asarray(attention._segment_start(seg))
    length = seg.shape[1]
    mask = (np.arange(length)[None, None, :] >= start[:, :, None]) & np.tri(length, dtype=bool)[None]
    real = np.asarray(seg != 0)
    np.testing.assert_array_equal(mask[real], np.asarray(attention.attention_mask(seg))[:, 0][real])


def test_implementation_names_match_the_config():
    assert set(attention.IMPLEMENTATIONS) == set(ATTENTION_IMPLEMENTATIONS)


@pytest.mark.parametrize("name,backend", [("cudnn", "cpu"), ("triton", "tpu"), ("tokamax", "cpu"),
                                          ("splash", "gpu"), ("flash", "cpu")])
def test_kernel_on_a_backend_without_it_is_a_config_error(name, backend):
    with pytest.raises(ConfigError, match=f"model.attention={name!r}"):
        attention.check_backend(name, backend)
    attention.check_backend("blocked", backend)


def test_accelerator_kernel_on_cpu_fails_at_trace_with_a_config_error():
    q, k, v, seg, _ = packed_inputs()
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU backend")
    with pytest.raises(ConfigError, match="use model.attention='blocked'"):
        jax.jit(lambda *a: attention.attend("cudnn", *a)).lower(q, k, v, seg)


def test_train_step_loss_and_gradients_blocked_equal_reference():
    """The toy model's loss and parameter gradients on a packed batch, "blocked" against "reference"."""
    import dataclasses

    import flax.linen as nn

    from lima_jax.config import ModelConfig
    from lima_jax.model import Llama
    from lima_jax.train_step import loss_sums

    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64,
                      attention="reference")
    _, _, _, seg, _ = packed_inputs(length=45)
    positions = jnp.arange(seg.shape[1]) - attention._segment_start(seg)  # restart at 0 in each segment
    tokens = jax.random.randint(jax.random.key(3), seg.shape, 0, cfg.vocab_size)
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1), "weights": (seg != 0).astype(jnp.float32),
             "segment_ids": seg, "positions": positions}
    params = nn.meta.unbox(Llama(cfg).init(jax.random.key(0), tokens[:1])["params"])

    def loss_and_grads(name):
        model = Llama(dataclasses.replace(cfg, attention=name))
        return jax.jit(jax.value_and_grad(lambda p: loss_sums(p, model, batch, None, True)[0] / 45.0))(params)

    ref_loss, ref_grads = loss_and_grads("reference")
    loss, grads = loss_and_grads("blocked")
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    for path, got, want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads),
                               jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4, err_msg=jax.tree_util.keystr(path[0]))


def test_default_block_size_by_backend_and_row_length():
    """Off the CPU the fixed BLOCK_SIZE; on the CPU one block for short rows, else the power of two nearest a
    row's eighth within CPU_BLOCK_RANGE."""
    assert attention.default_block_size(2048, "tpu") == attention.default_block_size(100, "gpu") == attention.BLOCK_SIZE
    assert [attention.default_block_size(t, "cpu") for t in (100, 128, 512, 1024, 2048, 8192)] == [
        104, 128, 64, 128, 256, 256]


def test_blocked_default_block_equals_reference_on_packed_rows():
    """The CPU default (several 64-token blocks at 512 tokens) against the reference, packed rows with padding."""
    q, k, v, seg, cot = packed_inputs(length=512)
    got = output_and_grads(attention.blocked_attention, q, k, v, seg, cot)
    want = output_and_grads(attention.reference_attention, q, k, v, seg, cot)
    assert_close_on_real_tokens(got, want, seg, F32_TOL)
