"""Timing the real train step and the decode loop of a config, for one or several variants side by side.

Each variant is the config with a set of `field=value` overrides. For each one the train step is compiled
exactly as `lima_jax.training` runs it (`lima_jax.analysis.layouts.compile_layout`: `jit_train_step` over the
state's shardings, the state donated), fed random token rows of the config's shape (optionally packed with
several segments per row, so the segment mask and restarting positions are exercised), warmed up, then timed
step by step, the variants alternating so that machine load hits them alike. Figures per variant:

* median (and min) step time, tokens/s (every position of every row is a token);
* FLOPs per step three ways: analytic (6 * matmul params * tokens + attention, full L x L), XLA's
  `cost_analysis()` (which counts a scanned layer body once: an undercount for the scanned model) and the
  loop-aware count of the compiled HLO's dots (CPU/GPU); achieved TFLOP/s from the analytic and XLA figures;
* MFU: analytic FLOP/s over the devices' bf16 dense peak (`hardware.device_peak_tflops`, or `peak_tflops`);
* memory: the compiled program's arguments / temporaries / peak per device, and the runtime's peak bytes in
  use (`memory_stats()`, GPU/TPU; none on CPU);
* compile time (lowering + compilation).

Decode (`time_decode`): tokens/s of `lima_jax.generation.decode` (the KV-cache loop `generate` runs) on random
prompts at given batch sizes, greedy and with LIMA's sampling (top-p 0.9, temperature 0.7, repetition penalty
1.2), alternating, EOT not stopping rows so every run decodes batch x new tokens.

  Variant          a label and its overrides
  parse_variants   `--vs field=v1,v2` sweeps (cross product) and explicit override sets -> variants
  compile_case     one variant's compiled step, state and batch, ready to time (`TrainCase.step`)
  run              every variant's train (and decode) records: the library entry point of `python -m lima_jax.bench`
  ratios           each variant's figures over the first one's
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import statistics
import time
from typing import Any, Iterator, Sequence

import jax
import ml_collections
import numpy as np

from lima_jax import runtime, sharding
from lima_jax.analysis.hardware import device_peak_tflops
from lima_jax.analysis.hlo import HloModule, dot_flops
from lima_jax.analysis.layouts import analytic_flops, compile_layout, resolve_vocab_size, step_rows
from lima_jax.config import ModelConfig, apply_overrides, model_config, validate
from lima_jax.errors import ConfigError
from lima_jax.generation import SamplingConfig, jit_decode, put_global

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration to time: `overrides` (field, value text) applied on top of the base config."""

    label: str
    overrides: tuple[tuple[str, str], ...] = ()


def _split_assignment(text: str, where: str) -> tuple[str, str]:
    field, sep, value = text.partition("=")
    if not sep or not field.strip():
        raise ConfigError(f"{where}: {text!r}: expected FIELD=VALUE, e.g. model.remat_policy=full")
    field = field.strip()
    return field[len("config."):] if field.startswith("config.") else field, value.strip()


def parse_variants(sweeps: Sequence[str], sets: Sequence[str]) -> list[Variant]:
    """Variants from `--vs FIELD=V1,V2,...` sweeps (several sweeps: their cross product) and `--variant
    "F1=A F2=B"` override sets (one variant each, after the sweeps); the base config alone when neither."""
    variants: list[Variant] = []
    if sweeps:
        axes = []
        for sweep in sweeps:
            field, values = _split_assignment(sweep, "--vs")
            choices = [v.strip() for v in values.split(",") if v.strip()]
            if not choices:
                raise ConfigError(f"--vs {sweep!r}: no value given (e.g. {field}=none,full)")
            axes.append([(field, v) for v in choices])
        for combo in itertools.product(*axes):
            variants.append(Variant(" ".join(f"{f}={v}" for f, v in combo), tuple(combo)))
    for text in sets:
        overrides = tuple(_split_assignment(part, "--variant") for part in text.split())
        variants.append(Variant(" ".join(f"{f}={v}" for f, v in overrides) or "base", overrides))
    return variants or [Variant("base")]


