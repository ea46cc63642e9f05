"""Compare sharding layouts of the real train step: memory, FLOPs, collectives and (when possible) speed.

    python -m lima_jax.layouts --config configs/toy.py --layouts data,fsdp,fsdp_tp,tensor
    python -m lima_jax.layouts --config configs/lima_65b.py --topology v5p-128 --layouts fsdp,fsdp_tp

For each layout the tool builds the mesh, lowers and compiles `lima_jax.train.make_train_step` exactly as
training does (same state shardings, same donated state) and reports, per device:

* memory of the compiled program: arguments, outputs, temporaries and the peak (the larger of XLA's
  peak estimate and arguments + outputs - aliased (donated) + temporaries); whether it fits the device
  (the TPU generation's HBM with `--topology`, the runtime's limit on GPU);
* FLOPs per step, summed over devices: XLA's cost analysis (which counts a loop body once, so it
  undercounts the scanned layers), a loop-aware count of the compiled HLO's `dot`s (CPU/GPU; TPU writes
  matmuls as convolutions and gets "-"), and the analytic 6 * N_matmul * tokens + 12 * layers * length *
  dim * tokens (attention scores and values). Rematerialization adds the recomputed forward pass to the
  compiled figures; computation a layout replicates (e.g. an unsplit LM head) adds to them too;
* the collectives in the compiled HLO: count and bytes (result sizes) per kind, per step and device, ops
  in the scanned layer loop counted once per trip (XLA's known trip count, or the loop condition's bound);
* unless `--topology` is given or `--steps=0`: measured step time, tokens/s and MFU (MFU needs the
  device's peak FLOP/s: known for TPUs and H100/H200/A100, else `--peak_tflops`).

A layout is `name` or `name:DATAxFSDPxTENSOR` to give its mesh, e.g. `fsdp_tp:1x4x2` (one size may be -1); the
default mesh per layout puts all devices on its main axis (tensor size: `--tensor`, default the largest
power of two up to 8 that divides the KV heads and the device count). An invalid layout is reported in
the table with its error; the others still run.

`--topology` compiles for a Cloud TPU slice from this CPU host, without a TPU (needs libtpu:
`pip install "lima_jax[tpu]"`). Names: `v5p-128`, `v4-64` (TensorCores, as in Cloud TPU accelerator
types), `v5e-16` / `v5litepod-16`, `v6e-64` (chips), or explicit `v5p:4x4x4`.

Output: a table on the console, `<out>/layouts.csv`, `<out>/layouts.json`, `<out>/layouts.png` and
`<out>/layouts.md` (a Markdown summary, as in docs/sharding.md).
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import pathlib
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from lima_jax import sharding, train
from lima_jax.config import ConfigError, ModelConfig, config_from_flag, model_config, validate
from lima_jax.data.pipeline import BATCH_FIELDS
from lima_jax.model import Llama
from lima_jax.optim import learning_rate_schedule, make_optimizer

_CONFIG = train._CONFIG  # --config is defined once, by lima_jax.train (imported above)
_LAYOUTS = flags.DEFINE_list("layouts", ",".join(sharding.LAYOUTS), "Layouts to compare: name or "
                             "name:DATAxFSDPxTENSOR (e.g. fsdp_tp:1x4x2, one size may be -1).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Compile ahead of time for this TPU slice (e.g. v5p-128, "
                                "v4-64, v5e-16, v6e-64, v5p:4x4x4) instead of the present devices.")
_TENSOR = flags.DEFINE_integer("tensor", None, "Tensor-axis size of the tensor-parallel layouts' default mesh.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per layout on the present devices (0: compile only).")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: <config.workdir>/layouts or "
                           "/tmp/lima_layouts).")
_VOCAB = flags.DEFINE_integer("vocab_size", 32001, "Vocabulary when neither config.model.vocab_size nor a "
                              "tokenizer file is available (LLaMA's 32,000 + EOT).")
_DUMP_HLO = flags.DEFINE_bool("dump_hlo", False, "Also write each layout's compiled HLO to <out>/<layout>.hlo.txt.")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device for MFU (default: known "
                                  "accelerators' bf16 figure).")

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

# Public per-chip figures (bf16 dense peak TFLOP/s, HBM GiB) of Cloud TPU generations (cloud.google.com/tpu).
TPU_SPECS = {"v4": (275.0, 32.0), "v5p": (459.0, 95.0), "v5e": (197.0, 16.0), "v6e": (918.0, 32.0)}
_DEVICE_KIND_TO_TPU = (("TPU v6 lite", "v6e"), ("TPU v5 lite", "v5e"), ("TPU v5", "v5p"), ("TPU v4", "v4"))
_GPU_PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0))


# ------------------------------------------------------------------------------------------ topologies


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice to compile for: generation, chip grid, and the compile-only devices."""

    name: str
    generation: str
    shape: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)


