"""The chunked loss and the padded vocabulary: the same loss and gradients as the plain computation.

Tolerances: the chunked loss sums the same float32 token losses in another order, so the loss agrees to 1e-5
relative and each gradient leaf to 1e-5 of its largest entry (observed: 6e-8 absolute on entries of ~1e-3,
largest ~1). Padding the vocabulary changes no real logit (the real columns of the LM head are the same
numbers), so loss and real-row gradients agree as closely, and the padding rows get exactly zero gradient.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lima_jax.config import ModelConfig
from lima_jax.generation import SamplingConfig, choose_tokens
from lima_jax.loss import lm_loss_sums
from lima_jax.model import Llama, lm_logits, resize_vocab, strip_vocab_padding
from lima_jax.train_step import loss_sums

CFG = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64)


def params_of(cfg: ModelConfig, seed: int = 0) -> dict:
    return nn.meta.unbox(Llama(cfg).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])


def packed_batch(length: int = 24, batch: int = 2, seed: int = 1) -> dict:
    """Two rows, each two packed examples and trailing padding; loss on part of each example only."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (batch, length)).astype(np.int32)
    segment_ids = np.zeros((batch, length), np.int32)
    segment_ids[:, :10], segment_ids[:, 10:length - 3] = 1, 2
    positions = np.zeros((batch, length), np.int32)
    for row in range(batch):
        for seg in (1, 2):
            where = segment_ids[row] == seg
            positions[row, where] = np.arange(where.sum())
    weights = ((segment_ids != 0) & (rng.random((batch, length)) < 0.7)).astype(np.float32)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "weights": weights, "segment_ids": segment_ids,
            "positions": positions}


def value_and_grads(cfg: ModelConfig, params: dict, batch: dict, chunk_length: int):
    fn = jax.jit(jax.value_and_grad(lambda p: loss_sums(p, Llama(cfg), batch, None, True, chunk_length),
                                    has_aux=True))
    (loss_sum, count), grads = fn(params)
    return float(loss_sum), float(count), grads


def assert_trees_close(a, b, rtol):
    """Leaf by leaf within `rtol` of the leaf's largest magnitude (tiny entries differ relatively more when
    float32 sums change order)."""
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        y = np.asarray(y)
        np.testing.assert_allclose(np.asarray(x), y, rtol=0, atol=rtol * np.abs(y).max(), err_msg=str(path))


@pytest.mark.parametrize("tie, chunk_length", [(False, 8), (True, 7)])  # 24 = 3 x 8; 7 pads the last chunk
def test_chunked_loss_equals_the_plain_loss_and_gradients(tie, chunk_length):
    cfg = dataclasses.replace(CFG, tie_embeddings=tie)
    params, batch = params_of(cfg), packed_batch()
    plain = value_and_grads(cfg, params, batch, 0)
    chunked = value_and_grads(cfg, params, batch, chunk_length)
    assert chunked[1] == plain[1] == batch["weights"].sum()
    np.testing.assert_allclose(chunked[0], plain[0], rtol=1e-5)
    assert_trees_close(chunked[2], plain[2], rtol=1e-5)


def test_chunking_keeps_only_one_chunk_of_logits():
    """Compiled temporaries of loss + gradient fall by most of the float32 logits (and their gradient)."""
    cfg = dataclasses.replace(CFG, vocab_size=4096, n_layers=1)
    b, t = 2, 256
    hidden = jax.ShapeDtypeStruct((b, t, cfg.dim), jnp.float32)
    head = jax.ShapeDtypeStruct((cfg.dim, cfg.vocab_size), jnp.float32)
    ints, floats = jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.float32)

    def temporaries(chunk_length):
        loss = lambda h, w, y, m: lm_loss_sums(h, w, y, m, cfg, chunk_length)[0]  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, head, ints, floats).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    logits_bytes = b * t * cfg.vocab_size * 4
    plain, chunked = temporaries(0), temporaries(32)
    assert plain >= logits_bytes  # the plain loss holds at least the whole logits
    assert chunked < plain - logits_bytes // 2, (plain, chunked)


