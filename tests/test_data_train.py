"""Training with packed rows on the toy config ("rows" and "examples"), interrupted mid-epoch and resumed: the
resumed run sees exactly the batches an uninterrupted run would have (no replay, no skip)."""
import numpy as np
import pytest

from lima_jax import data
from lima_jax.tokenizer import load_tokenizer


class Crash(RuntimeError):
    pass


def _recording(original, seen, crash_after=None):
    """epoch_batches that records every batch it hands out and fails before batch `crash_after + 1`."""
    def epoch_batches(*args, **kwargs):
        for batch in original(*args, **kwargs):
            if crash_after is not None and len(seen) == crash_after:
                raise Crash(f"simulated failure after {crash_after} batches")
            seen.append((kwargs["epoch"], batch))
            yield batch
    return epoch_batches


@pytest.mark.slow
@pytest.mark.parametrize("packing, batch_size", [("rows", 8), ("examples", 16)])
def test_toy_training_with_packing_resumes_mid_epoch_with_exactly_the_remaining_batches(toy_config, monkeypatch,
                                                                                         packing, batch_size):
    from lima_jax.training import train

    config = toy_config
    config.data.packing = packing
    config.train.batch_size = batch_size  # rows ("rows": divisible by the 8 test devices) or examples
    config.train.num_epochs = 2
    config.train.checkpoint_every_steps = 1
    config.train.async_checkpointing = False  # the crash must find step crash_after's checkpoint sealed
    config.dev_report.epochs = ()

    tokenizer = load_tokenizer(config)
    examples = data.load_examples(config.data.train_path, tokenizer, config.data.max_len).examples
    plan = data.plan_steps(examples, batch_size=batch_size, max_len=config.data.max_len, seed=config.seed,
                           packing=packing, num_epochs=2, row_multiple=8)  # 8 data shards
    per_epoch = plan.steps_per_epoch
    if packing == "rows":
        assert data.row_layout(examples, config.data.max_len, packing).num_rows < len(examples) / 2
    else:  # the paper's steps, in half the rows
        assert per_epoch == data.steps_per_epoch(len(examples), batch_size) and plan.rows_per_step == 8
    assert per_epoch >= 2
    expected = [(epoch, batch) for epoch in (1, 2) for batch in data.epoch_batches(
        examples, batch_size=batch_size, max_len=config.data.max_len, seed=config.seed, epoch=epoch,
        packing=packing, num_rows=plan.rows_per_step)]
    crash_after = per_epoch + 1  # inside epoch 2

    original = data.epoch_batches
    first, second = [], []
    monkeypatch.setattr(data, "epoch_batches", _recording(original, first, crash_after))
    with pytest.raises(Crash):
        train(config)
    monkeypatch.setattr(data, "epoch_batches", _recording(original, second))
    metrics = train(config)

    assert len(first) == crash_after and second[0][0] == 2
    got = first + second
    assert len(got) == len(expected) == 2 * per_epoch
    for (epoch_a, a), (epoch_b, b) in zip(got, expected):
        assert epoch_a == epoch_b
        for field in data.BATCH_FIELDS:
            np.testing.assert_array_equal(a[field], b[field])
    assert max(int(b["segment_ids"].max()) for _, b in got) > 1  # rows really hold several examples
    assert np.isfinite(metrics["loss"]) and metrics["epoch"] == 2
    assert metrics["tokens"] == (got[-1][1]["segment_ids"] != 0).sum()  # the step saw the packed rows

    # Resuming the same workdir with other input settings would replay or skip examples: refused.
    config.data.packing = "none"
    with pytest.raises(data.DataError, match="different input"):
        train(config)
