"""Rows of a batch: examples laid out one per row (padding) or packed several per row (best-fit decreasing).

A row is a list of examples written one after the other; `segment_ids` number them 1, 2, ... within the
row (0 is padding) and `positions` restart at 0 for each, so the model's attention mask (same segment,
causal, never padding) and RoPE treat every example exactly as if it had a row of its own.
"""
from __future__ import annotations

import bisect
from typing import Protocol, Sequence

import numpy as np

ROW_FIELDS = ("tokens", "targets", "weights", "segment_ids", "positions")


class RowItem(Protocol):
    tokens: np.ndarray
    targets: np.ndarray
    weights: np.ndarray

    def __len__(self) -> int: ...


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Groups item indices into bins whose lengths sum to at most `capacity`.

    Items are placed longest first, each into the fullest bin it still fits (ties: the lowest bin
    index), else into a new bin. Items of equal length keep their order in `lengths`, so the number of
    bins depends only on the multiset of lengths, never on their order.
    """
    too_long = [i for i, n in enumerate(lengths) if not 0 < n <= capacity]
    if too_long:
        raise ValueError(f"items {too_long[:5]} have lengths outside [1, {capacity}]")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep order
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in order:
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            bins.append([i])
            space, index = capacity - lengths[i], len(bins) - 1
        else:
            space, index = free.pop(slot)
            bins[index].append(i)
            space -= lengths[i]
        if space > 0:
            bisect.insort(free, (space, index))
    return bins


def empty_rows(num_rows: int, max_len: int) -> dict[str, np.ndarray]:
    """All-padding arrays [num_rows, max_len] for every batch field."""
    rows = {name: np.zeros((num_rows, max_len), np.int32) for name in ROW_FIELDS}
    rows["weights"] = np.zeros((num_rows, max_len), np.float32)
    return rows


def write_rows(rows: Sequence[Sequence[RowItem]], max_len: int) -> dict[str, np.ndarray]:
    """Writes each row's examples one after the other; an empty row is all padding (weight 0)."""
    batch = empty_rows(len(rows), max_len)
    for r, items in enumerate(rows):
        start = 0
        for segment, item in enumerate(items, start=1):
            end = start + len(item)
            if end > max_len:
                raise ValueError(f"row {r}: {end} tokens do not fit in max_len={max_len}")
            batch["tokens"][r, start:end] = item.tokens
            batch["targets"][r, start:end] = item.targets
            batch["weights"][r, start:end] = item.weights
            batch["segment_ids"][r, start:end] = segment
            batch["positions"][r, start:end] = np.arange(len(item))
            start = end
    return batch


def token_efficiency(lengths: Sequence[int], num_rows: int, max_len: int) -> float:
    """Share of the `num_rows * max_len` row positions that hold real (non-pad) tokens."""
    return float(np.sum(lengths)) / max(num_rows * max_len, 1)
