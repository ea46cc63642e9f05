"""Exact, deterministic input: per-epoch order from (seed, epoch) only, the same global batch on 1 and on 2
processes, resuming mid-epoch without replay or skip, padded and packed alike."""
import threading

import numpy as np
import pytest

from lima_jax.data import (epoch_batches, epoch_order, epoch_rows, load_examples, prefetch, row_layout,
                           steps_per_epoch, tokenize_all, tokenize_conversation)
from lima_jax.data.formats import read_conversations

MAX_LEN = 128


@pytest.fixture(scope="module")
def examples(toy_tokenizer, repo):
    return load_examples(str(repo / "data" / "toy_lima.jsonl"), toy_tokenizer, MAX_LEN).examples


def _batches(examples, **kwargs):
    args = dict(batch_size=4, max_len=MAX_LEN, seed=7, epoch=2)
    return list(epoch_batches(examples, **{**args, **kwargs}))


def _example_ids(batch):
    """(row, segment) -> the example's token tuple, to identify which examples a batch holds."""
    found = []
    for r in range(batch["tokens"].shape[0]):
        for segment in np.unique(batch["segment_ids"][r]):
            if segment:
                found.append(tuple(batch["tokens"][r][batch["segment_ids"][r] == segment]))
    return found


def test_epoch_order_depends_only_on_seed_and_epoch():
    np.testing.assert_array_equal(epoch_order(50, 3, 4), epoch_order(50, 3, 4))
    assert not np.array_equal(epoch_order(50, 3, 4), epoch_order(50, 3, 5))
    assert not np.array_equal(epoch_order(50, 3, 4), epoch_order(50, 4, 4))
    np.testing.assert_array_equal(epoch_order(50, 3, 4, shuffle=False), np.arange(50))


@pytest.mark.parametrize("packing", [False, True])
def test_every_example_once_per_epoch_and_a_fixed_number_of_rows(examples, packing):
    lengths = [len(e) for e in examples]
    row_counts = set()
    for epoch in (1, 2, 3):
        rows = epoch_rows(lengths, max_len=MAX_LEN, seed=0, epoch=epoch, packing=packing)
        assert sorted(i for row in rows for i in row) == list(range(len(examples)))
        assert all(sum(lengths[i] for i in row) <= MAX_LEN for row in rows)
        row_counts.add(len(rows))
    assert row_counts == {row_layout(examples, MAX_LEN, packing).num_rows}
    tokens = sorted(tuple(e.tokens) for e in examples)
    seen = sorted(t for b in _batches(examples, packing=packing) for t in _example_ids(b))
    assert seen == tokens


def test_packed_epochs_differ_in_row_order_and_grouping(examples):
    lengths = [len(e) for e in examples]
    a = epoch_rows(lengths, max_len=MAX_LEN, seed=0, epoch=1, packing=True)
    b = epoch_rows(lengths, max_len=MAX_LEN, seed=0, epoch=2, packing=True)
    assert a != b
    assert a == epoch_rows(lengths, max_len=MAX_LEN, seed=0, epoch=1, packing=True)


@pytest.mark.parametrize("packing", [False, True])
def test_same_global_batch_on_one_and_on_two_processes(examples, packing):
    one = _batches(examples, packing=packing)
    hosts = [_batches(examples, packing=packing, process_index=p, process_count=2) for p in (0, 1)]
    steps = steps_per_epoch(row_layout(examples, MAX_LEN, packing).num_rows, 4)
    assert len(one) == len(hosts[0]) == len(hosts[1]) == steps
    for step, whole in enumerate(one):
        for field, value in whole.items():
            assert hosts[0][step][field].shape[0] == 2
            np.testing.assert_array_equal(np.concatenate([hosts[0][step][field], hosts[1][step][field]]), value)


@pytest.mark.parametrize("packing", [False, True])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(examples, packing):
    full = _batches(examples, packing=packing)
    done = len(full) // 2
    resumed = _batches(examples, packing=packing, start_step=done)
    assert len(resumed) == len(full) - done
    for a, b in zip(full[done:], resumed):
        for field in a:
            np.testing.assert_array_equal(a[field], b[field])
    before = [t for batch in full[:done] for t in _example_ids(batch)]
    after = [t for batch in resumed for t in _example_ids(batch)]
    assert sorted(before + after) == sorted(tuple(e.tokens) for e in examples)  # no replay, no skip


def test_last_short_batch_is_filled_with_empty_rows(examples):
    batches = _batches(examples[:10], batch_size=4)
    assert len(batches) == 3
    assert (batches[-1]["segment_ids"][2:] == 0).all() and (batches[-1]["weights"][2:] == 0).all()


def test_batch_size_must_split_over_processes(examples):
    with pytest.raises(ValueError, match="not divisible by 3"):
        _batches(examples, process_count=3)


def test_worker_processes_tokenize_exactly_like_one_process(toy_tokenizer, repo):
    convs = read_conversations(repo / "data" / "toy_lima.jsonl")
    one = tokenize_all(toy_tokenizer, convs, MAX_LEN, num_workers=1)
    two = tokenize_all(toy_tokenizer, convs, MAX_LEN, num_workers=2)
    assert [e.where for e in two] == [c.where for c in convs]
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.weights, b.weights)
    assert np.array_equal(one[0].tokens, tokenize_conversation(toy_tokenizer, convs[0], MAX_LEN).tokens)


def test_input_signature_changes_with_anything_that_moves_the_saved_position(examples):
    from lima_jax.data import input_signature
    base = dict(batch_size=8, max_len=MAX_LEN, seed=0, shuffle=True, packing=True)
    reference = input_signature(examples, **base)
    assert input_signature(list(examples), **base) == reference
    changed = [input_signature(examples[:-1], **base), input_signature(examples[::-1], **base)]
    changed += [input_signature(examples, **{**base, key: value})
                for key, value in (("batch_size", 16), ("max_len", 256), ("seed", 1), ("shuffle", False),
                                   ("packing", False))]
    assert reference not in changed and len(set(changed)) == len(changed)


def test_prefetch_produces_the_next_item_while_the_caller_holds_one_and_keeps_the_order():
    second_made = threading.Event()

    def items():
        yield 0
        yield 1
        second_made.set()
        yield 2

    got = []
    for item in prefetch(items()):
        if item == 0:  # still holding the first: the thread must have made the second meanwhile
            assert second_made.wait(timeout=30)
        got.append(item)
    assert got == [0, 1, 2]


def test_prefetch_raises_a_producers_error_at_its_place_and_stops_its_thread_when_left():
    def failing():
        yield "a"
        raise ValueError("the second batch is bad")

    got = []
    with pytest.raises(ValueError, match="second batch"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == ["a"]

    before = threading.active_count()
    endless = prefetch(iter(int, 1))  # never ends
    assert next(endless) == 0
    endless.close()  # the caller leaves the loop early
    assert threading.active_count() == before
