"""Fine-tune LLaMA with the LIMA recipe.

    python -m lima_jax.train --config configs/toy.py --config.workdir=/tmp/lima_toy
    python -m lima_jax.train --config configs/lima_65b.py --config.workdir=... --config.init_from=...

Runs `train.num_epochs` epochs over the data, writes a checkpoint at the end of every epoch (all kept),
and resumes from the latest checkpoint in `workdir` when restarted. Every host of a pod slice runs the
same command. The pieces:

  loss_sums        summed token cross-entropy and target count of one (micro-)batch
  make_train_step  one optimizer step, gradient accumulation normalized by the total target tokens
  create_train_state / abstract_train_state   the sharded state, never materialized on one host
  train            the loop: data -> steps -> metrics -> per-epoch checkpoints
"""
from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, logging
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from ml_collections import config_flags

from lima_jax import checkpoint, data, distributed, sharding
from lima_jax.config import ConfigError, ModelConfig, config_from_flag, model_config, validate
from lima_jax.fileio import atomic_write_text
from lima_jax.metrics import MetricsWriter, quiet_library_logs
from lima_jax.model import Llama, resize_vocab
from lima_jax.optim import learning_rate_schedule, make_optimizer
from lima_jax.tokenizer import Tokenizer

TrainState = train_state.TrainState


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; no checkpoint of that state was written."""


# ----------------------------------------------------------------------------------------------- loss


def loss_sums(params: Any, model: Llama, batch: dict, rng: jax.Array | None, deterministic: bool):
    """(sum of token cross-entropies weighted by `weights`, sum of weights) for one batch."""
    logits, _ = model.apply({"params": params}, batch["tokens"], batch["segment_ids"], batch["positions"],
                            deterministic=deterministic, rngs=None if deterministic else {"dropout": rng})
    token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    weights = batch["weights"]
    return jnp.sum(token_loss * weights), jnp.sum(weights)


def make_train_step(model: Llama, config: ml_collections.ConfigDict, schedule: optax.Schedule,
                    base_rng: jax.Array) -> Callable:
    """A (state, batch) -> (state, metrics) function; jit it with the state's shardings.

    With `grad_accum_steps` = k the batch is split into k micro-batches (rows i, i+k, i+2k, ... so each
    micro-batch stays spread over all data shards); gradients of the *summed* token losses are added up
    and divided once by the total number of target tokens, so the update equals the full-batch update.
    """
    accum = config.train.grad_accum_steps
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def micro_step(params, micro_batch, rng):
        (loss_sum, count), grads = grad_fn(params, model, micro_batch, rng, False)
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
        return state.apply_gradients(grads=grads), metrics

    return train_step


# ----------------------------------------------------------------------------------------- train state


def _init_boxed_state(model: Llama, tx: optax.GradientTransformation, seq_len: int, rng: jax.Array):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init({"params": rng}, tokens)["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def _abstract_key() -> jax.ShapeDtypeStruct:
    """A PRNG key's shape for eval_shape. A concrete key would be placed on the current mesh, which for an
    ahead-of-time TPU topology has no devices to run on."""
    return jax.eval_shape(jax.random.key, 0)


def abstract_train_state(model: Llama, tx: optax.GradientTransformation, mesh: Mesh, rules,
                         seq_len: int = 8) -> tuple[Any, Any]:
    """(abstract state with shardings attached, state shardings), from `eval_shape`: no memory used."""
    boxed = jax.eval_shape(lambda r: _init_boxed_state(model, tx, seq_len, r), _abstract_key())
    return _sharded_shapes(boxed, mesh, rules)


def create_train_state(model: Llama, tx: optax.GradientTransformation, shardings: Any, rng: jax.Array,
                       seq_len: int = 8) -> TrainState:
    """A freshly initialized state, created directly in its shards (jit with out_shardings)."""
    init = jax.jit(lambda r: nn.meta.unbox(_init_boxed_state(model, tx, seq_len, r)), out_shardings=shardings)
    return init(rng)


def abstract_params(model: Llama, mesh: Mesh, rules) -> Any:
    """ShapeDtypeStructs (with shardings on `mesh`) of the model's parameters; no memory used."""
    boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"], _abstract_key())
    return _sharded_shapes(boxed, mesh, rules)[0]