def _balanced_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The most cube-like power-of-two grid (ascending) with `chips` chips: 64 -> 4x4x4, 32 -> 4x8."""
    if chips & (chips - 1):
        raise ValueError(f"{chips} chips: not a power of two; give the grid explicitly, e.g. v5p:4x4x8")
    exponent = chips.bit_length() - 1
    parts = [exponent // dims + (1 if i >= dims - exponent % dims else 0) for i in range(dims)]
    return tuple(2 ** p for p in parts)


def parse_topology(name: str) -> Topology:
    """`v5p-128` (TensorCores for v4/v5p, chips for v5e/v6e, as Cloud TPU names them) or `v5p:4x4x4`."""
    aliases = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}
    match = re.fullmatch(r"(v\w+?)[:=]([0-9x]+)", name) or re.fullmatch(r"(v\w+?)-(\d+)", name)
    if not match:
        raise ValueError(f"--topology={name!r}: expected e.g. v5p-128, v4-64, v5e-16, v6e-64 or v5p:4x4x4")
    generation = aliases.get(match.group(1), match.group(1))
    if generation not in TPU_SPECS:
        raise ValueError(f"--topology={name!r}: generation {generation!r} not one of {sorted(TPU_SPECS)}")
    dims = 3 if generation in ("v4", "v5p") else 2
    if "x" in match.group(2) or ":" in name or "=" in name:
        shape = tuple(int(s) for s in match.group(2).split("x"))
    else:
        count = int(match.group(2))
        chips = count // 2 if dims == 3 else count  # v4/v5p names count TensorCores, 2 per chip
        shape = _balanced_shape(max(chips, 1), dims)
    if len(shape) != dims:
        raise ValueError(f"--topology={name!r}: {generation} slices are {dims}-D grids")
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


def device_peak_tflops(device: Any) -> float | None:
    kind = getattr(device, "device_kind", "")
    for prefix, generation in _DEVICE_KIND_TO_TPU:
        if kind.startswith(prefix):
            return TPU_SPECS[generation][0]
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


# ---------------------------------------------------------------------------------------------- HLO


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(r"\b(?:body|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start|-done)?\(")
_S32_CONSTANT = re.compile(r"=\s*s32\[\]\S*\s+constant\((\d+)\)")
_FUSED_REDUCE_SCATTER = re.compile(r"=\s*(.+?)\s+fusion\(.*calls=%?all-reduce-scatter")
_SHAPE = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f8\w*|bf16|f16|f32|f64|c64|c128)\[([\d,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "c64": 64, "c128": 128}


def _shape_bytes(text: str) -> int:
    """Bytes of every array shape in an HLO type string (a tuple sums its elements)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        bits = _BITS.get(dtype) or (8 if dtype.startswith("f8") else int(re.sub(r"\D", "", dtype)))
        total += math.prod(int(d) for d in dims.split(",") if d) * bits // 8
    return total


@dataclasses.dataclass
class HloModule:
    """The computations of an HLO module's text and how often each runs per execution of ENTRY."""

    computations: dict[str, list[str]]
    runs: dict[str, int]

    @classmethod
    def parse(cls, hlo_text: str) -> "HloModule":
        computations: dict[str, list[str]] = {}
        entry, current = None, None
        for line in hlo_text.splitlines():
            header = _COMPUTATION.match(line)
            if header and not line.startswith(" "):
                current = header.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
            elif current is not None and line.strip() == "}":
                current = None
            elif current is not None:
                computations[current].append(line)
        if entry is None:
            raise ValueError("no ENTRY computation in the HLO text")
        runs: dict[str, int] = {}

        def visit(name: str, times: int) -> None:
            runs[name] = runs.get(name, 0) + times
            for line in computations.get(name, ()):
                if _FUSED_REDUCE_SCATTER.search(line):
                    continue  # counted as one reduce-scatter by collective_stats
                callees = _CALLEE.findall(line)
                for group in _BRANCHES.findall(line):
                    callees += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
                for callee in callees:
                    if callee in computations:  # a while body runs trip-count times (once if unknown)
                        is_body = re.search(rf"\bbody=%?{re.escape(callee)}(?:[,\s]|$)", line) is not None
                        visit(callee, times * (_trip_count(line, computations) if is_body else 1))

        visit(entry, 1)
        return cls(computations, runs)

    def lines(self):
        """(line, times it runs) for every instruction reachable from ENTRY."""
        for name, times in self.runs.items():
            for line in self.computations[name]:
                yield name, line, times


