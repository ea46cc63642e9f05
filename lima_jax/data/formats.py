"""Reading conversations from JSONL in the three common SFT schemas, with errors that name file and line.

  LIMA (GAIR release):   {"conversations": [user, assistant, user, ...], "source": "stackexchange"}
  instruction/response:  {"instruction": str, "input": str (optional), "response"|"output": str}
  chat messages:         {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}

A training conversation alternates user/assistant, starts with the user and ends with the assistant. A
prompt (for generation) ends with the user. A leading system message is joined to the first user turn
(LIMA's turn format has no system slot).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Iterator

from lima_jax.errors import DataError
from lima_jax.paths import as_path

SCHEMAS = ("lima", "instruction", "messages")


@dataclasses.dataclass(frozen=True)
class Conversation:
    turns: tuple[str, ...]  # user, assistant, user, ...
    source: str
    path: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def detect_schema(record: dict) -> str | None:
    if "conversations" in record:
        return "lima"
    if "messages" in record:
        return "messages"
    if "instruction" in record:
        return "instruction"
    return None


# Each reader returns the turns as (field name for error messages, value) pairs.
Turns = list[tuple[str, object]]


def _turns_lima(record: dict, where: str) -> Turns:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise DataError(f"{where}: field 'conversations' must be a list of strings, got {type(turns).__name__}")
    return [(f"'conversations'[{i}]", turn) for i, turn in enumerate(turns)]


def _turns_instruction(record: dict, where: str) -> Turns:
    response_key = "response" if "response" in record else "output"
    if response_key not in record:
        raise DataError(f"{where}: instruction schema needs field 'response' (or 'output')")
    prompt = record["instruction"]
    extra = record.get("input", "")
    if not isinstance(prompt, str) or not isinstance(extra, str):
        raise DataError(f"{where}: fields 'instruction' and 'input' must be strings")
    return [("'instruction'", f"{prompt}\n\n{extra}" if extra else prompt), (f"'{response_key}'", record[response_key])]


def _turns_messages(record: dict, where: str) -> Turns:
    messages = record["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"{where}: field 'messages' must be a list of {{'role', 'content'}} objects")
    system = []
    if messages and messages[0].get("role") == "system":
        system, messages = [messages[0].get("content")], messages[1:]
        if not isinstance(system[0], str):
            raise DataError(f"{where}: field 'messages'[0].content must be a string")
    turns = []
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.get("role") != expected:
            raise DataError(f"{where}: field 'messages'[{i + len(system)}].role is {message.get('role')!r}, "
                            f"expected {expected!r} (roles must alternate user, assistant, ...)")
        turns.append((f"'messages'[{i + len(system)}].content", message.get("content")))
    if system and turns and isinstance(turns[0][1], str):
        turns[0] = (turns[0][0], f"{system[0]}\n\n{turns[0][1]}")
    return turns


_READERS = {"lima": _turns_lima, "instruction": _turns_instruction, "messages": _turns_messages}


def parse_record(record: object, path: str, line: int, schema: str = "auto",
                 for_training: bool | None = True) -> Conversation:
    """One JSONL record to a Conversation; raises DataError naming `path:line` and the field.

    `for_training`: True needs a conversation ending with the assistant, False a prompt ending with the
    user, None accepts either."""
    where = f"{path}:{line}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    found = detect_schema(record) if schema == "auto" else schema
    if found not in _READERS:
        raise DataError(f"{where}: unknown schema (fields {sorted(record)}); expected one of: "
                        "'conversations' (LIMA), 'instruction'+'response', 'messages'")
    if schema != "auto" and detect_schema(record) != schema:
        raise DataError(f"{where}: schema {schema!r} was asked for, but the record has fields {sorted(record)}")
    named_turns = _READERS[found](record, where)
    for i, (field, turn) in enumerate(named_turns):
        if not isinstance(turn, str):
            raise DataError(f"{where}: field {field} (turn {i}) is {type(turn).__name__}, expected a string")
        if not turn.strip():
            raise DataError(f"{where}: field {field} (turn {i}) is empty")
    turns = [turn for _, turn in named_turns]
    if not turns:
        raise DataError(f"{where}: no turns")
    if for_training and len(turns) % 2:
        raise DataError(f"{where}: {len(turns)} turns; a training conversation must end with the "
                        "assistant (user, assistant, ...)")
    if for_training is False and len(turns) % 2 == 0:
        raise DataError(f"{where}: {len(turns)} turns; a prompt must end with the user")
    source = record.get("source", "")
    if not isinstance(source, str):
        raise DataError(f"{where}: field 'source' is {type(source).__name__}, expected a string")
    return Conversation(tuple(turns), source, path, line)


def numbered_lines(path: str | pathlib.Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each non-blank line of a file."""
    path = as_path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open("r", encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if text.strip():
                yield line_no, text


def parse_json_line(text: str, path: str | pathlib.Path, line: int) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line}: malformed JSON: {e.msg} (column {e.colno})") from None


def iter_jsonl(path: str | pathlib.Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) for each non-blank line; malformed JSON raises DataError with the line."""
    for line_no, text in numbered_lines(path):
        yield line_no, parse_json_line(text, path, line_no)


def read_conversations(path: str | pathlib.Path, schema: str = "auto",
                       for_training: bool | None = True) -> list[Conversation]:
    """Every conversation in a JSONL file; the first bad record raises DataError."""
    return [parse_record(record, str(path), line, schema, for_training) for line, record in iter_jsonl(path)]
