"""Build TFDS datasets of conversations and inspect training data.

  python -m lima_jax.data build lima --manual_dir DIR --data_dir OUT [--config single_turn|with_dialogues|all]
                                     [--dev_file dev.jsonl]
  python -m lima_jax.data build jsonl --name NAME --train train.jsonl [--dev dev.jsonl] [--test test.jsonl]
                                      --data_dir OUT
  python -m lima_jax.data stats --data PATH --tokenizer tokenizer.model [--max_len 2048] [--histogram out.png]

`build` prints each dataset folder; use it (optionally `FOLDER:split`) as `config.data.train_path`.
`--data` of `stats` is a JSONL file or such a folder. Nothing is downloaded: see docs/data.md.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Sequence

from lima_jax.data.formats import DataError


def _build(args: argparse.Namespace) -> None:
    from lima_jax.data import tfds_builders

    if args.dataset == "lima":
        configs = sorted(tfds_builders.RELEASED_TRAIN_ROWS) if args.config == "all" else [args.config]
        for config in configs:
            print(tfds_builders.build_lima(args.manual_dir, args.data_dir, config, args.dev_file))
    else:
        files = {"train": args.train, "dev": args.dev, "test": args.test}
        print(tfds_builders.build_jsonl(args.name, {k: v for k, v in files.items() if v}, args.data_dir))


def _stats(args: argparse.Namespace) -> None:
    from lima_jax.data.pipeline import load_examples
    from lima_jax.data.stats import compute_stats, format_stats, write_histogram
    from lima_jax.tokenizer import Tokenizer

    report = load_examples(args.data, Tokenizer(args.tokenizer), args.max_len, args.loss_on, args.on_bad_example)
    stats = compute_stats(args.data, report, args.max_len)
    print(format_stats(stats, args.batch_size))
    if args.histogram:
        write_histogram(stats, report.examples, args.histogram)
        print(f"wrote {args.histogram}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lima_jax.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build a TFDS (ArrayRecord) dataset from local files")
    kinds = build.add_subparsers(dest="dataset", required=True)
    lima = kinds.add_parser("lima", help="the released LIMA files (train.jsonl, test.jsonl) in a manual dir")
    lima.add_argument("--manual_dir", required=True, type=pathlib.Path)
    lima.add_argument("--config", default="single_turn", choices=("single_turn", "with_dialogues", "all"))
    lima.add_argument("--dev_file", type=pathlib.Path, help="a JSONL for the 'dev' split (default: DIR/dev.jsonl)")
    jsonl = kinds.add_parser("jsonl", help="any JSONL files in the LIMA, instruction or messages schema")
    jsonl.add_argument("--name", required=True, help="the config name: OUT/sft_jsonl/NAME/1.0.0")
    jsonl.add_argument("--train", required=True, type=pathlib.Path)
    jsonl.add_argument("--dev", type=pathlib.Path)
    jsonl.add_argument("--test", type=pathlib.Path)
    for kind in (lima, jsonl):
        kind.add_argument("--data_dir", required=True, type=pathlib.Path, help="TFDS data dir to write into")
    stats = sub.add_parser("stats", help="counts, token lengths per source, trimming, padding vs packing")
    stats.add_argument("--data", required=True, help="a JSONL file or a built dataset folder (FOLDER[:split])")
    stats.add_argument("--tokenizer", required=True, type=pathlib.Path)
    stats.add_argument("--max_len", type=int, default=2048)
    stats.add_argument("--loss_on", default="assistant", choices=("assistant", "all"))
    stats.add_argument("--on_bad_example", default="error", choices=("error", "skip"))
    stats.add_argument("--batch_size", type=int, help="also print steps per epoch at this many rows per step")
    stats.add_argument("--histogram", type=pathlib.Path, help="write a length histogram PNG here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        _build(args) if args.command == "build" else _stats(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
