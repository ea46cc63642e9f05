"""Device mesh and the one table that maps logical axis names to mesh axes.

The model names every dimension of every parameter and key activation ("batch", "length", "embed",
"heads", "kv_heads", "kv", "mlp", "vocab", "layers", "norm"); optimizer state inherits the parameters'
names. A *layout* is an ordered list of (logical axis, mesh axes) rules; flax assigns mesh axes by priority
and never uses one mesh axis twice in an array, so "batch" (listed first) takes the data axes before
"embed" could. Presets (`config.mesh.layout`):

  data     pure data parallel: parameters replicated, batch split over every device
  fsdp     ZeRO-3 style: batch split over data x fsdp, parameters and optimizer state split along embed
  fsdp_tp  fsdp plus Megatron tensor parallelism over heads / mlp / vocab on the "tensor" axis
  tensor   tensor parallelism only (parameters split over heads / mlp / vocab, batch over data x fsdp)

User rules in `config.mesh.rules` come before the preset's, so they win, e.g.
`c.mesh.rules = (("vocab", None),)` keeps the embedding unsplit under fsdp_tp.

The mesh is (data, fsdp, tensor) with sizes from `config.mesh.{data,fsdp,tensor}`, one of them -1
(inferred from the device count). On a multi-slice TPU job (devices with several `slice_index` values) the
slices are laid along the data axis, so only gradient all-reduces cross the slower data-centre network.
Everything here is checked before anything is compiled: errors name the config file and field.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lima_jax.config import ConfigError, packing_mode
from lima_jax.xla_cpu import keep_freed_memory

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "kv", "mlp", "vocab", "layers", "norm")
MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

_BATCH = (("batch", ("data", "fsdp")),)
_REPLICATED = (("layers", None), ("length", None), ("norm", None), ("kv", None))
_TENSOR = (("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))
_NO_TENSOR = (("heads", None), ("kv_heads", None), ("mlp", None), ("vocab", None))
LAYOUTS: dict[str, Rules] = {
    "data": _BATCH + _REPLICATED + _NO_TENSOR + (("embed", None),),
    "fsdp": _BATCH + _REPLICATED + _NO_TENSOR + (("embed", "fsdp"),),
    "fsdp_tp": _BATCH + _REPLICATED + _TENSOR + (("embed", "fsdp"),),
    "tensor": _BATCH + _REPLICATED + _TENSOR + (("embed", None),),
}


def _where(config: ml_collections.ConfigDict) -> str:
    return config.get("source_file", "") or "<config>"


def _as_mesh_axes(target: Any) -> MeshAxes:
    if target is None or isinstance(target, str):
        return target
    return tuple(target)


def _axes_of(target: MeshAxes) -> tuple[str, ...]:
    return (target,) if isinstance(target, str) else tuple(target or ())


def layout_rules(config: ml_collections.ConfigDict, layout: str | None = None, vocab_size: int | None = None,
                 shape: Sequence[int] | None = None) -> Rules:
    """The rules in force: the user's `mesh.rules` first, then those of `layout` (default `mesh.layout`).

    LLaMA's vocabulary plus EOT (32,001) divides no tensor axis; when `vocab_size` and the mesh `shape` are
    given and the preset (not a user rule) would split an indivisible vocabulary, the embedding and LM
    head stay whole along vocab (a ("vocab", None) rule goes first) instead of failing.
    """
    name = layout or config.mesh.layout
    if name not in LAYOUTS:
        raise ConfigError(f"{_where(config)}: config.mesh.layout={name!r}: not one of {sorted(LAYOUTS)}")
    user = []
    for rule in config.mesh.get("rules", ()):
        if len(rule) != 2:
            raise ConfigError(f"{_where(config)}: config.mesh.rules: {rule!r} is not a (logical_axis, mesh_axes) pair")
        logical, target = str(rule[0]), _as_mesh_axes(rule[1])
        if logical not in LOGICAL_AXES:
            raise ConfigError(f"{_where(config)}: config.mesh.rules: logical axis {logical!r} is not one of "
                              f"{LOGICAL_AXES}")
        unknown = [a for a in _axes_of(target) if a not in MESH_AXES]
        if unknown:
            raise ConfigError(f"{_where(config)}: config.mesh.rules: ({logical!r}, {target!r}) names mesh axes "
                              f"{unknown}, not in {MESH_AXES}")
        user.append((logical, target))
    rules = tuple(user) + LAYOUTS[name]
    target = rule_table(rules).get("vocab")
    if vocab_size and shape is not None and not any(r[0] == "vocab" for r in user):
        ways = math.prod(dict(zip(MESH_AXES, shape))[a] for a in _axes_of(target))
        if vocab_size % ways:
            logging.warning("vocabulary %d does not divide mesh axes %s (%d ways): the embedding and LM head "
                            "are not split along vocab (set config.model.vocab_multiple, e.g. 128, to pad and "
                            "split them)", vocab_size, target, ways)
            rules = (("vocab", None),) + rules
    return rules


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Mesh sizes for (data, fsdp, tensor), resolving one -1 to the remaining devices; validated."""
    sizes = [int(config.mesh[axis]) for axis in MESH_AXES]
    shown = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
    inferred = [i for i, s in enumerate(sizes) if s == -1]
    if len(inferred) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"{_where(config)}: config.mesh ({shown}): sizes must be positive, with at most one "
                          "-1 (inferred from the device count)")
    known = math.prod(s for s in sizes if s != -1)
    if inferred:
        if num_devices % known:
            raise ConfigError(f"{_where(config)}: config.mesh ({shown}): {num_devices} devices are not divisible "
                              f"by the fixed axes' product {known}")
        sizes[inferred[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"{_where(config)}: config.mesh ({shown}): needs {math.prod(sizes)} devices, but "
                          f"{num_devices} are present (set one axis to -1 to infer it)")
    return tuple(sizes)


def rule_table(rules: Rules) -> dict[str, MeshAxes]:
    """logical axis -> mesh axes, the first rule for each logical axis winning (as in flax)."""
    table: dict[str, MeshAxes] = {}
    for logical, target in rules:
        table.setdefault(logical, target)
    return table


def validate_for_mesh(config: ml_collections.ConfigDict, shape: Sequence[int], vocab_size: int | None = None,
                      rules: Rules | None = None) -> None:
    """Batch and model dimensions must divide the mesh axes they are split over (checked before compiling).

    `vocab_size` is the model's embedding rows: the tokenizer's plus EOT when `model.vocab_size` is 0, padded to
    a multiple of `model.vocab_multiple` (`ModelConfig.padded_vocab_size`).
    """
    where = _where(config)
    sizes = dict(zip(MESH_AXES, shape))
    rules = rules if rules is not None else layout_rules(config, vocab_size=vocab_size, shape=shape)
    table = rule_table(rules)
    batch_ways = math.prod(sizes[a] for a in _axes_of(table.get("batch")))
    micro_batch = config.train.batch_size // config.train.grad_accum_steps
    # packing="examples" rounds its rows per step up to a multiple of the shards (lima_jax.data.rows_per_step) instead.
    if micro_batch % batch_ways and packing_mode(config.data.get("packing", "none")) != "examples":
        raise ConfigError(f"{where}: config.train.batch_size={config.train.batch_size} "
                          f"(micro-batch {micro_batch} with grad_accum_steps={config.train.grad_accum_steps}) "
                          f"is not divisible by the batch's mesh axes {table.get('batch')} of size {batch_ways} "
                          f"(mesh {sizes})")
    m = config.model
    vocab = vocab_size or m.vocab_size
    dims = {"heads": m.n_heads, "kv_heads": m.n_kv_heads, "mlp": m.hidden_dim, "embed": m.dim,
            "kv": m.dim // m.n_heads, "layers": m.n_layers, "length": config.data.max_len}
    if vocab:
        dims["vocab"] = vocab
    for logical, dim in dims.items():
        target = table.get(logical)
        ways = math.prod(sizes[a] for a in _axes_of(target))
        if dim % ways:
            field = {"heads": "n_heads", "kv_heads": "n_kv_heads", "mlp": "hidden_dim", "embed": "dim",
                     "kv": "dim", "layers": "n_layers", "vocab": "vocab_size"}.get(logical)
            name = f"config.model.{field}" if field else "config.data.max_len"
            raise ConfigError(f"{where}: {name}: {logical} size {dim} is not divisible by mesh axes {target} of "
                              f"size {ways} (layout {config.mesh.layout!r}, mesh {sizes}); change config.mesh or "
                              f"add a config.mesh.rules entry such as ({logical!r}, None)")


def _num_slices(devices: Sequence[Any]) -> int:
    return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(shape: Sequence[int], devices: Sequence[Any], where: str = "<config>") -> np.ndarray:
    """Devices arranged in `shape`: ICI-aware on TPU, slices along the data axis when there are several."""
    slices = _num_slices(devices)
    if slices > 1:
        if shape[0] % slices:
            raise ConfigError(f"{where}: config.mesh.data={shape[0]}: a job over {slices} TPU slices lays the "
                              f"slices along the data axis, so data must be a multiple of {slices}")
        ici = (shape[0] // slices, *shape[1:])
        return mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices=devices)
    try:
        return mesh_utils.create_device_mesh(tuple(shape), devices=list(devices))
    except (ValueError, NotImplementedError, AssertionError, KeyError):
        return np.asarray(devices).reshape(shape)  # CPU or an irregular device set: plain order


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None,
              vocab_size: int | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all), the config checked against it first.

    Use `layout_rules(config, vocab_size=..., shape=mesh.devices.shape)` for the matching rules."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(config, len(devices))
    validate_for_mesh(config, shape, vocab_size)
    keep_freed_memory(devices[0].platform)  # CPU steps reuse their temporaries' pages (lima_jax.xla_cpu)
    return Mesh(device_grid(shape, devices, _where(config)), MESH_AXES)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules):
    """The context to trace, compile and run the model in: `mesh` set as JAX's current mesh and `rules` as
    flax's logical axis rules.

    `jax.set_mesh`, not the legacy `with mesh:`: under the latter JAX's abstract mesh stays empty and flax
    silently drops every `with_logical_constraint`, leaving XLA to shard the activations as it likes.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_sharding(mesh: Mesh, rules: Rules, logical_axes: tuple[str | None, ...]) -> NamedSharding:
    return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_axes, rules))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of [batch, length] input arrays."""
    return logical_sharding(mesh, rules, ("batch", "length"))


