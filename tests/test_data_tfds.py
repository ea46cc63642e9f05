"""TFDS datasets (ArrayRecord, no TensorFlow): the `lima` builder on a GAIR-style release with dialogues,
the generic `sft_jsonl` builder, reading back with random access, the CLI, and the real LIMA texts."""
import json
import subprocess
import sys

import numpy as np
import pytest

from lima_jax import cli as lima_cli
from lima_jax.data import DataError, load_examples
from lima_jax.data import __main__ as cli
from lima_jax.data import tfds_builders
from tests.conftest import shared_file

SINGLE = [
    ({"conversations": ["How do I boil an egg?", "Put it in boiling water for nine minutes."], "source": "wikihow"}),
    ({"conversations": ["Why is the sky blue?", "Air scatters blue light more than red."], "source": "stackexchange"}),
    ({"conversations": ["Write a haiku about rain.", "Grey clouds gather slow / drops tap the tin roof."],
      "source": "manual"}),
    ({"conversations": ["Summarize: cats sleep a lot.", "Cats sleep much of the day."], "source": "nlp"}),
]
DIALOGUES = [
    ({"conversations": ["Plan a picnic.", "Bring bread and fruit.", "And drinks?", "Lemonade and water."],
      "source": "multi_turn"}),
    ({"conversations": ["Name a prime.", "Seven.", "Another?", "Eleven.", "One more?", "Thirteen."],
      "source": "multi_turn"}),
]
TEST = [{"conversations": ["Tell me a joke."], "source": ""}, {"conversations": ["What is love?"], "source": ""}]
DEV = [{"conversations": ["Describe the moon."]}]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A manual dir laid out like the GAIR release (own text), with dialogues interleaved, and a dev file."""
    root = tmp_path_factory.mktemp("lima_release")
    manual = root / "manual"
    manual.mkdir()
    _jsonl(manual / "train.jsonl", [SINGLE[0], DIALOGUES[0], SINGLE[1], SINGLE[2], DIALOGUES[1], SINGLE[3]])
    _jsonl(manual / "test.jsonl", TEST)
    dev = _jsonl(root / "my_dev.jsonl", DEV)
    built = {config: tfds_builders.build_lima(manual, root / "tfds", config, dev_file=dev)
             for config in ("single_turn", "with_dialogues")}
    return manual, built


def test_lima_configs_hold_single_turn_or_all_rows_in_file_order(release):
    manual, built = release
    single = tfds_builders.read_conversations(built["single_turn"])
    everything = tfds_builders.read_conversations(f"{built['with_dialogues']}:train")
    assert [c.turns for c in single] == [tuple(r["conversations"]) for r in SINGLE]
    assert [c.line for c in single] == [1, 3, 4, 6]
    assert [c.source for c in single] == ["wikihow", "stackexchange", "manual", "nlp"]
    assert len(everything) == 6 and [len(c.turns) for c in everything] == [2, 4, 2, 2, 6, 2]
    assert everything[4].where == f"{manual / 'train.jsonl'}:5"


def test_lima_test_and_dev_splits_and_random_access(release):
    _, built = release
    test = tfds_builders.data_source(f"{built['single_turn']}:test")
    assert len(test) == 2
    assert tfds_builders.to_conversation(test[1]).turns == ("What is love?",)  # random access, no iteration
    dev = tfds_builders.read_conversations(f"{built['single_turn']}:dev")
    assert [c.turns for c in dev] == [("Describe the moon.",)]
    with pytest.raises(DataError, match="no split 'validation'"):
        tfds_builders.data_source(f"{built['single_turn']}:validation")


def test_training_from_a_dataset_equals_training_from_its_jsonl(release, toy_tokenizer):
    manual, built = release
    from_dataset = load_examples(str(built["with_dialogues"]), toy_tokenizer, 64).examples
    from_jsonl = load_examples(str(manual / "train.jsonl"), toy_tokenizer, 64).examples
    assert [e.where for e in from_dataset] == [e.where for e in from_jsonl]
    for a, b in zip(from_dataset, from_jsonl):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.weights, b.weights)
        assert a.source == b.source


def test_prompt_split_is_refused_for_training_naming_the_line(release, toy_tokenizer):
    manual, built = release
    with pytest.raises(DataError, match=f"{manual / 'test.jsonl'}:1: 1 turns"):
        load_examples(f"{built['single_turn']}:test", toy_tokenizer, 64)


def test_build_stops_at_a_bad_line_and_writes_nothing(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "train.jsonl").write_text(json.dumps(SINGLE[0]) + "\n" + '{"conversations": ["q", 3]}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: field 'conversations'\[1\] \(turn 1\) is int"):
        tfds_builders.build_lima(manual, tmp_path / "tfds")
    assert not tfds_builders.is_dataset_path(tmp_path / "tfds" / "lima" / "single_turn" / "1.0.0")


def test_build_without_the_release_files_says_what_is_missing(tmp_path):
    with pytest.raises(DataError, match="train.jsonl: file not found"):
        tfds_builders.build_lima(tmp_path, tmp_path / "tfds")


def test_generic_builder_reads_the_other_schemas(tmp_path, toy_tokenizer):
    train = tmp_path / "chat.jsonl"
    train.write_text(
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello."}]}) + "\n"
        + json.dumps({"instruction": "Add", "input": "2 and 3", "output": "5"}) + "\n")
    folder = tfds_builders.build_jsonl("mine", {"train": train}, tmp_path / "tfds")
    assert folder == tmp_path / "tfds" / "sft_jsonl" / "mine" / "1.0.0"
    convs = tfds_builders.read_conversations(folder)
    assert [c.turns for c in convs] == [("Be brief.\n\nHi", "Hello."), ("Add\n\n2 and 3", "5")]
    assert len(load_examples(str(folder), toy_tokenizer, 64).examples) == 2


def test_cli_build_and_stats(tmp_path, toy_tokenizer, capsys, repo):
    manual = tmp_path / "manual"
    manual.mkdir()
    _jsonl(manual / "train.jsonl", SINGLE + DIALOGUES)
    assert cli.main(["build", "lima", "--manual_dir", str(manual), "--data_dir", str(tmp_path / "out"),
                     "--config", "with_dialogues"]) == 0
    folder = capsys.readouterr().out.strip().splitlines()[-1]
    png = tmp_path / "hist.png"
    assert cli.main(["stats", "--data", folder, "--tokenizer", str(toy_tokenizer.path), "--max_len", "64",
                     "--histogram", str(png)]) == 0
    out = capsys.readouterr().out
    assert "examples: 6 kept, 0 skipped" in out
    assert out.count("multi_turn") == 1 and "wikihow" in out and "packed (best-fit decreasing)" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as exit_info:  # bad input: one error paragraph, exit status 2
        lima_cli.run(cli.main, ["build", "lima", "--manual_dir", str(tmp_path / "none"), "--data_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "file not found" in capsys.readouterr().err


def test_cli_help_runs_as_a_module():
    for command in ([], ["build"], ["build", "lima"], ["stats"], ["tokenizer"], ["tokenizer", "train"],
                    ["tokenizer", "encode"]):
        result = subprocess.run([sys.executable, "-m", "lima_jax.data", *command, "--help"], capture_output=True,
                                text=True, check=True)  # check: --help exits 0
        assert "usage: python -m lima_jax.data " + " ".join(command) in result.stdout


def test_cli_bad_input_is_one_error_line_and_status_2(repo):
    result = subprocess.run([sys.executable, "-m", "lima_jax.data", "stats", "--data", "/nonexistent.jsonl",
                             "--tokenizer", "data/toy_tokenizer.model"], capture_output=True, text=True, cwd=repo)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: /nonexistent.jsonl: file not found"]
    assert "Traceback" not in result.stderr and result.stdout == ""


def _independent_lengths(sp, path):
    """Conversation lengths counted without lima_jax: BOS + each turn's pieces + one EOT per turn."""
    lengths = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            turns = [record["instruction"], record["response"]]
            lengths.append(1 + sum(len(sp.encode(t)) + 1 for t in turns))
    return np.asarray(lengths)


