"""The outputs of a layout comparison: the console table, and `layouts.csv`, `layouts.json`, `layouts.png`
and `layouts.md` (the Markdown summary docs/sharding.md shows) in an output folder, local or gs://.

  format_table    the console table (memory per device in GiB, FLOPs per step in TFLOP)
  markdown_table  memory, fit, FLOPs and collectives as a Markdown table
  write_outputs   the four files
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
from typing import Any, Sequence

import numpy as np
from etils import epath

from lima_jax.analysis.hlo import COLLECTIVES
from lima_jax.analysis.layouts import LayoutReport
from lima_jax.paths import PathLike, as_path, atomic_write_text


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _collective_text(collectives: dict) -> str:
    parts = [f"{kind} {c['count']}x/{_fmt(c['bytes'] / 2 ** 20)}MiB" for kind, c in collectives.items()
             if c["count"]]
    return ", ".join(parts) or "none"


def _short_error(error: str) -> str:
    """The gist of a validation error for the table (the CSV/JSON keep all of it)."""
    error = re.sub(r" \(micro-batch \d+ with grad_accum_steps=\d+\)", "", error)
    error = re.sub(r" \(layout '\w+', mesh \{[^}]*\}\).*", "", error)
    return re.sub(r" \(mesh \{[^}]*\}\)", "", error)[:110]


def format_table(reports: Sequence[LayoutReport]) -> str:
    """The console table (memory per device in GiB, FLOPs per step in TFLOP)."""
    header = ("layout", "mesh d.f.t", "args", "temp", "peak", "fits", "XLA TFLOP", "HLO dot TFLOP",
              "6N+attn TFLOP", "step s", "tokens/s", "MFU", "collectives per step (count/bytes)")
    rows = []
    for r in reports:
        if r.error and r.fits != "NO":
            rows.append((r.layout, r.mesh, "invalid: " + _short_error(r.error)) + ("",) * (len(header) - 3))
            continue
        fits = f"{r.fits} ({_fmt(r.device_memory_gib)})" if r.fits else "-"
        rows.append((r.layout, r.mesh, _fmt(r.argument_gib), _fmt(r.temp_gib), _fmt(r.peak_gib), fits,
                     _fmt(r.xla_tflop), _fmt(r.hlo_dot_tflop), _fmt(r.analytic_tflop), _fmt(r.step_s),
                     _fmt(r.tokens_per_s),
                     "-" if math.isnan(r.mfu) else f"{100 * r.mfu:.1f}%",
                     r.error[:60] if r.error else _collective_text(r.collectives)))
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(reports: Sequence[LayoutReport]) -> str:
    """The memory/fit/FLOPs/collectives summary as a Markdown table (for docs)."""
    columns = ["layout", "mesh (data x fsdp x tensor)", "arguments GiB", "temporaries GiB", "peak GiB", "fits",
               "XLA TFLOP (loop once)", "6N+attn TFLOP", *(f"{kind} GiB" for kind in COLLECTIVES),
               "collectives GiB"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in reports:
        if r.error and r.fits != "NO":
            lines.append(f"| {r.layout} | {r.mesh} | invalid: {_short_error(r.error)} |" + "|" * (len(columns) - 3))
            continue
        fits = f"{r.fits} ({_fmt(r.device_memory_gib)} GiB)" if r.fits else "-"
        moved = [r.collectives[kind]["bytes"] / 2 ** 30 for kind in COLLECTIVES] if r.collectives else []
        cells = [r.layout, r.mesh, _fmt(r.argument_gib), _fmt(r.temp_gib), _fmt(r.peak_gib), fits,
                 _fmt(r.xla_tflop), _fmt(r.analytic_tflop), *(_fmt(g) for g in moved)]
        cells += [_fmt(sum(moved))] if moved else ["-"] * (len(COLLECTIVES) + 1)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(reports: Sequence[LayoutReport], out: PathLike, title: str) -> list[epath.Path]:
    """layouts.csv, layouts.json, layouts.png and layouts.md in `out` (created if missing)."""
    out = as_path(out)
    records = [dataclasses.asdict(r) for r in reports]
    json_path = out / "layouts.json"
    atomic_write_text(json_path, json.dumps({"title": title, "layouts": records}, indent=2, default=str))
    csv_path = out / "layouts.csv"
    atomic_write_text(csv_path, _csv_text(records))
    png_path = out / "layouts.png"
    png_path.write_bytes(_plot(reports, title))
    md_path = out / "layouts.md"
    atomic_write_text(md_path, f"{title}\n\n{markdown_table(reports)}\n")
    return [csv_path, json_path, png_path, md_path]


def _csv_text(records: Sequence[dict]) -> str:
    """One row per layout; the collectives spread over `<kind>_count` and `<kind>_bytes` columns."""
    text = io.StringIO(newline="")
    fields = [k for k in records[0] if k != "collectives"] + [f"{k}_{m}" for k in COLLECTIVES
                                                               for m in ("count", "bytes")]
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    for record in records:
        row = {k: v for k, v in record.items() if k != "collectives"}
        for kind in COLLECTIVES:
            for m in ("count", "bytes"):
                row[f"{kind}_{m}"] = record["collectives"].get(kind, {}).get(m, "")
        writer.writerow(row)
    return text.getvalue()


def _plot(reports: Sequence[LayoutReport], title: str) -> bytes:
    """The PNG of memory, collective bytes and (when timed) tokens/s per layout."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in reports if not r.error]
    names = [f"{r.layout}\n{r.mesh}" for r in ok]
    x = np.arange(len(ok))
    timed = any(not math.isnan(r.tokens_per_s) for r in ok)
    fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(5 * (3 if timed else 2), 4.5))
    width = 0.27
    for i, (field, label) in enumerate((("argument_gib", "arguments"), ("temp_gib", "temporaries"),
                                        ("peak_gib", "peak"))):
        axes[0].bar(x + (i - 1) * width, [getattr(r, field) for r in ok], width, label=label)
    limits = {r.device_memory_gib for r in ok if not math.isnan(r.device_memory_gib)}
    for limit in limits:
        axes[0].axhline(limit, color="red", linestyle="--", label=f"device memory {limit:.0f} GiB")
    axes[0].set(title="memory per device (GiB)", xticks=x, xticklabels=names)
    axes[0].legend(fontsize=8)
    bottom = np.zeros(len(ok))
    for kind in COLLECTIVES:
        values = np.array([r.collectives.get(kind, {}).get("bytes", 0) / 2 ** 30 for r in ok])
        if values.any():
            axes[1].bar(x, values, bottom=bottom, label=kind)
            bottom += values
    axes[1].set(title="collective bytes per step, per device (GiB)", xticks=x, xticklabels=names)
    if bottom.any():
        axes[1].legend(fontsize=8)
    if timed:
        axes[2].bar(x, [r.tokens_per_s for r in ok])
        axes[2].set(title="measured tokens/s", xticks=x, xticklabels=names)
    fig.suptitle(title)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return png.getvalue()
