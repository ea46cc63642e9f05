"""Per-epoch dev reports: rendering, a toy training run with the hook, the chosen-epoch marker."""
import json
import os
import re

import pytest

from lima_jax import dev_report, generate, report, rundir
from lima_jax.errors import CheckpointError
from lima_jax.records import read_prompts, write_jsonl


def _answer(pid, prompt, response, tokens, reason, epoch, step):
    return {"id": pid, "input": [prompt], "prompt": [prompt], "response": response, "responses": [response],
            "prompt_tokens": 5, "response_tokens": tokens, "stop_reason": reason, "epoch": epoch, "step": step}


def _write_epoch(workdir, epoch, records):
    write_jsonl(rundir.RunDir.at(workdir).epoch_answers(epoch), records)


def test_report_puts_epochs_side_by_side_with_lengths_and_eot_rates(tmp_path):
    _write_epoch(tmp_path, 5, [_answer("1", "Why <b>?", "Because <i>.", 3, "eot", 5, 50),
                               _answer("2", "How?", "Like this", 2, "eot", 5, 50),
                               _answer("3", "What?", "It goes on", 9, "max_new_tokens", 5, 50)])
    _write_epoch(tmp_path, 6, [_answer("2", "How?", "Like that", 4, "max_new_tokens", 6, 60),
                               _answer("1", "Why <b>?", "Since.", 1, "eot", 6, 60),
                               _answer("3", "What?", "Stop.", 2, "eot", 6, 60)])
    html_path, md_path = dev_report.write_report(tmp_path)
    page, md = html_path.read_text(), md_path.read_text()
    assert "Why &lt;b&gt;?" in page and "Because &lt;i&gt;." in page and "<i>" not in page  # escaped
    assert len(re.findall(r"<th>epoch 5</th>\s*<th>epoch 6</th>", page)) == 3  # side by side, per prompt
    # EOT share, mean length and dev perplexity side by side ("-": this run has no reference answers)
    assert "| 5 | 50 | 3 | 67% | 4.7 | - | 3 | 9 | eot 2, max_new_tokens 1 |" in md
    assert "| 6 | 60 | 3 | 67% | 2.3 | - | 2 | 4 | eot 2, max_new_tokens 1 |" in md
    # Prompts follow the first epoch's order; each epoch's answer is matched by id, not by position.
    assert md.index("Because <i>.") < md.index("Since.") < md.index("Like this") < md.index("Like that")
    summary = dev_report.epoch_summary(dev_report.load_epoch_answers(tmp_path)[6])
    assert summary["eot_rate"] == pytest.approx(2 / 3) and summary["median_tokens"] == 2


def test_chosen_checkpoint_is_none_until_chosen_and_malformed_markers_fail(tmp_path):
    assert rundir.chosen_checkpoint(tmp_path) is None
    (tmp_path / rundir.CHOSEN_EPOCH).write_text('{"epoch": 3}')
    with pytest.raises(CheckpointError, match="chosen_epoch.json: malformed"):
        rundir.chosen_checkpoint(tmp_path)
    (tmp_path / rundir.CHOSEN_EPOCH).write_text('{"epoch": 3, "checkpoint": "checkpoints/30"}')
    with pytest.raises(CheckpointError, match="does not exist"):
        rundir.chosen_checkpoint(tmp_path)