def test_real_lima_builds_and_its_stats_match_an_independent_count(tmp_path):
    import sentencepiece as spm

    from lima_jax.data.stats import compute_stats, format_stats
    from lima_jax.tokenizer import Tokenizer

    train, test = shared_file("lima/lima_train_1022.jsonl"), shared_file("lima/lima_test.jsonl")
    tokenizer = Tokenizer(shared_file("llama/llama_tokenizer.model"))
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "train.jsonl").symlink_to(train)
    (manual / "test.jsonl").symlink_to(test)
    folder = tfds_builders.build_lima(manual, tmp_path / "tfds")
    assert len(tfds_builders.data_source(folder)) == 1022
    assert len(tfds_builders.data_source(f"{folder}:test")) == 300

    report = load_examples(str(folder), tokenizer, 2048)
    stats = compute_stats(str(folder), report, 2048)
    lengths = _independent_lengths(spm.SentencePieceProcessor(model_file=str(tokenizer.path)), train)
    assert stats.overall.count == len(lengths) == 1022
    assert stats.overall.total == lengths.sum()
    assert stats.overall.trimmed == (lengths > 2049).sum()
    assert stats.overall.maximum == lengths.max() and stats.overall.percentiles[50] == np.percentile(lengths, 50)
    row_tokens = np.minimum(lengths, 2049) - 1
    assert stats.padded.efficiency == pytest.approx(row_tokens.sum() / (1022 * 2048))
    assert stats.packed.efficiency == pytest.approx(row_tokens.sum() / (stats.packed.num_rows * 2048))
    assert stats.packed.efficiency >= 0.95
    assert "1022 kept" in format_stats(stats)
