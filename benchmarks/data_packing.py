"""Packing vs padding on the real LIMA training texts with the real LLaMA tokenizer, and preprocessing speed.

    python benchmarks/data_packing.py [--max_len 2048] [--batch_size 32] [--repeats 5] [--workers 2 --copies 20]

Prints, for each `config.data.packing` mode ("none", "rows", "examples"; the rows per step of "examples"
planned over 15 epochs of seed 0): rows per step, share of real (non-pad) tokens and steps per epoch; then the median time of each preprocessing stage on
one core (the process is pinned to one CPU) and the tokens/s that gives. With `--workers N` it also
times tokenization in N worker processes on `--copies` copies of the data (where parallelism can pay).
Reads ../shared/data beside the checkout (see its README); says so and exits 0 when it is absent.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time
from typing import Callable

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lima_jax.config import PACKING_MODES  # noqa: E402
from lima_jax.data import epoch_batches, plan_steps, rows_per_step, tokenize_all  # noqa: E402
from lima_jax.data.formats import read_conversations  # noqa: E402
from lima_jax.data.packing import best_fit_decreasing  # noqa: E402
from lima_jax.tokenizer import Tokenizer  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
EPOCHS = 15  # the recipe's: the rows per step of packing="examples" are planned over them


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_len", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=32, help="rows per step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--copies", type=int, default=20)
    args = parser.parse_args()
    texts, model = SHARED / "lima" / "lima_train_1022.jsonl", SHARED / "llama" / "llama_tokenizer.model"
    if not texts.is_file() or not model.is_file():
        print(f"skipped: {texts} or {model} is absent (../shared/data beside the checkout)")
        return
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    tokenizer = Tokenizer(model)

    convs = read_conversations(texts)
    examples = tokenize_all(tokenizer, convs, args.max_len, num_workers=1)
    tokens = sum(e.full_length for e in examples)
    print(f"data: {texts.name}, {len(examples)} conversations, {tokens:,} tokens, LLaMA tokenizer "
          f"(vocab {tokenizer.vocab_size} incl. EOT), max_len {args.max_len}, batch_size {args.batch_size}")

    print(f"\n{'data.packing':<34} {'rows/step':>10} {'real tokens':>12} {'steps/epoch':>12}")
    plans = {mode: plan_steps(examples, batch_size=args.batch_size, max_len=args.max_len, seed=0, packing=mode,
                              num_epochs=EPOCHS) for mode in PACKING_MODES}
    for mode, plan in plans.items():
        print(f"{mode:<34} {plan.rows_per_step:>10} {100 * plan.efficiency:>11.1f}% {plan.steps_per_epoch:>12}")

    lengths = [len(e) for e in examples]
    stages = {
        "read + validate JSONL": lambda: read_conversations(texts),
        "tokenize + mask + trim": lambda: tokenize_all(tokenizer, convs, args.max_len, num_workers=1),
        "best-fit decreasing (plan)": lambda: best_fit_decreasing(lengths, args.max_len),
        "one epoch of packed batches": lambda: list(epoch_batches(
            examples, batch_size=args.batch_size, max_len=args.max_len, seed=0, epoch=1, packing="rows")),
        "one epoch of padded batches": lambda: list(epoch_batches(
            examples, batch_size=args.batch_size, max_len=args.max_len, seed=0, epoch=1)),
        f"rows per step, {EPOCHS} epochs (plan)": lambda: rows_per_step(
            lengths, batch_size=args.batch_size, max_len=args.max_len, seed=0, packing="examples",
            num_epochs=EPOCHS),
        "one epoch, packing=examples": lambda: list(epoch_batches(
            examples, batch_size=args.batch_size, max_len=args.max_len, seed=0, epoch=1, packing="examples",
            num_rows=plans["examples"].rows_per_step)),
    }
    print(f"\none core, median of {args.repeats}:")
    print(f"{'stage':<32} {'seconds':>9} {'tokens/s':>14}")
    for name, fn in stages.items():
        seconds = median_seconds(fn, args.repeats)
        print(f"{name:<32} {seconds:>9.3f} {tokens / seconds:>14,.0f}")

    def whole_pipeline() -> None:
        read = tokenize_all(tokenizer, read_conversations(texts), args.max_len, num_workers=1)
        list(epoch_batches(read, batch_size=args.batch_size, max_len=args.max_len, seed=0, epoch=1, packing="rows"))

    seconds = median_seconds(whole_pipeline, args.repeats)
    print(f"{'all of it (file -> packed epoch)':<32} {seconds:>9.3f} {tokens / seconds:>14,.0f}")

    if args.workers > 1:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        many = convs * args.copies
        print(f"\ntokenize + mask + trim on {len(many)} conversations ({args.copies} copies), "
              f"median of {args.repeats}:")
        for workers in (1, args.workers):
            seconds = median_seconds(lambda: tokenize_all(tokenizer, many, args.max_len, num_workers=workers),
                                     args.repeats)
            print(f"{workers} worker(s){'':<22} {seconds:>9.3f} {tokens * args.copies / seconds:>14,.0f}")


if __name__ == "__main__":
    main()
