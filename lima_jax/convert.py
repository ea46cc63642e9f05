"""Checkpoint interop: import pretrained LLaMA weights and export fine-tuned models to Hugging Face.

    python -m lima_jax.convert from_hf      --input /llama-hf   --output /ckpt/llama
    python -m lima_jax.convert from_meta    --input /llama-65b  --output /ckpt/llama-65b
    python -m lima_jax.convert from_llama2c --input stories260K.bin --output /ckpt/stories260k
    python -m lima_jax.convert to_hf        --input /run --output /hf [--tokenizer tokenizer.model] [--eot E]

An import writes a lima_jax parameter checkpoint (`params/` + `model.json`) that `config.init_from` reads.
`to_hf` reads such a folder, a training checkpoint (`workdir/checkpoints/<step>`) or a run directory (its
chosen epoch, else its latest checkpoint; it prints which) and writes a folder that transformers loads offline;
without `--tokenizer`/`--eot` it takes the run's `config.tokenizer.path` and `config.tokenizer.eot`. Every command
writes
`<output>.lima-partial-<random>` and renames it onto `--output` when complete; a non-empty `--output` is
replaced only with `--overwrite`, and only when it is a lima_jax checkpoint or export (any other folder is
refused untouched). Paths may be local or gs:// URLs. The library is `lima_jax.conversion`;
docs/checkpoints.md has the details.
"""
from __future__ import annotations

import argparse
import time
from typing import Sequence

from lima_jax import cli, conversion, rundir

_SOURCES = {"from_hf": conversion.HuggingFaceSource, "from_meta": conversion.MetaSource,
            "from_llama2c": conversion.Llama2cSource}
_OVERWRITE_HELP = ("replace a non-empty --output that is a lima_jax checkpoint or Hugging Face export (as a "
                   "whole, once the new folder is complete); without it, and for any other folder, the --output "
                   "is refused")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("lima_jax.convert", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"from_hf": "Hugging Face LLaMA folder (config.json + safetensors) -> lima_jax checkpoint",
             "from_meta": "Meta's params.json + consolidated.NN.pth -> lima_jax checkpoint",
             "from_llama2c": "llama2.c legacy .bin -> lima_jax checkpoint"}
    for command, text in helps.items():
        p = cli.subcommand(sub, command, text)
        p.add_argument("--input", required=True, help="the source folder (or .bin file for llama2.c)")
        p.add_argument("--output", required=True, help="the lima_jax checkpoint folder to write")
        p.add_argument("--dtype", choices=conversion.DTYPES, default=None,
                       help="stored dtype (default: as in the source)")
        p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    p = cli.subcommand(sub, "to_hf", "lima_jax parameter or training checkpoint -> Hugging Face folder (weights, "
                    "config, tokenizer)")
    p.add_argument("--input", required=True, help="a params folder, workdir/checkpoints/<step>, or a run directory "
                   "(its chosen epoch, else its latest checkpoint)")
    p.add_argument("--tokenizer", default=None, help="the tokenizer file the model was trained with: a sentencepiece "
                   "or Meta tiktoken tokenizer.model, or a tokenizer.json (default: the run's config.tokenizer.path)")
    p.add_argument("--eot", default=None, help="the model's EOT: 'new_row' or a special token of the tokenizer, "
                   "e.g. '<|eot_id|>' (default: the run's config.tokenizer.eot, else 'new_row')")
    p.add_argument("--output", required=True, help="the Hugging Face folder to write")
    p.add_argument("--dtype", choices=conversion.DTYPES, default=None, help="weights dtype (default: as stored)")
    p.add_argument("--max_shard_gb", type=float, default=5.0, help="split safetensors above this size")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    return parser


def _peak_rss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: Sequence[str] | None = None) -> int | None:
    args, _ = cli.parse(build_parser(), argv)
    tic = time.perf_counter()
    if args.command == "to_hf":
        choice = rundir.resolve_checkpoint(args.input)
        print(f"to_hf: exporting the {choice.describe()}", flush=True)
        tokenizer, why = conversion.export_tokenizer(choice, args.tokenizer)
        print(f"to_hf: tokenizer {tokenizer}: {why}", flush=True)
        eot, why = conversion.export_eot(choice, args.eot)
        print(f"to_hf: EOT {eot!r}: {why}", flush=True)
        cfg = conversion.export_hf(choice, tokenizer, args.output, args.dtype, int(args.max_shard_gb * 2**30),
                                   overwrite=args.overwrite, eot=eot)
    else:
        conversion.check_output(args.output, args.overwrite, [args.input])  # before the source is opened
        source = _SOURCES[args.command](args.input)
        cfg = conversion.import_checkpoint(source, args.output, args.dtype, overwrite=args.overwrite)
        kept = conversion.source_tokenizer(source)
        print(f"{args.command}: tokenizer: " + (f"kept {kept} in {args.output} (config.tokenizer.path="
                                                 f"{args.output} reads it)" if kept else "none in the source"))
    print(f"{args.command}: wrote {args.output} ({cfg.num_params():,} parameters, {cfg.param_dtype}, "
          f"{conversion.describe_rope(cfg)}) in "
          f"{time.perf_counter() - tic:.1f} s, peak host memory {_peak_rss_mib():.0f} MiB")
    return None


if __name__ == "__main__":
    cli.run(main)