def _trip_count(while_line: str, computations: dict[str, list[str]]) -> int:
    """A while loop's trip count: XLA's known_trip_count, else the one s32 bound its condition compares
    against (the `i < N` of a scan); 1 when neither is there."""
    known = _TRIP_COUNT.search(while_line)
    if known:
        return int(known.group(1))
    condition = re.search(r"\bcondition=%?([\w.\-]+)", while_line)
    lines = computations.get(condition.group(1), []) if condition else []
    bounds = [int(m.group(1)) for line in lines for m in [_S32_CONSTANT.search(line)] if m]
    if len(bounds) == 1 and any("direction=LT" in line for line in lines):
        return bounds[0]
    return 1


def collective_stats(module: HloModule) -> dict[str, dict[str, int]]:
    """{kind: {"count", "bytes"}} of the collectives executed per run of the module (per device).

    Each op counts as often as its computation runs: loop bodies times their known trip count. Bytes are
    the op's result size (for async ops, the `-done` result).
    """
    stats = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    for _, line, times in module.lines():
        fused = _FUSED_REDUCE_SCATTER.search(line)
        if fused:  # TPU: a reduce-scatter implemented as a fusion around an all-reduce
            stats["reduce-scatter"]["count"] += times
            stats["reduce-scatter"]["bytes"] += times * _shape_bytes(fused.group(1))
            continue
        op = _OP.search(line)
        if not op or op.group(3) == "-start":
            continue
        stats[op.group(2)]["count"] += times
        stats[op.group(2)]["bytes"] += times * _shape_bytes(op.group(1))
    return stats


_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\S+?\[[\d,]*\])")
_DOT = re.compile(r"=\s*\S+?\[([\d,]*)\]\S*\s+dot\((?:\S+\[[\d,]*\]\S*\s+)?%([\w.\-]+)")
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")


def dot_flops(module: HloModule) -> float:
    """2 * output size * contracted size, summed over every `dot` executed (loop bodies trip-count times)."""
    shapes: dict[tuple[str, str], list[int]] = {}
    for name, line, _ in module.lines():
        definition = _DEF.match(line)
        if definition:
            dims = definition.group(2).split("[", 1)[1].rstrip("]")
            shapes[(name, definition.group(1))] = [int(d) for d in dims.split(",") if d]
    total = 0.0
    for name, line, times in module.lines():
        dot = _DOT.search(line)
        contracting = _CONTRACTING.search(line)
        if not dot or not contracting or (name, dot.group(2)) not in shapes:
            continue
        lhs = shapes[(name, dot.group(2))]
        out = math.prod(int(d) for d in dot.group(1).split(",") if d)
        contracted = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i)
        total += 2.0 * out * contracted * times
    return total


# ------------------------------------------------------------------------------------------- analysis


def analytic_flops(model_cfg: ModelConfig, batch: int, length: int) -> float:
    """Model FLOPs of one training step: 6 * matmul params * tokens + attention (QK^T and AV, full L x L)."""
    m = model_cfg
    attention = m.dim * m.head_dim * (2 * m.n_heads + 2 * m.n_kv_heads)
    matmul_params = m.n_layers * (attention + 3 * m.dim * m.hidden_dim) + m.vocab_size * m.dim  # + LM head
    tokens = batch * length
    return 6.0 * matmul_params * tokens + 12.0 * m.n_layers * length * m.dim * tokens


@dataclasses.dataclass
class LayoutReport:
    """One row of the comparison."""

    layout: str
    mesh: str
    error: str = ""
    argument_gib: float = math.nan
    output_gib: float = math.nan
    alias_gib: float = math.nan
    temp_gib: float = math.nan
    peak_gib: float = math.nan
    device_memory_gib: float = math.nan
    fits: str = ""
    compile_s: float = math.nan
    xla_tflop: float = math.nan
    hlo_dot_tflop: float = math.nan
    analytic_tflop: float = math.nan
    collectives: dict = dataclasses.field(default_factory=dict)
    step_s: float = math.nan
    tokens_per_s: float = math.nan
    mfu: float = math.nan


