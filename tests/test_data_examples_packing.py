"""packing="examples": the paper's steps (exactly train.batch_size examples each, as many steps per epoch as
unpacked) packed into a fixed number of rows for the whole run, with the padded recipe's gradients; and the
packing modes in configs (old bools accepted), signatures and stats."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from lima_jax import data
from lima_jax.config import load_config_file, model_config, packing_mode, validate
from lima_jax.data.pipeline import round_up
from lima_jax.errors import ConfigError
from lima_jax.model import Llama
from lima_jax.train_step import loss_sums, make_train_step

MAX_LEN = 128
BATCH = 32  # the paper's examples per step
# Float32 gradients of a packed and a padded step differ only by summation order: measured max |difference|
# 4.5e-8 on the toy model (largest gradient entry ~0.16), so allclose(rtol=1e-5, atol=5e-7) has ~10x margin.
GRAD_RTOL, GRAD_ATOL = 1e-5, 5e-7


@pytest.fixture(scope="module")
def examples(toy_tokenizer, repo):
    return data.load_examples(str(repo / "data" / "toy_lima.jsonl"), toy_tokenizer, MAX_LEN).examples


@pytest.fixture(scope="module")
def lengths(examples):
    return [len(e) for e in examples]


def _steps(examples, packing, epoch, num_rows=None, **kwargs):
    return list(data.epoch_batches(examples, batch_size=BATCH, max_len=MAX_LEN, seed=3, epoch=epoch,
                                   packing=packing, num_rows=num_rows, **kwargs))


def _rows(lengths, num_epochs=2, row_multiple=1):
    return data.rows_per_step(lengths, batch_size=BATCH, max_len=MAX_LEN, seed=3, packing="examples",
                              num_epochs=num_epochs, row_multiple=row_multiple)


def _example_tokens(batch):
    """The token tuple of every example a batch holds (one per (row, segment))."""
    found = []
    for r in range(batch["tokens"].shape[0]):
        for segment in np.unique(batch["segment_ids"][r]):
            if segment:
                found.append(tuple(batch["tokens"][r][batch["segment_ids"][r] == segment]))
    return sorted(found)


def test_steps_hold_the_unpacked_steps_examples_in_a_fixed_number_of_rows(examples, lengths):
    rows = _rows(lengths)
    assert rows < BATCH  # 32 toy examples fit in ~11 rows
    for epoch in (1, 2):
        padded, packed = _steps(examples, "none", epoch), _steps(examples, "examples", epoch, rows)
        assert len(packed) == len(padded) == data.steps_per_epoch(len(examples), BATCH) == 2
        sizes = [len(_example_tokens(b)) for b in packed]
        assert sizes == [BATCH, len(examples) - BATCH]  # the last step holds the remainder, as unpacked
        for a, b in zip(padded, packed):
            assert _example_tokens(a) == _example_tokens(b)  # the very examples of the unpacked step
            assert b["tokens"].shape == (rows, MAX_LEN)
            assert a["weights"].sum() == b["weights"].sum()  # the same loss denominator
            used = (b["segment_ids"] != 0).any(axis=1)
            assert (b["weights"][~used] == 0).all()  # unused rows are empty
        seen = [t for b in packed for t in _example_tokens(b)]
        assert sorted(seen) == sorted(tuple(e.tokens) for e in examples)  # every example once per epoch


def test_rows_per_step_covers_every_epoch_and_rounds_up(examples, lengths):
    most = {epoch: max(len(step) for step in data.epoch_steps(
        lengths, batch_size=BATCH, max_len=MAX_LEN, seed=3, epoch=epoch, packing="examples")) for epoch in (1, 2, 3)}
    assert _rows(lengths, num_epochs=3) == max(most.values())
    assert _rows(lengths, num_epochs=3, row_multiple=8) == round_up(max(most.values()), 8) == 16
    assert data.rows_per_step(lengths, batch_size=BATCH, max_len=MAX_LEN, seed=3, packing="rows") == BATCH
    with pytest.raises(ValueError, match="more than the 2 planned"):
        _steps(examples, "examples", 1, num_rows=2)
    # Deterministic: a function of (seed, epoch, data) only.
    assert _steps(examples, "examples", 2, _rows(lengths))[0]["tokens"].tobytes() == \
        _steps(examples, "examples", 2, _rows(lengths))[0]["tokens"].tobytes()


def test_each_host_builds_its_block_of_the_planned_rows(examples, lengths):
    rows = _rows(lengths, row_multiple=2)
    whole = _steps(examples, "examples", 1, rows)
    hosts = [_steps(examples, "examples", 1, rows, process_index=p, process_count=2) for p in (0, 1)]
    for step, batch in enumerate(whole):
        for field, value in batch.items():
            assert hosts[0][step][field].shape[0] == rows // 2
            np.testing.assert_array_equal(np.concatenate([hosts[0][step][field], hosts[1][step][field]]), value)


@pytest.fixture(scope="module")
def toy_model(toy_tokenizer, repo):
    """The toy config's model with residual dropout off (rate 0 everywhere: dropout is the identity), and
    its config."""
    config = load_config_file(repo / "configs" / "toy.py")
    config.model.residual_dropout_max = 0.0
    model = Llama(model_config(config, toy_tokenizer.vocab_size))
    params = meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return config, model, params


def test_an_examples_packed_step_has_the_padded_steps_gradient(examples, lengths, toy_model):
    config, model, params = toy_model

    @jax.jit
    def loss_and_grads(params, batch):
        def mean_loss(p):
            loss_sum, count = loss_sums(p, model, batch, None, True)
            return loss_sum / count
        return jax.value_and_grad(mean_loss)(params)

    rows = _rows(lengths)
    for epoch in (1, 2):
        for padded, packed in zip(_steps(examples, "none", epoch), _steps(examples, "examples", epoch, rows)):
            (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(params, padded), loss_and_grads(params, packed)
            assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-6)
            for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_the_train_step_on_packed_rows_with_grad_accumulation_matches_the_padded_step(examples, lengths,
                                                                                     toy_model):
    """make_train_step itself (dropout rate 0, so its non-deterministic path is exact): the packed step, its
    rows rounded up to 2 micro-batches, gives the padded step's loss, gradient norm and target count."""
    from flax.training import train_state
    import optax

    config, model, params = toy_model
    schedule = optax.constant_schedule(1e-3)
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(1e-3))
    padded = _steps(examples, "none", 1)[0]
    packed = _steps(examples, "examples", 1, _rows(lengths, row_multiple=2))[0]
    config.train.grad_accum_steps = 1
    _, full = jax.jit(make_train_step(model, config, schedule, jax.random.key(1)))(state, padded)
    config.train.grad_accum_steps = 2
    _, accum = jax.jit(make_train_step(model, config, schedule, jax.random.key(1)))(state, packed)
    assert float(accum["target_tokens"]) == float(full["target_tokens"])
    assert float(accum["tokens"]) == float(full["tokens"])
    assert float(accum["loss"]) == pytest.approx(float(full["loss"]), rel=1e-6)
    assert float(accum["grad_norm"]) == pytest.approx(float(full["grad_norm"]), rel=1e-5)


