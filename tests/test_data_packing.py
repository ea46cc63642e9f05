"""Packing: best-fit decreasing, segment ids and restarting positions, no attention across segments, and
packed batches training exactly like padded ones (same per-example losses and gradients)."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from lima_jax.config import ModelConfig
from lima_jax.data import best_fit_decreasing, load_examples, pad_rows, row_layout
from lima_jax.data.packing import write_rows
from lima_jax.model import Llama, attention_mask
from lima_jax.train_step import loss_sums

MAX_LEN = 128


@pytest.fixture(scope="module")
def toy_examples(toy_tokenizer, repo):
    return load_examples(str(repo / "data" / "toy_lima.jsonl"), toy_tokenizer, MAX_LEN).examples


def test_best_fit_decreasing_fills_bins_and_keeps_every_item_once():
    assert best_fit_decreasing([6, 4, 5, 5, 3, 7], 10) == [[5, 4], [0, 1], [2, 3]]  # 7+3, 6+4, 5+5
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 101, size=300).tolist()
    bins = best_fit_decreasing(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert len(bins) <= 1.1 * np.ceil(sum(lengths) / 100)  # BFD is within 11/9 OPT + 1; far closer here


def test_bin_count_does_not_depend_on_order():
    lengths = np.random.default_rng(1).integers(1, 60, size=200)
    counts = {len(best_fit_decreasing(np.random.default_rng(s).permutation(lengths).tolist(), 64)) for s in range(5)}
    assert len(counts) == 1


def test_best_fit_decreasing_rejects_items_longer_than_a_row():
    with pytest.raises(ValueError, match="outside"):
        best_fit_decreasing([3, 11], 10)


def _packed_rows(examples, max_len=MAX_LEN):
    bins = best_fit_decreasing([len(e) for e in examples], max_len)
    return bins, write_rows([[examples[i] for i in b] for b in bins], max_len)


def test_packed_rows_hold_each_example_with_its_own_segment_and_positions(toy_examples):
    bins, batch = _packed_rows(toy_examples)
    assert len(bins) < len(toy_examples) / 2  # several examples per row
    for r, b in enumerate(bins):
        start = 0
        for segment, i in enumerate(b, start=1):
            ex, end = toy_examples[i], start + len(toy_examples[i])
            np.testing.assert_array_equal(batch["tokens"][r, start:end], ex.tokens)
            np.testing.assert_array_equal(batch["targets"][r, start:end], ex.targets)
            np.testing.assert_array_equal(batch["weights"][r, start:end], ex.weights)
            assert (batch["segment_ids"][r, start:end] == segment).all()
            np.testing.assert_array_equal(batch["positions"][r, start:end], np.arange(len(ex)))  # restart
            start = end
        assert (batch["segment_ids"][r, start:] == 0).all() and (batch["weights"][r, start:] == 0).all()


def test_no_attention_weight_crosses_a_segment_boundary(toy_examples):
    bins, batch = _packed_rows(toy_examples)
    mask = np.asarray(attention_mask(jnp.asarray(batch["segment_ids"])))[:, 0]
    for r, b in enumerate(bins):
        owner = np.full(MAX_LEN, -1)  # which example each position belongs to, built from the plan alone
        start = 0
        for i in b:
            owner[start:start + len(toy_examples[i])] = i
            start += len(toy_examples[i])
        q, k = np.nonzero(mask[r])
        assert (owner[q] == owner[k]).all() and (owner[k] >= 0).all() and (k <= q).all()
        # and within an example the mask is exactly causal
        for i in b:
            span = np.nonzero(owner == i)[0]
            np.testing.assert_array_equal(mask[r][np.ix_(span, span)], np.tril(np.ones((len(span),) * 2, bool)))


CFG = ModelConfig(vocab_size=0, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=MAX_LEN)


def _segment_loss_sums(model, params, batch, owners):
    """Per-example summed token loss from one layout (`owners`: the example of each position, -1 = pad)."""
    @jax.jit
    def token_loss(params, batch):
        logits, _ = model.apply({"params": params}, batch["tokens"], batch["segment_ids"], batch["positions"])
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]

    weighted = np.asarray(token_loss(params, batch)) * batch["weights"]
    return {i: float(weighted[owners == i].sum()) for i in np.unique(owners[owners >= 0])}


def test_packed_and_padded_batches_give_the_same_per_example_losses_and_gradients(toy_examples, toy_tokenizer):
    examples = toy_examples[:12]
    model = Llama(dataclasses.replace(CFG, vocab_size=toy_tokenizer.vocab_size))
    params = meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])

    padded = pad_rows(examples, MAX_LEN)
    padded_owner = np.where(padded["segment_ids"] > 0, np.arange(len(examples))[:, None], -1)
    bins, packed = _packed_rows(examples)
    packed_owner = np.full(packed["tokens"].shape, -1)
    for r, b in enumerate(bins):
        for segment, i in enumerate(b, start=1):
            packed_owner[r][packed["segment_ids"][r] == segment] = i
    assert packed["tokens"].shape[0] < len(examples)

    loss_padded = _segment_loss_sums(model, params, padded, padded_owner)
    loss_packed = _segment_loss_sums(model, params, packed, packed_owner)
    assert loss_padded.keys() == loss_packed.keys() == set(range(len(examples)))
    for i in loss_padded:
        assert loss_packed[i] == pytest.approx(loss_padded[i], rel=1e-5, abs=1e-5)

    grad_fn = jax.jit(jax.grad(lambda p, batch: loss_sums(p, model, batch, None, True)[0]))

    def grads_of(batch, owners, only=None):
        weights = batch["weights"] if only is None else np.where(owners == only, batch["weights"], 0.0)
        return grad_fn(params, {**batch, "weights": weights.astype(np.float32)})

    # The whole batch (what a train step uses) and one example alone: both must match across layouts.
    for only in (None, 3):
        g_padded, g_packed = grads_of(padded, padded_owner, only), grads_of(packed, packed_owner, only)
        for a, b in zip(jax.tree.leaves(g_padded), jax.tree.leaves(g_packed)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=1e-6)
    # Target-token counts (the loss denominator) are the same too.
    assert padded["weights"].sum() == packed["weights"].sum()


def test_row_layout_reports_rows_and_efficiency(toy_examples):
    total = sum(len(e) for e in toy_examples)
    padded, packed = row_layout(toy_examples, MAX_LEN), row_layout(toy_examples, MAX_LEN, packing=True)
    assert padded.num_rows == len(toy_examples)
    assert padded.efficiency == pytest.approx(total / (len(toy_examples) * MAX_LEN))
    assert packed.num_rows == len(best_fit_decreasing([len(e) for e in toy_examples], MAX_LEN))
    assert packed.efficiency == pytest.approx(total / (packed.num_rows * MAX_LEN))
    assert packed.efficiency > 2 * padded.efficiency
    assert "packed" in packed.describe() and f"{100 * packed.efficiency:.1f}%" in packed.describe()


def test_write_rows_refuses_a_row_that_overflows(toy_examples):
    longest = sorted(toy_examples, key=len)[-2:]
    with pytest.raises(ValueError, match="do not fit"):
        write_rows([list(itertools.chain(longest))], max(len(e) for e in longest))
