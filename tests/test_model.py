"""The LLaMA model: shapes, causality, RoPE, grouped-query attention, LIMA residual dropout."""
import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lima_jax.config import ModelConfig
from lima_jax.errors import ConfigError
from lima_jax.model import (Llama, apply_rope, attention_mask, grouped_query_attention, residual_dropout,
                            residual_dropout_rates, resize_vocab, rope_frequencies)

CFG = ModelConfig(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, hidden_dim=48,
                  max_seq_len=64, residual_dropout_max=0.3)


def init(cfg: ModelConfig = CFG, length: int = 12):
    model = Llama(cfg)
    params = jax.tree.map(lambda x: x, model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32)))["params"]
    from flax.linen import meta
    return model, meta.unbox(params)


def tokens(batch=2, length=12, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, CFG.vocab_size)


def test_logits_shape_and_parameter_count():
    model, params = init()
    logits, cache = model.apply({"params": params}, tokens())
    assert logits.shape == (2, 12, CFG.vocab_size) and logits.dtype == jnp.float32
    assert cache is None
    assert sum(x.size for x in jax.tree.leaves(params)) == CFG.num_params()
    assert params["layers"]["attention"]["wq"].shape == (3, 32, 4, 8)  # stacked by the layer scan
    assert params["layers"]["attention"]["wk"].shape == (3, 32, 2, 8)


def test_tied_embeddings_have_no_lm_head():
    model, params = init(dataclasses.replace(CFG, tie_embeddings=True))
    assert "lm_head" not in params
    assert model.apply({"params": params}, tokens())[0].shape == (2, 12, CFG.vocab_size)


def test_causal_masking_future_tokens_do_not_change_past_logits():
    model, params = init()
    x = tokens()
    y = x.at[:, 7:].set((x[:, 7:] + 5) % CFG.vocab_size)
    a, _ = model.apply({"params": params}, x)
    b, _ = model.apply({"params": params}, y)
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-5)
    assert np.abs(np.asarray(a[:, 7:] - b[:, 7:])).max() > 1e-3


def test_segments_are_isolated_and_positions_restart():
    """Two examples packed in one row give the same logits as each alone."""
    model, params = init()
    first, second = tokens(1, 5, seed=2), tokens(1, 7, seed=3)
    packed = jnp.concatenate([first, second], axis=1)
    segment_ids = jnp.array([[1] * 5 + [2] * 7])
    positions = jnp.array([list(range(5)) + list(range(7))])
    packed_logits, _ = model.apply({"params": params}, packed, segment_ids, positions)
    alone_first, _ = model.apply({"params": params}, first)
    alone_second, _ = model.apply({"params": params}, second)
    np.testing.assert_allclose(packed_logits[:, :5], alone_first, atol=1e-5)
    np.testing.assert_allclose(packed_logits[:, 5:], alone_second, atol=1e-5)