def test_packing_modes_and_the_old_bools(toy_config, tmp_path, examples):
    assert [packing_mode(v) for v in (False, True, "none", "rows", "examples")] == \
        ["none", "rows", "none", "rows", "examples"]
    for value in (False, True, "none", "rows", "examples"):
        with toy_config.ignore_type():  # an older config's bool field
            toy_config.data.packing = value
        validate(toy_config)
    toy_config.data.packing = "packed"
    with pytest.raises(ConfigError, match=r"config.data.packing='packed': must be one of \('none', 'rows'"):
        validate(toy_config)
    # A run's config.json written before the modes holds a bool: read as its mode.
    old = json.loads(toy_config.to_json())
    old["data"]["packing"] = True
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert load_config_file(tmp_path / "config.json").data.packing == "rows"


def test_input_signature_holds_the_packing_mode(examples):
    base = dict(batch_size=8, max_len=MAX_LEN, seed=0, shuffle=True)
    signatures = {mode: data.input_signature(examples, **base, packing=mode) for mode in ("none", "rows", "examples")}
    assert len(set(signatures.values())) == 3
    # Checkpoints saved with the old bools keep their signature, so those runs still resume.
    assert data.input_signature(examples, **base, packing=False) == signatures["none"]
    assert data.input_signature(examples, **base, packing=True) == signatures["rows"]


def test_stats_report_steps_rows_and_real_tokens_per_mode(examples):
    from lima_jax.data.stats import compute_stats, format_stats

    stats = compute_stats("toy", data.LoadReport(list(examples), []), MAX_LEN, batch_size=BATCH, num_epochs=2,
                          seed=3)
    none, rows, packed = (stats.plans[m] for m in ("none", "rows", "examples"))
    assert (none.steps_per_epoch, none.rows_per_step) == (2, BATCH)
    assert rows.steps_per_epoch == 1 and rows.rows_per_step == BATCH
    assert (packed.steps_per_epoch, packed.rows_per_step) == (2, _rows([len(e) for e in examples]))
    tokens = sum(len(e) for e in examples)
    assert packed.efficiency == pytest.approx(tokens / (2 * packed.rows_per_step * MAX_LEN))
    assert none.efficiency < packed.efficiency
    text = format_stats(stats)
    assert all(mode in text for mode in ("none", "rows", "examples")) and "steps/epoch" in text