def parse_layout_spec(spec: str) -> tuple[str, dict[str, int]]:
    """`fsdp_tp` -> ("fsdp_tp", {}); `fsdp_tp:1x8x4` -> ("fsdp_tp", {"data": 1, "fsdp": 8, "tensor": 4})."""
    name, _, mesh = spec.partition(":")
    if not mesh:
        return name, {}
    sizes = mesh.split("x")
    if len(sizes) != len(sharding.MESH_AXES) or not all(re.fullmatch(r"-?\d+", v) for v in sizes):
        raise ValueError(f"--layouts: {spec!r}: the mesh must be data x fsdp x tensor sizes, e.g. {name}:1x8x4 "
                         "(one size may be -1)")
    return name, dict(zip(sharding.MESH_AXES, map(int, sizes)))


def default_tensor_size(model_cfg: ModelConfig, num_devices: int) -> int:
    size = 1
    while size < 8 and model_cfg.n_kv_heads % (size * 2) == 0 and num_devices % (size * 2) == 0:
        size *= 2
    return size


def layout_config(config: ml_collections.ConfigDict, spec: str, tensor: int) -> ml_collections.ConfigDict:
    """A copy of `config` with the layout and mesh of `spec`."""
    name, sizes = parse_layout_spec(spec)
    defaults = {"data": dict(data=-1, fsdp=1, tensor=1), "fsdp": dict(data=1, fsdp=-1, tensor=1),
                "fsdp_tp": dict(data=1, fsdp=-1, tensor=tensor), "tensor": dict(data=-1, fsdp=1, tensor=tensor)}
    cfg = copy.deepcopy(config)
    cfg.mesh.layout = name
    cfg.mesh.update(defaults.get(name, {}))
    cfg.mesh.update(sizes)
    return cfg


def abstract_batch(config: ml_collections.ConfigDict, batch_sharding) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (config.train.batch_size, config.data.max_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "weights" else jnp.int32, sharding=batch_sharding)
            for k in BATCH_FIELDS}


def synthetic_batch(config: ml_collections.ConfigDict, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A full batch of random tokens (every position a target) for timing."""
    rng = np.random.default_rng(seed)
    shape = (config.train.batch_size, config.data.max_len)
    tokens = rng.integers(0, vocab_size, shape, dtype=np.int32)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "weights": np.ones(shape, np.float32),
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()}


def compile_layout(config: ml_collections.ConfigDict, model_cfg: ModelConfig, devices: Sequence[Any],
                   total_steps: int = 1000):
    """(compiled step, abstract state, state shardings, batch sharding, mesh) for `config`'s layout."""
    mesh = sharding.make_mesh(config, devices, vocab_size=model_cfg.vocab_size)
    rules = sharding.layout_rules(config, vocab_size=model_cfg.vocab_size, shape=mesh.devices.shape)
    model = Llama(model_cfg)
    tx = make_optimizer(config, total_steps)
    step = train.make_train_step(model, config, learning_rate_schedule(config, total_steps),
                                 jax.random.key(config.seed + 1))
    with sharding.activate(mesh, rules):  # as lima_jax.train does
        abstract, state_shardings = train.abstract_train_state(model, tx, mesh, rules)
        batch_sharding = sharding.batch_sharding(mesh, rules)
        jitted = jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, None), donate_argnums=0)
        compiled = jitted.lower(abstract, abstract_batch(config, batch_sharding)).compile()
    return compiled, model, tx, state_shardings, batch_sharding, mesh


def _gib(value: float) -> float:
    return value / 2 ** 30


