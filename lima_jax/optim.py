"""The LIMA optimizer: AdamW (b1 0.9, b2 0.95, weight decay 0.1) with a linear learning-rate decay.

The learning rate goes linearly from `learning_rate` at the first step to `end_learning_rate` at the last
step of the last epoch (LIMA: 1e-5 -> 1e-6, no warmup; an optional linear warmup precedes the decay).
Weight decay skips norm scales (decaying a gain towards 0 only shrinks the signal). Optional global-norm
gradient clipping comes first.
"""
from __future__ import annotations

import jax
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


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    o = config.optimizer
    adamw = optax.adamw(learning_rate_schedule(config, total_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                        weight_decay=o.weight_decay, mask=weight_decay_mask)
    if o.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), adamw)
    return adamw
