"""Building what every tool runs on from a config: the tokenizer, the typed model config, the mesh and its
sharding rules, the sharded train state (never materialized on one host), and parameters loaded from a
checkpoint straight into their shards.

  build                 tokenizer, model config, mesh, rules: everything checked before any compilation
  abstract_train_state  the state's shapes and shardings (eval_shape: no memory used)
  create_train_state    a freshly initialized state, created in its shards
  initial_state         the state training starts from: `init_from`'s weights or a fresh init
  load_params           a checkpoint's parameters, checked against the config, onto the mesh
  global_batch          each host's rows assembled into the global, sharded batch
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding

from lima_jax import attention, rundir, sharding
from lima_jax.checkpoint import check_model_matches
from lima_jax.config import ModelConfig, model_config
from lima_jax.errors import CheckpointError, ConfigError
from lima_jax.model import Llama, resize_vocab
from lima_jax.sharding import Rules
from lima_jax.tokenizer import Tokenizer, eot_init_row, load_tokenizer
from lima_jax.train_step import TrainState


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What a model needs to run: its tokenizer, typed config, device mesh and logical-axis rules."""

    tokenizer: Tokenizer
    model_cfg: ModelConfig
    mesh: Mesh
    rules: Rules

    @functools.cached_property
    def model(self) -> Llama:
        """One model object per runtime: the train state's `apply_fn` must be the same in every tree."""
        return Llama(self.model_cfg)


def use_compilation_cache(config: ml_collections.ConfigDict) -> None:
    """Points JAX's persistent compilation cache at `config.train.compilation_cache_dir` when it is set, so a
    restarted job loads its compiled programs instead of compiling them again. JAX reads the setting at its
    first compilation: `build` calls this before anything is compiled."""
    folder = config.get("train", {}).get("compilation_cache_dir", "")
    if folder:
        jax.config.update("jax_compilation_cache_dir", str(folder))
        logging.info("compilation cache: %s (train.compilation_cache_dir)", folder)


def build(config: ml_collections.ConfigDict, with_eot: bool = True, tokenizer: Tokenizer | None = None) -> Runtime:
    """The Runtime of `config`, every part checked (tokenizer file, vocabulary, mesh) before any compilation.
    `with_eot=False` admits a model without the EOT row (a base model, sampled as plain completion);
    `tokenizer`, when the caller has already loaded `config`'s, is used instead of loading it again."""
    use_compilation_cache(config)
    if tokenizer is None:
        tokenizer = load_tokenizer(config)
        logging.info("tokenizer: %s", tokenizer.describe())
    smallest = tokenizer.vocab_size if with_eot else tokenizer.base_vocab_size
    model_cfg = model_config(config, vocab_size=config.model.vocab_size or smallest)
    if model_cfg.vocab_size < smallest:
        raise ConfigError(f"{config.get('source_file', '<config>')}: config.model.vocab_size="
                          f"{model_cfg.vocab_size} is smaller than the tokenizer's {smallest}"
                          + (" (EOT included)" if with_eot and tokenizer.eot_is_new_row else ""))
    attention.check_backend(model_cfg.attention)  # a GPU/TPU kernel on a backend without it
    # the mesh splits the embedding's rows: the padded vocabulary (model.vocab_multiple) is what must divide
    mesh = sharding.make_mesh(config, vocab_size=model_cfg.padded_vocab_size)
    rules = sharding.layout_rules(config, vocab_size=model_cfg.padded_vocab_size, shape=mesh.devices.shape)
    return Runtime(tokenizer, model_cfg, mesh, rules)


# ----------------------------------------------------------------------------------------- train state


def _init_boxed_state(model: Llama, tx: optax.GradientTransformation, seq_len: int, rng: jax.Array):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init({"params": rng}, tokens)["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def _abstract_key() -> jax.ShapeDtypeStruct:
    """A PRNG key's shape for eval_shape. A concrete key would be placed on the current mesh, which for an
    ahead-of-time TPU topology has no devices to run on."""
    return jax.eval_shape(jax.random.key, 0)


def abstract_train_state(model: Llama, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules,
                         seq_len: int = 8) -> tuple[Any, Any]:
    """(abstract state with shardings attached, state shardings), from `eval_shape`: no memory used."""
    boxed = jax.eval_shape(lambda r: _init_boxed_state(model, tx, seq_len, r), _abstract_key())
    return _sharded_shapes(boxed, mesh, rules)


def create_train_state(model: Llama, tx: optax.GradientTransformation, shardings: Any, rng: jax.Array,
                       seq_len: int = 8) -> TrainState:
    """A freshly initialized state, created directly in its shards (jit with out_shardings)."""
    init = jax.jit(lambda r: nn.meta.unbox(_init_boxed_state(model, tx, seq_len, r)), out_shardings=shardings)
    return init(rng)


def abstract_params(model: Llama, mesh: Mesh, rules: Rules) -> Any:
    """ShapeDtypeStructs (with shardings on `mesh`) of the model's parameters; no memory used."""
    boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"], _abstract_key())
    return _sharded_shapes(boxed, mesh, rules)[0]


def _sharded_shapes(boxed: Any, mesh: Mesh, rules: Rules) -> tuple[Any, Any]:
    """(ShapeDtypeStructs carrying their shardings, the shardings) of an `eval_shape` tree of flax boxes.

    Unboxed without the sharding constraint flax's `unbox` would apply: these are shapes, not arrays."""
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    shapes = jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, boxed, is_leaf=is_box)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return abstract, shardings


