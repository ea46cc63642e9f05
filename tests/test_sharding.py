"""Meshes, layouts and validation on 8 fake CPU devices (tests/conftest.py sets them up).

The central check: three training steps of the toy model give the same losses under every preset layout
and several mesh shapes as on one device. Tolerance: rtol 1e-4 on float32 losses. Sharding changes only
the order of floating-point reductions (psum trees, split matmuls), which moves a float32 loss of ~6 by
about 1e-6 relative per step; a real sharding bug (a wrong all-reduce, rows loaded twice, a missing
gradient shard) changes it at the 1e-2 level or more.
"""
from __future__ import annotations

import collections
import functools
import pathlib
import types

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lima_jax import checkpoint, data, runtime, sharding, training, train_step
from lima_jax.config import ConfigError, model_config
from lima_jax.model import Llama
from lima_jax.optim import learning_rate_schedule, make_optimizer
from lima_jax.tokenizer import load_tokenizer

STEPS = 3
RTOL = 1e-4


def _with_mesh(config, layout: str, data_: int, fsdp: int, tensor: int, **train_overrides):
    config.mesh.update(layout=layout, data=data_, fsdp=fsdp, tensor=tensor)
    config.train.update(train_overrides)
    return config


def _state_and_step(config, devices):
    """What `lima_jax.training.train` builds, on `devices`: mesh, rules, state, jitted step, batch sharding."""
    tokenizer = load_tokenizer(config)
    model_cfg = model_config(config, vocab_size=tokenizer.vocab_size)
    mesh = sharding.make_mesh(config, devices, vocab_size=model_cfg.vocab_size)
    rules = sharding.layout_rules(config, vocab_size=model_cfg.vocab_size, shape=mesh.devices.shape)
    model = Llama(model_cfg)
    total = 100
    tx = make_optimizer(config, total)
    with sharding.activate(mesh, rules):
        abstract, shardings = runtime.abstract_train_state(model, tx, mesh, rules)
        state = runtime.create_train_state(model, tx, shardings, jax.random.key(config.seed))
        batch_sharding = sharding.batch_sharding(mesh, rules)
        step = train_step.jit_train_step(model, config, learning_rate_schedule(config, total), shardings,
                                         batch_sharding)
    return tokenizer, model_cfg, mesh, abstract, state, step, batch_sharding


def _losses(config, devices) -> list[float]:
    """Losses of the first STEPS steps of epoch 1 (dropout on, as in training)."""
    tokenizer, _, mesh, _, state, step, batch_sharding = _state_and_step(config, devices)
    report = data.load_examples(config.data.train_path, tokenizer, config.data.max_len, config.data.loss_on)
    shape = (config.train.batch_size, config.data.max_len)
    block, blocks = sharding.process_batch_block(batch_sharding, shape)
    batches = data.epoch_batches(report.examples, batch_size=config.train.batch_size, max_len=config.data.max_len,
                                 seed=config.seed, epoch=1, process_index=block, process_count=blocks)
    losses = []
    with jax.set_mesh(mesh):
        for _, local in zip(range(STEPS), batches):
            state, metrics = step(state, runtime.global_batch(local, batch_sharding, shape))
            losses.append(float(metrics["loss"]))
    return losses


@functools.lru_cache(maxsize=None)
def _one_device_losses(accum: int) -> tuple[float, ...]:
    """The reference: the same steps on one device (same grad_accum_steps: micro-batches draw their own
    dropout masks, so accumulation changes the loss even on one device)."""
    from lima_jax.config import load_config_file
    config = load_config_file(pathlib.Path(__file__).resolve().parent.parent / "configs" / "toy.py")
    config.workdir = "/unused"
    return tuple(_losses(_with_mesh(config, "data", 1, 1, 1, grad_accum_steps=accum), jax.devices()[:1]))


@pytest.mark.slow
@pytest.mark.parametrize("layout,mesh_sizes,accum", [
    ("data", (8, 1, 1), 1),
    ("fsdp", (1, 4, 2), 2),  # the tensor axis idle under fsdp; gradient accumulation over 2 micro-batches
    ("fsdp_tp", (2, 2, 2), 1),
    ("tensor", (4, 1, 2), 1),
])
def test_losses_match_one_device(toy_config, layout, mesh_sizes, accum):
    config = _with_mesh(toy_config, layout, *mesh_sizes, grad_accum_steps=accum)
    losses = _losses(config, jax.devices())
    reference_losses = _one_device_losses(accum)
    print(f"{layout} {mesh_sizes} accum {accum}: {losses} vs one device {reference_losses}")
    assert np.isfinite(losses).all()
    np.testing.assert_allclose(losses, reference_losses, rtol=RTOL)