def measure_layout(config: ml_collections.ConfigDict, spec: str, model_cfg: ModelConfig, devices: Sequence[Any],
                   topology: Topology | None, steps: int, peak_tflops: float | None, tensor: int,
                   hlo_dir: pathlib.Path | None = None) -> LayoutReport:
    """Compiles (and unless AOT, runs) the train step under one layout."""
    cfg = layout_config(config, spec, tensor)
    shape_text = ""
    try:
        shape = sharding.mesh_shape(cfg, len(devices))
        shape_text = "x".join(str(s) for s in shape)
        tic = time.perf_counter()
        compiled, model, tx, state_shardings, batch_sharding, mesh = compile_layout(cfg, model_cfg, devices)
        compile_s = time.perf_counter() - tic
    except (ConfigError, ValueError) as e:
        return LayoutReport(spec, shape_text or "?", error=str(e).split(": ", 1)[-1][:300])
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return _out_of_memory_report(spec, shape_text, str(e), devices[0], topology)
    report = LayoutReport(spec, shape_text, compile_s=compile_s)
    memory = compiled.memory_analysis()
    if memory is not None:
        report.argument_gib = _gib(memory.argument_size_in_bytes)
        report.output_gib = _gib(memory.output_size_in_bytes)
        report.alias_gib = _gib(memory.alias_size_in_bytes)
        report.temp_gib = _gib(memory.temp_size_in_bytes)
        total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                 + memory.temp_size_in_bytes)
        report.peak_gib = _gib(max(getattr(memory, "peak_memory_in_bytes", 0), total))
    limit = device_memory_bytes(devices[0], topology)
    if limit:
        report.device_memory_gib = _gib(limit)
        report.fits = "yes" if report.peak_gib <= report.device_memory_gib else "NO"
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and "flops" in cost:
        report.xla_tflop = cost["flops"] * len(devices) / 1e12  # the cost is of one device's program
    batch, length = cfg.train.batch_size, cfg.data.max_len
    report.analytic_tflop = analytic_flops(model_cfg, batch, length) / 1e12
    hlo_text = compiled.as_text()
    if hlo_dir is not None:
        hlo_dir.mkdir(parents=True, exist_ok=True)
        (hlo_dir / (re.sub(r"[^\w.=-]+", "_", spec) + ".hlo.txt")).write_text(hlo_text)
    module = HloModule.parse(hlo_text)
    report.collectives = collective_stats(module)
    if not any(" convolution(" in line for _, line, _ in module.lines()):  # TPU writes matmuls as convolutions
        report.hlo_dot_tflop = dot_flops(module) * len(devices) / 1e12
    if topology is None and steps > 0:
        _time_steps(report, cfg, compiled, model, tx, state_shardings, batch_sharding, mesh, steps, peak_tflops,
                    len(devices), model_cfg.vocab_size)
    return report


