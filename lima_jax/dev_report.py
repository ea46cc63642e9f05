"""Per-epoch dev-set answers and the report a person reads to choose the epoch.

LIMA chose its checkpoint by reading dev-set answers of epochs 5 to 10. With `config.data.dev_path` set,
training calls the hook from `dev_report_hook(config)` after each epoch's checkpoint; for the epochs in
`config.dev_report.epochs` it answers the dev prompts (LIMA's sampling, `config.dev_report.max_new_tokens`,
the same seed every epoch so answers differ only through the model) and writes into the run directory
(file names: `lima_jax.rundir`):

  dev_reports/epoch_007.jsonl   the answers of epoch 7 (the answer-record schema of `lima_jax.records` +
                                epoch, step)
  dev_report.html               every prompt with the answers of all epochs side by side, plus per-epoch
  dev_report.md                 response lengths, how often each epoch stopped on EOT and, with
                                `config.dev_report.reference_path` set, the dev-set perplexity
  dev_reports/perplexity.json   {epoch: perplexity of the reference answers' tokens (EOT included)}

`config.dev_report.max_new_tokens = 0` sizes the answer cap from the data: the 99th percentile of the training
examples' assistant tokens (EOT included), so a small model's reports neither cut its answers nor run to 2,048.

`python -m lima_jax.report choose --workdir W --epoch 7` marks the epoch the other tools then use.
"""
from __future__ import annotations

import html
import json
import math
import statistics
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from lima_jax import data, distributed
from lima_jax.errors import DataError
from lima_jax.generation import Generator, SamplingConfig, answer_prompts
from lima_jax.paths import PathLike, atomic_write_text
from lima_jax.records import check_prompts_fit, read_answers, read_prompts, write_jsonl
from lima_jax.rundir import RunDir, read_chosen_epoch
from lima_jax.tokenizer import load_tokenizer
from lima_jax.train_step import loss_sums
from lima_jax.training import EpochEnd, EpochHook

PERPLEXITY_FILE = "perplexity.json"
ANSWER_CAP_PERCENTILE = 99


def load_epoch_answers(workdir: PathLike) -> dict[int, list[dict]]:
    """{epoch: answer records} of every `dev_reports/epoch_*.jsonl`, in epoch order."""
    run = RunDir.at(workdir)
    if not run.dev_reports.is_dir():
        return {}
    return {int(path.stem.split("_")[1]): read_answers(path) for path in sorted(run.dev_reports.glob("epoch_*.jsonl"))}


def load_perplexities(workdir: PathLike) -> dict[int, float]:
    """{epoch: dev-set perplexity} written by the hook, {} when the run has no reference answers."""
    path = RunDir.at(workdir).dev_reports / PERPLEXITY_FILE
    return {int(k): float(v) for k, v in json.loads(path.read_text()).items()} if path.exists() else {}


def mean_token_loss(model: Any, params: Any, examples: Sequence[data.Example], max_len: int,
                    rows: int = 32) -> float:
    """Mean cross-entropy (nats) over the weighted target tokens of `examples`, one example per row."""
    step = jax.jit(lambda p, batch: loss_sums(p, model, batch, None, True))
    total = count = 0.0
    for start in range(0, len(examples), rows):
        chunk = list(examples[start:start + rows])
        batch = data.pad_rows(chunk + [None] * (rows - len(chunk)), max_len)
        loss, weight = step(params, {k: jnp.asarray(v) for k, v in batch.items()})
        total, count = total + float(loss), count + float(weight)
    return total / max(count, 1.0)


