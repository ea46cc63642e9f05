"""The accelerators a layout is compiled for: Cloud TPU slices (generation, chip grid, compile-only devices
through libtpu) and the per-device peak FLOP/s and memory the comparison measures against.

  parse_topology      `v5p-128`, `v4-64`, `v5e-16` / `v5litepod-16`, `v6e-64` or `v5p:4x4x4` -> Topology
  topology_devices    the slice's compile-only devices (needs libtpu, not a TPU)
  device_peak_tflops  bf16 dense peak of known TPUs and GPUs, else None
  device_memory_bytes the memory one device may use: the TPU generation's HBM, or the runtime's limit
  device_hbm_gbps     HBM bandwidth of one chip of a known TPU generation (GB/s), else None
  num_hosts           the hosts of a slice (CHIPS_PER_HOST chips each), or of the present job
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from lima_jax.errors import ConfigError

# Public per-chip figures (bf16 dense peak TFLOP/s, HBM GiB) of Cloud TPU generations (cloud.google.com/tpu).
TPU_SPECS = {"v4": (275.0, 32.0), "v5p": (459.0, 95.0), "v5e": (197.0, 16.0), "v6e": (918.0, 32.0)}
# Public per-chip HBM bandwidth in GB/s (cloud.google.com/tpu/docs: v4, v5p, v5e, v6e system architecture).
TPU_HBM_GBPS = {"v4": 1228.0, "v5p": 2765.0, "v5e": 819.0, "v6e": 1640.0}
# Chips per TPU VM host of multi-host slices (also the host bounds `topology_devices` compiles for).
CHIPS_PER_HOST = 4
_DEVICE_KIND_TO_TPU = (("TPU v6 lite", "v6e"), ("TPU v5 lite", "v5e"), ("TPU v5", "v5p"), ("TPU v4", "v4"))
_GPU_PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0))
_GPU_HBM_GBPS = (("H200", 4800.0), ("H100", 3350.0), ("A100", 2039.0))  # SXM parts, vendor data sheets


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice to compile for: generation, chip grid, and the compile-only devices."""

    name: str
    generation: str
    shape: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)


def _balanced_shape(chips: int, dims: int, name: str) -> tuple[int, ...]:
    """The most cube-like power-of-two grid (ascending) with `chips` chips: 64 -> 4x4x4, 32 -> 4x8."""
    if chips & (chips - 1):
        raise ConfigError(f"--topology={name!r}: {chips} chips: not a power of two; give the grid explicitly, "
                          "e.g. v5p:4x4x8")
    exponent = chips.bit_length() - 1
    parts = [exponent // dims + (1 if i >= dims - exponent % dims else 0) for i in range(dims)]
    return tuple(2 ** p for p in parts)


def parse_topology(name: str) -> Topology:
    """`v5p-128` (TensorCores for v4/v5p, chips for v5e/v6e, as Cloud TPU names them) or `v5p:4x4x4`;
    ConfigError naming `--topology` for anything else."""
    aliases = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}
    match = re.fullmatch(r"(v\w+?)[:=](\d+(?:x\d+)*)", name) or re.fullmatch(r"(v\w+?)-(\d+)", name)
    if not match:
        raise ConfigError(f"--topology={name!r}: expected e.g. v5p-128, v4-64, v5e-16, v6e-64 or v5p:4x4x4")
    generation = aliases.get(match.group(1), match.group(1))
    if generation not in TPU_SPECS:
        raise ConfigError(f"--topology={name!r}: generation {generation!r} not one of {sorted(TPU_SPECS)}")
    dims = 3 if generation in ("v4", "v5p") else 2
    if "x" in match.group(2) or ":" in name or "=" in name:
        shape = tuple(int(s) for s in match.group(2).split("x"))
    else:
        count = int(match.group(2))
        chips = count // 2 if dims == 3 else count  # v4/v5p names count TensorCores, 2 per chip
        shape = _balanced_shape(max(chips, 1), dims, name)
    if len(shape) != dims:
        raise ConfigError(f"--topology={name!r}: {generation} slices are {dims}-D grids")
    return Topology(name, generation, shape)


def topology_devices(topology: Topology) -> list[Any]:
    """Compile-only devices of the slice (needs libtpu; no TPU needed)."""
    from jax.experimental import topologies
    chip_config = "megacore" if topology.generation in ("v4", "v5p") else "default"
    host_bounds = (2, 2, 1)
    grid = "x".join(str(s) for s in topology.shape)
    desc = topologies.get_topology_desc(f"{topology.generation}:{grid}", "tpu", chip_config_name=chip_config,
                                        chips_per_host_bounds=host_bounds, num_slices=1)
    return list(desc.devices)


def _tpu_generation(device: Any) -> str | None:
    kind = getattr(device, "device_kind", "")
    return next((generation for prefix, generation in _DEVICE_KIND_TO_TPU if kind.startswith(prefix)), None)


def device_peak_tflops(device: Any) -> float | None:
    generation = _tpu_generation(device)
    if generation:
        return TPU_SPECS[generation][0]
    kind = getattr(device, "device_kind", "")
    for name, peak in _GPU_PEAK_TFLOPS:
        if name in kind:
            return peak
    return None


def device_memory_bytes(device: Any, topology: Topology | None) -> int | None:
    """Memory one device may use: the TPU generation's HBM, or what the runtime reports (GPU)."""
    if topology is not None:
        return int(TPU_SPECS[topology.generation][1] * 2 ** 30)
    try:
        stats = device.memory_stats() or {}
    except Exception:  # CPU devices and compile-only devices have none
        stats = {}
    return stats.get("bytes_limit")


def device_hbm_gbps(device: Any, topology: Topology | None) -> float | None:
    """HBM bandwidth of one chip in GB/s: the slice's TPU generation, a present TPU's or known GPU's, else None."""
    generation = topology.generation if topology is not None else _tpu_generation(device)
    if generation:
        return TPU_HBM_GBPS[generation]
    kind = getattr(device, "device_kind", "")
    return next((gbps for name, gbps in _GPU_HBM_GBPS if name in kind), None)


def num_hosts(topology: Topology | None, process_count: int) -> int:
    """Hosts of the slice (CHIPS_PER_HOST chips each), or `process_count` for the present devices."""
    return max(1, topology.chips // CHIPS_PER_HOST) if topology is not None else process_count