@pytest.mark.slow
def test_toy_run_writes_the_report_and_the_chosen_epoch_drives_generation(toy_config, tmp_path, capsys):
    from lima_jax.training import train
    config = toy_config
    config.train.num_epochs = 2
    config.dev_report.epochs = (1, 2)
    config.dev_report.max_new_tokens = 8
    config.dev_report.reference_path = config.data.train_path  # reference answers: dev perplexity per epoch
    workdir = tmp_path / "run"
    train(config, after_epoch=dev_report.dev_report_hook(config))

    answers = dev_report.load_epoch_answers(workdir)
    assert sorted(answers) == [1, 2]
    # A run stopped inside epoch 2's report: restarting trains nothing more, writes the missing answers
    # (identical: same parameters and seed) and leaves epoch 1's file alone.
    epoch1_file, epoch2_file = rundir.RunDir.at(workdir).epoch_answers(1), rundir.RunDir.at(workdir).epoch_answers(2)
    epoch1_before, epoch2_before = epoch1_file.read_bytes(), epoch2_file.read_bytes()
    epoch1_mtime = os.stat(epoch1_file).st_mtime_ns
    epoch2_file.unlink()
    train(config, after_epoch=dev_report.dev_report_hook(config))
    assert epoch2_file.read_bytes() == epoch2_before
    assert epoch1_file.read_bytes() == epoch1_before and os.stat(epoch1_file).st_mtime_ns == epoch1_mtime
    dev_prompts = read_prompts(config.data.dev_path)
    for epoch, records in answers.items():
        assert [r["id"] for r in records] == [p.id for p in dev_prompts]
        assert all(r["epoch"] == epoch and 1 <= r["response_tokens"] + (r["stop_reason"] == "eot") <= 8
                   for r in records)
    page = (workdir / "dev_report.html").read_text()
    md = (workdir / "dev_report.md").read_text()
    for p in dev_prompts:
        assert p.turns[0] in page and p.turns[0] in md
    for epoch in (1, 2):
        s = dev_report.epoch_summary(answers[epoch])
        ppl = dev_report.load_perplexities(workdir)[epoch]
        assert f"| {epoch} | {answers[epoch][0]['step']} | 6 | {100 * s['eot_rate']:.0f}% | {s['mean_tokens']:.1f} | " \
               f"{ppl:.3f} |" in md
        assert f"<td>{ppl:.3f}</td>" in page
    perplexities = dev_report.load_perplexities(workdir)
    assert sorted(perplexities) == [1, 2] and 1.0 < perplexities[2] < perplexities[1] < 513  # it learns the answers

    report.main(["choose", "--workdir", str(workdir), "--epoch", "1", "--note", "test"])
    marker = rundir.read_chosen_epoch(workdir)
    assert marker["epoch"] == 1 and marker["step"] == answers[1][0]["step"]
    assert str(rundir.chosen_checkpoint(workdir)) == str(workdir / "checkpoints" / str(marker["step"]))
    choice = rundir.resolve_checkpoint(workdir)
    assert (choice.kind, str(choice.folder), choice.reason, choice.epoch) == (
        "train", str(workdir / "checkpoints" / str(marker["step"])), "chosen", 1)
    assert "1 (chosen)" in (workdir / "dev_report.md").read_text()
    with pytest.raises(CheckpointError, match="no end-of-epoch checkpoint for epoch 9"):
        rundir.mark_chosen_epoch(workdir, 9)

    # generate --checkpoint WORKDIR reads the chosen epoch's parameters: same seed and settings as the hook,
    # so it reproduces epoch 1's dev answers exactly (and not epoch 2's, the latest checkpoint).
    out = tmp_path / "answers.jsonl"
    generate.main(["--config", config.source_file, "--checkpoint", str(workdir), "--prompts", config.data.dev_path,
                   "--out", str(out), "--max_new_tokens", "8", "--seed", str(config.seed)])
    regenerated = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["response"] for r in regenerated] == [r["response"] for r in answers[1]]
    assert [r["stop_reason"] for r in regenerated] == [r["stop_reason"] for r in answers[1]]
    # Without --config, generate uses the run's own config.json, and says which checkpoint and why.
    capsys.readouterr()
    again = tmp_path / "again.jsonl"
    generate.main(["--checkpoint", str(workdir), "--prompts", config.data.dev_path, "--out", str(again),
                   "--max_new_tokens", "8", "--seed", str(config.seed)])
    printed = capsys.readouterr()
    assert again.read_text() == out.read_text()
    assert f"config: {workdir / 'config.json'}" in printed.err
    assert f"checkpoints/{marker['step']} (step {marker['step']}, epoch 1): the run's chosen epoch" in printed.out


def test_answer_cap_comes_from_the_training_answers_unless_set(toy_config, toy_tokenizer):
    from lima_jax import data
    from lima_jax.data.formats import read_conversations
    examples = data.load_examples(toy_config.data.train_path, toy_tokenizer, toy_config.data.max_len).examples
    answer_tokens = sorted(dev_report.answer_lengths(examples))
    assert len(answer_tokens) == sum(len(e.turns) // 2 for e in read_conversations(toy_config.data.train_path))
    toy_config.dev_report.max_new_tokens = 0
    cap = dev_report.answer_cap(toy_config, toy_tokenizer)
    assert answer_tokens[len(answer_tokens) // 2] < cap <= answer_tokens[-1]  # the 99th percentile, EOT included
    assert sum(n > cap for n in answer_tokens) <= 0.01 * len(answer_tokens) + 1
    toy_config.dev_report.max_new_tokens = 48
    assert dev_report.answer_cap(toy_config, toy_tokenizer) == 48
