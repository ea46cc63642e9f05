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


def test_sampled_data_draws_from_many_train_subjects_none_of_them_a_test_subject():
    words = [w for w, _ in story_data.SAMPLED_TRAIN_SUBJECTS]
    assert len(words) == len(set(words)) >= 3 * len(story_data.TRAIN_SUBJECTS)
    assert set(story_data.TRAIN_SUBJECTS) <= set(story_data.SAMPLED_TRAIN_SUBJECTS)
    assert not set(words) & {w for w, _ in story_data.TEST_SUBJECTS}
    assert {k for _, k in story_data.SAMPLED_TRAIN_SUBJECTS} == {"animal", "thing"}


def test_one_story_cuts_where_the_model_starts_a_new_story():
    from types import SimpleNamespace as C
    assert small_lima.one_story(C(ids=[5, 6, 1, 7], stop_reason="length"), 1) == ([5, 6], True)
    assert small_lima.one_story(C(ids=[5, 6], stop_reason="length"), 1) == ([5, 6], False)
    assert small_lima.one_story(C(ids=[5, 6], stop_reason="eot"), 1) == ([5, 6], True)


def test_mentions_is_a_whole_word_check():
    assert story_data.mentions("The Dogs ran.", "dog") and story_data.mentions("a fox.", "fox")
    assert not story_data.mentions("a hotdog stand", "dog") and not story_data.mentions("boxes", "ox")


def test_plans_name_the_subject_and_requests_match_what_the_sampled_story_does():
    import random
    rng = random.Random(0)
    plans = [story_data.make_plan(rng, story_data.TRAIN_SUBJECTS, story_data.TRAIN_NAMES) for _ in range(200)]
    assert all(story_data.mentions(p.opening[0], p.subject) and p.hero in p.text for p in plans)
    assert {bool(p.event) for p in plans} == {True, False} and all(len(p.opening) == 1 + bool(p.event) for p in plans)
    first = [story_data.make_plan(rng, story_data.SAMPLED_TRAIN_SUBJECTS, story_data.TRAIN_NAMES, subject_first=True)
             for _ in range(200)]  # the train openings name the subject as a request does, animal or thing
    assert {p.animal for p in first} == {True, False} and all(p.hero in p.text for p in first)

    def subject_before_hero(p):
        first_sentence = p.opening[0]
        return -1 < first_sentence.find(f"{story_data.article(p.subject)} {p.subject}") < first_sentence.find(p.hero)
    assert all(subject_before_hero(p) for p in first)
    assert not any(subject_before_hero(p) for p in plans if not p.animal)  # test openings: "Lily had a red ball."
    plan = next(p for p in plans if p.event and not p.animal)
    continuation = f'The {plan.subject} was gone. "Oh no!" said {plan.hero}. Then {plan.hero} learned to look.'
    assert story_data.split_sentences(continuation) == [f"The {plan.subject} was gone.", '"Oh no!"',
                                                        f"said {plan.hero}.", f"Then {plan.hero} learned to look."]
    assert set(story_data.kinds_for(plan, continuation)) == set(story_data.SAMPLED_KINDS)
    assert "moral" not in story_data.kinds_for(plan, "Nothing happened at all.")
    assert "where" not in story_data.kinds_for(next(p for p in plans if not p.event), None)
    request, answer = story_data.plan_request(rng, plan, "sentences", continuation)
    assert answer == f"{plan.text} {continuation}"
    assert f" {len(story_data.split_sentences(answer))}" in request.replace("-", " ")
    request, answer = story_data.plan_request(rng, plan, "continue", continuation)
    assert request.endswith(plan.text) and answer == continuation
    assert plan.event in story_data.plan_request(rng, plan, "where", continuation)[0]
    assert story_data.plan_request(rng, plan, "about", None)[1] is None  # a test prompt: no answer


