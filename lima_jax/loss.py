"""The training loss: masked token cross-entropy of the LM head's logits, whole or in sequence chunks.

  token_loss_sums  (sum of weighted token cross-entropies, sum of weights) of a block of logits: the one
                   definition of the loss and its masking (`weights` is 0 for prompt and padding tokens)
  lm_loss_sums     the same sums from the final hidden states and the LM head, with the logits made either
                   at once or `chunk_length` sequence positions at a time

Chunking: the float32 logits [batch, length, vocab] are the largest activation of a LLaMA step (32,001 x
2,048 x 4 bytes = 262 MB per row). With `chunk_length` = c the head, log-softmax and cross-entropy run on
[batch, c, vocab] slices inside a `lax.scan` whose body is `jax.checkpoint`ed, so the backward pass
recomputes each chunk's logits instead of keeping them: only one chunk's logits exist at a time. The sums
are the same as the whole-sequence ones up to float32 summation order (tests/test_loss.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import flax.linen as nn

from lima_jax.config import ModelConfig
from lima_jax.model import lm_logits

Array = jax.Array


def token_loss_sums(logits: Array, targets: Array, weights: Array) -> tuple[Array, Array]:
    """(sum of token cross-entropies weighted by `weights`, sum of weights); logits [..., vocab] float32."""
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(token_loss * weights), jnp.sum(weights)


def lm_loss_sums(hidden: Array, head: Array, targets: Array, weights: Array, cfg: ModelConfig,
                 chunk_length: int = 0) -> tuple[Array, Array]:
    """`token_loss_sums` of `lm_logits(hidden, head)`: hidden [batch, length, dim], head [dim, padded_vocab],
    targets / weights [batch, length]. `chunk_length` > 0 (and below the length) makes the logits that many
    positions at a time and recomputes them in the backward pass; a length that is no multiple of it is
    padded with weight-0 positions."""
    length = hidden.shape[1]
    if not chunk_length or chunk_length >= length:
        return token_loss_sums(lm_logits(hidden, head, cfg), targets, weights)
    pad = -length % chunk_length
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    chunks = (length + pad) // chunk_length

    def split(x: Array) -> Array:  # [batch, chunks * c, ...] -> [chunks, batch, c, ...]: every chunk spans all rows
        return jnp.swapaxes(x.reshape(x.shape[0], chunks, chunk_length, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def chunk_sums(head: Array, h: Array, t: Array, w: Array) -> tuple[Array, Array]:
        h = nn.with_logical_constraint(h, ("batch", "length", "embed"))
        return token_loss_sums(lm_logits(h, head, cfg), t, w)

    def body(carry, inputs):
        loss_sum, count = chunk_sums(head, *inputs)
        return (carry[0] + loss_sum, carry[1] + count), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, count), _ = jax.lax.scan(body, (zero, zero), (split(hidden), split(targets), split(weights)))
    return loss_sum, count
