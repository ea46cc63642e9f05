"""Device mesh and the one table that maps logical axis names to mesh axes.

The model names every dimension ("batch", "embed", "heads", "mlp", ...). A *layout* is an ordered list
of (logical axis, mesh axes) rules; flax assigns mesh axes by priority and never uses one mesh axis twice
in an array, so "batch" (listed first) takes the data axes before "embed" could. Presets:

  data     pure data parallel: parameters replicated, batch split over every device
  fsdp     ZeRO-3 style: batch split over data x fsdp, parameters and optimizer state split along embed
  fsdp_tp  fsdp plus Megatron tensor parallelism over heads / mlp / vocab on the "tensor" axis
  tensor   tensor parallelism only (parameters split over heads / mlp / vocab, batch over data x fsdp)

User rules in `config.mesh.rules` come before the preset's, so they win.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lima_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

_BATCH = (("batch", ("data", "fsdp")),)
_REPLICATED = (("layers", None), ("length", None), ("norm", None), ("kv", None))
LAYOUTS: dict[str, Rules] = {
    "data": _BATCH + _REPLICATED + (("embed", None), ("heads", None), ("kv_heads", None), ("mlp", None),
                                    ("vocab", None)),
    "fsdp": _BATCH + _REPLICATED + (("embed", "fsdp"), ("heads", None), ("kv_heads", None), ("mlp", None),
                                    ("vocab", None)),
    "fsdp_tp": _BATCH + _REPLICATED + (("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
                                       ("vocab", "tensor"), ("embed", "fsdp")),
    "tensor": _BATCH + _REPLICATED + (("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"),
                                      ("vocab", "tensor"), ("embed", None)),
}


def layout_rules(config: ml_collections.ConfigDict) -> Rules:
    """The rules in force: the user's `mesh.rules` first, then the named layout's."""
    name = config.mesh.layout
    if name not in LAYOUTS:
        raise ConfigError(f"{config.get('source_file', '<config>')}: config.mesh.layout={name!r}: "
                          f"not one of {sorted(LAYOUTS)}")
    user = tuple((str(axis), _as_mesh_axes(target)) for axis, target in config.mesh.rules)
    return user + LAYOUTS[name]


def _as_mesh_axes(target) -> str | tuple[str, ...] | None:
    if target is None or isinstance(target, str):
        return target
    return tuple(target)


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Mesh sizes for (data, fsdp, tensor), resolving one -1 to the remaining devices; validated."""
    where = config.get("source_file", "<config>")
    sizes = [int(config.mesh[axis]) for axis in MESH_AXES]
    inferred = [i for i, s in enumerate(sizes) if s == -1]
    if len(inferred) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"{where}: config.mesh={dict(zip(MESH_AXES, sizes))}: sizes must be positive, "
                          "with at most one -1 (inferred)")
    known = math.prod(s for s in sizes if s != -1)
    if inferred:
        if num_devices % known:
            raise ConfigError(f"{where}: config.mesh={dict(zip(MESH_AXES, sizes))}: {num_devices} devices "
                              f"are not divisible by the fixed axes' product {known}")
        sizes[inferred[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"{where}: config.mesh={dict(zip(MESH_AXES, sizes))}: needs {math.prod(sizes)} "
                          f"devices, but {num_devices} are present")
    return tuple(sizes)


def validate_for_mesh(config: ml_collections.ConfigDict, shape: Sequence[int]) -> None:
    """Batch and model dimensions must divide the mesh axes they are split over (checked before compiling)."""
    where = config.get("source_file", "<config>")
    sizes = dict(zip(MESH_AXES, shape))
    batch_ways = sizes["data"] * sizes["fsdp"]
    micro_batch = config.train.batch_size // config.train.grad_accum_steps
    if micro_batch % batch_ways:
        raise ConfigError(f"{where}: config.train.batch_size={config.train.batch_size} "
                          f"(micro-batch {micro_batch} with grad_accum_steps={config.train.grad_accum_steps}) "
                          f"is not divisible by the data axes data*fsdp={batch_ways}")
    rules = dict(reversed(layout_rules(config)))  # first rule wins
    m = config.model
    for logical, dim in (("heads", m.n_heads), ("kv_heads", m.n_kv_heads), ("mlp", m.hidden_dim),
                         ("embed", m.dim)):
        target = rules.get(logical)
        ways = math.prod(sizes[a] for a in ((target,) if isinstance(target, str) else (target or ())))
        if dim % ways:
            raise ConfigError(f"{where}: config.model: {logical} size {dim} is not divisible by mesh axes "
                              f"{target} of size {ways} (layout {config.mesh.layout!r})")


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over all devices, checked against the config first."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(config, len(devices))
    validate_for_mesh(config, shape)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_sharding(mesh: Mesh, rules: Rules, logical_axes: tuple[str | None, ...]) -> NamedSharding:
    import flax.linen as nn
    return NamedSharding(mesh, nn.logical_to_mesh_axes(logical_axes, rules))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of [batch, length] input arrays."""
    return logical_sharding(mesh, rules, ("batch", "length"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
