"""What the whole recipe costs on a slice, per layout: wall time and chip-hours, split into compute,
checkpoint I/O, dev-report decoding and start-up, plus the storage the run leaves behind.

Inputs: the compiled train step of each layout (`lima_jax.analysis.layouts.LayoutReport`: memory, fit,
compile time), the data's real row and token counts (`step_plan`), the slice's chips, hosts, peak FLOP/s
and HBM bandwidth (`lima_jax.analysis.hardware`), and the `Assumptions` (MFU, storage bandwidth, fixed
start-up), each carrying the sentence that says where its value comes from.

* compute: total steps x step time; step time = model FLOPs of one step (analytic 6N + attention over
  rows_per_step x max_len positions, the figure MFU is defined on, as `layouts` measures it) / (MFU x
  peak x chips). Rematerialization's extra forward pass is part of what a given MFU absorbs.
* checkpoint I/O: bytes written / (hosts x per-host write bandwidth): every host writes its own shards
  (orbax). Each save is the full train state (parameters + AdamW mu and nu, optax keeps them in the
  parameters' dtype); with `config.train.snapshots="params"` each epoch also writes a parameter snapshot in
  `train.snapshot_dtype` and only the newest full state is kept (`save_plan`).
* decoding: the dev report after each epoch of `config.dev_report.epochs`, every batch decoding up to the
  answer cap (`dev_report.max_new_tokens`, bounded by the context). Decoding one token is memory-bound:
  per step every chip reads its share of the parameters (in their stored dtype: the report decodes from
  the train state) and of the KV cache buffer (full context length), so step time = those bytes / (chips x
  HBM bandwidth). This is a floor: it ignores FSDP's weight gathers over ICI and answers that stop early.
* start-up: a fixed allowance (process start, distributed init, tokenizing, the decoder's compile) + the
  measured ahead-of-time compile of the train step + reading the pretrained parameters (init_from) at
  the per-host read bandwidth.

  step_plan        steps per epoch, rows per step and real tokens, from the examples
  load_step_plan   the same from config.data.train_path and config.tokenizer.path
  SliceSpec        chips, hosts, peak TFLOP/s and HBM GB/s per chip of the devices compiled for (slice_spec)
  Assumptions      MFU, bandwidths, start-up allowance, dev prompts, with their sources
  estimate_layouts one Estimate per compiled layout, and what they used (the library entry point)
  estimate_layout  one layout's Estimate
  format_table / markdown_table / write_outputs
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

import ml_collections
from etils import epath

from lima_jax import data
from lima_jax.analysis.hardware import TPU_SPECS, Topology, device_hbm_gbps, device_peak_tflops, num_hosts
from lima_jax.analysis.layouts import LayoutReport, analytic_flops, resolve_vocab_size
from lima_jax.config import ModelConfig, model_config, packing_mode
from lima_jax.data.pipeline import round_up
from lima_jax.errors import ConfigError
from lima_jax.paths import PathLike, as_path, atomic_write_text
from lima_jax.records import read_prompts
from lima_jax.tokenizer import load_tokenizer

# Defaults of the hardware assumptions, each with its source (the recipe's numbers live in configs/).
DEFAULT_MFU = 0.40
DEFAULT_MFU_SOURCE = ("assumed 40%: the project has no measured TPU MFU (docs/sharding.md and benchmarks/layouts "
                      "hold ahead-of-time compiles only); PaLM 540B reached 46.2% on TPU v4 (Chowdhery et al. "
                      "2022, table 3), so 40% is a round figure below it")
DEFAULT_WRITE_GBPS = 1.0
DEFAULT_WRITE_SOURCE = ("assumed 1 GB/s per host streaming to a same-region GCS bucket (a conservative single-VM "
                        "figure; measure with a real save's log and pass --write_gbps)")
DEFAULT_READ_GBPS = 1.0
DEFAULT_READ_SOURCE = "assumed 1 GB/s per host reading from GCS (pass --read_gbps)"
DEFAULT_STARTUP_S = 300.0
DEFAULT_STARTUP_SOURCE = ("assumed 300 s: process start, jax.distributed init, loading and tokenizing the data, "
                          "compiling the decoder for the dev report (pass --startup_s)")
# Devices of unknown speed (CPU): placeholders so the arithmetic runs; the figures then mean nothing.
UNKNOWN_PEAK_TFLOPS = 1.0
UNKNOWN_HBM_GBPS = 100.0
# LIMA's dev set: 50 author-written prompts (Zhou et al. 2023, section 2), when config.data.dev_path is unset.
LIMA_DEV_PROMPTS = 50
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one epoch trains on: optimizer steps, rows per step (each max_len positions) before a layout's
    batch shards round them up (packing="examples"), real tokens."""

    steps_per_epoch: int
    rows_per_step: int
    real_tokens_per_epoch: int
    row_tokens: int
    description: str
    packing: str = "none"

    def rows_for(self, batch_ways: int, grad_accum_steps: int) -> int:
        """The rows a layout computes per step: with packing="examples" R rounded up to a multiple of the
        batch's shards x micro-batches, as training rounds it; else train.batch_size rows as planned."""
        if self.packing != "examples":
            return self.rows_per_step
        return round_up(self.rows_per_step, batch_ways * grad_accum_steps)


