"""The LIMA optimizer: AdamW (b1 0.9, b2 0.95, weight decay 0.1) with a linear learning-rate decay.

The learning rate goes linearly from `learning_rate` at the first step to `end_learning_rate` at the last
step of the last epoch (LIMA: 1e-5 -> 1e-6, no warmup; an optional linear warmup precedes the decay).
Weight decay skips norm scales (decaying a gain towards 0 only shrinks the signal). Optional global-norm
gradient clipping comes first. Adam's moments are stored in the parameters' dtype unless `optimizer.mu_dtype` /
`nu_dtype` say otherwise: bfloat16 moments of float32 parameters save 2 of the 16 bytes per parameter of
the train state each (params, mu, nu and the gradient's 4 bytes).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Step (0-based) -> learning rate; the last step, `total_steps - 1`, gets `end_learning_rate`."""
    o = config.optimizer
    decay_steps = max(total_steps - 1 - o.warmup_steps, 1)
    decay = optax.linear_schedule(o.learning_rate, o.end_learning_rate, decay_steps)
    if not o.warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
    return optax.join_schedules([warmup, decay], [o.warmup_steps])


def weight_decay_mask(params) -> object:
    """True for every parameter that is decayed: all but RMSNorm scales."""
    def decayed(path, _):
        return not any(getattr(k, "key", None) == "scale" for k in path)
    return jax.tree_util.tree_map_with_path(decayed, params)


def second_moment_in(dtype: jnp.dtype, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` (optax's scale_by_adam) with its second moment `nu` stored in `dtype` and updated in float32.

    optax's `mu_dtype` covers only the first moment. Rounding nu to bfloat16 after each float32 update is
    sound only while one step's change, (1 - b2) of the gap to g**2, exceeds half a bfloat16 ulp
    (`config.NU_BF16_MIN_STEP` is checked when the config is validated)."""
    def cast(state, to):
        return state._replace(nu=jax.tree.map(lambda x: x.astype(to), state.nu))

    def init(params):
        return cast(inner.init(params), dtype)

    def update(updates, state, params=None):
        updates, new_state = inner.update(updates, cast(state, jnp.float32), params)
        return updates, cast(new_state, dtype)

    return optax.GradientTransformation(init, update)


def adamw(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """optax.adamw of `config.optimizer` with Adam's moments stored in `mu_dtype` / `nu_dtype` ("param", the
    parameters' dtype, where the config lacks them); the same state tree as `optax.adamw`."""
    o = config.optimizer
    mu_dtype, nu_dtype = (o.get(field, "param") for field in ("mu_dtype", "nu_dtype"))
    adam = optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps, mu_dtype=None if mu_dtype == "param" else mu_dtype)
    if nu_dtype != "param":
        adam = second_moment_in(jnp.dtype(nu_dtype), adam)
    return optax.chain(adam, optax.add_decayed_weights(o.weight_decay, weight_decay_mask),
                       optax.scale_by_learning_rate(learning_rate_schedule(config, total_steps)))


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    o = config.optimizer
    adamw_ = adamw(config, total_steps)
    if o.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), adamw_)
    return adamw_
