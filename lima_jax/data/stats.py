"""What a training set looks like once tokenized: counts, token lengths per source, trimming, how well the
examples fill rows padded vs packed, and the steps of a run in each packing mode ("none", "rows",
"examples": steps per epoch, rows per step, real-token share). `python -m lima_jax.data stats` prints it
and draws a histogram."""
from __future__ import annotations

import dataclasses
import io
from typing import Sequence

import numpy as np

from lima_jax.config import PACKING_MODES
from lima_jax.data.pipeline import Example, LoadReport, RowLayout, StepPlan, plan_steps, row_layout
from lima_jax.paths import PathLike, as_path

NO_SOURCE = "(no source)"
PERCENTILES = (50, 90, 99)


@dataclasses.dataclass(frozen=True)
class LengthSummary:
    """Token lengths of whole conversations (BOS and EOTs included, before trimming)."""

    count: int
    total: int
    mean: float
    minimum: int
    percentiles: dict[int, float]
    maximum: int
    trimmed: int

    @classmethod
    def of(cls, examples: Sequence[Example]) -> "LengthSummary":
        lengths = np.asarray([e.full_length for e in examples], np.int64)
        return cls(len(lengths), int(lengths.sum()), float(lengths.mean()), int(lengths.min()),
                   {p: float(np.percentile(lengths, p)) for p in PERCENTILES}, int(lengths.max()),
                   sum(e.trimmed for e in examples))


@dataclasses.dataclass(frozen=True)
class DataStats:
    path: str
    max_len: int
    num_skipped: int
    overall: LengthSummary
    per_source: dict[str, LengthSummary]
    target_tokens: int
    padded: RowLayout
    packed: RowLayout
    plans: dict[str, StepPlan]  # packing mode -> the run's steps
    num_epochs: int
    seed: int


def compute_stats(path: PathLike, report: LoadReport, max_len: int, batch_size: int = 32, num_epochs: int = 15,
                  seed: int = 0, row_multiple: int = 1) -> DataStats:
    """Statistics of the examples `load_examples(path, ...)` returned; the step plans of every packing mode
    at `batch_size` (rows per step for "examples" planned over `num_epochs` epochs of `seed`'s order and
    rounded up to `row_multiple`, as training does with the batch shards x grad_accum_steps)."""
    examples = report.examples
    sources = sorted({e.source for e in examples})
    per_source = {s or NO_SOURCE: LengthSummary.of([e for e in examples if e.source == s]) for s in sources}
    plans = {mode: plan_steps(examples, batch_size=batch_size, max_len=max_len, seed=seed, packing=mode,
                              num_epochs=num_epochs, row_multiple=row_multiple) for mode in PACKING_MODES}
    return DataStats(str(path), max_len, len(report.skipped), LengthSummary.of(examples), per_source,
                     int(sum(e.weights.sum() for e in examples)), row_layout(examples, max_len, "none"),
                     row_layout(examples, max_len, "rows"), plans, num_epochs, seed)


def _summary_line(name: str, s: LengthSummary) -> str:
    pct = " ".join(f"{s.percentiles[p]:>7.0f}" for p in PERCENTILES)
    return (f"{name:<16} {s.count:>6} {s.total:>10,} {s.mean:>7.0f} {s.minimum:>6} {pct} {s.maximum:>7} "
            f"{s.trimmed:>7}")


def _plan_line(plan: StepPlan) -> str:
    per_step = plan.num_examples / plan.steps_per_epoch
    return (f"{plan.packing:<10} {plan.batch_size:>6} {'rows' if plan.packing == 'rows' else 'examples':<9} "
            f"{plan.steps_per_epoch:>11} {plan.rows_per_step:>9} {per_step:>13.1f} {100 * plan.efficiency:>10.1f}%")


def format_stats(stats: DataStats) -> str:
    """The human-readable report printed by `python -m lima_jax.data stats`."""
    header = f"{'source':<16} {'count':>6} {'tokens':>10} {'mean':>7} {'min':>6} " + " ".join(
        f"{'p' + str(p):>7}" for p in PERCENTILES) + f" {'max':>7} {'trimmed':>7}"
    lines = [f"data: {stats.path}",
             f"examples: {stats.overall.count} kept, {stats.num_skipped} skipped; "
             f"{stats.overall.trimmed} trimmed to max_len={stats.max_len} (+1 for the shifted target)",
             f"target (loss) tokens after trimming: {stats.target_tokens:,}",
             "conversation length in tokens (BOS and EOTs included, before trimming):", header]
    lines += [_summary_line(name, s) for name, s in stats.per_source.items()]
    if len(stats.per_source) > 1:
        lines.append(_summary_line("all", stats.overall))
    lines += [layout.describe() for layout in (stats.padded, stats.packed)]
    lines.append(f"steps per data.packing mode (rows/step of \"examples\": the most any step of {stats.num_epochs} "
                 f"epochs of seed {stats.seed} needs; real tokens: share of steps x rows x max_len):")
    lines.append(f"{'packing':<10} {'batch_size':<16} {'steps/epoch':>11} {'rows/step':>9} {'examples/step':>13} "
                 f"{'real tokens':>11}")
    lines += [_plan_line(plan) for plan in stats.plans.values()]
    return "\n".join(lines)


def write_histogram(stats: DataStats, examples: Sequence[Example], png: PathLike) -> None:
    """A stacked histogram of conversation lengths per source, with the trimming length marked, written to
    `png` (a local path or a gs:// URL)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stats.per_source)
    groups = [[e.full_length for e in examples if (e.source or NO_SOURCE) == name] for name in names]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(groups, bins=60, stacked=True, label=names)
    ax.axvline(stats.max_len + 1, color="black", linestyle="--", label=f"trimmed above {stats.max_len + 1}")
    ax.set_xlabel("tokens per conversation (BOS and EOTs included)")
    ax.set_ylabel("examples")
    ax.set_title(f"{as_path(stats.path).name}: {stats.overall.count} examples")
    ax.legend()
    fig.tight_layout()
    png = as_path(png)
    image = io.BytesIO()
    fig.savefig(image, format=png.suffix.lstrip(".").lower() or "png", dpi=120)  # as savefig(png) would
    plt.close(fig)
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(image.getvalue())
