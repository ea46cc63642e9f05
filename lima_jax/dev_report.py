"""Per-epoch dev-set answers and the report a person reads to choose the epoch.

LIMA chose its checkpoint by reading dev-set answers of epochs 5 to 10. With `config.data.dev_path` set,
training calls the hook from `dev_report_hook(config)` after each epoch's checkpoint; for the epochs in
`config.dev_report.epochs` it answers the dev prompts (LIMA's sampling, `config.dev_report.max_new_tokens`,
the same seed every epoch so answers differ only through the model) and writes into the run directory
(file names: `lima_jax.rundir`):

  dev_reports/epoch_007.jsonl   the answers of epoch 7 (the answer-record schema of `lima_jax.records` +
                                epoch, step)
  dev_report.html               every prompt with the answers of all epochs side by side, plus per-epoch
  dev_report.md                 response lengths and how often each epoch stopped on EOT

`python -m lima_jax.report choose --workdir W --epoch 7` marks the epoch the other tools then use.
"""
from __future__ import annotations

import html
import statistics
from typing import Any, Sequence

import jax
import ml_collections
from absl import logging
from etils import epath

from lima_jax import distributed
from lima_jax.errors import DataError
from lima_jax.generation import Generator, SamplingConfig, answer_prompts
from lima_jax.paths import PathLike, atomic_write_text
from lima_jax.records import check_prompts_fit, read_answers, read_prompts, write_jsonl
from lima_jax.rundir import RunDir, read_chosen_epoch
from lima_jax.tokenizer import load_tokenizer
from lima_jax.training import EpochEnd, EpochHook


def load_epoch_answers(workdir: PathLike) -> dict[int, list[dict]]:
    """{epoch: answer records} of every `dev_reports/epoch_*.jsonl`, in epoch order."""
    run = RunDir.at(workdir)
    if not run.dev_reports.is_dir():
        return {}
    return {int(path.stem.split("_")[1]): read_answers(path) for path in sorted(run.dev_reports.glob("epoch_*.jsonl"))}


def epoch_summary(records: Sequence[dict]) -> dict[str, Any]:
    """Response-length statistics and stop-reason counts of one epoch's answers."""
    lengths = [r["response_tokens"] for r in records]
    reasons: dict[str, int] = {}
    for r in records:
        reasons[r["stop_reason"]] = reasons.get(r["stop_reason"], 0) + 1
    return {"answers": len(records), "step": records[0].get("step") if records else None,
            "mean_tokens": statistics.fmean(lengths) if lengths else 0.0,
            "median_tokens": statistics.median(lengths) if lengths else 0,
            "max_tokens": max(lengths, default=0), "eot_rate": reasons.get("eot", 0) / max(len(records), 1),
            "stop_reasons": reasons}


def _prompt_table(answers: dict[int, list[dict]]) -> list[tuple[dict, dict[int, dict]]]:
    """[(prompt record of the first epoch, {epoch: answer record})] in the dev file's order."""
    by_epoch = {e: {r["id"]: r for r in records} for e, records in answers.items()}
    first = next(iter(answers.values()), [])
    return [(r, {e: by_epoch[e][r["id"]] for e in answers if r["id"] in by_epoch[e]}) for r in first]


def _prompt_text(record: dict) -> str:
    return "\n\n".join(f"[{'user' if i % 2 == 0 else 'assistant'}] {t}" if len(record["prompt"]) > 1 else t
                       for i, t in enumerate(record["prompt"]))


