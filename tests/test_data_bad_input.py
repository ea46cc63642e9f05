"""Bad input: every case gets an error naming file, line and field, or with on_bad_example="skip" a counted
warning; nothing passes silently. The same for TFDS builds."""
import json

import pytest

from lima_jax.data import DataError, load_examples

GOOD = {"conversations": ["What is 2 + 2?", "4."], "source": "math"}

# (bad record or raw line, text the error must contain besides "file:line")
BAD = {
    "malformed_json": ('{"conversations": ["a", "b"', "malformed JSON"),
    "not_an_object": ('["a", "b"]', "expected a JSON object"),
    "unknown_schema": ({"prompt": "a", "completion": "b"}, "unknown schema"),
    "wrong_role_order": ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]},
                         "'messages'[0].role is 'assistant', expected 'user'"),
    "ends_with_user": ({"conversations": ["q", "a", "q2"]}, "must end with the assistant"),
    "empty_turn": ({"conversations": ["q", "  "]}, "field 'conversations'[1] (turn 1) is empty"),
    "empty_response": ({"instruction": "q", "response": ""}, "field 'response' (turn 1) is empty"),
    "non_string_turn": ({"conversations": ["q", 42]}, "field 'conversations'[1] (turn 1) is int"),
    "non_string_content": ({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "a"}]},
                           "field 'messages'[0].content (turn 0) is list"),
    "conversations_not_list": ({"conversations": "q a"}, "'conversations' must be a list"),
    "missing_response": ({"instruction": "q"}, "needs field 'response'"),
    "source_not_string": ({"conversations": ["q", "a"], "source": 3}, "field 'source' is int"),
    "nothing_left_after_trimming": ({"conversations": ["word " * 400, "a"]}, "trimmed to data.max_len"),
}


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_each_bad_record_raises_naming_file_line_and_field(tmp_path, toy_tokenizer, case):
    bad, message = BAD[case]
    path = _write(tmp_path / "train.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as e:
        load_examples(str(path), toy_tokenizer, max_len=64)
    assert str(e.value).startswith(f"{path}:3: ")
    assert message in str(e.value)


def test_skip_mode_counts_and_logs_every_bad_record(tmp_path, toy_tokenizer, caplog):
    bad = [BAD[case][0] for case in sorted(BAD)]
    path = _write(tmp_path / "train.jsonl", [GOOD, *bad, GOOD])
    report = load_examples(str(path), toy_tokenizer, max_len=64, on_bad_example="skip")
    assert len(report.examples) == 2
    assert len(report.skipped) == len(BAD)
    assert {s.split(": ")[0] for s in report.skipped} == {f"{path}:{line}" for line in range(2, 2 + len(BAD))}
    warnings = [r for r in caplog.records if "skipped bad example" in r.getMessage()]
    assert len(warnings) == len(BAD) and f"({len(BAD)} so far)" in warnings[-1].getMessage()


def test_a_file_with_no_usable_example_is_an_error(tmp_path, toy_tokenizer):
    path = _write(tmp_path / "train.jsonl", [BAD["empty_turn"][0]])
    with pytest.raises(DataError, match="no usable examples"):
        load_examples(str(path), toy_tokenizer, max_len=64, on_bad_example="skip")


def test_missing_file_is_named(tmp_path, toy_tokenizer):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_examples(str(tmp_path / "nope.jsonl"), toy_tokenizer, max_len=64)


def test_a_later_bad_record_fails_before_any_tokenization(tmp_path, toy_tokenizer, monkeypatch):
    from lima_jax.data import pipeline
    calls = []
    monkeypatch.setattr(pipeline, "tokenize_all", lambda *a, **k: calls.append(1) or [])
    path = _write(tmp_path / "train.jsonl", [GOOD] * 5 + [BAD["unknown_schema"][0]])
    with pytest.raises(DataError, match=":6: unknown schema"):
        load_examples(str(path), toy_tokenizer, max_len=64)
    assert not calls


# ------------------------------------------------------------------------------ limits on one line

GOOD_LINE = json.dumps(GOOD).encode()
# (raw bad line, max_line_bytes, what the error must say after "file:line: ")
LIMITS = {
    "invalid_utf8": (b'{"conversations": ["caf\xe9?", "b"]}', None, "not valid UTF-8 (byte offset 23"),
    "lone_surrogate": (b'{"conversations": ["q", "a\\ud800b"]}', None,
                       "field 'conversations'[1] holds a lone surrogate (\\ud800 at character 1)"),
    "lone_surrogate_in_a_message": (b'{"messages": [{"role": "user", "content": "\\udfffx"}]}', None,
                                    "field 'messages'[0].content holds a lone surrogate"),
    "deep_nesting": (b"[" * 10_000, None, "JSON nested deeper than 64 levels"),
    "deep_nesting_in_a_field": (b'{"conversations": ' + b"[" * 5_000 + b"]" * 5_000 + b"}", None,
                                "JSON nested deeper than 64 levels"),
    "line_too_long": (b'{"conversations": ["' + b"x" * 50_000 + b'", "b"]}', 20_000,
                      "line of 50,028 bytes, over the limit of 20,000 bytes (config.data.max_line_bytes"),
}


def _write_lines(path, lines):
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


@pytest.mark.parametrize("case", sorted(LIMITS))
def test_a_line_over_a_limit_raises_naming_file_and_line(tmp_path, toy_tokenizer, case):
    bad, limit, message = LIMITS[case]
    path = _write_lines(tmp_path / "train.jsonl", [GOOD_LINE, GOOD_LINE, bad, GOOD_LINE])
    with pytest.raises(DataError) as e:
        load_examples(str(path), toy_tokenizer, max_len=64, **({"max_line_bytes": limit} if limit else {}))
    assert str(e.value).startswith(f"{path}:3: ")
    assert message in str(e.value)


def test_skip_mode_counts_every_line_over_a_limit_and_reads_on(tmp_path, toy_tokenizer):
    bad = [LIMITS[case][0] for case in sorted(LIMITS)]
    path = _write_lines(tmp_path / "train.jsonl", [GOOD_LINE, *bad, GOOD_LINE])
    report = load_examples(str(path), toy_tokenizer, max_len=64, on_bad_example="skip", max_line_bytes=20_000)
    assert len(report.examples) == 2 and [e.where for e in report.examples] == [f"{path}:1",
                                                                                 f"{path}:{len(bad) + 2}"]
    assert [s.split(": ")[0] for s in report.skipped] == [f"{path}:{line}" for line in range(2, 2 + len(bad))]
    for skipped, case in zip(report.skipped, sorted(LIMITS)):
        assert LIMITS[case][2] in skipped


def test_an_over_long_line_is_skipped_in_chunks_never_held_whole(tmp_path):
    """A 32 MB line under the default 4 MiB limit: refused, and the lines around it still read, while memory
    stays far below the line's size (before, it was read whole: a 50 MB line took 28 s and 3.4 GB)."""
    import tracemalloc

    from lima_jax.data import formats
    path = tmp_path / "big.jsonl"
    with path.open("wb") as f:
        f.write(GOOD_LINE + b"\n" + b'{"conversations": ["')
        for _ in range(32):
            f.write(b"x" * 2**20)
        f.write(b'", "b"]}\n' + GOOD_LINE + b"\n")
    tracemalloc.start()
    try:
        lines = list(formats.read_lines(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [line for line, _ in lines] == [1, 2, 3]
    assert isinstance(lines[1][1], DataError) and str(lines[1][1]).startswith(f"{path}:2: line of 33,554,460 bytes")
    assert lines[0][1] == lines[2][1] == GOOD_LINE.decode()
    assert peak < formats.MAX_LINE_BYTES + 3 * formats._READ_CHUNK  # about 5 MB, not 32


def test_line_splitting_across_chunk_boundaries(monkeypatch):
    import io

    from lima_jax.data import formats
    data = b"ab\n\nxxxxxxxxxxxx\ncd\nyyyyyy"
    for chunk in (1, 2, 3, 5, 64):
        monkeypatch.setattr(formats, "_READ_CHUNK", chunk)
        assert list(formats._raw_lines(io.BytesIO(data), 5)) == [(1, b"ab"), (2, b""), (3, 12), (4, b"cd"), (5, 6)]


def test_limits_apply_to_every_jsonl_reader(tmp_path):
    """Prompt files, response files and judgments go through the same reader: file:line, no crash."""
    from lima_jax.evaluation.pairs import read_responses
    from lima_jax.records import read_prompts
    path = _write_lines(tmp_path / "prompts.jsonl", [b'{"conversations": ["hi"]}', LIMITS["invalid_utf8"][0]])
    with pytest.raises(DataError, match=r"prompts.jsonl:2: not valid UTF-8 \(byte offset 23"):
        read_prompts(path)
    path = _write_lines(tmp_path / "answers.jsonl", [b'{"prompt": "hi", "response": "\\ud800"}'])
    with pytest.raises(DataError, match=r"answers.jsonl:1: field 'response' holds a lone surrogate"):
        read_responses(path)


def _stats_argv(path, repo, limit):
    return ["stats", "--data", str(path), "--tokenizer", str(repo / "data" / "toy_tokenizer.model"), "--max_len",
            "64", *(["--max_line_bytes", str(limit)] if limit else [])]


@pytest.mark.parametrize("case", ["invalid_utf8", "lone_surrogate", "deep_nesting", "line_too_long"])
def test_data_stats_exits_2_with_one_paragraph_naming_file_and_line(tmp_path, repo, case, capsys):
    from lima_jax import cli
    from lima_jax.data.__main__ import main
    bad, limit, message = LIMITS[case]
    path = _write_lines(tmp_path / "train.jsonl", [GOOD_LINE, bad])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, _stats_argv(path, repo, limit))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:2: ") and message in err and "Traceback" not in err


def test_data_stats_command_exits_2_on_an_over_long_line(tmp_path, repo):
    import subprocess
    import sys
    bad, limit, message = LIMITS["line_too_long"]
    path = _write_lines(tmp_path / "train.jsonl", [GOOD_LINE, bad, GOOD_LINE])
    result = subprocess.run([sys.executable, "-m", "lima_jax.data", *_stats_argv(path, repo, limit)],
                            capture_output=True, text=True, cwd=repo)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}:2: ") and message in errors[0]
    assert "Traceback" not in result.stderr
    skipped = subprocess.run([sys.executable, "-m", "lima_jax.data", *_stats_argv(path, repo, limit),
                              "--on_bad_example", "skip"], capture_output=True, text=True, cwd=repo)
    assert skipped.returncode == 0, skipped.stderr
    assert "2 kept, 1 skipped" in skipped.stdout
