"""Sentencepiece tokenizer with LIMA's end-of-turn (EOT) token, and the one turn format.

EOT is a *new* id, equal to the sentencepiece vocabulary size, so it is distinct from EOS and carries no
pretraining meaning; the model's vocabulary is therefore `sentencepiece size + 1`. `encode_dialog` is the
only place a conversation becomes token ids, used by training and by generation alike, so the two can
never tokenize a prompt differently:

    <bos> user_1 <eot> assistant_1 <eot> user_2 <eot> assistant_2 <eot> ...

Each utterance is encoded on its own (never a string template that is re-split), and every assistant
token including its EOT is a training target, so the model learns to stop.

CLI: `python -m lima_jax.tokenizer train --input data/toy_lima.jsonl --output data/toy_tokenizer.model`
builds the toy tokenizer that ships with the repo.
"""
from __future__ import annotations

import dataclasses
import io
import json
import pathlib
from typing import Iterable, Sequence

import sentencepiece as spm

EOT_PIECE = "<eot>"


@dataclasses.dataclass(frozen=True)
class EncodedDialog:
    ids: list[int]
    assistant_mask: list[bool]  # True for tokens of assistant utterances, their EOT included


class Tokenizer:
    """A sentencepiece model plus the EOT id appended after its vocabulary."""

    def __init__(self, model_path: str | pathlib.Path):
        path = pathlib.Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: sentencepiece model not found (config.tokenizer.path)")
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e}); LLaMA-3's tiktoken tokenizer is not "
                             "supported yet (docs/model.md)") from None
        self.eot_id = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if self.bos_id < 0:
            raise ValueError(f"{path}: the sentencepiece model has no BOS id")

    @property
    def vocab_size(self) -> int:
        """Model vocabulary: the sentencepiece pieces plus EOT."""
        return self.eot_id + 1

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, with special ids (EOT, BOS, EOS) left out."""
        special = {self.eot_id, self.bos_id, self.eos_id}
        return self.sp.decode([int(i) for i in ids if int(i) not in special and 0 <= int(i) < self.eot_id])

    def encode_dialog(self, turns: Sequence[str]) -> EncodedDialog:
        """Turns alternate user, assistant, user, ...; each is followed by EOT. See the module docstring."""
        ids, mask = [self.bos_id], [False]
        for i, turn in enumerate(turns):
            piece = self.encode(turn) + [self.eot_id]
            ids.extend(piece)
            mask.extend([i % 2 == 1] * len(piece))
        return EncodedDialog(ids, mask)


def train_sentencepiece(texts: Iterable[str], output: str | pathlib.Path, vocab_size: int) -> None:
    """Trains a byte-fallback BPE sentencepiece model (LLaMA's special ids: unk 0, bos 1, eos 2)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        num_threads=1, split_digits=True, minloglevel=2)
    pathlib.Path(output).write_bytes(model.getvalue())


def _texts_of_jsonl(path: pathlib.Path) -> list[str]:
    from lima_jax.data.formats import read_conversations
    return [turn for conv in read_conversations(path) for turn in conv.turns]


def main(argv: Sequence[str] | None = None) -> None:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m lima_jax.tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a small sentencepiece model on a conversation JSONL")
    train.add_argument("--input", required=True, type=pathlib.Path)
    train.add_argument("--output", required=True, type=pathlib.Path)
    train.add_argument("--vocab_size", type=int, default=512)
    encode = sub.add_parser("encode", help="show how a conversation (JSON list of turns) is tokenized")
    encode.add_argument("--tokenizer", required=True, type=pathlib.Path)
    encode.add_argument("turns", help='JSON list, e.g. \'["Hi", "Hello!"]\'')
    args = parser.parse_args(argv)
    if args.command == "train":
        train_sentencepiece(_texts_of_jsonl(args.input), args.output, args.vocab_size)
        print(f"wrote {args.output} (vocab {args.vocab_size} + EOT)")
    else:
        tok = Tokenizer(args.tokenizer)
        dialog = tok.encode_dialog(json.loads(args.turns))
        for token, is_target in zip(dialog.ids, dialog.assistant_mask):
            piece = EOT_PIECE if token == tok.eot_id else tok.sp.id_to_piece(token)
            print(f"{token:>7} {'T' if is_target else '.'} {piece}")


if __name__ == "__main__":
    main()