def variant_config(config: ml_collections.ConfigDict, variant: Variant) -> ml_collections.ConfigDict:
    """A validated copy of `config` with the variant's overrides (ConfigError naming the bad one)."""
    cfg = copy.deepcopy(config)
    apply_overrides(cfg, variant.overrides)
    validate(cfg, paths=False)  # timing needs no data, tokenizer or workdir
    return cfg


def packed_batch(config: ml_collections.ConfigDict, vocab_size: int, rows: int, segments: int = 1,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Random token rows (rows x data.max_len), each cut into `segments` packed examples of near-equal length:
    segment ids 1..segments, positions restarting at 0 in each, no target across a boundary."""
    length = config.data.max_len
    if not 1 <= segments <= length // 2:
        raise ConfigError(f"--segments={segments}: must be between 1 and data.max_len / 2 = {length // 2}")
    rng = np.random.default_rng(seed)
    shape = (rows, length)
    tokens = rng.integers(0, vocab_size, shape, dtype=np.int32)
    starts = np.linspace(0, length, segments + 1).astype(int)
    segment_of = np.searchsorted(starts, np.arange(length), side="right").astype(np.int32)  # 1-based
    positions = np.arange(length, dtype=np.int32) - starts[segment_of - 1]
    last_of_segment = np.isin(np.arange(length), starts[1:] - 1)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1),
            "weights": np.broadcast_to(np.where(last_of_segment, 0.0, 1.0).astype(np.float32), shape).copy(),
            "segment_ids": np.broadcast_to(segment_of, shape).copy(),
            "positions": np.broadcast_to(positions, shape).copy()}


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _device_peak_bytes(devices: Sequence[Any]) -> int | None:
    """The runtime's peak bytes in use, the largest over the devices (GPU/TPU; CPU devices report none)."""
    peaks = []
    for device in devices:
        try:
            stats = device.memory_stats() or {}
        except Exception:  # CPU and compile-only devices have no statistics
            stats = {}
        if "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return max(peaks) if peaks else None


def _model_record(m: ModelConfig) -> dict:
    return {"dim": m.dim, "n_layers": m.n_layers, "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads,
            "hidden_dim": m.hidden_dim, "vocab_size": m.vocab_size, "params": m.num_params(),
            "param_dtype": m.param_dtype, "compute_dtype": m.compute_dtype, "remat_policy": m.remat_policy}


@dataclasses.dataclass
class TrainCase:
    """A compiled variant with its live state and batch, and its step times so far."""

    variant: Variant
    cfg: ml_collections.ConfigDict
    model_cfg: ModelConfig
    compiled: Any
    model: Any
    state: Any
    batch: dict
    mesh: Any
    rules: Any
    record: dict
    times: list[float] = dataclasses.field(default_factory=list)

    def step(self) -> float:
        tic = time.perf_counter()
        with jax.set_mesh(self.mesh):
            self.state, metrics = self.compiled(self.state, self.batch)
            loss = float(jax.device_get(metrics["loss"]))  # waits for the whole step (its metrics need all of it)
        seconds = time.perf_counter() - tic
        if not math.isfinite(loss):
            raise ConfigError(f"variant {self.variant.label!r}: the step's loss is {loss}: not a usable timing")
        self.record["last_loss"] = loss
        return seconds


def compile_case(config: ml_collections.ConfigDict, variant: Variant, devices: Sequence[Any], segments: int = 1,
                 vocab_fallback: int = 32001) -> TrainCase:
    """The variant's train step compiled (timed, its FLOPs and memory recorded), with a fresh state and a
    random batch on the devices: `case.step()` runs one step and returns its seconds."""
    cfg = variant_config(config, variant)
    model_cfg = model_config(cfg, vocab_size=resolve_vocab_size(cfg, vocab_fallback))
    tic = time.perf_counter()
    compiled, model, tx, state_shardings, batch_sharding, mesh = compile_layout(cfg, model_cfg, devices)
    compile_s = time.perf_counter() - tic
    rules = sharding.layout_rules(cfg, vocab_size=model_cfg.vocab_size, shape=mesh.devices.shape)
    rows, length = step_rows(cfg, batch_sharding), cfg.data.max_len
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    module = HloModule.parse(compiled.as_text())
    matmuls_as_dots = not any(" convolution(" in line for _, line, _ in module.lines())  # TPU: convolutions
    record = {
        "kind": "train", "variant": variant.label, "overrides": dict(variant.overrides),
        "platform": devices[0].platform, "device_kind": devices[0].device_kind, "num_devices": len(devices),
        "mesh": dict(mesh.shape), "layout": cfg.mesh.layout, "model": _model_record(model_cfg),
        "rows": rows, "length": length, "segments_per_row": segments, "tokens_per_step": rows * length,
        "compile_s": compile_s,
        "analytic_tflop": analytic_flops(model_cfg, rows, length) / 1e12,
        # XLA's figure is of one device's program and counts a while-loop (scanned layers) body once.
        "xla_cost_tflop": (cost["flops"] * len(devices) / 1e12) if cost and "flops" in cost else None,
        "hlo_dot_tflop": dot_flops(module) * len(devices) / 1e12 if matmuls_as_dots else None,
    }
    if memory is not None:
        total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                 + memory.temp_size_in_bytes)
        record.update(argument_gib=memory.argument_size_in_bytes / GIB, temp_gib=memory.temp_size_in_bytes / GIB,
                      alias_gib=memory.alias_size_in_bytes / GIB,
                      compiled_peak_gib=max(getattr(memory, "peak_memory_in_bytes", 0), total) / GIB)
    with jax.set_mesh(mesh):
        state = runtime.create_train_state(model, tx, state_shardings, jax.random.key(cfg.seed))
        batch = runtime.global_batch(packed_batch(cfg, model_cfg.vocab_size, rows, segments), batch_sharding)
    return TrainCase(variant, cfg, model_cfg, compiled, model, state, batch, mesh, rules, record)


