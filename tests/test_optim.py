"""LIMA's optimizer: the linear learning-rate schedule, AdamW's weight-decay mask and its moments' dtypes."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lima_jax.config import ConfigError, validate
from lima_jax.optim import learning_rate_schedule, make_optimizer, weight_decay_mask
from tests.test_config import filled


def test_schedule_first_middle_last_step():
    c = filled("lima_65b.py")
    total = 31 * 15  # ceil(1000 / 32) steps per epoch, 15 epochs
    schedule = learning_rate_schedule(c, total)
    assert float(schedule(0)) == pytest.approx(1e-5)
    assert float(schedule((total - 1) // 2)) == pytest.approx((1e-5 + 1e-6) / 2, rel=1e-5)
    assert float(schedule(total - 1)) == pytest.approx(1e-6)
    steps = np.array([float(schedule(s)) for s in range(total)])
    assert np.all(np.diff(steps) < 0)  # strictly decreasing: no warmup, no plateau
    np.testing.assert_allclose(np.diff(steps), np.diff(steps)[0], rtol=1e-3)  # linear


def test_optional_warmup_precedes_the_decay():
    c = filled("lima_65b.py")
    c.optimizer.warmup_steps = 10
    schedule = learning_rate_schedule(c, 100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1e-5)
    assert float(schedule(99)) == pytest.approx(1e-6)


def test_weight_decay_skips_norm_scales_only():
    params = {"embedding": jnp.ones((4, 2)), "final_norm": {"scale": jnp.ones(2)},
              "layers": {"attention_norm": {"scale": jnp.ones((3, 2))}, "mlp": {"w1": jnp.ones((3, 2, 2))}}}
    mask = weight_decay_mask(params)
    assert mask == {"embedding": True, "final_norm": {"scale": False},
                    "layers": {"attention_norm": {"scale": False}, "mlp": {"w1": True}}}


def test_adamw_update_decays_weights_but_not_norms():
    c = filled("lima_65b.py")
    c.optimizer.learning_rate = c.optimizer.end_learning_rate = 0.1
    tx = make_optimizer(c, 10)
    params = {"w": jnp.full((2,), 2.0), "norm": {"scale": jnp.full((2,), 2.0)}}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["w"], 2.0 - 0.1 * 0.1 * 2.0, rtol=1e-6)  # decoupled decay: lr * wd * w
    np.testing.assert_allclose(new["norm"]["scale"], 2.0)


def test_gradient_clipping_is_optional():
    c = filled("lima_65b.py")
    c.optimizer.learning_rate = c.optimizer.end_learning_rate = 1.0
    c.optimizer.weight_decay = 0.0
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.array([300.0, 400.0, 0.0])}
    c.optimizer.grad_clip_norm = 1.0
    clipped = make_optimizer(c, 10)
    c.optimizer.grad_clip_norm = 0.0
    plain = make_optimizer(c, 10)
    # Adam normalizes the step, so compare the clipped gradient it saw via the first moment
    _, state_clipped = clipped.update(grads, clipped.init(params), params)
    _, state_plain = plain.update(grads, plain.init(params), params)
    mu_clipped = jax.tree.leaves(state_clipped[1][0].mu)[0]
    mu_plain = jax.tree.leaves(state_plain[0].mu)[0]
    np.testing.assert_allclose(mu_clipped, 0.1 * np.array([0.6, 0.8, 0.0]), rtol=1e-5)
    np.testing.assert_allclose(mu_plain, 0.1 * np.array([300.0, 400.0, 0.0]), rtol=1e-5)


def _adam_state(opt_state):
    return next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState))


@pytest.mark.parametrize("mu_dtype, nu_dtype", [("bfloat16", "param"), ("bfloat16", "bfloat16"),
                                                ("param", "bfloat16")])
def test_bfloat16_moments_are_stored_so_and_give_the_float32_step(mu_dtype, nu_dtype):
    """Two AdamW steps of float32 parameters: the moments have the chosen dtypes, and the updates agree
    with all-float32 moments within bfloat16's rounding (1%)."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(64, 8)), jnp.float32), "norm": {"scale": jnp.ones(8)}}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(2)]

    def run(mu, nu):
        c = filled("lima_65b.py")
        c.optimizer.mu_dtype, c.optimizer.nu_dtype = mu, nu
        validate(c)
        tx = make_optimizer(c, 10)
        state, p, updates = tx.init(params), params, None
        for g in grads:
            updates, state = jax.jit(tx.update)(g, state, p)
            p = optax.apply_updates(p, updates)
        return updates, _adam_state(state)

    reference, ref_state = run("param", "param")
    updates, state = run(mu_dtype, nu_dtype)
    expected = {"param": jnp.float32, "bfloat16": jnp.bfloat16}
    assert {x.dtype for x in jax.tree.leaves(ref_state.mu) + jax.tree.leaves(ref_state.nu)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.mu)} == {jnp.dtype(expected[mu_dtype])}
    assert {x.dtype for x in jax.tree.leaves(state.nu)} == {jnp.dtype(expected[nu_dtype])}
    for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(reference)):
        np.testing.assert_allclose(got, want, rtol=0.01, atol=0.01 * float(jnp.abs(want).max()))


def test_bfloat16_second_moment_needs_a_small_b2():
    c = filled("lima_65b.py")
    c.optimizer.nu_dtype, c.optimizer.b2 = "bfloat16", 0.999
    with pytest.raises(ConfigError, match=r"config.optimizer.nu_dtype='bfloat16': bfloat16 .* b2=0.999"):
        validate(c)
