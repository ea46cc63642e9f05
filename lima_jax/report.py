"""Per-epoch dev-set answers, a report a person reads to choose the epoch, and the chosen-epoch marker.

LIMA chose its checkpoint by reading dev-set answers of epochs 5 to 10. With `config.data.dev_path` set,
training calls the hook from `dev_report_hook(config)` after each epoch's checkpoint; for the epochs in
`config.eval.dev_report_epochs` it answers the dev prompts (LIMA's sampling, `config.eval.max_new_tokens`,
the same seed every epoch so answers differ only through the model) and writes, under the workdir:

  dev_reports/epoch_007.jsonl   the answers of epoch 7 (the `lima_jax.generate` output schema + epoch, step)
  dev_report.html               every prompt with the answers of all epochs side by side, plus per-epoch
  dev_report.md                 response lengths and how often each epoch stopped on EOT

Choosing an epoch:

    python -m lima_jax.report choose --workdir W --epoch 7 [--note "most helpful, least rambling"]

writes `W/chosen_epoch.json` = {"epoch": 7, "step": <its end-of-epoch step>, "checkpoint":
"checkpoints/<step>", "note": ..., "chosen_at": ...}. `chosen_checkpoint(W)` resolves it to the checkpoint
folder; `lima_jax.generate --checkpoint W` uses it (else the latest checkpoint), and export / evaluation
should call `chosen_checkpoint` too. `python -m lima_jax.report build --workdir W` re-renders the report.
"""
from __future__ import annotations

import datetime
import html
import json
import pathlib
import statistics
from typing import Any, Callable, Sequence

import jax
from absl import logging

from lima_jax.fileio import atomic_write_text

REPORT_DIR = "dev_reports"
CHOSEN_FILE = "chosen_epoch.json"


# ------------------------------------------------------------------------------------------ the marker


def epoch_checkpoint_steps(workdir: str | pathlib.Path) -> dict[int, int]:
    """{epoch: step} of the end-of-epoch training checkpoints in `workdir/checkpoints`."""
    from lima_jax.checkpoint import TrainCheckpoints
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no training checkpoints here")
    checkpoints = TrainCheckpoints(directory)
    try:
        steps = {}
        for step in checkpoints.all_steps():
            meta = checkpoints.read_meta(step)
            if meta.get("end_of_epoch"):
                steps[int(meta["epoch"])] = step
        return steps
    finally:
        checkpoints.close()