def step_plan(config: ml_collections.ConfigDict, examples: Sequence[data.Example]) -> StepPlan:
    """The per-step plan of `config`'s packing mode over `examples`: lima_jax.data's own `plan_steps`, as
    training plans it (R over every epoch of the run for packing="examples")."""
    plan = data.plan_steps(examples, batch_size=config.train.batch_size, max_len=config.data.max_len,
                           seed=config.seed, shuffle=config.data.shuffle, packing=packing_mode(config.data.packing),
                           num_epochs=config.train.num_epochs)
    return StepPlan(plan.steps_per_epoch, plan.rows_per_step, plan.epoch_tokens, plan.max_len, plan.describe(),
                    plan.packing)


def load_step_plan(config: ml_collections.ConfigDict) -> StepPlan:
    """`step_plan` of config.data.train_path tokenized with config.tokenizer.path, as training loads it;
    ConfigError naming the field when either is unset (the estimate counts the real data's steps)."""
    for field, value in (("data.train_path", config.data.train_path), ("tokenizer.path", config.tokenizer.path)):
        if not value:
            raise ConfigError(f"config.{field} is unset: the estimate counts the steps and tokens of the real "
                              f"training data (--config.{field}=...)")
    max_line_bytes = config.data.get("max_line_bytes", data.formats.MAX_LINE_BYTES)
    report = data.load_examples(config.data.train_path, load_tokenizer(config), config.data.max_len,
                                config.data.loss_on, config.data.on_bad_example, max_line_bytes=max_line_bytes)
    return step_plan(config, report.examples)


@dataclasses.dataclass(frozen=True)
class SliceSpec:
    """The devices an estimate runs on; `source` says where the per-chip figures come from."""

    name: str
    chips: int
    hosts: int
    peak_tflops: float
    hbm_gbps: float
    source: str


def slice_spec(devices: Sequence[Any], topology: Topology | None, peak_tflops: float | None,
               process_count: int) -> SliceSpec:
    """Chips, hosts and per-chip figures of `devices` (the TPU slice compiled for, or the present devices);
    --peak_tflops wins; unknown devices (CPU) get the UNKNOWN_* placeholders, which `source` names."""
    device = devices[0]
    known_peak = TPU_SPECS[topology.generation][0] if topology is not None else device_peak_tflops(device)
    peak, hbm = peak_tflops or known_peak, device_hbm_gbps(device, topology)
    if topology is not None:
        name = f"TPU {topology.name}"
        source = f"public Cloud TPU {topology.generation} figures, lima_jax.analysis.hardware"
    else:
        name, source = f"{len(devices)} x {device.device_kind}", "known accelerator figures"
    if peak_tflops:
        source += "; peak from --peak_tflops"
    if peak is None or hbm is None:
        source = (f"{getattr(device, 'device_kind', device)} has no known figures: placeholders "
                  f"{UNKNOWN_PEAK_TFLOPS:g} TFLOP/s, {UNKNOWN_HBM_GBPS:g} GB/s, so the times mean nothing "
                  "(--peak_tflops sets the peak)")
    return SliceSpec(name, len(devices), num_hosts(topology, process_count), peak or UNKNOWN_PEAK_TFLOPS,
                     hbm or UNKNOWN_HBM_GBPS, source)


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """The figures an estimate cannot derive; every `*_source` is printed beside its value. `mfu` None:
    a layout's measured MFU where it was timed, else DEFAULT_MFU. `compile_s` None: the measured compile."""

    mfu: float | None = None
    mfu_source: str = DEFAULT_MFU_SOURCE
    write_gbps: float = DEFAULT_WRITE_GBPS
    write_source: str = DEFAULT_WRITE_SOURCE
    read_gbps: float = DEFAULT_READ_GBPS
    read_source: str = DEFAULT_READ_SOURCE
    startup_s: float = DEFAULT_STARTUP_S
    startup_source: str = DEFAULT_STARTUP_SOURCE
    compile_s: float | None = None
    dev_prompts: int = LIMA_DEV_PROMPTS
    dev_source: str = "LIMA's 50 dev prompts (config.data.dev_path unset; --dev_prompts)"

    def describe(self) -> list[str]:
        mfu = "measured MFU of a timed layout, else " if self.mfu is None else ""
        compile_text = ("the measured (ahead-of-time, on this host) compile of each layout's train step"
                        if self.compile_s is None
                        else f"{self.compile_s:g} s (--compile_s)")
        return [f"MFU: {mfu}{100 * (self.mfu or DEFAULT_MFU):g}% ({self.mfu_source})",
                f"checkpoint writes: {self.write_gbps:g} GB/s per host ({self.write_source})",
                f"pretrained-parameter reads: {self.read_gbps:g} GB/s per host ({self.read_source})",
                f"start-up: {self.startup_s:g} s ({self.startup_source}) + {compile_text}",
                f"dev prompts: {self.dev_prompts} ({self.dev_source})"]


