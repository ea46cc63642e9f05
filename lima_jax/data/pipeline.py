"""From conversations to training batches: tokenize, mask, trim, lay out rows, shuffle per epoch, split per host.

A row holds `max_len` input positions: `tokens[i]` predicts `targets[i]`, weighted by `weights[i]`
(1 on assistant tokens and their EOT by default, or on every token with `loss_on="all"`). Conversations
longer than `max_len + 1` tokens are trimmed at the end. `config.data.packing` decides how examples fill
rows (`PACKING_MODES`):

  "none"      one example per row; `train.batch_size` rows (= examples) per step (the paper's layout)
  "rows"      several examples per row, best-fit decreasing over the whole epoch; `train.batch_size`
              counts packed *rows* per step, so a step holds ~3x the examples and an epoch has ~1/3 the steps
  "examples"  a step holds exactly `train.batch_size` examples (the paper's steps), packed by best-fit
              decreasing into a fixed number of rows R for the whole run (`plan_steps`): the most rows any
              step of any epoch needs, rounded up to what the mesh and gradient accumulation divide; the
              unused rows of a step are empty (segment_ids 0, weights 0)

`segment_ids` number a row's examples 1, 2, ... (0 = padding) and `positions` restart at 0 for each
(`packing.py`). The steps per epoch are known before training: ceil(examples / batch_size) for "none"
and "examples", ceil(rows / batch_size) for "rows", where the number of best-fit-decreasing rows does not
depend on the order (see `best_fit_decreasing`), so every epoch has the same number of steps and the
learning-rate schedule knows the total in advance. Every epoch visits every example once in an order that
depends only on (seed, epoch); the last, short batch is filled with empty rows (weight 0) instead of being
dropped. Each host builds only its own rows of every global batch, from step `start_step` on (resuming).

Examples come from a JSONL file (`formats.py`) or a prepared TFDS dataset (`tfds_builders.py`), local or
on gs:// (every path goes through `lima_jax.paths`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import logging
import math
import multiprocessing
import os
import queue
import sys
import threading
from typing import Iterable, Iterator, Sequence, TypeVar

import numpy as np

from lima_jax.config import PACKING_MODES, packing_mode
from lima_jax.data.formats import MAX_LINE_BYTES, Conversation, DataError, parse_json_line, parse_record, read_lines
from lima_jax.data.packing import ROW_FIELDS, best_fit_decreasing, token_efficiency, write_rows
from lima_jax.paths import PathLike
from lima_jax.tokenizer import Tokenizer

BATCH_FIELDS = ROW_FIELDS
# Below this many conversations one process tokenizes faster than starting workers (LIMA: 1,030).
PARALLEL_MIN_CONVERSATIONS = 50_000


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32 [n]
    targets: np.ndarray  # int32 [n]
    weights: np.ndarray  # float32 [n]
    source: str
    where: str  # file:line
    trimmed: bool
    full_length: int = 0  # tokens of the whole conversation before trimming (BOS and EOTs included)

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
    return Example(ids[:-1], ids[1:], weights, conv.source, conv.where, trimmed, len(dialog.ids))


@dataclasses.dataclass
class LoadReport:
    """What happened while loading: kept examples, and each skipped record with the reason."""

    examples: list[Example]
    skipped: list[str]

    @property
    def num_trimmed(self) -> int:
        return sum(e.trimmed for e in self.examples)


def iter_conversations(path: PathLike, schema: str = "auto",
                       max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Conversation | DataError]:
    """Each training record of a JSONL file or a prepared TFDS dataset (`dir` or `dir:split`), in file
    order: its Conversation, or the DataError (naming file and line) that makes it unusable, a line that
    is not UTF-8 or over `max_line_bytes` included."""
    from lima_jax.data import tfds_builders  # tensorflow_datasets is imported only when a dataset is read

    if tfds_builders.is_dataset_path(path):
        for conv in tfds_builders.read_conversations(path):
            if len(conv.turns) % 2:
                yield DataError(f"{conv.where}: {len(conv.turns)} turns (a prompt); a training conversation "
                                f"must end with the assistant (dataset {path})")
            else:
                yield conv
        return
    for line, text in read_lines(path, max_line_bytes):
        if isinstance(text, DataError):
            yield text
            continue
        try:
            yield parse_record(parse_json_line(text, path, line), str(path), line, schema, for_training=True)
        except DataError as e:
            yield e


@functools.lru_cache(maxsize=2)
def _worker_tokenizer(path: str, eot: str) -> Tokenizer:
    return Tokenizer(path, eot=eot)


def _tokenize_or_error(tokenizer: Tokenizer, conv: Conversation, max_len: int, loss_on: str) -> Example | DataError:
    try:
        return tokenize_conversation(tokenizer, conv, max_len, loss_on)
    except DataError as e:
        return e


def _tokenize_chunk(tokenizer_path: str, eot: str, convs: list[Conversation], max_len: int,
                    loss_on: str) -> list[Example | DataError]:
    tokenizer = _worker_tokenizer(tokenizer_path, eot)
    return [_tokenize_or_error(tokenizer, conv, max_len, loss_on) for conv in convs]


def tokenize_all(tokenizer: Tokenizer, convs: Sequence[Conversation], max_len: int, loss_on: str = "assistant",
                 num_workers: int | None = None) -> list[Example | DataError]:
    """`tokenize_conversation` of every conversation, in order, a DataError in place of each failure.

    `num_workers` > 1 tokenizes in that many processes (spawned: safe after JAX has started threads);
    None picks one process below PARALLEL_MIN_CONVERSATIONS conversations and all cores above.
    """
    if num_workers is None:
        num_workers = 1 if len(convs) < PARALLEL_MIN_CONVERSATIONS else (os.cpu_count() or 1)
    if num_workers <= 1 or len(convs) < 2:
        return [_tokenize_or_error(tokenizer, conv, max_len, loss_on) for conv in convs]
    chunk = math.ceil(len(convs) / (4 * num_workers))
    chunks = [list(convs[i:i + chunk]) for i in range(0, len(convs), chunk)]
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        n = len(chunks)
        done = pool.map(_tokenize_chunk, [str(tokenizer.path)] * n, [tokenizer.eot] * n, chunks, [max_len] * n,
                        [loss_on] * n)
        return [item for part in done for item in part]


def _keep_or_raise(items: Iterable[Example | Conversation | DataError], on_bad_example: str,
                   skipped: list[str]) -> list:
    kept = []
    for item in items:
        if not isinstance(item, DataError):
            kept.append(item)
        elif on_bad_example != "skip":
            raise item
        else:
            skipped.append(str(item))
            logging.warning("skipped bad example (%d so far): %s", len(skipped), item)
    return kept


def load_examples(path: PathLike, tokenizer: Tokenizer, max_len: int, loss_on: str = "assistant",
                  on_bad_example: str = "error", schema: str = "auto", num_workers: int | None = None,
                  max_line_bytes: int = MAX_LINE_BYTES) -> LoadReport:
    """Reads and tokenizes a JSONL file or a prepared TFDS dataset (`dir` or `dir:split`, see
    `tfds_builders`). Bad records (a line that is not UTF-8 or over `max_line_bytes` included) raise
    DataError naming file and line, or with on_bad_example="skip" are counted (`LoadReport.skipped`) and
    logged."""
    if on_bad_example not in ("error", "skip"):
        raise ValueError(f"on_bad_example={on_bad_example!r}: expected 'error' or 'skip'")
    skipped: list[str] = []
    convs = _keep_or_raise(iter_conversations(path, schema, max_line_bytes), on_bad_example, skipped)
    examples = _keep_or_raise(tokenize_all(tokenizer, convs, max_len, loss_on, num_workers), on_bad_example,
                              skipped)
    if not examples:
        raise DataError(f"{path}: no usable examples ({len(skipped)} skipped)")
    return LoadReport(examples, skipped)


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The example order of one epoch: a permutation that depends only on (seed, epoch)."""
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _row_order(num_rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    # A stream of its own (the extra 1), so row order and example order are independent.
    return np.random.default_rng([seed, epoch, 1]).permutation(num_rows) if shuffle else np.arange(num_rows)


def _mode(packing: str | bool) -> str:
    """`packing` as one of PACKING_MODES (an older bool accepted); ValueError for anything else."""
    mode = packing_mode(packing)
    if mode not in PACKING_MODES:
        raise ValueError(f"packing={packing!r}: expected one of {PACKING_MODES}")
    return mode


def pack_rows(indices: Sequence[int], lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """The examples `indices` (into `lengths`) packed into rows by best-fit decreasing; ties keep their order
    in `indices`."""
    bins = best_fit_decreasing([lengths[i] for i in indices], max_len)
    return [[int(indices[j]) for j in b] for b in bins]


def epoch_rows(lengths: Sequence[int], *, max_len: int, seed: int, epoch: int, shuffle: bool = True,
               packing: str | bool = "none") -> list[list[int]]:
    """The example indices of each row of `epoch` for packing "none" or "rows", rows in training order; a
    function of its arguments only (for "examples" see `epoch_steps`).

    "rows": the examples, in this epoch's order, are packed by best-fit decreasing (so equal lengths are
    grouped differently from epoch to epoch), then the rows are shuffled.
    """
    mode = _mode(packing)
    if mode == "examples":
        raise ValueError('packing="examples" packs each step on its own: use epoch_steps')
    order = epoch_order(len(lengths), seed, epoch, shuffle)
    if mode == "none":
        return [[int(i)] for i in order]
    rows = pack_rows(order, lengths, max_len)
    return [rows[k] for k in _row_order(len(rows), seed, epoch, shuffle)]


def epoch_steps(lengths: Sequence[int], *, batch_size: int, max_len: int, seed: int, epoch: int,
                shuffle: bool = True, packing: str | bool = "none") -> list[list[list[int]]]:
    """The rows (example indices) of every step of `epoch`, steps in training order; a function of its
    arguments only. A step lists only its real rows: the global batch fills it up with empty rows.

    "none" / "rows": `epoch_rows` cut into steps of `batch_size` rows. "examples": step k takes examples
    k*B ... (k+1)*B-1 of the epoch's order (the very examples of the unpacked step k) and packs them by
    best-fit decreasing into as few rows as they fit, the fullest rows first.
    """
    if _mode(packing) != "examples":
        rows = epoch_rows(lengths, max_len=max_len, seed=seed, epoch=epoch, shuffle=shuffle, packing=packing)
        return [rows[k:k + batch_size] for k in range(0, len(rows), batch_size)]
    order = epoch_order(len(lengths), seed, epoch, shuffle)
    return [pack_rows(order[k:k + batch_size], lengths, max_len) for k in range(0, len(order), batch_size)]


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= `value`."""
    return -(-value // multiple) * multiple


def rows_per_step(lengths: Sequence[int], *, batch_size: int, max_len: int, seed: int, shuffle: bool = True,
                  packing: str | bool = "none", num_epochs: int = 1, row_multiple: int = 1) -> int:
    """R, the rows of every global batch of the run: `batch_size` for "none" and "rows"; for "examples" the
    most rows any step of epochs 1..`num_epochs` packs into (planned over every epoch's shuffle, so one
    program serves the whole run), rounded up to a multiple of `row_multiple` (the batch's data shards
    times train.grad_accum_steps: every shard and micro-batch gets the same number of rows)."""
    if _mode(packing) != "examples":
        return batch_size
    most = max(len(step) for epoch in range(1, num_epochs + 1)
               for step in epoch_steps(lengths, batch_size=batch_size, max_len=max_len, seed=seed, epoch=epoch,
                                       shuffle=shuffle, packing="examples"))
    return round_up(most, row_multiple)


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """How an epoch's examples fill rows: the count (the same every epoch) and the share of real tokens."""

    num_examples: int
    num_rows: int
    max_len: int
    packing: bool
    efficiency: float

    def describe(self) -> str:
        mode = "packed (best-fit decreasing)" if self.packing else "padded, one example per row"
        return (f"{self.num_examples} examples in {self.num_rows} rows of {self.max_len} tokens, {mode}: "
                f"{100 * self.efficiency:.1f}% of row tokens are real (non-pad)")


def row_layout(examples: Sequence[Example], max_len: int, packing: str | bool = "none") -> RowLayout:
    """Rows per epoch and token efficiency for `examples` laid out over a whole epoch: padded ("none") or
    packed ("rows"; with "examples" each step packs its own, see `plan_steps`)."""
    lengths = [len(e) for e in examples]
    packed = _mode(packing) != "none"
    num_rows = len(best_fit_decreasing(lengths, max_len)) if packed else len(lengths)
    return RowLayout(len(lengths), num_rows, max_len, packed, token_efficiency(lengths, num_rows, max_len))


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    """Optimizer steps per epoch: `num_rows` (examples without packing, `row_layout(...).num_rows` with)
    in batches of `batch_size` rows, the last one filled up with empty rows."""
    return math.ceil(num_rows / batch_size)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The shape of a run's steps: what `batch_size` counts, the rows R of every global batch, the steps of
    every epoch, and the share of the computed row positions (steps x R x max_len) that are real tokens."""

    packing: str
    batch_size: int
    num_examples: int
    max_len: int
    rows_per_step: int
    steps_per_epoch: int
    epoch_tokens: int  # real (non-pad) tokens of one epoch

    @property
    def efficiency(self) -> float:
        return self.epoch_tokens / max(self.steps_per_epoch * self.rows_per_step * self.max_len, 1)

    def describe(self) -> str:
        counts = "examples" if self.packing in ("none", "examples") else "packed rows"
        return (f"packing={self.packing!r}: {self.steps_per_epoch} steps/epoch of {self.batch_size} {counts}, "
                f"{self.rows_per_step} rows x {self.max_len} tokens per step; {100 * self.efficiency:.1f}% of "
                "the rows' tokens are real (non-pad)")


def plan_steps(examples: Sequence[Example], *, batch_size: int, max_len: int, seed: int, shuffle: bool = True,
               packing: str | bool = "none", num_epochs: int = 1, row_multiple: int = 1) -> StepPlan:
    """The StepPlan of training `examples` for `num_epochs` epochs (see `rows_per_step` for R)."""
    mode, lengths = _mode(packing), [len(e) for e in examples]
    rows = len(lengths) if mode == "examples" else row_layout(examples, max_len, mode).num_rows
    num_rows = rows_per_step(lengths, batch_size=batch_size, max_len=max_len, seed=seed, shuffle=shuffle,
                             packing=mode, num_epochs=num_epochs, row_multiple=row_multiple)
    return StepPlan(mode, batch_size, len(lengths), max_len, num_rows, steps_per_epoch(rows, batch_size),
                    int(sum(lengths)))


# How each mode enters the input signature: "none" and "rows" as the bools of the checkpoints written before
# the modes existed, so those runs still resume.
_SIGNATURE_PACKING = {"none": False, "rows": True}


def input_signature(examples: Sequence[Example], *, batch_size: int, max_len: int, seed: int, shuffle: bool,
                    packing: str | bool) -> str:
    """A digest of everything that decides which rows step k of epoch e trains on, the packing mode included.
    Stored next to (epoch, batches_done) in a checkpoint, it lets a resumed run refuse to continue on
    different data or settings, where the saved position would no longer point at the same examples."""
    mode = _mode(packing)
    key = (batch_size, max_len, seed, shuffle, _SIGNATURE_PACKING.get(mode, mode), len(examples))
    digest = hashlib.sha256(repr(key).encode())
    for ex in examples:
        digest.update(ex.tokens.tobytes())
        digest.update(ex.weights.tobytes())
    return digest.hexdigest()[:16]


def check_input_signature(meta: dict, signature: str, checkpoint: str) -> None:
    """Raises DataError when a checkpoint's saved input signature differs from this run's (see
    `input_signature`); checkpoints written before signatures existed are accepted."""
    saved = meta.get("data_signature")
    if saved is not None and saved != signature:
        raise DataError(f"{checkpoint}: saved at epoch {meta.get('epoch')} after {meta.get('batches_done')} batches "
                        f"of different input (signature {saved}, now {signature}): the training data, seed, "
                        "max_len, shuffle, packing or batch_size changed, so resuming would replay or skip "
                        "examples. Restore the settings or start a new workdir.")


def pad_rows(examples: Sequence[Example | None], max_len: int) -> dict[str, np.ndarray]:
    """Stacks examples into [len(examples), max_len] arrays; None gives an empty (all padding) row."""
    return write_rows([[] if ex is None else [ex] for ex in examples], max_len)


def epoch_batches(examples: Sequence[Example], *, batch_size: int, max_len: int, seed: int, epoch: int,
                  shuffle: bool = True, start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  packing: str | bool = "none", num_rows: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """This host's share of each global batch of `epoch`, from batch `start_step` on (for resuming).

    A global batch is `num_rows` rows (default `batch_size`; with packing="examples" pass the run's
    `rows_per_step`), a step's rows (see `epoch_steps`) followed by empty ones; host p of P builds only rows
    [p*R/P, (p+1)*R/P) of each.
    """
    num_rows = batch_size if num_rows is None else num_rows
    if num_rows % process_count:
        raise ValueError(f"{num_rows} rows per step (train.batch_size={batch_size}, packing={packing!r}) are not "
                         f"divisible by {process_count} processes")
    per_host = num_rows // process_count
    steps = epoch_steps([len(e) for e in examples], batch_size=batch_size, max_len=max_len, seed=seed, epoch=epoch,
                        shuffle=shuffle, packing=packing)
    for step_rows in steps[start_step:]:
        if len(step_rows) > num_rows:
            raise ValueError(f"epoch {epoch}: a step packs into {len(step_rows)} rows, more than the {num_rows} "
                             "planned (rows_per_step must cover every epoch of the run)")
        global_rows = step_rows + [[]] * (num_rows - len(step_rows))
        mine = global_rows[process_index * per_host:(process_index + 1) * per_host]
        yield write_rows([[examples[i] for i in row] for row in mine], max_len)


T = TypeVar("T")
_END = object()


def prefetch(items: Iterable[T], ahead: int = 1) -> Iterator[T]:
    """Yields `items` in their order while a background thread produces the next ones (up to `ahead` ready and
    one in the making) beyond the one the caller holds: the training loop's next batch is assembled while the
    current step runs (on the CPU, where lima_jax runs computations on the calling thread, the only such
    overlap). An exception raised in producing an item is raised here at that item's place. Closing the
    generator (leaving the loop early, then `close()`) stops and joins the thread."""
    ready: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as e:  # noqa: BLE001 (re-raised in the consumer's thread)
            put((_END, e))
            return
        put((_END, None))

    thread = threading.Thread(target=produce, name="lima-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        if not sys.is_finalizing():  # at the interpreter's exit a daemon thread can no longer run: never join it
            thread.join()