def _finish_record(case: TrainCase, steps: int, warmup: int, peak_tflops: float | None,
                   devices: Sequence[Any]) -> dict:
    r = case.record
    median = statistics.median(case.times)
    peak_bytes = _device_peak_bytes(devices)
    r.update(steps=steps, warmup=warmup, step_s_median=median, step_s_min=min(case.times),
             tokens_per_s=r["tokens_per_step"] / median,
             achieved_tflops_analytic=r["analytic_tflop"] / median,
             achieved_tflops_xla_cost=(r["xla_cost_tflop"] / median) if r["xla_cost_tflop"] is not None else None,
             peak_tflops_per_device=peak_tflops,
             mfu=(r["analytic_tflop"] / median / (peak_tflops * len(devices))) if peak_tflops else None,
             device_peak_gib=peak_bytes / GIB if peak_bytes is not None else None)
    return {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in r.items()}


def time_train(config: ml_collections.ConfigDict, variants: Sequence[Variant], steps: int, warmup: int,
               segments: int = 1, peak_tflops: float | None = None, sequential: bool = False,
               vocab_fallback: int = 32001, devices: Sequence[Any] | None = None) -> Iterator[tuple[dict, Any]]:
    """(train record, the variant's case) per variant. Alternating: all variants compiled and warmed up, then
    `steps` rounds of one step each; `sequential`: one variant at a time (only one state in memory)."""
    devices = list(devices or jax.devices())
    peak = peak_tflops or device_peak_tflops(devices[0])

    def warm(case: TrainCase) -> None:
        for _ in range(warmup):
            case.step()

    if sequential:
        for variant in variants:
            case = compile_case(config, variant, devices, segments, vocab_fallback)
            warm(case)
            case.times = [case.step() for _ in range(steps)]
            yield _finish_record(case, steps, warmup, peak, devices), case
        return
    cases = [compile_case(config, v, devices, segments, vocab_fallback) for v in variants]
    for case in cases:
        warm(case)
    for _ in range(steps):
        for case in cases:
            case.times.append(case.step())
    for case in cases:
        yield _finish_record(case, steps, warmup, peak, devices), case