@dataclasses.dataclass(frozen=True)
class SavePlan:
    """The checkpoints a run writes and keeps: full train states (`saves`, `states_kept` of them kept) and
    parameter snapshots (one per epoch with train.snapshots="params", all kept)."""

    saves: int
    state_bytes: float
    states_kept: int
    snapshots: int
    snapshot_bytes: float
    what: str

    @property
    def written_bytes(self) -> float:
        return self.saves * self.state_bytes + self.snapshots * self.snapshot_bytes

    @property
    def kept_bytes(self) -> float:
        return self.states_kept * self.state_bytes + self.snapshots * self.snapshot_bytes


def save_plan(config: ml_collections.ConfigDict, model_cfg: ModelConfig, steps_per_epoch: int) -> SavePlan:
    """What lima_jax.training saves: a full train state at every epoch end and every
    `train.checkpoint_every_steps` (parameters + AdamW mu and nu, optax keeps them in the parameters' dtype),
    all kept; with `train.snapshots="params"` also a parameter snapshot per epoch in `train.snapshot_dtype`
    (default bfloat16), and only the newest full state kept."""
    epochs, every = int(config.train.num_epochs), int(config.train.checkpoint_every_steps)
    total = epochs * steps_per_epoch
    epoch_ends = {e * steps_per_epoch for e in range(1, epochs + 1)}
    saves = len(epoch_ends | (set(range(every, total + 1, every)) if every else set()))
    params = model_cfg.num_params()
    state = 3 * params * _BYTES[model_cfg.param_dtype]
    what = f"full train state: parameters + AdamW mu, nu in {model_cfg.param_dtype}"
    if config.train.get("snapshots", "full") != "params":
        return SavePlan(saves, state, saves, 0, 0.0, f"{what}; all kept")
    dtype = config.train.get("snapshot_dtype", "bfloat16")
    return SavePlan(saves, state, 1, epochs, params * _BYTES[dtype],
                    f"{what}, only the newest kept; + a parameter snapshot per epoch in {dtype}, all kept")


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """The dev report's decoding over the whole run: decode steps and the bytes each step reads."""

    epochs: int
    batches: int
    rows_per_batch: int
    steps_per_batch: int
    bytes_per_step: float

    @property
    def total_steps(self) -> int:
        return self.epochs * self.batches * self.steps_per_batch


def decode_plan(config: ml_collections.ConfigDict, model_cfg: ModelConfig, batch_ways: int,
                num_prompts: int) -> DecodePlan:
    """Decode steps of the dev reports (every answer to the cap, the context's bound) and bytes per step:
    the parameters in their stored dtype plus a batch's KV cache buffer, which generation sizes to the prompt
    plus the answer cap within the context (prompts taken as long as `data.max_len`, the longest trained on)."""
    epochs = sum(1 for e in config.dev_report.epochs if int(e) <= int(config.train.num_epochs))
    rows = math.ceil(int(config.dev_report.batch_size) / batch_ways) * batch_ways  # as generation.Generator
    steps = min(int(config.dev_report.max_new_tokens), model_cfg.max_seq_len)
    m = model_cfg
    cache_len = min(m.max_seq_len, int(config.data.max_len) + steps)
    kv_bytes = 2 * m.n_layers * rows * cache_len * m.n_kv_heads * m.head_dim * _BYTES[m.compute_dtype]
    return DecodePlan(epochs, math.ceil(num_prompts / rows), rows, steps,
                      m.num_params() * _BYTES[m.param_dtype] + kv_bytes)


