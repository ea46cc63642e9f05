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