def test_attention_mask_causal_same_segment_no_padding():
    mask = np.asarray(attention_mask(jnp.array([[1, 1, 2, 2, 0]])))[0, 0]
    expected = np.array([[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [0, 0, 1, 0, 0],
                         [0, 0, 1, 1, 0],
                         [0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(mask, expected)


def test_padding_rows_give_finite_logits():
    model, params = init()
    logits, _ = model.apply({"params": params}, tokens(), jnp.zeros((2, 12), jnp.int32))
    assert np.isfinite(np.asarray(logits)).all()


LLAMA31_ROPE = dict(rope_theta=500000.0, rope_type="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0, rope_original_max_seq_len=8192)


@pytest.mark.parametrize("rope", [{}, LLAMA31_ROPE], ids=["default", "llama3"])
def test_rope_depends_only_on_relative_position(rope):
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

    def score(m, n, theta=10000.0):
        cfg = dataclasses.replace(CFG, **{"rope_theta": theta, **rope})  # llama3: its own theta
        qm = apply_rope(q, jnp.array([[m]]), cfg)
        kn = apply_rope(k, jnp.array([[n]]), cfg)
        return float(jnp.sum(qm * kn))

    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5)
    assert score(100, 90) == pytest.approx(score(17, 7), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)
    assert score(5, 2, theta=500000.0) == pytest.approx(score(9, 6, theta=500000.0), abs=1e-5)  # LLaMA-3 theta
    cfg = dataclasses.replace(CFG, **rope)
    np.testing.assert_allclose(apply_rope(q, jnp.array([[0]]), cfg), q, atol=1e-7)  # position 0: identity
    norm = jnp.linalg.norm(apply_rope(q, jnp.array([[42]]), cfg))
    assert float(norm) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)  # a rotation


def test_llama3_rope_scaling_bands():
    """LLaMA-3.1's rule on a head of 128 (theta 500,000, factor 8, 1 / 4, original 8,192), against the formula
    in float64: wavelengths under 8192 / 4 keep their frequency, over 8192 / 1 are divided by 8, and between
    the frequency blends from f / 8 to f; the default RoPE is the unscaled frequencies."""
    plain = np.asarray(rope_frequencies(128, dataclasses.replace(CFG, rope_theta=500000.0)))
    scaled = np.asarray(rope_frequencies(128, dataclasses.replace(CFG, **LLAMA31_ROPE)))
    base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    np.testing.assert_allclose(plain, base, rtol=1e-6)
    wavelen = 2 * np.pi / base
    high, low, medium = wavelen < 2048, wavelen > 8192, (wavelen >= 2048) & (wavelen <= 8192)
    assert high.sum() and low.sum() and medium.sum()  # every band is exercised
    smooth = (8192 / wavelen - 1) / (4 - 1)
    expected = np.where(high, base, np.where(low, base / 8, (1 - smooth) * base / 8 + smooth * base))
    np.testing.assert_allclose(scaled, expected, rtol=1e-5)
    assert np.all(scaled[medium] < base[medium]) and np.all(scaled[medium] > base[medium] / 8)


@pytest.mark.parametrize("fields, message", [
    (dict(rope_type="yarn"), r"ModelConfig.rope_type='yarn': must be one of \('default', 'llama3'\)"),
    (dict(LLAMA31_ROPE, rope_scaling_factor=0.5), r"ModelConfig.rope_scaling_factor=0.5: must be a number >= 1"),
    (dict(LLAMA31_ROPE, rope_high_freq_factor=1.0), r"rope_high_freq_factor=1.0: must be a number > "
                                                    r"rope_low_freq_factor=1.0"),
    (dict(LLAMA31_ROPE, rope_original_max_seq_len=None), r"rope_original_max_seq_len=None: must be a positive int"),
    (dict(rope_scaling_factor=8.0), r"rope_scaling_factor=8.0: is only used with rope_type='llama3'"),
])
def test_bad_rope_settings_are_refused_by_model_config(fields, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(CFG, **fields)


def test_grouped_query_attention_equals_full_attention_with_repeated_kv():
    rng = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(rng[0], (2, 6, 8, 4))
    k = jax.random.normal(rng[1], (2, 6, 2, 4))
    v = jax.random.normal(rng[2], (2, 6, 2, 4))
    mask = attention_mask(jnp.ones((2, 6), jnp.int32))
    grouped = grouped_query_attention(q, k, v, mask)
    # full multi-head attention where query head h uses KV head h // 4
    full = grouped_query_attention(q, jnp.repeat(k, 4, axis=2), jnp.repeat(v, 4, axis=2), mask)
    np.testing.assert_allclose(grouped, full, atol=1e-6)
    # and against a direct per-head computation
    scores = jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, 4, axis=2)) / 2.0
    scores = jnp.where(mask, scores, -jnp.inf)
    direct = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, -1), jnp.repeat(v, 4, axis=2))
    np.testing.assert_allclose(grouped, direct, atol=1e-5)


def test_residual_dropout_rates_follow_lima_schedule():
    np.testing.assert_allclose(residual_dropout_rates(5, 0.3), [0.0, 0.075, 0.15, 0.225, 0.3], atol=1e-7)
    np.testing.assert_allclose(residual_dropout_rates(80, 0.3)[[0, 79]], [0.0, 0.3], atol=1e-7)
    assert residual_dropout_rates(80, 0.3)[39] == pytest.approx(0.3 * 39 / 79)
    np.testing.assert_array_equal(residual_dropout_rates(1, 0.3), [0.0])


def test_residual_dropout_drops_at_the_given_rate_and_rescales():
    x = jnp.ones((200, 500))
    y = np.asarray(residual_dropout(x, jnp.float32(0.3), jax.random.key(0)))
    assert np.mean(y == 0) == pytest.approx(0.3, abs=0.01)
    np.testing.assert_allclose(y[y != 0], 1 / 0.7, rtol=1e-6)
    assert np.mean(y) == pytest.approx(1.0, abs=0.01)
    np.testing.assert_array_equal(residual_dropout(x, jnp.float32(0.0), jax.random.key(0)), x)
    np.testing.assert_array_equal(residual_dropout(x, jnp.float32(0.3), None), x)


def test_dropout_is_identity_at_eval_and_active_in_training():
    model, params = init()
    x = tokens()
    eval_a, _ = model.apply({"params": params}, x, deterministic=True)
    no_dropout_model = Llama(dataclasses.replace(CFG, residual_dropout_max=0.0))
    train_no_dropout, _ = no_dropout_model.apply({"params": params}, x, deterministic=False,
                                                 rngs={"dropout": jax.random.key(5)})
    np.testing.assert_allclose(eval_a, train_no_dropout, atol=1e-5)  # p_max = 0: training == eval
    train_a, _ = model.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    train_b, _ = model.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert np.abs(np.asarray(train_a - eval_a)).max() > 1e-3
    assert np.abs(np.asarray(train_a - train_b)).max() > 1e-3