def answer_lengths(examples: Sequence[data.Example]) -> list[int]:
    """Tokens of every assistant turn (its EOT included) of `examples` trained on assistant tokens: each turn
    is one run of consecutive weighted targets."""
    lengths = []
    for e in examples:
        edges = np.diff(np.concatenate([[0], (e.weights > 0).astype(np.int8), [0]]))
        lengths += (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist()
    return lengths


def answer_cap_from_data(examples: Sequence[data.Example], percentile: int = ANSWER_CAP_PERCENTILE) -> int:
    """The dev-report answer cap sized from the training data: a percentile of the answers' lengths in tokens."""
    return max(1, int(math.ceil(np.percentile(answer_lengths(examples), percentile))))


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


def _perplexity_cell(perplexities: dict[int, float], epoch: int) -> str:
    return f"{perplexities[epoch]:.3f}" if epoch in perplexities else "-"


def render_markdown(answers: dict[int, list[dict]], chosen: int | None = None,
                    perplexities: dict[int, float] | None = None) -> str:
    perplexities = perplexities or {}
    lines = ["# Dev-set answers per epoch", "",
             "| epoch | step | answers | stopped on EOT | mean tokens | dev perplexity | median tokens | max tokens "
             "| stop reasons |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for epoch, records in answers.items():
        s = epoch_summary(records)
        mark = " (chosen)" if epoch == chosen else ""
        lines.append(f"| {epoch}{mark} | {s['step']} | {s['answers']} | {100 * s['eot_rate']:.0f}% | "
                     f"{s['mean_tokens']:.1f} | {_perplexity_cell(perplexities, epoch)} | "
                     f"{s['median_tokens']} | {s['max_tokens']} | "
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


def render_html(answers: dict[int, list[dict]], chosen: int | None = None,
                perplexities: dict[int, float] | None = None) -> str:
    esc = html.escape
    perplexities = perplexities or {}
    cls = lambda epoch: ' class="chosen"' if epoch == chosen else ""  # noqa: E731
    head = ("<tr><th>epoch</th><th>step</th><th>answers</th><th>stopped on EOT</th><th>mean tokens</th>"
            "<th>dev perplexity</th><th>median tokens</th><th>max tokens</th><th>stop reasons</th></tr>")
    rows = []
    for epoch, records in answers.items():
        s = epoch_summary(records)
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["stop_reasons"].items()))
        rows.append(f"<tr{cls(epoch)}><td>{epoch}{' (chosen)' if epoch == chosen else ''}</td><td>{s['step']}</td>"
                    f"<td>{s['answers']}</td><td>{100 * s['eot_rate']:.0f}%</td><td>{s['mean_tokens']:.1f}</td>"
                    f"<td>{_perplexity_cell(perplexities, epoch)}</td><td>{s['median_tokens']}</td>"
                    f"<td>{s['max_tokens']}</td><td>{esc(reasons)}</td></tr>")
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
    perplexities = load_perplexities(run.root)
    atomic_write_text(run.dev_report_html, render_html(answers, chosen, perplexities))
    atomic_write_text(run.dev_report_md, render_markdown(answers, chosen, perplexities))
    return run.dev_report_html, run.dev_report_md


# ------------------------------------------------------------------------------------ training hook


def answer_cap(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> int:
    """`config.dev_report.max_new_tokens`, or with 0 the cap sized from the training data (logged)."""
    cap = int(config.dev_report.max_new_tokens)
    if cap:
        return cap
    examples = data.load_examples(config.data.train_path, tokenizer, config.data.max_len, "assistant",
                                  config.data.on_bad_example).examples
    cap = answer_cap_from_data(examples)
    logging.info("dev_report.max_new_tokens=0: answers capped at %d tokens, the %dth percentile of the %d training "
                 "answers' lengths", cap, ANSWER_CAP_PERCENTILE, len(examples))
    return cap


def dev_report_hook(config: ml_collections.ConfigDict) -> EpochHook | None:
    """The `after_epoch` hook for `lima_jax.training.train`, or None when `config.data.dev_path` is unset.

    The dev prompts (and reference answers) are read and checked here, before training starts, so a bad dev
    file fails at once.
    """
    if not config.data.get("dev_path"):
        return None
    tokenizer = load_tokenizer(config)
    prompts = read_prompts(config.data.dev_path)
    check_prompts_fit(prompts, tokenizer, config.model.max_seq_len)
    epochs = {int(e) for e in config.dev_report.epochs}
    settings = SamplingConfig(max_new_tokens=answer_cap(config, tokenizer), seed=int(config.seed))
    settings.validate()
    reference_path = config.dev_report.get("reference_path", "")
    references = (data.load_examples(reference_path, tokenizer, config.data.max_len, "assistant").examples
                  if reference_path else [])
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
        if references:
            perplexity = math.exp(mean_token_loss(rt.model, end.state.params, references, config.data.max_len))
            known = {**load_perplexities(run.root), end.epoch: perplexity}
            atomic_write_text(run.dev_reports / PERPLEXITY_FILE, json.dumps({str(k): v for k, v in
                                                                              sorted(known.items())}) + "\n")
            logging.info("epoch %d dev perplexity %.3f (%d reference answers)", end.epoch, perplexity,
                         len(references))
        html_path, _ = write_report(run.root)
        summary = epoch_summary(records)
        end.writer.scalar("dev/mean_response_tokens", summary["mean_tokens"], end.step)
        end.writer.scalar("dev/eot_rate", summary["eot_rate"], end.step)
        logging.info("epoch %d dev answers: %d, mean %.1f tokens, %.0f%% stopped on EOT; report %s", end.epoch,
                     summary["answers"], summary["mean_tokens"], 100 * summary["eot_rate"], html_path)

    return after_epoch