def _abstract_state(config, devices=None):
    """Abstract train state (eval_shape only, nothing compiled) with a vocabulary divisible by 8."""
    model_cfg = model_config(config, vocab_size=512)
    mesh = sharding.make_mesh(config, devices, vocab_size=model_cfg.vocab_size)
    rules = sharding.layout_rules(config, vocab_size=512, shape=mesh.devices.shape)
    with sharding.activate(mesh, rules):
        return runtime.abstract_train_state(Llama(model_cfg), make_optimizer(config, 10), mesh, rules)


def test_presets_shard_params_and_optimizer_state(toy_config):
    abstract, _ = _abstract_state(_with_mesh(toy_config, "fsdp_tp", 2, 2, 2))
    specs = sharding.spec_tree(abstract)
    attention = specs.params["layers"]["attention"]
    assert attention["wq"] == P(None, "fsdp", "tensor", None)  # [layers, embed, heads, kv]
    assert attention["wo"] == P(None, "tensor", None, "fsdp")
    assert specs.params["layers"]["mlp"]["w2"] == P(None, "tensor", "fsdp")
    assert specs.params["embedding"] == P("tensor", "fsdp")
    adam = specs.opt_state[0]
    assert adam.mu["layers"]["attention"]["wq"] == attention["wq"]
    assert adam.nu["embedding"] == P("tensor", "fsdp")
    # The per-device share really is 1/4 of a weight (2-way fsdp x 2-way tensor).
    wq = abstract.params["layers"]["attention"]["wq"]
    assert wq.sharding.shard_shape(wq.shape)[1:3] == (wq.shape[1] // 2, wq.shape[2] // 2)

    data_specs = sharding.spec_tree(_abstract_state(_with_mesh(toy_config, "data", -1, 1, 1))[0])
    assert all(s == P() or all(a is None for a in s) for s in jax.tree.leaves(data_specs.params))
    fsdp_specs = sharding.spec_tree(_abstract_state(_with_mesh(toy_config, "fsdp", 1, -1, 1))[0])
    assert fsdp_specs.params["layers"]["mlp"]["w1"] == P(None, "fsdp", None)


def test_user_rules_override_the_preset(toy_config):
    toy_config.mesh.rules = (("mlp", "fsdp"), ("embed", None))
    abstract, _ = _abstract_state(_with_mesh(toy_config, "fsdp", 1, 8, 1))
    assert sharding.spec_tree(abstract).params["layers"]["mlp"]["w1"] == P(None, None, "fsdp")


def test_odd_vocabulary_is_left_unsplit(toy_config):
    config = _with_mesh(toy_config, "fsdp_tp", 2, 2, 2)
    rules = sharding.layout_rules(config, vocab_size=513, shape=(2, 2, 2))
    assert sharding.rule_table(rules)["vocab"] is None and sharding.rule_table(rules)["heads"] == "tensor"
    assert sharding.rule_table(sharding.layout_rules(config, vocab_size=512, shape=(2, 2, 2)))["vocab"] == "tensor"


def test_mesh_shape_infers_minus_one(toy_config):
    assert sharding.mesh_shape(_with_mesh(toy_config, "fsdp", 2, -1, 1), 8) == (2, 4, 1)
    assert sharding.make_mesh(toy_config).shape == {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize("mesh_sizes,layout,field,message", [
    ((2, 2, 1), "fsdp", "config.mesh", "needs 4 devices, but 8 are present"),
    ((-1, -1, 1), "fsdp", "config.mesh", "at most one -1"),
    ((3, -1, 1), "fsdp", "config.mesh", "not divisible by the fixed axes' product 3"),
    ((1, 0, 8), "fsdp", "config.mesh", "must be positive"),
    ((1, 2, 4), "fsdp_tp", "config.model.n_kv_heads", "kv_heads size 2 is not divisible by mesh axes tensor of size 4"),
    ((1, 1, 8), "tensor", "config.model.n_heads", "heads size 4 is not divisible"),
    ((-1, 1, 1), "nonsense", "config.mesh.layout", "not one of"),
])
def test_invalid_mesh_errors_name_the_field(toy_config, mesh_sizes, layout, field, message):
    config = _with_mesh(toy_config, layout, *mesh_sizes)
    with pytest.raises(ConfigError) as error:
        sharding.make_mesh(config, vocab_size=512)
    assert field in str(error.value) and message in str(error.value)
    assert str(error.value).startswith(config.source_file)


def test_batch_not_divisible_fails_in_setup_before_any_compile(toy_config):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None)
    config = _with_mesh(toy_config, "data", 8, 1, 1, batch_size=12)
    config.data.packing = "none"  # one example per row: the rows are the batch size
    jax.clear_caches()
    with pytest.raises(ConfigError, match=r"config.train.batch_size=12 .* not divisible by the batch's mesh axes"):
        training.setup(config)
    config.data.packing = "examples"  # rounds its rows per step up to a multiple of the 8 shards instead
    training.setup(config)
    config = _with_mesh(toy_config, "tensor", 2, 1, 4, batch_size=8)
    with pytest.raises(ConfigError, match="kv_heads size 2 is not divisible by mesh axes tensor of size 4"):
        training.setup(config)
    assert compiles == []


def test_activate_makes_the_models_logical_constraints_bind(toy_config):
    """Under the legacy `with mesh:` flax drops every logical constraint without a word; `activate` must
    make them reach XLA (here: a replicated input comes out split over the batch's mesh axes)."""
    config = _with_mesh(toy_config, "fsdp", 2, 4, 1)
    mesh = sharding.make_mesh(config)
    rules = sharding.layout_rules(config)
    x = jax.device_put(np.zeros((8, 16), np.float32), sharding.replicated(mesh))
    with sharding.activate(mesh, rules):
        out = jax.jit(lambda a: nn.with_logical_constraint(a * 2, ("batch", "length")))(x)
    assert out.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None)), 2)


