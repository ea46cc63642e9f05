"""Compare sharding layouts of the real train step: memory, FLOPs, collectives and (when possible) speed.

    python -m lima_jax.layouts --config configs/toy.py --layouts data,fsdp,fsdp_tp,tensor
    python -m lima_jax.layouts --config configs/lima_65b.py --topology v5p-128 --layouts fsdp,fsdp_tp

For each layout the tool builds the mesh, lowers and compiles the train step exactly as training does
(`lima_jax.train_step.jit_train_step`: same state shardings, same donated state) and reports, per device:

* memory of the compiled program: arguments, outputs, temporaries and the peak (the larger of XLA's
  peak estimate and arguments + outputs - aliased (donated) + temporaries); whether it fits the device
  (the TPU generation's HBM with --topology, the runtime's limit on GPU);
* FLOPs per step, summed over devices: XLA's cost analysis (which counts a loop body once, so it
  undercounts the scanned layers), a loop-aware count of the compiled HLO's `dot`s (CPU/GPU; TPU writes
  matmuls as convolutions and gets "-"), and the analytic 6 * N_matmul * tokens + 12 * layers * length *
  dim * tokens (attention scores and values). Rematerialization adds the recomputed forward pass to the
  compiled figures; computation a layout replicates (e.g. an unsplit LM head) adds to them too;
* the collectives in the compiled HLO: count and bytes (result sizes) per kind, per step and device, ops
  in the scanned layer loop counted once per trip (XLA's known trip count, or the loop condition's bound);
* unless --topology is given or --steps=0: measured step time, tokens/s and MFU (MFU needs the
  device's peak FLOP/s: known for TPUs and H100/H200/A100, else --peak_tflops).

With `config.data.packing="examples"` a step's rows are planned from the data (the training log and
`python -m lima_jax.data stats` print them): pass them as --rows; without it the step is compiled for
train.batch_size rows (one example per row, the most a step can need), rounded up like training rounds.

A layout is `name` or `name:DATAxFSDPxTENSOR` to give its mesh, e.g. `fsdp_tp:1x4x2` (one size may be -1); the
default mesh per layout puts all devices on its main axis (tensor size: --tensor, default the largest
power of two up to 8 that divides the KV heads and the device count). An invalid layout is reported in
the table with its error; the others still run.

--topology compiles for a Cloud TPU slice from this CPU host, without a TPU (needs libtpu:
`pip install "lima_jax[tpu]"`). Names: `v5p-128`, `v4-64` (TensorCores, as in Cloud TPU accelerator
types), `v5e-16` / `v5litepod-16`, `v6e-64` (chips), or explicit `v5p:4x4x4`.

--estimate adds what the whole recipe costs under each layout (lima_jax.analysis.estimate): wall time
and chip-hours split into compute (steps from the real data x step time at --mfu), checkpoint I/O (saves
x bytes / hosts x --write_gbps), dev-report decoding (memory-bound: parameters + KV cache read per token
at the slice's HBM bandwidth, every answer to the cap) and start-up (--startup_s + the measured compile +
reading the pretrained parameters at --read_gbps), plus the storage the kept checkpoints take. It needs
config.data.train_path and config.tokenizer.path; it prints every figure it assumed and where it comes
from, and writes `<out>/estimate.md` and `<out>/estimate.json`:

    python -m lima_jax.layouts --config configs/lima_65b.py --topology v5p-128 --layouts fsdp_tp --estimate \
        --config.data.train_path=lima_train.jsonl --config.tokenizer.path=tokenizer.model

Output: a table on the console, `<out>/layouts.csv`, `<out>/layouts.json`, `<out>/layouts.png` and
`<out>/layouts.md` (a Markdown summary, as in docs/sharding.md); --out is a local folder or a gs:// URL,
by default `<config.workdir>/layouts` (else /tmp/lima_layouts). The library is `lima_jax.analysis`.
"""
from __future__ import annotations

import argparse
import os

import jax

from lima_jax import cli, sharding
from lima_jax.analysis import estimate, hardware, layout_report, layouts
from lima_jax.config import packing_mode
from lima_jax.paths import as_path
from lima_jax.rundir import RunDir

