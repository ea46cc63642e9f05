"""Reading conversations from JSONL in the three common SFT schemas, with errors that name file and line.

  LIMA (GAIR release):   {"conversations": [user, assistant, user, ...], "source": "stackexchange"}
  instruction/response:  {"instruction": str, "input": str (optional), "response"|"output": str}
  chat messages:         {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}

A training conversation alternates user/assistant, starts with the user and ends with the assistant. A
prompt (for generation) ends with the user. A leading system message is joined to the first user turn
(LIMA's turn format has no system slot).

Files are read as bytes in bounded chunks and decoded line by line, so a line that is not UTF-8, longer
than `max_line_bytes` (`config.data.max_line_bytes`), nested deeper than MAX_JSON_DEPTH or holding a lone
surrogate is one DataError naming `file:line`, never a crash or a line held whole in memory.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
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


# Limits on one line of a JSONL file, checked before (or while) it is parsed, so a hostile or broken file
# fails with its file and line instead of exhausting memory or the stack.
MAX_LINE_BYTES = 4 * 2**20  # the default of `config.data.max_line_bytes`; LIMA's longest line is 18 KB
MAX_JSON_DEPTH = 64  # arrays and objects inside each other; a conversation record needs 3
_READ_CHUNK = 2**20  # bytes read at a time: a line is never held whole before its length is known
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # how a lone surrogate gets into JSON text


def _raw_lines(f, max_line_bytes: int) -> Iterator[tuple[int, bytes | int]]:
    """(line number, the line's bytes without its newline) for each line of a binary file; for a line over
    `max_line_bytes` its length instead, counted while it is skipped in chunks (never held in memory)."""
    line_no, parts, size, too_long = 1, [], 0, False
    while block := f.read(_READ_CHUNK):
        start = 0
        while True:
            end = block.find(b"\n", start)
            piece = block[start:] if end < 0 else block[start:end]
            size += len(piece)
            if size > max_line_bytes:
                too_long, parts = True, []
            elif not too_long:
                parts.append(piece)
            if end < 0:
                break
            yield line_no, size if too_long else b"".join(parts)
            line_no, parts, size, too_long, start = line_no + 1, [], 0, False, end + 1
    if size:  # a last line without a newline
        yield line_no, size if too_long else b"".join(parts)


def read_lines(path: str | pathlib.Path, max_line_bytes: int = MAX_LINE_BYTES,
               ) -> Iterator[tuple[int, str | DataError]]:
    """(line number, text) for each non-blank line of a file, read as bytes and decoded line by line; a line
    that is not UTF-8 or longer than `max_line_bytes` gives a DataError naming `file:line` in place of its
    text (the file is read on after it: the caller decides whether to stop or to skip)."""
    path = as_path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open("rb") as f:
        for line_no, raw in _raw_lines(f, max_line_bytes):
            if isinstance(raw, int):
                yield line_no, DataError(
                    f"{path}:{line_no}: line of {raw:,} bytes, over the limit of {max_line_bytes:,} bytes "
                    "(config.data.max_line_bytes / --max_line_bytes); is this a JSONL file?")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, DataError(f"{path}:{line_no}: not valid UTF-8 (byte offset {e.start}: "
                                         f"{raw[e.start:e.start + 1].hex()}); save the file as UTF-8")
                continue
            if text.strip():
                yield line_no, text


def numbered_lines(path: str | pathlib.Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """(line number, text) for each non-blank line of a file; the first bad line (`read_lines`) raises."""
    for line_no, text in read_lines(path, max_line_bytes):
        if isinstance(text, DataError):
            raise text
        yield line_no, text


def _json_depth_over(text: str, limit: int) -> bool:
    """Whether arrays/objects nest deeper than `limit` in JSON `text` (brackets inside strings do not count)."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for ch in _NOT_A_BRACKET.sub("", _JSON_STRING.sub('""', text)):
        depth += 1 if ch in "[{" else -1
        if depth > limit:
            return True
    return False


def _field(parent: str, key: object) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else repr(key)


def _lone_surrogate(value: object, field: str = "") -> tuple[str, int, str] | None:
    """(what holds it: "field 'x'[1]", "field name ..." or "the value", character offset, the surrogate)
    of the first string or key in `value` that holds a lone surrogate; None if there is none."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return (f"field {field}" if field else "the value"), e.start, value[e.start]
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        inner = _field(field, key)
        if isinstance(key, str) and (found := _lone_surrogate(key, inner)):
            return (f"field name {inner}",) + found[1:]
        if found := _lone_surrogate(item, inner):
            return found
    return None


def parse_json_line(text: str, path: str | pathlib.Path, line: int) -> object:
    """One line of JSON; malformed JSON, nesting deeper than MAX_JSON_DEPTH, or a string holding a lone
    surrogate (`"\\ud800"`, which no UTF-8 text can hold) raise DataError naming `path:line`."""
    where = f"{path}:{line}"
    if _json_depth_over(text, MAX_JSON_DEPTH):
        raise DataError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels of arrays/objects")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:  # not reached after the depth check; kept so no input can escape as a crash
        raise DataError(f"{where}: JSON nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text) and (found := _lone_surrogate(value)):
        holder, offset, char = found
        raise DataError(f"{where}: {holder} holds a lone surrogate (\\u{ord(char):04x} at character {offset}), "
                        "which is not valid Unicode text; fix or drop the line")
    return value


def iter_jsonl(path: str | pathlib.Path, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) for each non-blank line; a bad line (not UTF-8, too long, malformed JSON,
    too deep, a lone surrogate) raises DataError with the line."""
    for line_no, text in numbered_lines(path, max_line_bytes):
        yield line_no, parse_json_line(text, path, line_no)


def read_conversations(path: str | pathlib.Path, schema: str = "auto", for_training: bool | None = True,
                       max_line_bytes: int = MAX_LINE_BYTES) -> list[Conversation]:
    """Every conversation in a JSONL file; the first bad record raises DataError."""
    return [parse_record(record, str(path), line, schema, for_training)
            for line, record in iter_jsonl(path, max_line_bytes)]
