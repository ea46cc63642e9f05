"""Build TFDS datasets of conversations, inspect training data, and build or try a tokenizer.

  python -m lima_jax.data build lima --manual_dir DIR --data_dir OUT [--config single_turn|with_dialogues|all]
                                     [--dev_file dev.jsonl]
  python -m lima_jax.data build jsonl --name NAME --train train.jsonl [--dev dev.jsonl] [--test test.jsonl]
                                      --data_dir OUT
  python -m lima_jax.data stats --data PATH --tokenizer FILE_OR_FOLDER [--eot new_row] [--max_len 2048]
                                [--histogram out.png]
                                [--on_bad_example error|skip] [--max_line_bytes 4194304] [--batch_size 32]
                                [--num_epochs 15] [--seed 0] [--row_multiple 1]
  python -m lima_jax.data tokenizer train --input conversations.jsonl --output tokenizer.model [--vocab_size 512]
  python -m lima_jax.data tokenizer encode --tokenizer FILE_OR_FOLDER [--eot new_row] '["Hi", "Hello!"]'

`build` prints each dataset folder; use it (optionally `FOLDER:split`) as `config.data.train_path`.
`--data` of `stats` is a JSONL file or such a folder. `tokenizer train` builds a small byte-fallback BPE
sentencepiece model from every turn of a conversation JSONL (how data/toy_tokenizer.model was made);
`tokenizer encode` prints each token of a conversation with `T` on the training targets. `--tokenizer` is a
sentencepiece or tiktoken tokenizer.model, a tokenizer.json, or a folder holding one, and `--eot` the EOT
choice, as `config.tokenizer.path` and `config.tokenizer.eot` (docs/model.md); both commands print the
tokenizer they chose first (`encode` on stderr). Every path may be
local or a gs:// URL. Nothing is downloaded: see docs/data.md. Bad input (a missing or malformed file)
prints one `error: ...` line naming the file and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Sequence

from lima_jax import cli
from lima_jax.errors import DataError
from lima_jax.paths import as_path

if TYPE_CHECKING:
    from lima_jax.tokenizer import Tokenizer


def _build(args: argparse.Namespace) -> None:
    from lima_jax.data import tfds_builders

    data_dir = as_path(args.data_dir)
    if args.dataset == "lima":
        configs = (sorted(tfds_builders.RELEASED_TRAIN_ROWS) if args.builder_config == "all"
                   else [args.builder_config])
        dev_file = as_path(args.dev_file) if args.dev_file else None
        for config in configs:
            print(tfds_builders.build_lima(as_path(args.manual_dir), data_dir, config, dev_file))
    else:
        files = {"train": args.train, "dev": args.dev, "test": args.test}
        print(tfds_builders.build_jsonl(args.name, {k: as_path(v) for k, v in files.items() if v}, data_dir))


def _stats(args: argparse.Namespace) -> None:
    from lima_jax.data.formats import MAX_LINE_BYTES
    from lima_jax.data.pipeline import load_examples
    from lima_jax.data.stats import compute_stats, format_stats, write_histogram

    tokenizer = _open_tokenizer(args)
    report = load_examples(args.data, tokenizer, args.max_len, args.loss_on, args.on_bad_example,
                           max_line_bytes=args.max_line_bytes or MAX_LINE_BYTES)
    print(f"tokenizer: {tokenizer.describe()}")  # after the data loaded: bad input prints only its error
    stats = compute_stats(args.data, report, args.max_len, args.batch_size, args.num_epochs, args.seed,
                          args.row_multiple)
    print(format_stats(stats))
    if args.histogram:
        write_histogram(stats, report.examples, as_path(args.histogram))
        print(f"wrote {args.histogram}")


def _tokenizer_train(args: argparse.Namespace) -> None:
    from lima_jax.data.formats import read_conversations
    from lima_jax.tokenizer import train_sentencepiece

    source = as_path(args.input)
    texts = [turn for conv in read_conversations(source) for turn in conv.turns]
    try:
        train_sentencepiece(texts, as_path(args.output), args.vocab_size)
    except RuntimeError as e:  # sentencepiece's own checks, e.g. a vocabulary too large for the text
        raise DataError(f"{source}: sentencepiece training failed with --vocab_size={args.vocab_size}: "
                        f"{str(e).strip()}") from None
    print(f"wrote {args.output} (vocab {args.vocab_size} + EOT)")


def _open_tokenizer(args: argparse.Namespace) -> Tokenizer:
    from lima_jax.tokenizer import Tokenizer

    return Tokenizer(as_path(args.tokenizer), "--tokenizer", args.eot, "--eot")


def _tokenizer_encode(args: argparse.Namespace) -> None:
    try:
        turns = json.loads(args.turns)
    except json.JSONDecodeError as e:
        raise DataError(f"turns {args.turns!r}: not JSON ({e.msg}); expected a list such as "
                        "'[\"Hi\", \"Hello!\"]'") from None
    if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
        raise DataError(f"turns {args.turns!r}: expected a JSON list of strings, e.g. '[\"Hi\", \"Hello!\"]'")
    tok = _open_tokenizer(args)
    print(f"tokenizer: {tok.describe()}", file=sys.stderr)
    dialog = tok.encode_dialog(turns)
    for token, is_target in zip(dialog.ids, dialog.assistant_mask):
        print(f"{token:>7} {'T' if is_target else '.'} {tok.id_to_piece(token)}")


def _tokenizer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, metavar="FILE", help="a sentencepiece or tiktoken tokenizer.model, "
                   "a tokenizer.json, or a folder holding one (the backend is told by the content)")
    p.add_argument("--eot", default="new_row", help="the EOT token: new_row (a new id after the tokenizer's, the "
                   "default) or one of the tokenizer's special tokens, e.g. '<|eot_id|>' (config.tokenizer.eot)")


def parser() -> argparse.ArgumentParser:
    p = cli.parser("lima_jax.data", __doc__)
    sub = p.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build a TFDS (ArrayRecord) dataset from JSONL files (nothing is downloaded)")
    kinds = build.add_subparsers(dest="dataset", required=True)
    lima = kinds.add_parser("lima", help="the released LIMA files (train.jsonl, test.jsonl) in a manual dir")
    lima.add_argument("--manual_dir", required=True, metavar="DIR")
    # The TFDS builder config, not a model config file: a dest of its own keeps `cli.parse` from loading it.
    lima.add_argument("--config", dest="builder_config", default="single_turn",
                      choices=("single_turn", "with_dialogues", "all"), help="which LIMA dataset to build")
    lima.add_argument("--dev_file", metavar="FILE", help="a JSONL for the 'dev' split (default: DIR/dev.jsonl)")
    jsonl = kinds.add_parser("jsonl", help="any JSONL files in the LIMA, instruction or messages schema")
    jsonl.add_argument("--name", required=True, help="the config name: OUT/sft_jsonl/NAME/1.0.0")
    jsonl.add_argument("--train", required=True, metavar="FILE")
    jsonl.add_argument("--dev", metavar="FILE")
    jsonl.add_argument("--test", metavar="FILE")
    for kind in (lima, jsonl):
        kind.add_argument("--data_dir", required=True, metavar="OUT", help="TFDS data dir to write into")
    build.set_defaults(run=_build)

    stats = sub.add_parser("stats", help="counts, token lengths per source, trimming, steps per packing mode")
    stats.add_argument("--data", required=True, help="a JSONL file or a built dataset folder (FOLDER[:split])")
    _tokenizer_flags(stats)
    stats.add_argument("--max_len", type=int, default=2048)
    stats.add_argument("--loss_on", default="assistant", choices=("assistant", "all"))
    stats.add_argument("--on_bad_example", default="error", choices=("error", "skip"))
    stats.add_argument("--max_line_bytes", type=cli.positive_int, default=None, metavar="N",
                       help="a longer JSONL line is a bad example, like config.data.max_line_bytes "
                            "(default 4194304: 4 MiB)")
    stats.add_argument("--batch_size", type=cli.positive_int, default=32,
                       help="train.batch_size of the step plans (default 32: the paper's examples per step)")
    stats.add_argument("--num_epochs", type=cli.positive_int, default=15,
                       help="epochs the rows per step of packing='examples' are planned over (default 15)")
    stats.add_argument("--seed", type=int, default=0, help="config.seed of the epochs' order (default 0)")
    stats.add_argument("--row_multiple", type=cli.positive_int, default=1, metavar="N",
                       help="round packing='examples' rows per step up to a multiple of N, as training does "
                            "with the batch's data shards x grad_accum_steps (default 1)")
    stats.add_argument("--histogram", metavar="PNG", help="write a length histogram PNG here")
    stats.set_defaults(run=_stats)

    tokenizer = sub.add_parser("tokenizer", help="train a small sentencepiece model, or show a tokenization")
    actions = tokenizer.add_subparsers(dest="action", required=True)
    train = actions.add_parser("train", help="train a small sentencepiece model on a conversation JSONL")
    train.add_argument("--input", required=True, metavar="FILE", help="conversation JSONL (any schema)")
    train.add_argument("--output", required=True, metavar="FILE", help="the sentencepiece .model to write")
    train.add_argument("--vocab_size", type=int, default=512, help="sentencepiece pieces (EOT comes on top)")
    train.set_defaults(run=_tokenizer_train)
    encode = actions.add_parser("encode", help="show how a conversation (JSON list of turns) is tokenized")
    _tokenizer_flags(encode)
    encode.add_argument("turns", help='JSON list, e.g. \'["Hi", "Hello!"]\'')
    encode.set_defaults(run=_tokenizer_encode)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; bad input raises a LimaError (DataError, ConfigError), which `cli.run` prints as
    one `error: ...` paragraph with exit status 2."""
    args, _ = cli.parse(parser(), argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    cli.run(main)