def render_markdown(answers: dict[int, list[dict]], chosen: int | None = None) -> str:
    lines = ["# Dev-set answers per epoch", "",
             "| epoch | step | answers | mean tokens | median tokens | max tokens | stopped on EOT | stop reasons |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for epoch, records in answers.items():
        s = epoch_summary(records)
        mark = " (chosen)" if epoch == chosen else ""
        lines.append(f"| {epoch}{mark} | {s['step']} | {s['answers']} | {s['mean_tokens']:.1f} | "
                     f"{s['median_tokens']} | {s['max_tokens']} | {100 * s['eot_rate']:.0f}% | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(s['stop_reasons'].items()))} |")
    for i, (prompt, per_epoch) in enumerate(_prompt_table(answers), start=1):
        lines += ["", f"## Prompt {i} (id {prompt['id']})", ""]
        lines += ["> " + line for line in _prompt_text(prompt).splitlines()]
        for epoch, r in per_epoch.items():
            lines += ["", f"**Epoch {epoch}** ({r['response_tokens']} tokens, stop: {r['stop_reason']})", "", "```text",
                      r["response"].replace("```", "'''"), "```"]
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:sans-serif;margin:1.5em} table{border-collapse:collapse} td,th{border:1px solid #bbb;
padding:4px 8px;vertical-align:top} .answers td{white-space:pre-wrap;min-width:18em;max-width:40em}
.prompt{white-space:pre-wrap;background:#f3f3f3;padding:.6em} .chosen{background:#e6ffe6} .meta{color:#666;
font-size:90%}"""


def render_html(answers: dict[int, list[dict]], chosen: int | None = None) -> str:
    esc = html.escape
    cls = lambda epoch: ' class="chosen"' if epoch == chosen else ""  # noqa: E731
    head = ("<tr><th>epoch</th><th>step</th><th>answers</th><th>mean tokens</th><th>median tokens</th>"
            "<th>max tokens</th><th>stopped on EOT</th><th>stop reasons</th></tr>")
    rows = []
    for epoch, records in answers.items():
        s = epoch_summary(records)
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["stop_reasons"].items()))
        rows.append(f"<tr{cls(epoch)}><td>{epoch}{' (chosen)' if epoch == chosen else ''}</td><td>{s['step']}</td>"
                    f"<td>{s['answers']}</td><td>{s['mean_tokens']:.1f}</td><td>{s['median_tokens']}</td>"
                    f"<td>{s['max_tokens']}</td><td>{100 * s['eot_rate']:.0f}%</td><td>{esc(reasons)}</td></tr>")
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Dev-set answers per epoch</title>",
             f"<style>{_CSS}</style></head><body><h1>Dev-set answers per epoch</h1>",
             "<p>Choose an epoch: <code>python -m lima_jax.report choose --workdir WORKDIR --epoch N</code></p>",
             f"<table>{head}{''.join(rows)}</table>"]
    epochs = list(answers)
    for i, (prompt, per_epoch) in enumerate(_prompt_table(answers), start=1):
        parts.append(f"<h2>Prompt {i} <span class='meta'>id {esc(str(prompt['id']))}</span></h2>"
                     f"<div class='prompt'>{esc(_prompt_text(prompt))}</div><table class='answers'><tr>")
        parts += [f"<th{cls(e)}>epoch {e}</th>" for e in epochs]
        parts.append("</tr><tr>")
        for e in epochs:
            r = per_epoch.get(e)
            body = ("<span class='meta'>missing</span>" if r is None else
                    f"<div class='meta'>{r['response_tokens']} tokens · stop: {esc(r['stop_reason'])}</div>"
                    f"{esc(r['response'])}")
            parts.append(f"<td{cls(e)}>{body}</td>")
        parts.append("</tr></table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(workdir: PathLike) -> tuple[epath.Path, epath.Path]:
    """(Re)writes `dev_report.html` and `dev_report.md` from every epoch's answers in the workdir."""
    run = RunDir.at(workdir)
    answers = load_epoch_answers(run.root)
    if not answers:
        raise DataError(f"{run.dev_reports}: no epoch_*.jsonl answers to report")
    marker = read_chosen_epoch(run.root)
    chosen = int(marker["epoch"]) if marker else None
    atomic_write_text(run.dev_report_html, render_html(answers, chosen))
    atomic_write_text(run.dev_report_md, render_markdown(answers, chosen))
    return run.dev_report_html, run.dev_report_md


# ------------------------------------------------------------------------------------ training hook


def dev_report_hook(config: ml_collections.ConfigDict) -> EpochHook | None:
    """The `after_epoch` hook for `lima_jax.training.train`, or None when `config.data.dev_path` is unset.

    The dev prompts are read and checked here, before training starts, so a bad dev file fails at once.
    """
    if not config.data.get("dev_path"):
        return None
    prompts = read_prompts(config.data.dev_path)
    check_prompts_fit(prompts, load_tokenizer(config), config.model.max_seq_len)
    epochs = {int(e) for e in config.dev_report.epochs}
    settings = SamplingConfig(max_new_tokens=int(config.dev_report.max_new_tokens), seed=int(config.seed))
    settings.validate()
    batch_size = int(config.dev_report.batch_size)
    run = RunDir.at(config.workdir)
    generators: dict[str, Generator] = {}  # one per run, so each shape compiles once across epochs

    def after_epoch(end: EpochEnd) -> None:
        """Answers the dev prompts after `end.epoch`; on resume only if that epoch has no answers yet."""
        if end.epoch not in epochs:
            return
        if end.resumed and distributed.main_process_says(run.epoch_answers(end.epoch).exists()):
            return
        rt = end.rt
        generator = generators.get("g")
        if generator is None:
            generator = generators["g"] = Generator(rt.model_cfg, end.state.params, rt.tokenizer, rt.mesh, rt.rules,
                                                    batch_size)
        generator.params = end.state.params
        records = [{**r, "epoch": end.epoch, "step": end.step} for r in answer_prompts(generator, prompts, settings)]
        if jax.process_index() != 0:
            return
        write_jsonl(run.epoch_answers(end.epoch), records)
        html_path, _ = write_report(run.root)
        summary = epoch_summary(records)
        if end.writer.enabled:
            end.writer.tensorboard.add_scalar("dev/mean_response_tokens", summary["mean_tokens"], end.step)
            end.writer.tensorboard.add_scalar("dev/eot_rate", summary["eot_rate"], end.step)
        logging.info("epoch %d dev answers: %d, mean %.1f tokens, %.0f%% stopped on EOT; report %s", end.epoch,
                     summary["answers"], summary["mean_tokens"], 100 * summary["eot_rate"], html_path)

    return after_epoch