def initial_state(config: ml_collections.ConfigDict, rt: Runtime, tx: optax.GradientTransformation,
                  state_shardings: Any) -> TrainState:
    """The state a new run starts from: `config.init_from`'s parameters (checked, grown by the EOT row if
    needed) with a fresh optimizer state, else a random init from `config.seed`."""
    model = rt.model
    if not config.init_from:
        return create_train_state(model, tx, state_shardings, jax.random.key(config.seed))
    choice, stored = check_init_from(config, rt.model_cfg)
    logging.info("init_from: %s", choice.describe())
    params = load_pretrained_params(choice, rt.model_cfg, stored, rt.mesh, rt.rules,
                                    eot_init_row(config, rt.tokenizer))
    return jax.jit(lambda p: TrainState.create(apply_fn=model.apply, params=p, tx=tx),
                   out_shardings=state_shardings, donate_argnums=0)(params)


# ---------------------------------------------------------------------------------------------- params


def check_init_from(config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> tuple[rundir.CheckpointChoice, dict]:
    """(the checkpoint `config.init_from` names, its stored model config), checked against the config's
    model without reading any weights."""
    where = f"{config.get('source_file', '<config>')}: config.init_from={config.init_from!r}"
    try:
        choice = rundir.resolve_checkpoint(config.init_from)
        stored = rundir.stored_model_config(choice)
    except CheckpointError as e:
        raise ConfigError(f"{where}: {e}") from None
    check_model_matches(stored, model_cfg, where, allow_smaller_vocab=True)
    return choice, stored


def load_pretrained_params(choice: rundir.CheckpointChoice, model_cfg: ModelConfig, stored: dict, mesh: Mesh,
                           rules: Rules, new_row_from: int | None = None) -> Any:
    """Parameters of a `lima_jax.convert` checkpoint (or another run's), restored straight into their shards
    and grown to `model_cfg.vocab_size` if the EOT row is new (new rows = the mean of the existing rows, or
    copies of row `new_row_from`: `tokenizer.eot_init_row`), the vocabulary padding re-made for
    `model_cfg.vocab_multiple` (zero rows) if the checkpoint's differs."""
    stored_cfg = dataclasses.replace(model_cfg, vocab_size=stored["vocab_size"],
                                     vocab_multiple=stored.get("vocab_multiple", 1))
    abstract = abstract_params(Llama(stored_cfg), mesh, rules)
    params, _ = rundir.load_checkpoint_params(choice, abstract)
    if stored_cfg.padded_vocab_size == model_cfg.padded_vocab_size and stored_cfg.vocab_size == model_cfg.vocab_size:
        return params
    grown = model_cfg.vocab_size > stored_cfg.vocab_size
    start = "" if not grown else "; new rows = " + ("the mean of the existing rows" if new_row_from is None
                                                    else f"copies of row {new_row_from}")
    logging.info("vocabulary %d (%d rows) -> %d (%d rows%s; padding rows zero)", stored_cfg.vocab_size,
                 stored_cfg.padded_vocab_size, model_cfg.vocab_size, model_cfg.padded_vocab_size, start)
    target = jax.tree.map(lambda a: a.sharding, abstract_params(Llama(model_cfg), mesh, rules))
    resize = functools.partial(resize_vocab, new_vocab_size=model_cfg.vocab_size, old_vocab_size=stored_cfg.vocab_size,
                               padded_size=model_cfg.padded_vocab_size, copy_row=new_row_from if grown else None)
    return jax.jit(resize, out_shardings=target)(params)


def load_params(choice: rundir.CheckpointChoice, rt: Runtime) -> Any:
    """A checkpoint's parameters, checked against the runtime's model config and restored straight onto its
    mesh's shardings (the vocabulary padding re-made if the checkpoint's `vocab_multiple` differs); of a
    training checkpoint only the parameters are read."""
    stored = rundir.stored_model_config(choice)
    check_model_matches(stored, rt.model_cfg, f"checkpoint {choice.folder}")
    return load_pretrained_params(choice, rt.model_cfg, stored, rt.mesh, rt.rules)


# ----------------------------------------------------------------------------------------------- batch


def global_batch(local: dict[str, np.ndarray], batch_sharding: NamedSharding,
                 global_shape: tuple[int, int] | None = None) -> dict[str, jax.Array]:
    """Assembles each host's rows into global [batch, length] arrays sharded over the data axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding, v, global_shape) for k, v in local.items()}