def test_sampled_stories_are_refused_for_what_a_bad_sample_does():
    plan = story_data.Plan("ball", "Tim", False, ("Once upon a time, Tim had a red ball.",), "")
    good = "He threw the ball high. It was fun."
    assert story_data.accept_story(plan, good, True, 80, 60) == ""
    assert story_data.accept_story(plan, good, False, 80, 60) == "no_end"
    assert story_data.accept_story(plan, good, True, 40, 60) == "short"
    assert story_data.accept_story(plan, "He ran home. It was fun.", True, 80, 60) == "off_subject"
    assert story_data.accept_story(plan, "He threw the ball and", True, 80, 60) == "no_sentence_end"
    assert story_data.accept_story(plan, "The ball fell. It was fun. It was fun.", True, 80, 60) == "repeats"
    pet = story_data.Plan("dog", "Spot", True, ("There was once a big dog called Spot.",), "")
    assert story_data.accept_story(pet, "Spot ran home.", True, 80, 60) == ""  # an animal: its name will do


def test_two_turn_conversations_pair_the_shortest_stories_of_two_subjects():
    def story(subject, n):
        return (story_data.Plan(subject, "Tim", False, (f"Tim had a {subject}.",), ""), f"The {subject} was red.", n)
    pool = [story("ball", 300), story("ball", 100), story("kite", 250), story("ball", 120), story("kite", 150)]
    pairs, single = small_lima.shortest_pairs(pool, 5)
    assert [(a[2], b[2]) for a, b in pairs] == [(100, 150), (120, 250)]
    assert single == [pool[0]]
    import random
    (example,) = small_lima.two_turn_examples(random.Random(0), pairs, 1)
    assert len(example.turns) == 4 and "kite" in example.turns[2] and example.turns[3].startswith("Tim had a kite.")


def test_build_data_writes_the_project_formats(tmp_path):
    from lima_jax.data import load_examples
    from lima_jax.records import read_prompts
    tok = Tokenizer(shared_file("llama/tok512.model"))
    stats = small_lima.build_data(tmp_path, tokenizer_path=str(shared_file("llama/tok512.model")),
                                  responses="template")
    assert stats["unknown_pieces"] == 0 and stats["test_subjects_unseen"]
    train = load_examples(tmp_path / "train.jsonl", tok, 512).examples
    assert len(train) == 1030 and not any(e.trimmed for e in train)
    assert [len(load_examples(tmp_path / f"train_{n}.jsonl", tok, 512).examples) for n in (250, 500)] == [258, 515]
    assert len(read_prompts(tmp_path / "dev.jsonl")) == 50 == len(load_examples(tmp_path / "dev_ref.jsonl", tok,
                                                                                  512).examples)
    assert all("subject" in json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines())


def test_copy_probe_finds_the_base_model_copying_in_plain_text_but_not_after_a_request(tmp_path):
    """The copy probe on the real stories260K: measured 67% of 39 template subjects copied in plain text
    and 0% in the chat format before fine-tuning (the answer opening "there was a" goes on with "little")."""
    shared_file("llama/stories260K.bin")
    base = small_lima.Base.load(small_lima.base_config(small_lima.import_base(tmp_path / "base")))
    tok = base.rt.tokenizer
    subjects = [w for w, _ in story_data.TRAIN_SUBJECTS][:39]  # 117 and 78 rows: the last batch shard is padded
    chat_rows = small_lima.copy_probe_rows(tok, subjects, chat=True)
    assert len(chat_rows) == 3 * len(subjects)
    context, pieces = chat_rows[subjects.index("butterfly") * 3]
    assert tok.decode(pieces) == "butterfly" and context.count(tok.eot_id) == 1 and context[0] == tok.bos_id
    assert tok.decode(context[context.index(tok.eot_id) + 1:]).endswith("there was a")
    plain = small_lima.copy_rate(base.rt, base.params, subjects, chat=False)
    chat = small_lima.copy_rate(base.rt, base.params, subjects, chat=True)
    print(f"copy probe, base model, {len(subjects)} subjects: plain text {plain:.3f}, chat {chat:.3f}")
    assert plain >= 0.5 and chat <= 0.1, (plain, chat)