def _sharded_shapes(boxed: Any, mesh: Mesh, rules) -> tuple[Any, Any]:
    """(ShapeDtypeStructs carrying their shardings, the shardings) of an `eval_shape` tree of flax boxes.

    Unboxed without the sharding constraint flax's `unbox` would apply: these are shapes, not arrays."""
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
    shapes = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, boxed, is_leaf=is_box)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return abstract, shardings


def check_init_from(config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> dict:
    """The stored model config of `config.init_from`, checked against the config's (no weights read)."""
    where = f"{config.get('source_file', '<config>')}: config.init_from={config.init_from!r}"
    try:
        stored = checkpoint.stored_model_config(config.init_from)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None
    checkpoint.check_model_matches(stored, model_cfg, where, allow_smaller_vocab=True)
    return stored


def load_pretrained_params(path: str, model_cfg: ModelConfig, stored: dict, mesh: Mesh, rules) -> Any:
    """Parameters of a `lima_jax.convert` checkpoint (or another run's), restored straight into their shards
    and grown to `model_cfg.vocab_size` if the EOT row is new (new rows = mean of the existing rows)."""
    old_vocab = stored["vocab_size"]
    abstract = abstract_params(Llama(dataclasses.replace(model_cfg, vocab_size=old_vocab)), mesh, rules)
    params, _ = checkpoint.load_checkpoint_params(path, abstract)
    if old_vocab == model_cfg.vocab_size:
        return params
    logging.info("growing the vocabulary from %d to %d (EOT rows = mean of existing rows)", old_vocab,
                 model_cfg.vocab_size)
    target = jax.tree.map(lambda a: a.sharding, abstract_params(Llama(model_cfg), mesh, rules))
    return jax.jit(lambda p: resize_vocab(p, model_cfg.vocab_size), out_shardings=target)(params)


# ------------------------------------------------------------------------------------------------ loop


def global_batch(local: dict[str, np.ndarray], batch_sharding: NamedSharding,
                 global_shape: tuple[int, int] | None = None) -> dict[str, jax.Array]:
    """Assembles each host's rows into global [batch, length] arrays sharded over the data axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, v, global_shape) for k, v in local.items()}


@dataclasses.dataclass
class Position:
    """Where training stands: the next epoch (1-based) and the number of its batches already done."""

    epoch: int = 1
    batches_done: int = 0
    step: int = 0


def check_schedule_length(meta: dict, total_steps: int, where: str) -> None:
    """A resumed run must keep the learning-rate schedule it started with (same total steps)."""
    if meta.get("total_steps", total_steps) != total_steps:
        raise ConfigError(f"{where}: this run was started for {meta['total_steps']} steps, the config now gives "
                          f"{total_steps} (train.num_epochs / batch_size / data changed): resuming would bend the "
                          "learning-rate schedule. Start a new workdir with --config.init_from=<this workdir>.")


def position_after(meta: dict, steps_per_epoch: int) -> Position:
    if meta["batches_done"] >= steps_per_epoch:
        return Position(meta["epoch"] + 1, 0, meta["step"])
    return Position(meta["epoch"], meta["batches_done"], meta["step"])


def model_setup(config: ml_collections.ConfigDict):
    """(tokenizer, model config, mesh, rules): everything a model needs, checked, before any compilation."""
    tokenizer = Tokenizer(config.tokenizer.path)
    model_cfg = model_config(config, vocab_size=config.model.vocab_size or tokenizer.vocab_size)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"{config.get('source_file', '<config>')}: config.model.vocab_size="
                          f"{model_cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} (incl. EOT)")
    mesh = sharding.make_mesh(config, vocab_size=model_cfg.vocab_size)
    rules = sharding.layout_rules(config, vocab_size=model_cfg.vocab_size, shape=mesh.devices.shape)
    return tokenizer, model_cfg, mesh, rules


def setup(config: ml_collections.ConfigDict):
    """Validates everything cheap first (config, tokenizer, mesh, init_from, data), before any compilation."""
    validate(config)
    tokenizer, model_cfg, mesh, rules = model_setup(config)
    if config.init_from and not checkpoint.has_train_checkpoints(pathlib.Path(config.workdir) / "checkpoints"):
        check_init_from(config, model_cfg)
    report = data.load_examples(config.data.train_path, tokenizer, config.data.max_len, config.data.loss_on,
                                config.data.on_bad_example)
    return tokenizer, model_cfg, mesh, rules, report


def train(config: ml_collections.ConfigDict, after_epoch: Callable[..., None] | None = None) -> dict:
    """Runs (or resumes) training; returns the last logged metrics. `after_epoch(epoch, state, ...)` runs
    after each epoch's checkpoint is written (e.g. the dev-set report), and with `resumed=True` for the
    epoch a run resumes after, in case the interrupted run stopped inside the hook."""
    tokenizer, model_cfg, mesh, rules, report = setup(config)
    examples = report.examples
    workdir = pathlib.Path(config.workdir)
    layout = data.row_layout(examples, config.data.max_len, config.data.packing)
    logging.info("%s", layout.describe())
    steps_per_epoch = data.steps_per_epoch(layout.num_rows, config.train.batch_size)  # batch_size = rows
    data_signature = data.input_signature(examples, batch_size=config.train.batch_size, max_len=config.data.max_len,
                                          seed=config.seed, shuffle=config.data.shuffle, packing=config.data.packing)
    total_steps = steps_per_epoch * config.train.num_epochs
    logging.info("%d examples (%d trimmed, %d skipped), %d steps per epoch, %d steps in all, mesh %s, layout %s",
                 len(examples), report.num_trimmed, len(report.skipped), steps_per_epoch, total_steps,
                 dict(mesh.shape), config.mesh.layout)

    model = Llama(model_cfg)
    schedule = learning_rate_schedule(config, total_steps)
    tx = make_optimizer(config, total_steps)
    with sharding.activate(mesh, rules):
        abstract, state_shardings = abstract_train_state(model, tx, mesh, rules)
        checkpoints = checkpoint.TrainCheckpoints(workdir / "checkpoints")
        latest = checkpoints.latest_step()
        if latest is not None:
            where = f"{checkpoints.directory}/{latest}"
            meta = checkpoints.read_meta(latest)
            data.check_input_signature(meta, data_signature, where)
            check_schedule_length(meta, total_steps, where)
            state, _ = checkpoints.restore(latest, abstract)
            position = position_after(meta, steps_per_epoch)
            logging.info("resumed from %s: epoch %d, %d batches done", where, meta["epoch"], meta["batches_done"])
        elif config.init_from:
            params = load_pretrained_params(config.init_from, model_cfg, check_init_from(config, model_cfg),
                                            mesh, rules)
            state = jax.jit(lambda p: TrainState.create(apply_fn=model.apply, params=p, tx=tx),
                            out_shardings=state_shardings, donate_argnums=0)(params)
            position = Position()
        else:
            state = create_train_state(model, tx, state_shardings, jax.random.key(config.seed))
            position = Position()
        _save_config(config, workdir)
        _log_parameter_overview(state.params, model_cfg)

        batch_sharding = sharding.batch_sharding(mesh, rules)
        batch_shape = (config.train.batch_size, config.data.max_len)
        block, num_blocks = sharding.process_batch_block(batch_sharding, batch_shape)
        step_fn = jax.jit(make_train_step(model, config, schedule, jax.random.key(config.seed + 1)),
                          in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
                          donate_argnums=0)
        writer = MetricsWriter(workdir, total_steps, resumed_at=int(state.step) if latest is not None else 0)
        last_metrics: dict = {}

        def epoch_done(epoch: int, resumed: bool = False) -> None:
            if after_epoch is not None:
                after_epoch(epoch=epoch, state=state, model=model, tokenizer=tokenizer, mesh=mesh, writer=writer,
                            rules=rules, resumed=resumed)

        try:
            if latest is not None and position.batches_done == 0:
                # Resumed at an epoch boundary: the previous run may have stopped inside this epoch's hook.
                epoch_done(position.epoch - 1, resumed=True)
            for epoch in range(position.epoch, config.train.num_epochs + 1):
                start = position.batches_done if epoch == position.epoch else 0
                batches = data.epoch_batches(
                    examples, batch_size=config.train.batch_size, max_len=config.data.max_len, seed=config.seed,
                    epoch=epoch, shuffle=config.data.shuffle, start_step=start,
                    process_index=block, process_count=num_blocks, packing=config.data.packing)
                for batch_index, local in enumerate(batches, start=start + 1):
                    tic = time.perf_counter()
                    state, metrics = step_fn(state, global_batch(local, batch_sharding, batch_shape))
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    step = int(state.step)
                    if not np.isfinite(metrics["loss"]) or not np.isfinite(metrics["grad_norm"]):
                        raise TrainingDiverged(
                            f"loss {metrics['loss']} / grad_norm {metrics['grad_norm']} at epoch {epoch} step {step}: "
                            f"training stopped; no checkpoint of this state was written (latest good: "
                            f"{checkpoints.latest_step()}). Lower optimizer.learning_rate or set grad_clip_norm.")
                    metrics.update(epoch=epoch, tokens_per_s=metrics["tokens"] / (time.perf_counter() - tic))
                    last_metrics = metrics
                    if step % config.train.log_every == 0 or batch_index == steps_per_epoch:
                        writer.write(step, metrics)
                    end_of_epoch = batch_index == steps_per_epoch
                    every = config.train.checkpoint_every_steps
                    if end_of_epoch or (every and step % every == 0):
                        checkpoints.save(step, state, {"epoch": epoch, "batches_done": batch_index, "step": step,
                                                       "data_signature": data_signature,
                                                       "total_steps": total_steps,
                                                       "end_of_epoch": end_of_epoch,
                                                       "model": dataclasses.asdict(model_cfg)})
                        if end_of_epoch:
                            logging.info("epoch %d done: checkpoint %s/%d", epoch, checkpoints.directory, step)
                epoch_done(epoch)
        finally:
            writer.close()
            checkpoints.close()
    distributed.barrier("train_done")
    return last_metrics


def _save_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """The run's full config as `workdir/config.json` (host 0), beside the checkpoints it produced."""
    if jax.process_index() == 0:
        atomic_write_text(workdir / "config.json", config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def _log_parameter_overview(params: Any, model_cfg: ModelConfig) -> None:
    if jax.process_index() != 0:
        return
    from clu import parameter_overview
    logging.info("parameters:\n%s", parameter_overview.get_parameter_overview(params, include_stats=False))
    logging.info("total parameters: %s (expected %s)", f"{sum(x.size for x in jax.tree.leaves(params)):,}",
                 f"{model_cfg.num_params():,}")


# ------------------------------------------------------------------------------------------------- CLI

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                          lock_config=False)


def main(argv: list[str]) -> None:
    config = config_from_flag(_CONFIG, argv)
    distributed.initialize_from_flags()
    if not distributed.is_main_process():
        logging.set_verbosity(logging.WARNING)  # host 0 logs; the others only warn
    quiet_library_logs()
    from lima_jax.report import dev_report_hook  # per-epoch dev answers when config.data.dev_path is set
    train(config, after_epoch=dev_report_hook(config))


if __name__ == "__main__":
    app.run(main)
