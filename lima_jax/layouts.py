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

Output: a table on the console, `<out>/layouts.csv`, `<out>/layouts.json`, `<out>/layouts.png` and
`<out>/layouts.md` (a Markdown summary, as in docs/sharding.md); --out is a local folder or a gs:// URL,
by default `<config.workdir>/layouts` (else /tmp/lima_layouts). The library is `lima_jax.analysis`.
"""
from __future__ import annotations

import os

import jax

from lima_jax import cli, sharding
from lima_jax.analysis import hardware, layout_report, layouts
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
    return p


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
    reports = layouts.compare(config, args.layouts, topology, args.steps, args.vocab_size, args.peak_tflops,
                              args.tensor, hlo_dir=out if args.dump_hlo else None, rows=args.rows)
    if not main_process:
        return
    where = f"TPU {topology.name} ({topology.chips} chips, AOT)" if topology else \
        f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    batch = (f"{config.train.batch_size} examples in {args.rows or 'up to ' + str(config.train.batch_size)} rows"
             if packing_mode(config.data.packing) == "examples" else str(config.train.batch_size))
    title = f"{as_path(config.source_file).name}: batch {batch} x {config.data.max_len} tokens on {where}"
    paths = layout_report.write_outputs(reports, out, title)
    print(f"\n{title}\nmemory per device in GiB; FLOPs per step summed over devices\n"
          f"{layout_report.format_table(reports)}\n")
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    cli.run(main)