DEFAULT_OUT = "/tmp/lima_layouts"


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _parser():
    p = cli.parser("lima_jax.layouts", __doc__)
    cli.add_config_flags(p)
    p.add_argument("--layouts", type=_comma_list, default=list(sharding.LAYOUTS),
                   help="layouts to compare, comma-separated: name or name:DATAxFSDPxTENSOR (e.g. fsdp_tp:1x4x2, "
                        "one size may be -1); default: " + ",".join(sharding.LAYOUTS))
    p.add_argument("--topology", default=None, help="compile ahead of time for this TPU slice (e.g. v5p-128, "
                   "v4-64, v5e-16, v6e-64, v5p:4x4x4) instead of the present devices")
    p.add_argument("--tensor", type=int, default=None,
                   help="tensor-axis size of the tensor-parallel layouts' default mesh")
    p.add_argument("--steps", type=int, default=5,
                   help="timed steps per layout on the present devices (0: compile only; default 5)")
    p.add_argument("--out", default=None,
                   help=f"output folder, local or gs:// (default: <config.workdir>/layouts, else {DEFAULT_OUT})")
    p.add_argument("--vocab_size", type=int, default=32001, help="vocabulary when neither config.model.vocab_size "
                   "nor a tokenizer file is available (default 32001: LLaMA's 32,000 + EOT)")
    p.add_argument("--rows", type=cli.positive_int, default=None, metavar="R",
                   help="with config.data.packing='examples': the planned rows per step to compile for "
                        "(default: train.batch_size, rounded up to the batch shards x grad_accum_steps)")
    p.add_argument("--dump_hlo", action="store_true",
                   help="also write each layout's compiled HLO to <out>/<layout>.hlo.txt")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="peak TFLOP/s per device for MFU (default: known accelerators' bf16 figure)")
    e = p.add_argument_group("cost estimate (--estimate)")
    e.add_argument("--estimate", action="store_true",
                   help="also estimate the whole recipe's wall time, chip-hours and storage per layout")
    e.add_argument("--mfu", type=_fraction, default=None,
                   help=_escaped(f"model FLOPs utilization, 0-1 (default: a timed layout's measured MFU, else "
                                 f"{estimate.DEFAULT_MFU:g}: {estimate.DEFAULT_MFU_SOURCE})"))
    e.add_argument("--write_gbps", type=_positive, default=estimate.DEFAULT_WRITE_GBPS,
                   help=f"checkpoint write bandwidth per host, GB/s (default {estimate.DEFAULT_WRITE_GBPS:g}: "
                        f"{estimate.DEFAULT_WRITE_SOURCE})")
    e.add_argument("--read_gbps", type=_positive, default=estimate.DEFAULT_READ_GBPS,
                   help=f"read bandwidth per host for the pretrained parameters, GB/s (default "
                        f"{estimate.DEFAULT_READ_GBPS:g})")
    e.add_argument("--startup_s", type=float, default=estimate.DEFAULT_STARTUP_S,
                   help=f"fixed start-up allowance in seconds, besides compile and restore (default "
                        f"{estimate.DEFAULT_STARTUP_S:g}: {estimate.DEFAULT_STARTUP_SOURCE})")
    e.add_argument("--compile_s", type=float, default=None,
                   help="train-step compile time in seconds (default: the measured compile of each layout)")
    e.add_argument("--dev_prompts", type=int, default=estimate.LIMA_DEV_PROMPTS,
                   help="dev prompts per report when config.data.dev_path is unset (default "
                        f"{estimate.LIMA_DEV_PROMPTS}, LIMA's dev set)")
    return p


def _escaped(text: str) -> str:
    """Help text with its `%` kept literal (argparse %-formats help strings)."""
    return text.replace("%", "%%")


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be in (0, 1]")
    return value


def _source(args: argparse.Namespace, flag: str, default: float, source: str) -> str:
    """`source` (why the default) when the flag kept its default, else the flag's name."""
    return source if getattr(args, flag) == default else f"--{flag}"