@dataclasses.dataclass
class Estimate:
    """One layout's cost of the whole recipe (seconds, chip-hours, GB = 1e9 bytes)."""

    layout: str
    mesh: str
    error: str = ""
    fits: str = ""
    peak_gib: float = math.nan
    chips: int = 0
    steps: int = 0
    step_tflop: float = math.nan
    mfu: float = math.nan
    mfu_source: str = ""
    step_s: float = math.nan
    compute_s: float = math.nan
    checkpoint_s: float = math.nan
    decode_s: float = math.nan
    startup_s: float = math.nan
    total_s: float = math.nan
    chip_hours: float = math.nan
    saves: int = 0
    state_gb: float = math.nan
    written_gb: float = math.nan
    storage_gb: float = math.nan
    decode_steps: int = 0
    decode_step_ms: float = math.nan


def _batch_ways(mesh: str) -> int:
    """data x fsdp of a report's `DATAxFSDPxTENSOR` mesh text."""
    sizes = [int(s) for s in mesh.split("x")]
    return sizes[0] * sizes[1]


def estimate_layout(report: LayoutReport, config: ml_collections.ConfigDict, model_cfg: ModelConfig,
                    plan: StepPlan, hardware: SliceSpec, assumptions: Assumptions) -> Estimate:
    """The recipe's cost under one compiled layout (a row with the report's error if it did not compile)."""
    est = Estimate(report.layout, report.mesh, fits=report.fits, peak_gib=report.peak_gib, chips=hardware.chips)
    if report.error:
        est.error = report.error
        return est
    if assumptions.mfu is not None:
        est.mfu, est.mfu_source = assumptions.mfu, "--mfu"
    elif not math.isnan(report.mfu):
        est.mfu, est.mfu_source = report.mfu, "measured"
    else:
        est.mfu, est.mfu_source = DEFAULT_MFU, "default"
    est.steps = plan.steps_per_epoch * int(config.train.num_epochs)
    rows = plan.rows_for(_batch_ways(report.mesh), int(config.train.grad_accum_steps))
    est.step_tflop = analytic_flops(model_cfg, rows, plan.row_tokens) / 1e12
    est.step_s = est.step_tflop / (est.mfu * hardware.peak_tflops * hardware.chips)
    est.compute_s = est.steps * est.step_s

    saves = save_plan(config, model_cfg, plan.steps_per_epoch)
    est.saves, est.state_gb = saves.saves, saves.state_bytes / 1e9
    est.written_gb, est.storage_gb = saves.written_bytes / 1e9, saves.kept_bytes / 1e9
    est.checkpoint_s = est.written_gb / (hardware.hosts * assumptions.write_gbps)

    decode = decode_plan(config, model_cfg, _batch_ways(report.mesh), assumptions.dev_prompts)
    est.decode_steps = decode.total_steps
    est.decode_step_ms = 1e3 * decode.bytes_per_step / (hardware.chips * hardware.hbm_gbps * 1e9)
    est.decode_s = decode.total_steps * est.decode_step_ms / 1e3

    compile_s = report.compile_s if assumptions.compile_s is None else assumptions.compile_s
    restore_s = model_cfg.num_params() * _BYTES[model_cfg.param_dtype] / 1e9 / (hardware.hosts * assumptions.read_gbps)
    est.startup_s = assumptions.startup_s + compile_s + restore_s
    est.total_s = est.compute_s + est.checkpoint_s + est.decode_s + est.startup_s
    est.chip_hours = est.total_s / 3600 * hardware.chips
    return est


def estimate_layouts(reports: Sequence[LayoutReport], config: ml_collections.ConfigDict, plan: StepPlan,
                     hardware: SliceSpec, assumptions: Assumptions,
                     vocab_size: int = 32001) -> tuple[list[Estimate], list[str]]:
    """(one Estimate per report, the lines saying what they used): the library entry point of --estimate;
    `vocab_size` as in `layouts.compare` (when neither the config nor a tokenizer file gives one)."""
    model_cfg = model_config(config, vocab_size=resolve_vocab_size(config, vocab_size))
    estimates = [estimate_layout(r, config, model_cfg, plan, hardware, assumptions) for r in reports]
    return estimates, describe_inputs(config, model_cfg, plan, hardware, assumptions)