def test_runs_sharing_an_output_folder_keep_their_own_table_and_plots(tmp_path):
    rows = [{"epoch": e, "eot_sampled": 0.5, "eot_greedy": 1.0, "retained": 1.05, "dev_perplexity": 2.7 - e / 10,
             "pref_vs_base": 0.6} for e in (1, 2)]
    assert small_lima.output_prefix("chosen") == "" and small_lima.output_prefix("lr_1e-3") == "lr_1e-3_"
    main = small_lima.plot(rows, 1.3, tmp_path, small_lima.output_prefix("chosen"))
    variant = small_lima.plot(rows, 1.3, tmp_path, small_lima.output_prefix("lr_1e-3"))
    assert [p.name for p in main] == ["eot_retained.png", "perplexity_vs_preference.png"]
    assert [p.name for p in variant] == ["lr_1e-3_eot_retained.png", "lr_1e-3_perplexity_vs_preference.png"]
    assert all(p.stat().st_size > 0 for p in main + variant)


@pytest.mark.slow
def test_reduced_experiment_learns_to_stop_and_keeps_the_story_knowledge(tmp_path):
    """A reduced run through the real sampling, train and dev-report path: ~120 conversations the base model
    wrote (one or two batches of samples), 2 epochs, 7 test prompts."""
    shared_file("llama/stories260K.bin")
    # lr 1e-3, not the config's 3e-4: 8 steps are too few for the smaller rate to teach the stop (the full
    # run takes 165 steps)
    result = small_lima.run(tmp_path, [("train.num_epochs", "2"), ("dev_report.epochs", "(2,)"),
                                       ("optimizer.learning_rate", "1e-3"), ("optimizer.end_learning_rate", "1e-4")],
                            sweep=False, test_prompts=7, heldout_stories=8, train_size=120)
    stats = json.loads((tmp_path / "data" / "stats.json").read_text())
    assert stats["responses"] == "sampled" and stats["sampling"]["accepted"] == 120 + 2 * 4 + 2 * 50
    sampling = stats["sampling"]
    assert sum(sampling["refused"].values()) + sampling["accepted"] + sampling["unused"] == sampling["candidates"]
    rows = result["rows"]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    base, last = rows[0], rows[-1]
    print("\n" + small_lima.table(rows))
    # Looser bars than the full run's goal (docs/reproducing.md); this reduced run was measured at greedy
    # EOT 100%, sampled 86% (6 of 7), retained 1.045, dev perplexity 2.868 -> 2.854 -> 2.794. It learns to
    # stop (the EOT row starts as BOS's, config tokenizer.eot_init), the answers' format is being learned
    # (dev perplexity falls every epoch) and the held-out story loss stays within 10% of the base model's.
    assert last["eot_greedy"] >= 0.7 and last["eot_sampled"] >= 0.4
    perplexities = [r["dev_perplexity"] for r in rows]
    assert perplexities == sorted(perplexities, reverse=True) and perplexities[-1] < perplexities[0]
    assert 1.0 < last["retained"] < 1.1 and base["retained"] == 1.0
    assert all(0.0 <= r["eot_sampled"] <= 1.0 and 0.0 <= r["pref_vs_base"] <= 1.0 for r in rows)
    assert (tmp_path / "runs" / "chosen" / "dev_report.md").exists()
    assert "dev perplexity" in (tmp_path / "runs" / "chosen" / "dev_report.md").read_text()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    # the copy probe on every row (8 steps are too few to teach the copy: 0% in chat, measured, as the base's);
    # the base model copies in plain text (75% of these 6 subjects, measured) but not after a request
    assert all(0.0 <= r["copy_chat"] <= 1.0 and 0.0 <= r["copy_plain"] <= 1.0 for r in rows)
    assert base["copy_plain"] > base["copy_chat"]
    assert all(p.endswith(".png") and pathlib.Path(p).exists() for p in result.get("plots", []))
