"""The record schemas shared by generation, dev reports and evaluation, defined once.

Prompt files (what `lima_jax.generate --prompts` and `config.data.dev_path` read): one JSON object per line in
any of LIMA's `conversations`, the `messages` schema, `instruction`, or question files with `turns` / `text`
(MT-Bench, Vicuna), read into `PromptRecord`s.

Answer files (what `lima_jax.generate --out` and the dev reports write, and `lima_jax.eval` reads): one JSON
object per prompt, in input order, with the fields of `ANSWER_FIELDS`:
  id, input (the prompt record's user turns), prompt (turns of the last round), response, responses (one per
  round), prompt_tokens, response_tokens, stop_reason ("eot", "eos", "max_new_tokens" or "context"),
  where (file:line); dev reports add epoch and step.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Sequence

from lima_jax.data.formats import DataError, iter_jsonl, parse_record
from lima_jax.paths import PathLike, as_path, atomic_write_text
from lima_jax.tokenizer import Tokenizer

PROMPT_FORMATS = ("chat", "completion")  # see `prompt_ids`
STOP_REASONS = ("running", "eot", "eos", "max_new_tokens", "context")
ANSWER_FIELDS = ("id", "input", "prompt", "response", "responses", "prompt_tokens", "response_tokens",
                 "stop_reason", "where")


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One prompt: `turns` end with the user; `followups` are later user turns (MT-Bench) asked after the
    model's own answer to the previous round."""

    id: str
    turns: tuple[str, ...]
    followups: tuple[str, ...]
    where: str
    extra: dict

    @property
    def input(self) -> list[str]:
        return list(self.turns) + list(self.followups)


def _question_turns(record: dict, where: str) -> list[str]:
    turns = record["turns"] if "turns" in record else [record["text"]]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'turns' must be a non-empty list of strings")
    for i, turn in enumerate(turns):
        if not isinstance(turn, str) or not turn.strip():
            raise DataError(f"{where}: field 'turns'[{i}] must be a non-empty string")
    return turns


def parse_prompt(record: object, path: str, line: int) -> PromptRecord:
    """A prompt from any supported schema; raises DataError naming path:line and the field."""
    where = f"{path}:{line}"
    if isinstance(record, dict) and ("turns" in record or "text" in record) and "conversations" not in record:
        questions = _question_turns(record, where)
        turns, followups = (questions[0],), tuple(questions[1:])
    elif isinstance(record, dict) and "instruction" in record and not {"response", "output"} & set(record):
        turns = parse_record({**record, "response": "-"}, path, line, "instruction").turns[:1]
        followups = ()
    else:
        turns, followups = parse_record(record, path, line, for_training=False).turns, ()
    ident = record.get("question_id", record.get("id", line)) if isinstance(record, dict) else line
    extra = {k: record[k] for k in ("category", "source") if k in record and isinstance(record[k], str)}
    return PromptRecord(str(ident), tuple(turns), followups, where, extra)


def read_prompts(path: PathLike) -> list[PromptRecord]:
    """Every prompt of a JSONL file: LIMA `conversations`, `messages`, `instruction`, or question files
    with `turns` / `text` (MT-Bench, Vicuna). The first bad record raises DataError with file:line."""
    prompts = [parse_prompt(record, str(path), line) for line, record in iter_jsonl(path)]
    if not prompts:
        raise DataError(f"{path}: no prompts")
    seen: dict[str, str] = {}
    for p in prompts:
        if p.id in seen:
            raise DataError(f"{p.where}: duplicate id {p.id!r} (first at {seen[p.id]})")
        seen[p.id] = p.where
    return prompts


def prompt_ids(tokenizer: Tokenizer, turns: Sequence[str], prompt_format: str) -> list[int]:
    """A prompt's token ids. "chat": lima_jax's turn format (`Tokenizer.encode_dialog`), the model answers as
    the assistant. "completion": plain text, `<bos> text` with no turn format, the model continues the text
    (a base model, which has no EOT row); such a prompt is one text."""
    if prompt_format == "chat":
        return tokenizer.encode_dialog(turns).ids
    if prompt_format != "completion":
        raise ValueError(f"prompt format {prompt_format!r}: expected one of {PROMPT_FORMATS}")
    (text,) = turns
    return [tokenizer.bos_id] + tokenizer.encode(text)


def check_prompts_fit(prompts: Sequence[PromptRecord], tokenizer: Tokenizer, max_seq_len: int,
                      prompt_format: str = "chat") -> None:
    """Fails before any compilation if a first-round prompt leaves no room for an answer, or if a
    "completion" prompt is not one text (a conversation or a multi-turn question)."""
    for p in prompts:
        if prompt_format == "completion" and len(p.input) != 1:
            raise DataError(f"{p.where}: {len(p.input)} turns; a completion prompt is one text (answer "
                            "conversations and multi-turn questions in the chat format)")
        n = len(prompt_ids(tokenizer, p.turns, prompt_format))
        if n >= max_seq_len:
            raise DataError(f"{p.where}: the prompt is {n} tokens; model.max_seq_len={max_seq_len} leaves no "
                            "room for an answer")


def answer_record(prompt: PromptRecord, conversation: list[str], responses: Sequence[str], prompt_tokens: int,
                  response_tokens: int, stop_reason: str) -> dict:
    """One line of an answer file (see the module docstring); the last round's counts and stop reason."""
    return {"id": prompt.id, "input": prompt.input, "prompt": conversation, "response": responses[-1],
            "responses": list(responses), "prompt_tokens": prompt_tokens, "response_tokens": response_tokens,
            "stop_reason": stop_reason, "where": prompt.where, **prompt.extra}


def write_jsonl(path: PathLike, records: Sequence[dict]) -> None:
    """Writes records atomically: a crash never leaves half a file."""
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def read_answers(path: PathLike) -> list[dict]:
    """The records of an answer file written by `write_jsonl`; DataError naming file:line for a bad line."""
    records = []
    for line, record in iter_jsonl(as_path(path)):
        if not isinstance(record, dict) or any(f not in record for f in ("id", "response", "response_tokens",
                                                                           "stop_reason")):
            raise DataError(f"{path}:{line}: not an answer record (needs id, response, response_tokens, "
                            "stop_reason)")
        records.append(record)
    return records