def test_dropout_rate_of_each_layer_is_applied(monkeypatch):
    """The scan hands layer l its own rate: record the rates the layers actually receive."""
    import lima_jax.model as model_module
    seen = []
    original = model_module.residual_dropout

    def spy(x, rate, rng):
        jax.debug.callback(lambda r: seen.append(float(r)), rate)
        return original(x, rate, rng)

    monkeypatch.setattr(model_module, "residual_dropout", spy)
    model, params = init()
    model.apply({"params": params}, tokens(), deterministic=False, rngs={"dropout": jax.random.key(0)})
    jax.effects_barrier()
    # each layer's rate reaches both of its residual branches, the same number of times for every layer
    counts = collections.Counter(round(r, 6) for r in seen)
    assert sorted(counts) == [0.0, 0.15, 0.3]
    assert len(set(counts.values())) == 1 and counts[0.0] % 2 == 0


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_does_not_change_results(policy):
    model, params = init()
    remat_model = Llama(dataclasses.replace(CFG, remat_policy=policy))
    x = tokens()

    def loss(p, m):
        return jnp.mean(m.apply({"params": p}, x)[0] ** 2)

    np.testing.assert_allclose(loss(params, model), loss(params, remat_model), rtol=1e-6)
    g1, g2 = jax.grad(loss)(params, model), jax.grad(loss)(params, remat_model)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("unroll", [1, 2, 3])
def test_scan_unroll_changes_neither_parameters_nor_results(unroll):
    """scan_unroll only changes how XLA loops over the layers: same parameter tree, same logits, gradients
    and dropout masks (each layer keeps its own rng), with or without a KV cache."""
    base = dataclasses.replace(CFG, scan_unroll=1)
    model, params = init(base)
    unrolled = Llama(dataclasses.replace(CFG, scan_unroll=unroll))
    _, unrolled_params = init(dataclasses.replace(CFG, scan_unroll=unroll))
    assert jax.tree.structure(params) == jax.tree.structure(unrolled_params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(unrolled_params)):
        np.testing.assert_array_equal(a, b)
    x = tokens()

    def loss(p, m):
        logits = m.apply({"params": p}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})[0]
        return jnp.mean(logits ** 2)

    np.testing.assert_allclose(loss(params, model), loss(params, unrolled), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(jax.grad(loss)(params, model)), jax.tree.leaves(jax.grad(loss)(params, unrolled))):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_layer_unroll_default_is_all_layers_on_cpu_one_elsewhere():
    from lima_jax.model import layer_unroll
    assert layer_unroll(CFG, "cpu") == CFG.n_layers
    assert layer_unroll(CFG, "tpu") == layer_unroll(CFG, "gpu") == 1
    assert layer_unroll(dataclasses.replace(CFG, scan_unroll=2), "cpu") == 2
    assert layer_unroll(dataclasses.replace(CFG, scan_unroll=9), "tpu") == CFG.n_layers


def test_for_platform_fixes_the_automatic_settings():
    from lima_jax.attention import BLOCK_SIZE
    from lima_jax.model import for_platform
    tpu = for_platform(CFG, "tpu")
    assert (tpu.scan_unroll, tpu.attention_block) == (1, BLOCK_SIZE)
    cpu = for_platform(CFG, "cpu")
    assert (cpu.scan_unroll, cpu.attention_block) == (CFG.n_layers, 0)  # the block still follows the row length
    assert for_platform(dataclasses.replace(CFG, attention_block=96), "tpu").attention_block == 96


def test_bfloat16_compute_keeps_float32_params():
    cfg = dataclasses.replace(CFG, compute_dtype="bfloat16")
    model, params = init(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits, _ = model.apply({"params": params}, tokens())
    full, _ = Llama(CFG).apply({"params": params}, tokens())
    assert logits.dtype == jnp.float32
    assert np.abs(np.asarray(logits - full)).max() < 0.1


def test_resize_vocab_adds_mean_rows():
    _, params = init()
    grown = resize_vocab(params, CFG.vocab_size + 1)
    assert grown["embedding"].shape == (CFG.vocab_size + 1, CFG.dim)
    np.testing.assert_allclose(grown["embedding"][-1], params["embedding"].mean(0), atol=1e-7)
    np.testing.assert_allclose(grown["lm_head"][:, -1], params["lm_head"].mean(1), atol=1e-7)
    np.testing.assert_array_equal(grown["embedding"][:-1], params["embedding"])
    with pytest.raises(ValueError, match="shrink"):
        resize_vocab(params, CFG.vocab_size - 1)


def test_resize_vocab_copies_a_row_when_asked():
    """`tokenizer.eot_init="bos"`: the new EOT row is the BOS row, in the embedding and in an untied head."""
    _, params = init()
    grown = resize_vocab(params, CFG.vocab_size + 1, padded_size=CFG.vocab_size + 8, copy_row=1)
    np.testing.assert_array_equal(grown["embedding"][CFG.vocab_size], params["embedding"][1])
    np.testing.assert_array_equal(grown["lm_head"][:, CFG.vocab_size], params["lm_head"][:, 1])
    np.testing.assert_array_equal(grown["embedding"][CFG.vocab_size + 1:], 0.0)
    with pytest.raises(ValueError, match="not one of"):
        resize_vocab(params, CFG.vocab_size + 1, copy_row=CFG.vocab_size)