def mark_chosen_epoch(workdir: str | pathlib.Path, epoch: int, note: str = "") -> dict:
    """Writes `workdir/chosen_epoch.json` for `epoch`'s end-of-epoch checkpoint (which must exist)."""
    workdir = pathlib.Path(workdir)
    steps = epoch_checkpoint_steps(workdir)
    if epoch not in steps:
        raise ValueError(f"{workdir}: no end-of-epoch checkpoint for epoch {epoch}; have epochs {sorted(steps)}")
    marker = {"epoch": epoch, "step": steps[epoch], "checkpoint": f"checkpoints/{steps[epoch]}", "note": note,
              "chosen_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(workdir / CHOSEN_FILE, json.dumps(marker, indent=2) + "\n")
    return marker


def read_chosen_epoch(workdir: str | pathlib.Path) -> dict | None:
    """The marker written by `mark_chosen_epoch`, or None when no epoch was chosen."""
    path = pathlib.Path(workdir) / CHOSEN_FILE
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        int(marker["epoch"]), str(marker["checkpoint"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: malformed chosen-epoch marker ({e}); rewrite it with "
                         "`python -m lima_jax.report choose`") from None
    return marker


def chosen_checkpoint(workdir: str | pathlib.Path) -> pathlib.Path | None:
    """The training checkpoint folder (`workdir/checkpoints/<step>`) of the chosen epoch, or None if none
    was chosen. Raises FileNotFoundError if the marker points at a checkpoint that is gone."""
    marker = read_chosen_epoch(workdir)
    if marker is None:
        return None
    folder = pathlib.Path(workdir) / marker["checkpoint"]
    if not folder.is_dir():
        raise FileNotFoundError(f"{pathlib.Path(workdir) / CHOSEN_FILE}: epoch {marker['epoch']} points at "
                                f"{folder}, which does not exist")
    return folder


# ---------------------------------------------------------------------------------------- the report


def epoch_answers_path(workdir: str | pathlib.Path, epoch: int) -> pathlib.Path:
    return pathlib.Path(workdir) / REPORT_DIR / f"epoch_{epoch:03d}.jsonl"


def load_epoch_answers(workdir: str | pathlib.Path) -> dict[int, list[dict]]:
    """{epoch: answer records} of every `dev_reports/epoch_*.jsonl`, in epoch order."""
    answers = {}
    for path in sorted((pathlib.Path(workdir) / REPORT_DIR).glob("epoch_*.jsonl")):
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        answers[int(path.stem.split("_")[1])] = records
    return answers


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


def write_report(workdir: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(Re)writes `dev_report.html` and `dev_report.md` from every epoch's answers in the workdir."""
    workdir = pathlib.Path(workdir)
    answers = load_epoch_answers(workdir)
    if not answers:
        raise FileNotFoundError(f"{workdir / REPORT_DIR}: no epoch_*.jsonl answers to report")
    marker = read_chosen_epoch(workdir)
    chosen = int(marker["epoch"]) if marker else None
    html_path, md_path = workdir / "dev_report.html", workdir / "dev_report.md"
    atomic_write_text(html_path, render_html(answers, chosen))
    atomic_write_text(md_path, render_markdown(answers, chosen))
    return html_path, md_path


# ------------------------------------------------------------------------------------ training hook


def dev_report_hook(config) -> Callable[..., None] | None:
    """The `after_epoch` hook for `lima_jax.train.train`, or None when `config.data.dev_path` is unset.

    The dev prompts are read and checked here, before training starts, so a bad dev file fails at once.
    """
    from lima_jax import distributed, sharding
    from lima_jax.generate import Generator, SamplingConfig, answer_prompts, check_prompts_fit, read_prompts, \
        write_jsonl
    from lima_jax.tokenizer import Tokenizer
    if not config.data.get("dev_path"):
        return None
    prompts = read_prompts(config.data.dev_path)
    check_prompts_fit(prompts, Tokenizer(config.tokenizer.path), config.model.max_seq_len)
    epochs = {int(e) for e in config.eval.dev_report_epochs}
    settings = SamplingConfig(max_new_tokens=int(config.eval.max_new_tokens), seed=int(config.seed))
    settings.validate()
    batch_size = int(config.eval.get("batch_size", 8))
    workdir = pathlib.Path(config.workdir)
    generators: dict[str, Generator] = {}  # one per run, so each shape compiles once across epochs

    def after_epoch(*, epoch: int, state, model, tokenizer, mesh, writer=None, rules=None, resumed: bool = False,
                    **_) -> None:
        """Answers the dev prompts after `epoch`; on resume (`resumed`) only if that epoch has no answers yet."""
        if epoch not in epochs:
            return
        if resumed and distributed.main_process_says(epoch_answers_path(workdir, epoch).exists()):
            return
        generator = generators.get("g")
        if generator is None:
            if rules is None:  # the rules training derived (they depend on the vocabulary and mesh shape)
                rules = sharding.layout_rules(config, vocab_size=model.cfg.vocab_size, shape=mesh.devices.shape)
            generator = generators["g"] = Generator(model.cfg, state.params, tokenizer, mesh, rules, batch_size)
        generator.params = state.params
        step = int(state.step)
        records = [{**r, "epoch": epoch, "step": step} for r in answer_prompts(generator, prompts, settings)]
        if jax.process_index() != 0:
            return
        write_jsonl(epoch_answers_path(workdir, epoch), records)
        html_path, _ = write_report(workdir)
        summary = epoch_summary(records)
        if writer is not None and getattr(writer, "enabled", False):
            writer.tensorboard.add_scalar("dev/mean_response_tokens", summary["mean_tokens"], step)
            writer.tensorboard.add_scalar("dev/eot_rate", summary["eot_rate"], step)
        logging.info("epoch %d dev answers: %d, mean %.1f tokens, %.0f%% stopped on EOT; report %s", epoch,
                     summary["answers"], summary["mean_tokens"], 100 * summary["eot_rate"], html_path)

    return after_epoch


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> None:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m lima_jax.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    choose = sub.add_parser("choose", help="mark the epoch whose checkpoint export and evaluation use")
    choose.add_argument("--workdir", required=True, type=pathlib.Path)
    choose.add_argument("--epoch", required=True, type=int)
    choose.add_argument("--note", default="", help="why this epoch (kept in the marker)")
    build = sub.add_parser("build", help="re-render dev_report.html / .md from dev_reports/epoch_*.jsonl")
    build.add_argument("--workdir", required=True, type=pathlib.Path)
    show = sub.add_parser("show", help="print the chosen epoch and its checkpoint")
    show.add_argument("--workdir", required=True, type=pathlib.Path)
    args = parser.parse_args(argv)
    if args.command == "choose":
        marker = mark_chosen_epoch(args.workdir, args.epoch, args.note)
        print(f"chose epoch {marker['epoch']}: {args.workdir / marker['checkpoint']}")
        if load_epoch_answers(args.workdir):
            write_report(args.workdir)
    elif args.command == "build":
        for path in write_report(args.workdir):
            print(f"wrote {path}")
    else:
        folder = chosen_checkpoint(args.workdir)
        print("no epoch chosen" if folder is None else f"epoch {read_chosen_epoch(args.workdir)['epoch']}: {folder}")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: the message names file, line and field
        raise SystemExit(f"error: {e}") from None