def batch_shards(sharding: NamedSharding) -> int:
    """How many ways `sharding` splits the batch (first) dimension: the rows of a (micro-)batch must divide it."""
    first = sharding.spec[0] if len(sharding.spec) else None
    return math.prod(dict(sharding.mesh.shape)[a] for a in _axes_of(first))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def process_batch_block(sharding: NamedSharding, global_shape: tuple[int, ...],
                        process_index: int | None = None) -> tuple[int, int]:
    """(block index, number of blocks): this host loads rows [i*B/n, (i+1)*B/n) of each global batch.

    Hosts whose devices hold the same rows (e.g. a tensor axis that spans hosts) get the same block, so a
    host never loads rows that none of its devices need. Raises if this host's rows are not one aligned block.
    """
    process_index = jax.process_index() if process_index is None else process_index
    batch = global_shape[0]
    rows: set[tuple[int, int]] = set()
    for device, index in sharding.devices_indices_map(tuple(global_shape)).items():
        if device.process_index == process_index:
            start, stop, _ = index[0].indices(batch)
            rows.add((start, stop))
    start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
    covered = sum(b - a for a, b in sorted(rows))
    size = stop - start
    if covered != size or batch % size or start % size:
        raise ConfigError(f"process {process_index} holds batch rows {sorted(rows)} of {batch}: not one aligned "
                          "block; reorder config.mesh so the data axes run across hosts")
    return start // size, batch // size


def spec_tree(tree: Any) -> Any:
    """The PartitionSpec of every array (or ShapeDtypeStruct) leaf: for logs and tests."""
    return jax.tree.map(lambda x: x.sharding.spec, tree)