def describe_inputs(config: ml_collections.ConfigDict, model_cfg: ModelConfig, plan: StepPlan,
                    hardware: SliceSpec, assumptions: Assumptions) -> list[str]:
    """The lines that say what an estimate used, for the console and estimate.md."""
    saves = save_plan(config, model_cfg, plan.steps_per_epoch)
    decode = decode_plan(config, model_cfg, 1, assumptions.dev_prompts)
    return [f"data: {plan.description}; {plan.real_tokens_per_epoch:,} real tokens/epoch "
            f"x {config.train.num_epochs} epochs",
            f"slice: {hardware.name}: {hardware.chips} chips on {hardware.hosts} host(s), {hardware.peak_tflops:g} "
            f"TFLOP/s and {hardware.hbm_gbps:g} GB/s HBM per chip ({hardware.source})",
            f"compute: model FLOPs per step (6N + attention, {plan.rows_per_step} x {plan.row_tokens} positions) "
            "/ (MFU x peak x chips)",
            f"checkpoints: {saves.saves} saves of {_fmt(saves.state_bytes / 1e9)} GB"
            + (f" + {saves.snapshots} snapshots of {_fmt(saves.snapshot_bytes / 1e9)} GB" if saves.snapshots else "")
            + f" ({saves.what}): {_fmt(saves.written_bytes / 1e9)} GB written, {_fmt(saves.kept_bytes / 1e9)} GB "
            "kept; each host writes its shards",
            f"decoding: {decode.epochs} dev reports x ceil(prompts / batch) x {decode.steps_per_batch} steps "
            "(the answer cap); memory-bound: a step reads the parameters + the batch's KV cache once, "
            "at the slice's HBM bandwidth",
            *assumptions.describe()]


_COLUMNS = ("layout", "mesh d.f.t", "fits (peak GiB)", "steps", "TFLOP/step", "MFU", "step s", "compute h",
            "checkpoint I/O h", "decoding h", "start-up h", "total h", "chips", "chip-hours", "storage TB")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else (f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}")
    return str(value)


def _cells(est: Estimate) -> list[str]:
    """One table row (`_COLUMNS`): the parts in hours, storage in TB; a layout that failed shows its error."""
    if est.error:
        return [est.layout, est.mesh, "invalid: " + est.error[:100]]
    hours = [_fmt(s / 3600) for s in (est.compute_s, est.checkpoint_s, est.decode_s, est.startup_s, est.total_s)]
    return [est.layout, est.mesh, f"{est.fits or '-'} ({_fmt(est.peak_gib)})", _fmt(est.steps), _fmt(est.step_tflop),
            f"{100 * est.mfu:.0f}% {est.mfu_source}", _fmt(est.step_s), *hours, _fmt(est.chips),
            _fmt(est.chip_hours), _fmt(est.storage_gb / 1e3)]


def format_table(estimates: Sequence[Estimate]) -> str:
    """The console table: hours per part, their total, chip-hours and the storage left behind."""
    header = list(_COLUMNS)
    rows = [r + [""] * (len(header) - len(r)) for r in map(_cells, estimates)]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(estimates: Sequence[Estimate]) -> str:
    """The same table in Markdown (estimate.md, docs/performance.md)."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for row in map(_cells, estimates):
        lines.append("| " + " | ".join(row) + " |" + "|" * (len(_COLUMNS) - len(row)))
    return "\n".join(lines)


def write_outputs(estimates: Sequence[Estimate], inputs: Sequence[str], out: PathLike, title: str) -> list[epath.Path]:
    """estimate.json (every field) and estimate.md (the inputs and the table) in `out`."""
    out = as_path(out)
    json_path, md_path = out / "estimate.json", out / "estimate.md"
    records = [dataclasses.asdict(e) for e in estimates]
    atomic_write_text(json_path, json.dumps({"title": title, "inputs": list(inputs), "layouts": records}, indent=2))
    body = "\n".join(f"* {line}" for line in inputs)
    atomic_write_text(md_path, f"{title}\n\n{body}\n\n{markdown_table(estimates)}\n")
    return [json_path, md_path]


def dev_prompt_count(config: ml_collections.ConfigDict, fallback: int) -> tuple[int, str]:
    """(prompts, where from): config.data.dev_path's prompt count, else `fallback` (LIMA's 50)."""
    path = config.data.get("dev_path", "")
    if path:
        return len(read_prompts(path)), f"the prompts of config.data.dev_path={path}"
    return fallback, "config.data.dev_path unset: LIMA's dev set size, or --dev_prompts"
