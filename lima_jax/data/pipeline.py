"""From conversations to training batches: tokenize, mask, trim, pad, shuffle per epoch, split per host.

A row holds `max_len` input positions: `tokens[i]` predicts `targets[i]`, weighted by `weights[i]`
(1 on assistant tokens and their EOT by default, or on every token with `loss_on="all"`). Conversations
longer than `max_len + 1` tokens are trimmed at the end. `segment_ids` are 1 on real tokens and 0 on
padding; `positions` count from 0. Every epoch visits every example once in an order that depends only
on (seed, epoch); the last, short batch is filled with empty rows (weight 0) instead of being dropped.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Iterator, Sequence

import numpy as np

from lima_jax.data.formats import Conversation, DataError, numbered_lines, parse_json_line, parse_record
from lima_jax.tokenizer import Tokenizer

BATCH_FIELDS = ("tokens", "targets", "weights", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32 [n]
    targets: np.ndarray  # int32 [n]
    weights: np.ndarray  # float32 [n]
    source: str
    where: str  # file:line
    trimmed: bool

    def __len__(self) -> int:
        return len(self.tokens)


def tokenize_conversation(tokenizer: Tokenizer, conv: Conversation, max_len: int,
                          loss_on: str = "assistant") -> Example:
    """One conversation to an (input, target, weight) example; raises DataError if nothing is trained on."""
    dialog = tokenizer.encode_dialog(conv.turns)
    ids = np.asarray(dialog.ids, np.int32)
    mask = np.asarray(dialog.assistant_mask, bool) if loss_on == "assistant" else np.ones(len(ids), bool)
    trimmed = len(ids) > max_len + 1
    ids, mask = ids[: max_len + 1], mask[: max_len + 1]
    weights = mask[1:].astype(np.float32)
    if not weights.any():
        reason = "trimmed to data.max_len" if trimmed else "empty"
        raise DataError(f"{conv.where}: the loss mask is {reason}: no assistant token to train on "
                        f"({len(dialog.ids)} tokens, max_len {max_len})")
    return Example(ids[:-1], ids[1:], weights, conv.source, conv.where, trimmed)


@dataclasses.dataclass
class LoadReport:
    """What happened while loading: kept examples, and each skipped record with the reason."""

    examples: list[Example]
    skipped: list[str]

    @property
    def num_trimmed(self) -> int:
        return sum(e.trimmed for e in self.examples)


def load_examples(path: str, tokenizer: Tokenizer, max_len: int, loss_on: str = "assistant",
                  on_bad_example: str = "error", schema: str = "auto") -> LoadReport:
    """Reads and tokenizes a JSONL file. Bad records raise DataError, or with "skip" are counted and logged."""
    examples, skipped = [], []
    for line, text in numbered_lines(path):
        try:
            conv = parse_record(parse_json_line(text, path, line), str(path), line, schema, for_training=True)
            examples.append(tokenize_conversation(tokenizer, conv, max_len, loss_on))
        except DataError as e:
            if on_bad_example != "skip":
                raise
            skipped.append(str(e))
            logging.warning("skipped bad example (%d so far): %s", len(skipped), e)
    if not examples:
        raise DataError(f"{path}: no usable examples")
    return LoadReport(examples, skipped)


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The example order of one epoch: a permutation that depends only on (seed, epoch)."""
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


def pad_rows(examples: Sequence[Example | None], max_len: int) -> dict[str, np.ndarray]:
    """Stacks examples into [len(examples), max_len] arrays; None gives an empty (all padding) row."""
    n = len(examples)
    batch = {
        "tokens": np.zeros((n, max_len), np.int32),
        "targets": np.zeros((n, max_len), np.int32),
        "weights": np.zeros((n, max_len), np.float32),
        "segment_ids": np.zeros((n, max_len), np.int32),
        "positions": np.zeros((n, max_len), np.int32),
    }
    for row, ex in enumerate(examples):
        if ex is None:
            continue
        k = len(ex)
        batch["tokens"][row, :k] = ex.tokens
        batch["targets"][row, :k] = ex.targets
        batch["weights"][row, :k] = ex.weights
        batch["segment_ids"][row, :k] = 1
        batch["positions"][row, :k] = np.arange(k)
    return batch


def epoch_batches(examples: Sequence[Example], *, batch_size: int, max_len: int, seed: int, epoch: int,
                  shuffle: bool = True, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """This host's share of each global batch of `epoch`, from batch `start_step` on (for resuming).

    Host p of P gets rows [p*B/P, (p+1)*B/P) of every global batch of B examples.
    """
    if batch_size % process_count:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by {process_count} processes")
    per_host = batch_size // process_count
    order = epoch_order(len(examples), seed, epoch, shuffle)
    for step in range(start_step, steps_per_epoch(len(examples), batch_size)):
        ids = order[step * batch_size:(step + 1) * batch_size]
        rows: list[Example | None] = [examples[i] for i in ids] + [None] * (batch_size - len(ids))
        yield pad_rows(rows[process_index * per_host:(process_index + 1) * per_host], max_len)