def _out_of_memory_report(spec: str, mesh: str, message: str, device: Any,
                          topology: Topology | None) -> LayoutReport:
    """The row of a layout whose compilation failed because it needs more memory than the device has."""
    report = LayoutReport(spec, mesh, fits="NO")
    needed = re.search(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", message) or \
        re.search(r"([\d.]+)G of ([\d.]+)G hbm", message)
    if needed:  # XLA's "G" are GiB
        report.temp_gib, report.device_memory_gib = float(needed.group(1)), float(needed.group(2))
    else:
        limit = device_memory_bytes(device, topology)
        report.device_memory_gib = _gib(limit) if limit else math.nan
    report.error = "out of memory at compile time: " + message.splitlines()[0].split(": ", 1)[-1][:200]
    return report


def _time_steps(report: LayoutReport, cfg, compiled, model, tx, state_shardings, batch_sharding, mesh,
                steps: int, peak_tflops: float | None, num_devices: int, vocab_size: int) -> None:
    with jax.set_mesh(mesh):
        state = train.create_train_state(model, tx, state_shardings, jax.random.key(cfg.seed))
        batch = train.global_batch(synthetic_batch(cfg, vocab_size), batch_sharding)
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        tic = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        report.step_s = (time.perf_counter() - tic) / steps
    report.tokens_per_s = cfg.train.batch_size * cfg.data.max_len / report.step_s
    if peak_tflops:
        report.mfu = report.analytic_tflop / report.step_s / (peak_tflops * num_devices)


# ---------------------------------------------------------------------------------------------- output


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _collective_text(collectives: dict) -> str:
    parts = [f"{kind} {c['count']}x/{_fmt(c['bytes'] / 2 ** 20)}MiB" for kind, c in collectives.items()
             if c["count"]]
    return ", ".join(parts) or "none"


def _short_error(error: str) -> str:
    """The gist of a validation error for the table (the CSV/JSON keep all of it)."""
    error = re.sub(r" \(micro-batch \d+ with grad_accum_steps=\d+\)", "", error)
    error = re.sub(r" \(layout '\w+', mesh \{[^}]*\}\).*", "", error)
    return re.sub(r" \(mesh \{[^}]*\}\)", "", error)[:110]


def format_table(reports: Sequence[LayoutReport]) -> str:
    """The console table (memory per device in GiB, FLOPs per step in TFLOP)."""
    header = ("layout", "mesh d.f.t", "args", "temp", "peak", "fits", "XLA TFLOP", "HLO dot TFLOP",
              "6N+attn TFLOP", "step s",
              "tokens/s", "MFU", "collectives per step (count/bytes)")
    rows = []
    for r in reports:
        if r.error and r.fits != "NO":
            rows.append((r.layout, r.mesh, "invalid: " + _short_error(r.error)) + ("",) * (len(header) - 3))
            continue
        fits = f"{r.fits} ({_fmt(r.device_memory_gib)})" if r.fits else "-"
        rows.append((r.layout, r.mesh, _fmt(r.argument_gib), _fmt(r.temp_gib), _fmt(r.peak_gib), fits,
                     _fmt(r.xla_tflop), _fmt(r.hlo_dot_tflop), _fmt(r.analytic_tflop), _fmt(r.step_s), _fmt(r.tokens_per_s),
                     "-" if math.isnan(r.mfu) else f"{100 * r.mfu:.1f}%",
                     r.error[:60] if r.error else _collective_text(r.collectives)))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(reports: Sequence[LayoutReport]) -> str:
    """The memory/fit/FLOPs/collectives summary as a Markdown table (for docs)."""
    columns = ["layout", "mesh (data x fsdp x tensor)", "arguments GiB", "temporaries GiB", "peak GiB", "fits",
               "XLA TFLOP (loop once)", "6N+attn TFLOP", *(f"{kind} GiB" for kind in COLLECTIVES),
               "collectives GiB"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in reports:
        if r.error and r.fits != "NO":
            lines.append(f"| {r.layout} | {r.mesh} | invalid: {_short_error(r.error)} |" + "|" * (len(columns) - 3))
            continue
        fits = f"{r.fits} ({_fmt(r.device_memory_gib)} GiB)" if r.fits else "-"
        moved = [r.collectives[kind]["bytes"] / 2 ** 30 for kind in COLLECTIVES] if r.collectives else []
        cells = [r.layout, r.mesh, _fmt(r.argument_gib), _fmt(r.temp_gib), _fmt(r.peak_gib), fits,
                 _fmt(r.xla_tflop), _fmt(r.analytic_tflop), *(_fmt(g) for g in moved)]
        cells += [_fmt(sum(moved))] if moved else ["-"] * (len(COLLECTIVES) + 1)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(reports: Sequence[LayoutReport], out: pathlib.Path, title: str) -> list[pathlib.Path]:
    """layouts.csv, layouts.json and layouts.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    records = [dataclasses.asdict(r) for r in reports]
    json_path = out / "layouts.json"
    json_path.write_text(json.dumps({"title": title, "layouts": records}, indent=2, default=str))
    csv_path = out / "layouts.csv"
    with csv_path.open("w", newline="") as f:
        fields = [k for k in records[0] if k != "collectives"] + [f"{k}_{m}" for k in COLLECTIVES
                                                                   for m in ("count", "bytes")]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for record in records:
            row = {k: v for k, v in record.items() if k != "collectives"}
            for kind in COLLECTIVES:
                for m in ("count", "bytes"):
                    row[f"{kind}_{m}"] = record["collectives"].get(kind, {}).get(m, "")
            writer.writerow(row)
    png_path = out / "layouts.png"
    _plot(reports, png_path, title)
    md_path = out / "layouts.md"
    md_path.write_text(f"{title}\n\n{markdown_table(reports)}\n")
    return [csv_path, json_path, png_path, md_path]


def _plot(reports: Sequence[LayoutReport], path: pathlib.Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in reports if not r.error]
    names = [f"{r.layout}\n{r.mesh}" for r in ok]
    x = np.arange(len(ok))
    timed = any(not math.isnan(r.tokens_per_s) for r in ok)
    fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(5 * (3 if timed else 2), 4.5))
    width = 0.27
    for i, (field, label) in enumerate((("argument_gib", "arguments"), ("temp_gib", "temporaries"),
                                        ("peak_gib", "peak"))):
        axes[0].bar(x + (i - 1) * width, [getattr(r, field) for r in ok], width, label=label)
    limits = {r.device_memory_gib for r in ok if not math.isnan(r.device_memory_gib)}
    for limit in limits:
        axes[0].axhline(limit, color="red", linestyle="--", label=f"device memory {limit:.0f} GiB")
    axes[0].set(title="memory per device (GiB)", xticks=x, xticklabels=names)
    axes[0].legend(fontsize=8)
    bottom = np.zeros(len(ok))
    for kind in COLLECTIVES:
        values = np.array([r.collectives.get(kind, {}).get("bytes", 0) / 2 ** 30 for r in ok])
        if values.any():
            axes[1].bar(x, values, bottom=bottom, label=kind)
            bottom += values
    axes[1].set(title="collective bytes per step, per device (GiB)", xticks=x, xticklabels=names)
    if bottom.any():
        axes[1].legend(fontsize=8)
    if timed:
        axes[2].bar(x, [r.tokens_per_s for r in ok])
        axes[2].set(title="measured tokens/s", xticks=x, xticklabels=names)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ CLI


def resolve_vocab_size(config: ml_collections.ConfigDict, fallback: int) -> int:
    """config.model.vocab_size, else the tokenizer's (with EOT) when its file exists, else `fallback`."""
    if config.model.vocab_size:
        return int(config.model.vocab_size)
    path = config.tokenizer.get("path", "")
    if path and pathlib.Path(path).is_file():
        from lima_jax.tokenizer import Tokenizer
        return Tokenizer(path).vocab_size
    return fallback


def check_config(config: ml_collections.ConfigDict) -> None:
    """`lima_jax.config.validate`, minus the paths that compiling does not need."""
    probe = copy.deepcopy(config)
    probe.workdir = probe.workdir or "unused"
    probe.data.train_path = probe.data.train_path or "unused"
    probe.tokenizer.path = probe.tokenizer.path or "unused"
    validate(probe)


def compare(config: ml_collections.ConfigDict, specs: Sequence[str], topology: Topology | None = None,
            steps: int = 5, vocab_size: int = 32001, peak_tflops: float | None = None,
            tensor: int | None = None, devices: Sequence[Any] | None = None,
            hlo_dir: pathlib.Path | None = None) -> list[LayoutReport]:
    """One LayoutReport per layout spec (the library entry point of the tool)."""
    check_config(config)
    for spec in specs:
        name, _ = parse_layout_spec(spec)
        if name not in sharding.LAYOUTS:
            raise ConfigError(f"--layouts: {name!r} is not one of {sorted(sharding.LAYOUTS)}")
    model_cfg = model_config(config, vocab_size=resolve_vocab_size(config, vocab_size))
    if devices is None:
        devices = topology_devices(topology) if topology is not None else jax.devices()
    peak = peak_tflops or device_peak_tflops(devices[0])
    tensor = tensor or default_tensor_size(model_cfg, len(devices))
    reports = []
    for spec in specs:
        logging.info("compiling the train step under layout %s", spec)
        reports.append(measure_layout(config, spec, model_cfg, devices, topology, steps, peak, tensor, hlo_dir))
    return reports


def main(argv: list[str]) -> None:
    config = config_from_flag(_CONFIG, argv)
    topology = parse_topology(_TOPOLOGY.value) if _TOPOLOGY.value else None
    if topology is not None:  # compile-only use of libtpu: don't contend for the TPU lock with other jobs
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    out = pathlib.Path(_OUT.value or (pathlib.Path(config.workdir) / "layouts" if config.workdir
                                      else "/tmp/lima_layouts"))
    reports = compare(config, _LAYOUTS.value, topology, _STEPS.value, _VOCAB.value, _PEAK_TFLOPS.value,
                      _TENSOR.value, hlo_dir=out if _DUMP_HLO.value else None)
    if jax.process_index() != 0:
        return
    where = f"TPU {topology.name} ({topology.chips} chips, AOT)" if topology else \
        f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    title = (f"{pathlib.Path(config.source_file).name}: batch {config.train.batch_size} x {config.data.max_len} "
             f"tokens on {where}")
    paths = write_outputs(reports, out, title)
    print(f"\n{title}\nmemory per device in GiB; FLOPs per step summed over devices\n{format_table(reports)}\n")
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    app.run(main)