def padded(cfg: ModelConfig, multiple: int = 128) -> ModelConfig:
    return dataclasses.replace(cfg, vocab_multiple=multiple)


@pytest.mark.parametrize("tie", [False, True])
def test_padded_vocabulary_leaves_loss_and_gradients_unchanged(tie):
    cfg = dataclasses.replace(CFG, tie_embeddings=tie)
    params, batch = params_of(cfg), packed_batch()
    pcfg = padded(cfg)
    assert pcfg.padded_vocab_size == 128
    # padding rows of any value: they must not matter
    pparams = resize_vocab(params, cfg.vocab_size, padded_size=pcfg.padded_vocab_size)
    pparams["embedding"] = pparams["embedding"].at[cfg.vocab_size:].set(5.0)
    if not tie:
        pparams["lm_head"] = pparams["lm_head"].at[:, cfg.vocab_size:].set(5.0)
    assert pparams["embedding"].shape == (128, cfg.dim)
    plain = value_and_grads(cfg, params, batch, 0)
    for chunk_length in (0, 8):
        loss, count, grads = value_and_grads(pcfg, pparams, batch, chunk_length)
        assert count == plain[1]
        np.testing.assert_allclose(loss, plain[0], rtol=1e-6)
        assert not np.asarray(grads["embedding"][cfg.vocab_size:]).any()  # exactly zero
        if not tie:
            assert not np.asarray(grads["lm_head"][:, cfg.vocab_size:]).any()
        assert_trees_close(strip_vocab_padding(grads, cfg.vocab_size), plain[2], rtol=1e-5)


def test_padded_logits_are_minus_infinity():
    cfg = padded(CFG)
    params = params_of(cfg)
    logits, _ = Llama(cfg).apply({"params": params}, jnp.asarray(packed_batch()["tokens"]))
    assert logits.shape[-1] == 128
    assert np.isneginf(np.asarray(logits[..., CFG.vocab_size:])).all()
    assert np.isfinite(np.asarray(logits[..., :CFG.vocab_size])).all()


@pytest.mark.parametrize("settings", [SamplingConfig(temperature=1.0, top_p=1.0, repetition_penalty=1.0),
                                      SamplingConfig()])
def test_padded_ids_are_never_sampled(settings):
    """Flat real logits (a zero LM head) at temperature 1: every real id is equally likely, and without the
    mask a quarter of the draws (31 of 128 ids) would be padding."""
    cfg = padded(CFG)
    rows = 4096
    logits = lm_logits(jnp.ones((rows, 1, cfg.dim)), jnp.zeros((cfg.dim, cfg.padded_vocab_size)), cfg)[:, 0]
    seen = jnp.zeros((rows, cfg.padded_vocab_size), bool).at[:, :3].set(True)
    keys = jax.random.split(jax.random.key(0), rows)
    drawn = np.asarray(choose_tokens(logits, seen, keys, settings))
    assert drawn.max() < CFG.vocab_size
    assert len(np.unique(drawn)) > CFG.vocab_size // 2  # really sampled from the flat distribution


def test_import_pads_with_zero_rows_and_grows_eot_as_the_mean():
    params = params_of(CFG)
    grown = resize_vocab(params, CFG.vocab_size + 1, padded_size=128)
    assert grown["embedding"].shape == (128, CFG.dim) and grown["lm_head"].shape == (CFG.dim, 128)
    np.testing.assert_allclose(grown["embedding"][CFG.vocab_size], params["embedding"].mean(0), rtol=1e-6)
    assert not np.asarray(grown["embedding"][CFG.vocab_size + 1:]).any()
    # a padded checkpoint re-padded: only its real rows count
    again = resize_vocab(grown, CFG.vocab_size + 1, old_vocab_size=CFG.vocab_size + 1)
    assert again["embedding"].shape == (CFG.vocab_size + 1, CFG.dim)
    np.testing.assert_array_equal(again["embedding"], grown["embedding"][:CFG.vocab_size + 1])