def _assumptions(args: argparse.Namespace, config) -> estimate.Assumptions:
    """The estimate's assumptions from the flags, each with where its value comes from."""
    prompts, dev_source = estimate.dev_prompt_count(config, args.dev_prompts)
    return estimate.Assumptions(
        mfu=args.mfu, mfu_source="--mfu" if args.mfu is not None else estimate.DEFAULT_MFU_SOURCE,
        write_gbps=args.write_gbps,
        write_source=_source(args, "write_gbps", estimate.DEFAULT_WRITE_GBPS, estimate.DEFAULT_WRITE_SOURCE),
        read_gbps=args.read_gbps,
        read_source=_source(args, "read_gbps", estimate.DEFAULT_READ_GBPS, estimate.DEFAULT_READ_SOURCE),
        startup_s=args.startup_s,
        startup_source=_source(args, "startup_s", estimate.DEFAULT_STARTUP_S, estimate.DEFAULT_STARTUP_SOURCE),
        compile_s=args.compile_s, dev_prompts=prompts, dev_source=dev_source)


def main(argv: list[str]) -> None:
    args, config = cli.parse(_parser(), argv)
    topology = hardware.parse_topology(args.topology) if args.topology else None
    if topology is not None:  # compile-only use of libtpu: don't contend for the TPU lock with other jobs
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # before anything starts a jax backend
    cli.setup_logging()
    if args.out:
        out, why = as_path(args.out), "--out"
    elif config.workdir:
        out, why = RunDir.at(config.workdir).layouts, "config.workdir's layouts folder"
    else:
        out, why = as_path(DEFAULT_OUT), "no --out and no config.workdir"
    main_process = jax.process_index() == 0
    if main_process:
        print(f"output folder: {out} ({why})", flush=True)
    plan = assumptions = None
    if args.estimate:  # the data first: a bad path fails before any compile
        plan, assumptions = estimate.load_step_plan(config), _assumptions(args, config)
    rows = args.rows
    if plan is not None and rows is None and plan.packing == "examples":
        rows = plan.rows_per_step  # the data's R: compile what training would
        print(f"rows per step: {rows}, planned from the data (packing='examples')", flush=True)
    devices = hardware.topology_devices(topology) if topology is not None else jax.devices()
    reports = layouts.compare(config, args.layouts, topology, args.steps, args.vocab_size, args.peak_tflops,
                              args.tensor, devices=devices, hlo_dir=out if args.dump_hlo else None, rows=rows)
    if not main_process:
        return
    where = f"TPU {topology.name} ({topology.chips} chips, AOT)" if topology else \
        f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    batch = (f"{config.train.batch_size} examples in {rows or 'up to ' + str(config.train.batch_size)} rows"
             if packing_mode(config.data.packing) == "examples" else str(config.train.batch_size))
    title = f"{as_path(config.source_file).name}: batch {batch} x {config.data.max_len} tokens on {where}"
    paths = layout_report.write_outputs(reports, out, title)
    print(f"\n{title}\nmemory per device in GiB; FLOPs per step summed over devices\n"
          f"{layout_report.format_table(reports)}\n")
    if plan is not None:
        paths += _print_estimate(config, reports, plan, assumptions,
                                 estimate.slice_spec(devices, topology, args.peak_tflops, jax.process_count()),
                                 args.vocab_size, out, title)
    print("wrote " + ", ".join(str(p) for p in paths))


def _print_estimate(config, reports, plan, assumptions, hardware_spec, vocab_size, out, title) -> list:
    """Prints what the estimate used and its table; writes estimate.md and estimate.json."""
    estimates, inputs = estimate.estimate_layouts(reports, config, plan, hardware_spec, assumptions, vocab_size)
    title = f"cost of the whole recipe: {title}"
    print(f"{title}\n" + "\n".join(f"  {line}" for line in inputs) +
          f"\nhours per part; total = compute + checkpoint I/O + decoding + start-up; chip-hours = total x chips\n"
          f"{estimate.format_table(estimates)}\n")
    return estimate.write_outputs(estimates, inputs, out, title)


if __name__ == "__main__":
    cli.run(main)
