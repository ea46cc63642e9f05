"""The one jitted train step: what `lima_jax.train` runs and `lima_jax.layouts` compiles and measures.

  loss_sums        summed token cross-entropy and target count of one (micro-)batch
  all_finite       whether every float of a tree is finite, as one fused reduction
  make_train_step  one optimizer step, gradient accumulation normalized by the total target tokens
  jit_train_step   that step jitted with the state's shardings and the donated state
  abstract_batch   the batch's shapes (rows per step x max_len), for compiling ahead of time
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state
from jax.sharding import NamedSharding

from lima_jax.data.pipeline import BATCH_FIELDS
from lima_jax.loss import lm_loss_sums
from lima_jax.model import Llama

TrainState = train_state.TrainState


def loss_sums(params: Any, model: Llama, batch: dict, rng: jax.Array | None, deterministic: bool,
              chunk_length: int = 0):
    """(sum of token cross-entropies weighted by `weights`, sum of weights) for one batch; the logits made
    `chunk_length` sequence positions at a time when > 0 (`lima_jax.loss.lm_loss_sums`)."""
    (hidden, head), _ = model.apply({"params": params}, batch["tokens"], batch["segment_ids"], batch["positions"],
                                    deterministic=deterministic, rngs=None if deterministic else {"dropout": rng},
                                    return_hidden=True)
    return lm_loss_sums(hidden, head, batch["targets"], batch["weights"], model.cfg, chunk_length)


def all_finite(tree: Any) -> jax.Array:
    """True when every floating-point value of `tree` is finite: a reduction per leaf that XLA fuses with the
    computation producing the leaf (no second pass over the state)."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def make_train_step(model: Llama, config: ml_collections.ConfigDict, schedule: optax.Schedule,
                    base_rng: jax.Array) -> Callable:
    """A (state, batch) -> (state, metrics) function; jit it with the state's shardings (`jit_train_step`).

    With `grad_accum_steps` = k the batch is split into k micro-batches (rows i, i+k, i+2k, ... so each
    micro-batch stays spread over all data shards); gradients of the *summed* token losses are added up
    and divided once by the total number of target tokens, so the update equals the full-batch update.
    The metrics include `state_finite`: whether the updated parameters and optimizer state are all finite.
    """
    accum = config.train.grad_accum_steps
    chunk_length = config.train.get("loss_chunk_length", 0)  # absent in a config.json written before it existed
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def micro_step(params, micro_batch, rng):
        (loss_sum, count), grads = grad_fn(params, model, micro_batch, rng, False, chunk_length)
        return grads, loss_sum, count

    def train_step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(base_rng, state.step)
        if accum == 1:
            grads, loss_sum, count = micro_step(state.params, batch, rng)
        else:
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
                                 batch)

            def body(carry, inputs):
                index, micro_batch = inputs
                micro_batch = jax.tree.map(lambda x: nn.with_logical_constraint(x, ("batch", "length")),
                                           micro_batch)
                grads, loss_sum, count = micro_step(state.params, micro_batch, jax.random.fold_in(rng, index))
                return jax.tree.map(jnp.add, carry, (grads, loss_sum, count)), None

            zeros = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros(()), jnp.zeros(()))
            (grads, loss_sum, count), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
        denominator = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        metrics = {
            "loss": loss_sum / denominator,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": schedule(state.step),
            "target_tokens": count,
            "tokens": jnp.sum(batch["segment_ids"] != 0),
        }
        new_state = state.apply_gradients(grads=grads)
        # What a checkpoint of this step would hold: checked before anything of it is saved.
        metrics["state_finite"] = all_finite((new_state.params, new_state.opt_state))
        return new_state, metrics

    return train_step


def jit_train_step(model: Llama, config: ml_collections.ConfigDict, schedule: optax.Schedule, state_shardings: Any,
                   batch_sharding: NamedSharding) -> Callable:
    """The train step jitted as training runs it: state and batch shardings in, the state donated, its dropout
    keys derived from `config.seed + 1`. Lower and call it under `sharding.activate(mesh, rules)`."""
    step = make_train_step(model, config, schedule, jax.random.key(config.seed + 1))
    return jax.jit(step, in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
                   donate_argnums=0)


def abstract_batch(config: ml_collections.ConfigDict, batch_sharding: NamedSharding,
                   num_rows: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of one global batch ([num_rows, data.max_len] per field): `num_rows` is the run's
    rows per step (`lima_jax.data.rows_per_step`), by default train.batch_size (packing "none" / "rows")."""
    shape = (config.train.batch_size if num_rows is None else num_rows, config.data.max_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "weights" else jnp.int32, sharding=batch_sharding)
            for k in BATCH_FIELDS}
