"""Time the real train step and the decode loop: step time, tokens/s, TFLOP/s, MFU, memory, compile time.

    python -m lima_jax.bench --config configs/toy.py
    python -m lima_jax.bench --config configs/llama3_8b.py --config.model.n_layers=16 --out bench.jsonl
    python -m lima_jax.bench --config configs/toy.py --vs model.remat_policy=none,full
    python -m lima_jax.bench --config configs/toy.py --vs data.max_len=128,256 --vs model.remat_policy=none,full
    python -m lima_jax.bench --config configs/toy.py --variant "model.compute_dtype=bfloat16" \
        --variant "model.compute_dtype=float32 model.remat_policy=full"

No data files are read: each step gets random token rows of the config's shape (train.batch_size x
data.max_len; --segments N packs N examples per row). The step is the one `lima_jax.train` runs (the same
jitted function, state donated), compiled for the present devices under the config's mesh and layout, warmed
up (--warmup), then timed --steps times. Variants (--vs FIELD=V1,V2,... sweeps, several --vs giving their
cross product, and --variant "F=V F2=V2" override sets) run in one process, their steps alternating, and the
console ends with each variant's ratios to the first (--sequential: one variant at a time, for variants
too large to be in memory together).

Per variant: the median step time, tokens/s, FLOPs per step (analytic 6N + attention; XLA's cost analysis,
which counts the scanned layers' body once; the loop-aware count of the compiled HLO's dots), achieved
TFLOP/s, MFU against the device's bf16 dense peak (H100/H200/A100 and TPU v4/v5e/v5p/v6e known; elsewhere,
e.g. CPU, n/a unless --peak_tflops is given), the compiled program's memory per device and the runtime's peak
bytes in use (GPU/TPU), and the compile time. Then decode tokens/s at each --decode_batches size through the
KV-cache loop `lima_jax.generate` runs, greedy and with LIMA's sampling (top-p 0.9, temperature 0.7,
repetition penalty 1.2), random prompts of --decode_prompt_len tokens, --decode_tokens new tokens per row.

Output: a table on the console; every record as one JSON line on stdout, and appended to --out FILE if
given. The library is `lima_jax.analysis.bench`.
"""
from __future__ import annotations

import argparse
import json
import sys

import jax

from lima_jax import cli
from lima_jax.analysis import bench


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _parser():
    p = cli.parser("lima_jax.bench", __doc__)
    cli.add_config_flags(p)
    p.add_argument("--steps", type=cli.positive_int, default=10, help="timed steps per variant (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant after compiling (default 2)")
    p.add_argument("--segments", type=cli.positive_int, default=1,
                   help="packed examples per row (segment ids and restarting positions; default 1)")
    p.add_argument("--vs", action="append", default=[], metavar="FIELD=V1,V2",
                   help="a config field to sweep, one variant per value, e.g. model.remat_policy=none,full; "
                        "several --vs: their cross product")
    p.add_argument("--variant", action="append", default=[], metavar='"F=V F2=V2"',
                   help="one variant given as space-separated config overrides (repeatable)")
    p.add_argument("--sequential", action="store_true",
                   help="time the variants one after another instead of alternating their steps")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="peak TFLOP/s per device for MFU (default: the device's known bf16 dense peak)")
    p.add_argument("--decode_batches", type=_int_list, default=[1, 16],
                   help="batch sizes of the decode timing, comma-separated (default 1,16)")
    p.add_argument("--no_decode", action="store_true", help="skip the decode timing")
    p.add_argument("--decode_tokens", type=cli.positive_int, default=64, help="new tokens per row (default 64)")
    p.add_argument("--decode_prompt_len", type=cli.positive_int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--decode_runs", type=cli.positive_int, default=3, help="timed decode runs per mode (default 3)")
    p.add_argument("--out", default=None, metavar="FILE", help="also append every JSON line to FILE")
    return p


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _console_line(r: dict) -> str:
    if r["kind"] == "train":
        return (f"train  {r['variant']}: {r['step_s_median'] * 1e3:,.1f} ms/step (min {r['step_s_min'] * 1e3:,.1f}), "
                f"{r['tokens_per_s']:,.0f} tokens/s, {r['achieved_tflops_analytic']:.3g} TFLOP/s analytic "
                f"({_fmt(r['achieved_tflops_xla_cost'], '.3g')} XLA-counted), MFU {_fmt(r['mfu'], '.1%')}, "
                f"FLOPs/step analytic {r['analytic_tflop']:.4g} T / XLA {_fmt(r['xla_cost_tflop'], '.4g')} T / HLO "
                f"dots {_fmt(r['hlo_dot_tflop'], '.4g')} T, compiled peak {_fmt(r.get('compiled_peak_gib'), '.3f')}"
                f" GiB (temp {_fmt(r.get('temp_gib'), '.3f')}), device peak {_fmt(r['device_peak_gib'], '.3f')} "
                f"GiB, compile {r['compile_s']:.1f} s")
    if r["kind"] == "decode":
        extra = f" ({r['vs_greedy']:.2f}x greedy)" if "vs_greedy" in r else ""
        return (f"decode {r['variant']}: batch {r['batch']} {r['mode']}: {r['tokens_per_s']:,.1f} tokens/s, "
                f"{r['ms_per_token_step']:.2f} ms per step{extra}")
    return (f"ratio  {r['variant']} / {r['baseline']}: step time {_fmt(r['step_s'], '.3f')}x, tokens/s "
            f"{_fmt(r['tokens_per_s'], '.3f')}x, compiled peak {_fmt(r['compiled_peak_gib'], '.3f')}x")


def main(argv: list[str]) -> None:
    args, config = cli.parse(_parser(), argv)
    cli.setup_logging()
    variants = bench.parse_variants(args.vs, args.variant)
    devices = jax.devices()
    print(f"bench: {config.get('source_file', '')} on {len(devices)} x {devices[0].device_kind} "
          f"({devices[0].platform}); variants: {[v.label for v in variants]}; {args.warmup} warm-up + "
          f"{args.steps} timed steps each, {'one after another' if args.sequential else 'alternating'}; "
          f"{args.segments} segment(s) per row", flush=True)
    out = open(args.out, "a", encoding="utf-8") if args.out else None
    try:
        for record in bench.run(config, variants, steps=args.steps, warmup=args.warmup, segments=args.segments,
                                peak_tflops=args.peak_tflops, sequential=args.sequential,
                                decode_batches=[] if args.no_decode else args.decode_batches,
                                decode_tokens=args.decode_tokens, decode_prompt_len=args.decode_prompt_len,
                                decode_runs=args.decode_runs):
            line = json.dumps(record, sort_keys=True)
            print(_console_line(record), file=sys.stderr, flush=True)
            print(line, flush=True)
            if out is not None:
                out.write(line + "\n")
                out.flush()
    finally:
        if out is not None:
            out.close()


if __name__ == "__main__":
    cli.run(main)