def time_decode(case: TrainCase, batch: int, new_tokens: int, prompt_len: int, runs: int) -> list[dict]:
    """Greedy and LIMA-sampling decode records of one variant's parameters at one batch size (runs alternating,
    after one compiling run each)."""
    cfg, model_cfg = case.cfg, case.model_cfg
    if prompt_len + new_tokens > model_cfg.max_seq_len:
        raise ConfigError(f"--decode_prompt_len={prompt_len} + --decode_tokens={new_tokens} exceeds "
                          f"model.max_seq_len={model_cfg.max_seq_len}")
    mesh, rules = case.mesh, case.rules
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = -(-batch // data_ways) * data_ways  # as `Generator` rounds a batch
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, model_cfg.vocab_size, (rows, prompt_len), dtype=np.int32)
    modes = {"greedy": SamplingConfig(greedy=True, max_new_tokens=new_tokens, stop_at_eot=False),
             "lima_sampling": SamplingConfig(max_new_tokens=new_tokens, stop_at_eot=False)}
    times: dict[str, list[float]] = {name: [] for name in modes}
    compile_s: dict[str, float] = {}
    with sharding.activate(mesh, rules):
        batch_sharding = sharding.batch_sharding(mesh, rules)
        row_sharding = sharding.logical_sharding(mesh, rules, ("batch",))
        inputs = (case.state.params, put_global(tokens, batch_sharding),
                  put_global(np.full((rows,), prompt_len, np.int32), row_sharding),
                  put_global(np.full((rows,), new_tokens, np.int32), row_sharding),
                  put_global(np.arange(rows, dtype=np.int32), row_sharding), np.int32(0))
        fns = {name: jit_decode(case.model, settings, prompt_len + new_tokens, (-1, -1), sharding.replicated(mesh))
               for name, settings in modes.items()}

        def once(name: str) -> float:
            tic = time.perf_counter()
            out = fns[name](*inputs)
            jax.block_until_ready(out)
            return time.perf_counter() - tic

        for name in modes:
            compile_s[name] = once(name)
        for _ in range(runs):
            for name in modes:
                times[name].append(once(name))
    records = []
    for name in modes:
        median = statistics.median(times[name])
        records.append({"kind": "decode", "variant": case.variant.label, "mode": name, "batch": batch,
                        "rows_decoded": rows, "prompt_len": prompt_len, "new_tokens": new_tokens, "runs": runs,
                        "s_median": median, "first_run_s": compile_s[name],
                        "tokens_per_s": batch * new_tokens / median,
                        "ms_per_token_step": 1e3 * median / new_tokens})
    sampled, greedy = records[1], records[0]
    sampled["vs_greedy"] = sampled["tokens_per_s"] / greedy["tokens_per_s"]
    return records


def ratios(records: Sequence[dict]) -> list[dict]:
    """Each train variant's step time, tokens/s and peak memory over the first variant's."""
    train = [r for r in records if r["kind"] == "train"]
    if len(train) < 2:
        return []
    base = train[0]

    def over(r: dict, key: str) -> float | None:
        a, b = r.get(key), base.get(key)
        return a / b if a is not None and b else None

    return [{"kind": "ratio", "variant": r["variant"], "baseline": base["variant"],
             "step_s": over(r, "step_s_median"), "tokens_per_s": over(r, "tokens_per_s"),
             "compiled_peak_gib": over(r, "compiled_peak_gib"), "compile_s": over(r, "compile_s")}
            for r in train[1:]]


def run(config: ml_collections.ConfigDict, variants: Sequence[Variant], steps: int = 5, warmup: int = 2,
        segments: int = 1, peak_tflops: float | None = None, sequential: bool = False,
        decode_batches: Sequence[int] = (1, 16), decode_tokens: int = 64, decode_prompt_len: int = 32,
        decode_runs: int = 3, devices: Sequence[Any] | None = None) -> Iterator[dict]:
    """Every record, as soon as it is measured: per variant its train record and (with `decode_batches`) its
    decode records, then the ratios to the first variant."""
    if steps < 1 or warmup < 0:
        raise ConfigError(f"--steps={steps} / --warmup={warmup}: need at least one timed step and warmup >= 0")
    for variant in variants:  # every override checked before anything is compiled
        variant_config(config, variant)
    records = []
    for record, case in time_train(config, variants, steps, warmup, segments, peak_tflops, sequential,
                                   devices=devices):
        records.append(record)
        yield record
        for batch in decode_batches:
            for decode_record in time_decode(case, batch, decode_tokens, decode_prompt_len, decode_runs):
                yield decode_record
        case.state = case.batch = None  # frees the variant's memory before the next (sequential) one
    yield from ratios(records)
