"""Sentencepiece tokenizer with LIMA's end-of-turn (EOT) token, and the one turn format.

EOT is a *new* id, equal to the sentencepiece vocabulary size, so it is distinct from EOS and carries no
pretraining meaning; the model's vocabulary is therefore `sentencepiece size + 1`. `encode_dialog` is the
only place a conversation becomes token ids, used by training and by generation alike, so the two can
never tokenize a prompt differently:

    <bos> user_1 <eot> assistant_1 <eot> user_2 <eot> assistant_2 <eot> ...

Each utterance is encoded on its own (never a string template that is re-split), and every assistant
token including its EOT is a training target, so the model learns to stop.

The model file may be local or a gs:// URL (read through `lima_jax.paths`). The command line lives in the
data entry point: `python -m lima_jax.data tokenizer train --input data/toy_lima.jsonl --output
data/toy_tokenizer.model` builds the toy tokenizer that ships with the repo, and `python -m lima_jax.data
tokenizer encode --tokenizer data/toy_tokenizer.model '["Hi", "Hello!"]'` shows how turns are tokenized.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Iterable, Sequence

import sentencepiece as spm

from lima_jax.errors import ConfigError
from lima_jax.paths import PathLike, as_path

EOT_PIECE = "<eot>"


@dataclasses.dataclass(frozen=True)
class EncodedDialog:
    ids: list[int]
    assistant_mask: list[bool]  # True for tokens of assistant utterances, their EOT included


class Tokenizer:
    """A sentencepiece model plus the EOT id appended after its vocabulary."""

    def __init__(self, model_path: PathLike, setting: str = "config.tokenizer.path"):
        """`setting` names where the path came from, for the error message (e.g. a flag)."""
        path = as_path(model_path)
        if not path.is_file():
            raise ConfigError(f"{path}: sentencepiece model not found ({setting})")
        self.path = path
        try:
            # The bytes go through epath, so a gs:// model loads like a local one.
            self.sp = spm.SentencePieceProcessor(model_proto=path.read_bytes())
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"{path}: not a sentencepiece model ({e}); LLaMA-3's tiktoken tokenizer is not "
                              "supported yet (docs/model.md)") from None
        self.eot_id = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        if self.bos_id < 0:
            raise ConfigError(f"{path}: the sentencepiece model has no BOS id")

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

    def id_to_piece(self, token: int) -> str:
        """The piece of one id as text: `<eot>` for EOT, else sentencepiece's own piece."""
        return EOT_PIECE if int(token) == self.eot_id else self.sp.id_to_piece(int(token))

    def encode_dialog(self, turns: Sequence[str]) -> EncodedDialog:
        """Turns alternate user, assistant, user, ...; each is followed by EOT. See the module docstring."""
        ids, mask = [self.bos_id], [False]
        for i, turn in enumerate(turns):
            piece = self.encode(turn) + [self.eot_id]
            ids.extend(piece)
            mask.extend([i % 2 == 1] * len(piece))
        return EncodedDialog(ids, mask)


def train_sentencepiece(texts: Iterable[str], output: PathLike, vocab_size: int) -> None:
    """Trains a byte-fallback BPE sentencepiece model (LLaMA's special ids: unk 0, bos 1, eos 2) and writes
    it to `output` (a local path or a gs:// URL)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        num_threads=1, split_digits=True, minloglevel=2)
    output = as_path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(model.getvalue())
