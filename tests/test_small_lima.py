"""The small-scale LIMA experiment on the real stories260K: its data builder, and a reduced run end to end."""
from __future__ import annotations

import json
import pathlib

import pytest

from tests.conftest import shared_file
from lima_jax.experiments import small_lima, story_data
from lima_jax.tokenizer import Tokenizer


def test_story_data_is_deterministic_varied_and_keeps_test_subjects_unseen():
    first, again = story_data.build_splits(seed=0), story_data.build_splits(seed=0)
    assert [e.turns for e in first.train] == [e.turns for e in again.train]
    assert [e.turns for e in story_data.build_splits(seed=1).train] != [e.turns for e in first.train]
    assert (len(first.train), sum(len(e.turns) == 4 for e in first.train), len(first.dev)) == (1030, 30, 50)
    train_subjects = {e.subject for e in first.train} | {e.subject for e in first.dev}
    assert not {e.subject for e in first.test} & train_subjects
    test_names = {n for n, _ in story_data.TEST_NAMES}
    assert not any(n in e.turns[0] or n in e.turns[1] for e in first.train for n in test_names)
    requests = {e.turns[0] for e in first.train}
    assert len(requests) > 0.7 * len(first.train)  # varied requests, not 1,000 copies of a few
    assert {e.turns[0] for e in first.dev}.isdisjoint(requests)
    # every kind of request is there, and every non-continuation answer names its subject
    assert set(story_data.REQUEST_KINDS) <= {e.kind for e in first.train}
    assert all(story_data.mentions(e.turns[1], e.subject) for e in first.train if e.kind != "continue")
    n_sentence = [e for e in first.train if e.kind == "sentences"]
    for e in n_sentence:  # "in N sentences" is what the story does
        n = int(next(w for w in e.turns[0].replace("-", " ").split() if w.isdigit()))
        assert e.turns[1].count(".") == n, e.turns


def test_mentions_is_a_whole_word_check():
    assert story_data.mentions("The Dogs ran.", "dog") and story_data.mentions("a fox.", "fox")
    assert not story_data.mentions("a hotdog stand", "dog") and not story_data.mentions("boxes", "ox")


def test_build_data_writes_the_project_formats(tmp_path):
    from lima_jax.data import load_examples
    from lima_jax.records import read_prompts
    tok = Tokenizer(shared_file("llama/tok512.model"))
    stats = small_lima.build_data(tmp_path, tokenizer_path=str(shared_file("llama/tok512.model")))
    assert stats["unknown_pieces"] == 0 and stats["test_subjects_unseen"]
    train = load_examples(tmp_path / "train.jsonl", tok, 512).examples
    assert len(train) == 1030 and not any(e.trimmed for e in train)
    assert [len(load_examples(tmp_path / f"train_{n}.jsonl", tok, 512).examples) for n in (250, 500)] == [258, 515]
    assert len(read_prompts(tmp_path / "dev.jsonl")) == 50 == len(load_examples(tmp_path / "dev_ref.jsonl", tok,
                                                                                  512).examples)
    assert all("subject" in json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines())


@pytest.mark.slow
def test_reduced_experiment_learns_to_stop_and_keeps_the_story_knowledge(tmp_path):
    """A reduced run (258 conversations, 2 epochs, 7 test prompts) through the real train/dev-report path."""
    shared_file("llama/stories260K.bin")
    result = small_lima.run(tmp_path, [("data.train_path", "train_250.jsonl"), ("data.max_len", "256"),
                                       ("train.num_epochs", "2"), ("dev_report.epochs", "(2,)")],
                            sweep=False, test_prompts=7, heldout_stories=8)
    rows = result["rows"]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    base, last = rows[0], rows[-1]
    print("\n" + small_lima.table(rows))
    # Looser bars than the full run's goal (docs/reproducing.md), which this reduced run was measured to
    # clear: it learns to stop (greedy answers end on EOT; the EOT row starts as BOS's, config
    # tokenizer.eot_init), the answers' format is being learned (dev perplexity falls every epoch from the
    # base model's) and the held-out story loss stays within 20% of the base model's.
    assert last["eot_greedy"] >= 0.5 and last["eot_sampled"] > 0.0
    perplexities = [r["dev_perplexity"] for r in rows]
    assert perplexities == sorted(perplexities, reverse=True) and perplexities[-1] < 0.9 * perplexities[0]
    assert 1.0 < last["retained"] < 1.2 and base["retained"] == 1.0
    assert all(0.0 <= r["eot_sampled"] <= 1.0 and 0.0 <= r["pref_vs_base"] <= 1.0 for r in rows)
    assert (tmp_path / "runs" / "chosen" / "dev_report.md").exists()
    assert "dev perplexity" in (tmp_path / "runs" / "chosen" / "dev_report.md").read_text()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    assert all(p.endswith(".png") and pathlib.Path(p).exists() for p in result.get("plots", []))
