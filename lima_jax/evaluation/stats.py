"""Win / tie / loss with 95% confidence intervals, the stacked bar chart of LIMA's Figure 1, and the
agreement between two raters as the paper measures it (tie-discounted accuracy)."""
from __future__ import annotations

import dataclasses
import io
import math
from typing import Sequence

from etils import epath

from lima_jax.errors import DataError
from lima_jax.paths import PathLike, as_path

Z_95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion (well behaved at 0 and n, unlike the normal approximation)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How often system A won, tied and lost against system B over n pairs."""

    a_name: str
    b_name: str
    wins: int
    ties: int
    losses: int
    disagreements: int = 0  # judge mode: pairs whose two orders disagreed (counted in ties)

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def share(self, count: int) -> tuple[float, float, float]:
        """(proportion, lower, upper) of `count` over n."""
        low, high = wilson_interval(count, self.n)
        return count / max(self.n, 1), low, high


def outcome(judgments: Sequence[dict]) -> Outcome:
    counts = {c: sum(j["winner"] == c for j in judgments) for c in ("a", "tie", "b")}
    return Outcome(judgments[0]["a_name"], judgments[0]["b_name"], counts["a"], counts["tie"], counts["b"],
                   sum(bool(j.get("disagreement")) for j in judgments))


def _cell(o: Outcome, count: int) -> str:
    p, low, high = o.share(count)
    return f"{100 * p:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def table_markdown(outcomes: Sequence[Outcome]) -> str:
    """A markdown table: one row per comparison, each cell `share% [95% CI]` (Wilson)."""
    lines = ["| A | B | pairs | A wins | tie | B wins | judge disagreements |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for o in outcomes:
        lines.append(f"| {o.a_name} | {o.b_name} | {o.n} | {_cell(o, o.wins)} | {_cell(o, o.ties)} | "
                     f"{_cell(o, o.losses)} | {o.disagreements} |")
    return "\n".join(lines) + "\n"


def plot_outcomes(outcomes: Sequence[Outcome], path: PathLike, title: str = "") -> epath.Path:
    """Horizontal stacked bars, one per comparison: A wins | tie | A loses, like LIMA's Figure 1; written
    to `path` (a local path or a gs:// URL, the format from its suffix, default PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(outcomes) + 1.4))
    labels = [f"{o.a_name} vs {o.b_name}" for o in outcomes]
    parts = (("wins", "#4c72b0", "A wins"), ("ties", "#c8c8c8", "Tie"), ("losses", "#dd8452", "A loses"))
    left = [0.0] * len(outcomes)
    for field, color, label in parts:
        values = [100 * getattr(o, field) / max(o.n, 1) for o in outcomes]
        bars = ax.barh(labels, values, left=left, color=color, label=label)
        for bar, value in zip(bars, values):
            if value >= 6:
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height() / 2, f"{value:.0f}%",
                        ha="center", va="center", fontsize=9)
        left = [a + b for a, b in zip(left, values)]
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of prompts")
    ax.invert_yaxis()
    ax.legend(ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    if title:
        ax.set_title(title, pad=28)
    fig.tight_layout()
    path = as_path(path)
    image = io.BytesIO()
    fig.savefig(image, format=path.suffix.lstrip(".").lower() or "png", dpi=120)
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image.getvalue())
    return path


@dataclasses.dataclass(frozen=True)
class Agreement:
    n: int  # pairs judged by both raters
    tie_discounted_accuracy: float
    exact_agreement: float


def agreement(first: Sequence[dict], second: Sequence[dict]) -> Agreement:
    """Agreement of two raters on the pairs both judged. LIMA's tie-discounted accuracy: 1 point when they
    agree, 0.5 when exactly one said tie, 0 when they picked different systems.

    The second rater's A/B are matched to the first's by system name, so swapped files compare correctly.
    """
    a_name, b_name = first[0]["a_name"], first[0]["b_name"]
    names = {second[0]["a_name"], second[0]["b_name"]}
    if names != {a_name, b_name}:
        raise DataError(f"the raters judged different systems: {a_name} vs {b_name} and {sorted(names)}")
    swap = second[0]["a_name"] != a_name
    flip = {"a": "b", "b": "a", "tie": "tie"}
    theirs = {j["pair_id"]: flip[j["winner"]] if swap else j["winner"] for j in second}
    common = [(j["winner"], theirs[j["pair_id"]]) for j in first if j["pair_id"] in theirs]
    if not common:
        raise DataError("the two raters have no judged pair in common")
    points = [1.0 if x == y else 0.5 if "tie" in (x, y) else 0.0 for x, y in common]
    return Agreement(len(common), sum(points) / len(points), sum(x == y for x, y in common) / len(common))