def test_bad_user_rule_is_rejected(toy_config):
    toy_config.mesh.rules = (("embed", "model"),)
    with pytest.raises(ConfigError, match=r"config.mesh.rules: .* names mesh axes \['model'\]"):
        sharding.layout_rules(toy_config)


@pytest.mark.slow
def test_checkpoint_saved_under_one_layout_restores_under_another(toy_config, tmp_path):
    config = _with_mesh(toy_config, "fsdp_tp", 2, 2, 2)
    *_, state, _, _ = _state_and_step(config, None)
    store = checkpoint.TrainCheckpoints(tmp_path / "ckpt")
    store.save(1, state, {"epoch": 1})
    store.close()
    expected = jax.device_get(state.params)
    for target, devices in ((("fsdp", 1, 8, 1), None), (("data", 1, 1, 1), jax.devices()[:1])):
        other = _with_mesh(toy_config, *target)
        _, _, mesh, abstract, *_ = _state_and_step(other, devices)
        restored, meta = checkpoint.TrainCheckpoints(tmp_path / "ckpt").restore(1, abstract)
        assert meta == {"epoch": 1}
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), expected)
        for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
            assert leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim)
        assert restored.params["embedding"].sharding.mesh.shape == dict(zip(sharding.MESH_AXES, target[1:]))


_FakeDevice = collections.namedtuple("_FakeDevice", "id process_index")


def _fake_sharding(rows_by_device: dict[tuple[int, int], tuple[int, int]]):
    """A stand-in sharding: {(device id, process): (start, stop)} of a batch of 8 rows."""
    devices = {_FakeDevice(d, p): (slice(a, b), slice(None))
               for (d, p), (a, b) in rows_by_device.items()}
    return types.SimpleNamespace(devices_indices_map=lambda shape: devices)


def test_process_batch_block():
    data_across_hosts = _fake_sharding({(0, 0): (0, 4), (1, 0): (4, 8), (2, 1): (0, 4), (3, 1): (4, 8)})
    assert sharding.process_batch_block(data_across_hosts, (8, 16), process_index=1) == (0, 1)
    split = _fake_sharding({(0, 0): (0, 2), (1, 0): (2, 4), (2, 1): (4, 6), (3, 1): (6, 8)})
    assert sharding.process_batch_block(split, (8, 16), process_index=0) == (0, 2)
    assert sharding.process_batch_block(split, (8, 16), process_index=1) == (1, 2)
    interleaved = _fake_sharding({(0, 0): (0, 2), (1, 1): (2, 4), (2, 0): (4, 6), (3, 1): (6, 8)})
    with pytest.raises(ConfigError, match="not one aligned block"):
        sharding.process_batch_block(interleaved, (8, 16), process_index=0)


def test_multi_slice_needs_data_axis_multiple_of_slices():
    devices = [types.SimpleNamespace(id=i, slice_index=i // 4, process_index=0) for i in range(8)]
    with pytest.raises(ConfigError, match="data must be a multiple of 2"):
        sharding.device_grid((1, 8, 1), devices, "x.py")
