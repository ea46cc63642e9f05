"""Comparing sharding layouts of the real train step: memory, FLOPs, collectives and (when possible) speed.

For each layout spec (`name` or `name:DATAxFSDPxTENSOR`) `compare` builds the mesh, compiles exactly the
step training runs (`lima_jax.train_step.jit_train_step` over `lima_jax.runtime.abstract_train_state`'s
shardings, the state donated) and fills one `LayoutReport`: the compiled program's memory per device,
XLA's and the HLO's FLOP counts beside the analytic 6N + attention figure, the collectives of the compiled
HLO (`lima_jax.analysis.hlo`), and, on present devices, the measured step time, tokens/s and MFU.
A layout that fails validation or runs out of memory at compile time is a row with its error.

  compare          one LayoutReport per spec: the library entry point of `python -m lima_jax.layouts`
  measure_layout   one spec's report
  compile_layout   the compiled train step of a config's layout on given devices
  layout_config    a config with a spec's layout and mesh
  step_rows        the rows of the compiled global batch (train.batch_size, or with packing="examples" R)
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from lima_jax import runtime, sharding
from lima_jax.analysis.hardware import Topology, device_memory_bytes, device_peak_tflops, topology_devices
from lima_jax.analysis.hlo import HloModule, collective_stats, dot_flops
from lima_jax.config import ModelConfig, model_config, packing_mode, validate
from lima_jax.data.pipeline import round_up
from lima_jax.errors import ConfigError
from lima_jax.model import Llama, for_platform
from lima_jax.optim import learning_rate_schedule, make_optimizer
from lima_jax.paths import PathLike, as_path
from lima_jax.tokenizer import load_tokenizer
from lima_jax.train_step import abstract_batch, jit_train_step


def analytic_flops(model_cfg: ModelConfig, batch: int, length: int) -> float:
    """Model FLOPs of one training step: 6 * matmul params * tokens + attention (QK^T and AV, full L x L). The LM
    head counts the padded vocabulary (`model.vocab_multiple`): the matmul the step computes."""
    m = model_cfg
    attention = m.dim * m.head_dim * (2 * m.n_heads + 2 * m.n_kv_heads)
    matmul_params = m.n_layers * (attention + 3 * m.dim * m.hidden_dim) + m.padded_vocab_size * m.dim  # + LM head
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
        raise ConfigError(f"--layouts: {spec!r}: the mesh must be data x fsdp x tensor sizes, e.g. {name}:1x8x4 "
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




def step_rows(config: ml_collections.ConfigDict, batch_sharding: Any, rows: int | None = None) -> int:
    """Rows of the global batch the step is compiled for. Packing "none" / "rows": train.batch_size.
    "examples": `rows` (the planned rows per step that training logs and `python -m lima_jax.data stats`
    prints), by default train.batch_size (the most a step can need: one example per row), rounded up as
    training rounds it, to a multiple of the batch shards x train.grad_accum_steps."""
    if packing_mode(config.data.packing) != "examples":
        return config.train.batch_size
    multiple = sharding.batch_shards(batch_sharding) * config.train.grad_accum_steps
    return round_up(config.train.batch_size if rows is None else rows, multiple)


def synthetic_batch(config: ml_collections.ConfigDict, vocab_size: int, seed: int = 0,
                    rows: int | None = None) -> dict[str, np.ndarray]:
    """A full batch of random tokens (every position a target) for timing: `rows` (default
    train.batch_size) x data.max_len."""
    rng = np.random.default_rng(seed)
    shape = (config.train.batch_size if rows is None else rows, config.data.max_len)
    tokens = rng.integers(0, vocab_size, shape, dtype=np.int32)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "weights": np.ones(shape, np.float32),
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()}


def compile_layout(config: ml_collections.ConfigDict, model_cfg: ModelConfig, devices: Sequence[Any],
                   total_steps: int = 1000, rows: int | None = None):
    """(compiled step, model, optimizer, state shardings, batch sharding, mesh) for `config`'s layout: the
    step `lima_jax.training` runs (`jit_train_step`), lowered on the abstract state and batch (`step_rows`
    rows)."""
    mesh = sharding.make_mesh(config, devices, vocab_size=model_cfg.padded_vocab_size)
    rules = sharding.layout_rules(config, vocab_size=model_cfg.padded_vocab_size, shape=mesh.devices.shape)
    model = Llama(model_cfg)
    tx = make_optimizer(config, total_steps)
    with sharding.activate(mesh, rules):  # as lima_jax.training does
        abstract, state_shardings = runtime.abstract_train_state(model, tx, mesh, rules)
        batch_sharding = sharding.batch_sharding(mesh, rules)
    # Outside the mesh: the step's dropout key is a concrete array, and a compile-only (AOT) mesh has no
    # devices to hold it.
    step = jit_train_step(model, config, learning_rate_schedule(config, total_steps), state_shardings,
                          batch_sharding)
    with sharding.activate(mesh, rules):
        num_rows = step_rows(config, batch_sharding, rows)
        compiled = step.lower(abstract, abstract_batch(config, batch_sharding, num_rows)).compile()
    return compiled, model, tx, state_shardings, batch_sharding, mesh


def _gib(value: float) -> float:
    return value / 2 ** 30


def measure_layout(config: ml_collections.ConfigDict, spec: str, model_cfg: ModelConfig, devices: Sequence[Any],
                   topology: Topology | None, steps: int, peak_tflops: float | None, tensor: int,
                   hlo_dir: epath.Path | None = None, rows: int | None = None) -> LayoutReport:
    """Compiles (and unless AOT, runs) the train step under one layout (`rows`: see `step_rows`)."""
    cfg = layout_config(config, spec, tensor)
    shape_text = ""
    try:
        shape = sharding.mesh_shape(cfg, len(devices))
        shape_text = "x".join(str(s) for s in shape)
        tic = time.perf_counter()
        compiled, model, tx, state_shardings, batch_sharding, mesh = compile_layout(cfg, model_cfg, devices,
                                                                                    rows=rows)
        compile_s = time.perf_counter() - tic
        num_rows = step_rows(cfg, batch_sharding, rows)
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
    report.analytic_tflop = analytic_flops(model_cfg, num_rows, cfg.data.max_len) / 1e12
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
                    len(devices), model_cfg.vocab_size, num_rows)
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
                steps: int, peak_tflops: float | None, num_devices: int, vocab_size: int, num_rows: int) -> None:
    with jax.set_mesh(mesh):
        state = runtime.create_train_state(model, tx, state_shardings, jax.random.key(cfg.seed))
        batch = runtime.global_batch(synthetic_batch(cfg, vocab_size, rows=num_rows), batch_sharding)
        state, metrics = compiled(state, batch)  # warm-up
        jax.block_until_ready(metrics)
        tic = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        report.step_s = (time.perf_counter() - tic) / steps
    report.tokens_per_s = num_rows * cfg.data.max_len / report.step_s
    if peak_tflops:
        report.mfu = report.analytic_tflop / report.step_s / (peak_tflops * num_devices)


def resolve_vocab_size(config: ml_collections.ConfigDict, fallback: int) -> int:
    """config.model.vocab_size, else the tokenizer's (EOT included) when its file or folder exists, else
    `fallback`."""
    if config.model.vocab_size:
        return int(config.model.vocab_size)
    path = config.tokenizer.get("path", "")
    if path and as_path(path).exists():
        return load_tokenizer(config).vocab_size
    return fallback


def compare(config: ml_collections.ConfigDict, specs: Sequence[str], topology: Topology | None = None,
            steps: int = 5, vocab_size: int = 32001, peak_tflops: float | None = None,
            tensor: int | None = None, devices: Sequence[Any] | None = None,
            hlo_dir: PathLike | None = None, rows: int | None = None) -> list[LayoutReport]:
    """One LayoutReport per layout spec (the library entry point of the tool); with `hlo_dir`, each layout's
    compiled HLO is also written there; `rows`: the global batch's rows with packing="examples" (see
    `step_rows`). ConfigError for a bad config or an unknown layout."""
    validate(config, paths=False)  # compiling needs no data, tokenizer or workdir
    if rows is not None and packing_mode(config.data.packing) != "examples":
        raise ConfigError(f"--rows={rows}: only with config.data.packing='examples'; with "
                          f"{config.data.packing!r} a step is train.batch_size={config.train.batch_size} rows")
    if not specs:
        raise ConfigError("--layouts: no layout given; name one or more of " + ",".join(sharding.LAYOUTS))
    for spec in specs:
        name, _ = parse_layout_spec(spec)
        if name not in sharding.LAYOUTS:
            raise ConfigError(f"--layouts: {name!r} is not one of {sorted(sharding.LAYOUTS)}")
    model_cfg = model_config(config, vocab_size=resolve_vocab_size(config, vocab_size))
    if devices is None:
        devices = topology_devices(topology) if topology is not None else jax.devices()
    model_cfg = for_platform(model_cfg, devices[0].platform)  # a TPU topology compiled from this host
    peak = peak_tflops or device_peak_tflops(devices[0])
    tensor = tensor or default_tensor_size(model_cfg, len(devices))
    reports = []
    for spec in specs:
        logging.info("compiling the train step under layout %s", spec)
        reports.append(measure_layout(config, spec, model_cfg, devices, topology, steps, peak, tensor,
                                      as_path(hlo_dir) if hlo_dir is not None else None, rows))
    return reports

