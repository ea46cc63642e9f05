"""Two response files on the same prompts, matched into pairs, and the judgments file that records each
verdict the moment it is made (append, flush, fsync) so a session can be interrupted and resumed.

A response file is JSONL with, per line, the prompt and the answer, in the fields of lima_jax's answer
records (`lima_jax.records`, what `lima_jax.generate --out` writes): `input` (the user turns), else
`prompt` (another system's file: a string, or the conversation ending with the user, of which the user
turns are kept), and `response` (with `responses`, one answer per round of a multi-turn question). Other
fields are ignored. Prompts are matched by their text, so both files may list them in any order.

Every path may be local or a gs:// URL (`lima_jax.paths`). A local judgments file is appended to and
synced line by line; on an object store (gs://), which cannot append, each judgment rewrites the object,
which becomes visible only once complete.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import random
from typing import Iterator, Sequence

from lima_jax.data.formats import iter_jsonl, parse_json_line
from lima_jax.errors import DataError
from lima_jax.paths import PathLike, as_path, is_remote
from lima_jax.records import ANSWER_FIELDS

CHOICES = ("a", "b", "tie")
# The fields of an answer record (`lima_jax.records.ANSWER_FIELDS`) that pairing reads.
INPUT, PROMPT, RESPONSE, RESPONSES = "input", "prompt", "response", "responses"
READ_FIELDS = (INPUT, PROMPT, RESPONSE, RESPONSES)
assert set(READ_FIELDS) <= set(ANSWER_FIELDS), "lima_jax.records renamed an answer field pairing reads"


@dataclasses.dataclass(frozen=True)
class Response:
    prompt: tuple[str, ...]  # the user's turns
    text: str  # the answer (a transcript of all rounds for multi-turn questions)
    where: str

    @property
    def key(self) -> str:
        return json.dumps(self.prompt, ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class Pair:
    """One prompt with system A's and system B's answers."""

    pair_id: str
    prompt: tuple[str, ...]
    a: str
    b: str

    @property
    def prompt_text(self) -> str:
        return self.prompt[0] if len(self.prompt) == 1 else "\n\n".join(
            f"[turn {i + 1}] {t}" for i, t in enumerate(self.prompt))

    @property
    def answers_sha(self) -> str:
        """Which two answers are judged: A's then B's (system order, whatever the display order)."""
        return hashlib.sha1(f"{self.a}\0{self.b}".encode("utf-8")).hexdigest()


def _answer_text(record: dict, prompt: Sequence[str], where: str) -> str:
    responses = record.get(RESPONSES)
    if isinstance(responses, list) and len(responses) > 1:
        if len(responses) != len(prompt) or not all(isinstance(r, str) for r in responses):
            raise DataError(f"{where}: field '{RESPONSES}' must hold one string per user turn ({len(prompt)})")
        return "\n\n".join(f"[answer {i + 1}] {r}" for i, r in enumerate(responses))
    text = record.get(RESPONSE)
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{RESPONSE}' must be a string")
    return text


def parse_response(record: object, path: str, line: int) -> Response:
    where = f"{path}:{line}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object")
    prompt = record.get(INPUT, record.get(PROMPT))
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(t, str) for t in prompt):
        raise DataError(f"{where}: field '{INPUT}' (or '{PROMPT}') must be a string or a non-empty list of "
                        "strings")
    if INPUT not in record and len(prompt) % 2 == 0:
        raise DataError(f"{where}: field '{PROMPT}' has {len(prompt)} turns; it must end with the user")
    if INPUT not in record:  # a conversation prefix: the user turns are what identifies the prompt
        prompt = prompt[::2] if len(prompt) > 1 else prompt
    return Response(tuple(prompt), _answer_text(record, prompt, where), where)


def read_responses(path: PathLike) -> dict[str, Response]:
    """{prompt key: Response}; a prompt that appears twice raises DataError naming both lines."""
    responses: dict[str, Response] = {}
    for line, record in iter_jsonl(path):
        response = parse_response(record, str(path), line)
        if response.key in responses:
            raise DataError(f"{response.where}: the same prompt as {responses[response.key].where}")
        responses[response.key] = response
    if not responses:
        raise DataError(f"{path}: no responses")
    return responses


def pair_id(prompt_key: str) -> str:
    return hashlib.sha1(prompt_key.encode("utf-8")).hexdigest()[:12]


def make_pairs(a_path: PathLike, b_path: PathLike) -> list[Pair]:
    """Pairs in A's file order; both files must answer exactly the same prompts."""
    a, b = read_responses(a_path), read_responses(b_path)
    for mine, other, other_path in ((a, b, b_path), (b, a, a_path)):
        missing = [r for k, r in mine.items() if k not in other]
        if missing:
            raise DataError(f"{missing[0].where}: this prompt has no answer in {other_path} "
                            f"({len(missing)} prompt(s) unmatched); both files must answer the same prompts")
    return [Pair(pair_id(k), r.prompt, r.text, b[k].text) for k, r in a.items()]


def first_shown(pair: Pair, seed: int) -> str:
    """Which system's answer is shown as "Response 1" ("a" or "b"): random, but fixed for (seed, pair) so
    a resumed session shows a pair the same way."""
    return random.Random(f"{seed}:{pair.pair_id}").choice(("a", "b"))


def presentation_order(pairs: Sequence[Pair], seed: int) -> list[Pair]:
    """The pairs in a random order that depends only on the seed."""
    order = list(pairs)
    random.Random(seed).shuffle(order)
    return order


# ------------------------------------------------------------------------------------------ judgments


# Every line `JudgmentStore.add` writes starts so (the dict's first key); a cut-off last line that does not is
# no judgment cut short by a crash, but a file that is not a judgments file.
_JUDGMENT_START = b'{"pair_id": "'
_NOT_JUDGMENTS = ("not a judgments file; --judgments must name a new file or one written by "
                  "`lima_jax.eval pairwise` (the file was left as it is)")


def check_judgment(record: object, where: str, hint: str = "") -> dict:
    """`record` if it is a judgment as `JudgmentStore.add` writes it, else DataError naming `where`."""
    if not (isinstance(record, dict) and isinstance(record.get("pair_id"), str) and record.get("winner") in CHOICES
            and {"a_name", "b_name"} <= set(record)):
        raise DataError(f"{where}: not a judgment (needs pair_id, a_name, b_name, winner in {CHOICES})"
                        + (f": {hint}" if hint else ""))
    return record


def _is_cut_judgment(tail: bytes) -> bool:
    """Whether a last line without its newline is the beginning of a line `add` writes, cut by a crash."""
    return tail.startswith(_JUDGMENT_START) or _JUDGMENT_START.startswith(tail)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class JudgmentStore:
    """An append-only JSONL file of judgments, one line per pair, synced to disk as each one is made.

    Every line names the two systems (`a_name`, `b_name`); reopening a file made for other systems is an
    error, so two comparisons never mix. The whole file is checked before anything is written: a file that
    is not a judgments file (say a text file passed by mistake) is refused and left byte for byte as it was.
    A last line cut short by a crash (never acknowledged: it starts like every line this class writes, and
    every line before it is a judgment) is cut off; the complete lines before it are never rewritten. Every
    line also holds `answers_sha` (see `check`).
    """

    def __init__(self, path: PathLike, a_name: str, b_name: str):
        self.path = as_path(path)
        self.a_name, self.b_name = a_name, b_name
        self._remote = is_remote(self.path)  # an object store: no append, each add rewrites the object
        self._remote_data = b""
        self._judged_on: dict[str, tuple[int, str | None]] = {}  # pair_id -> (line, answers_sha) in the file
        self.records = self._load()
        self._done = {r["pair_id"] for r in self.records}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None if self._remote else self.path.open("a", encoding="utf-8")

    def _load(self) -> list[dict]:
        """The judgments already in the file. Every line is checked before anything is written: a file that is
        not a judgments file of these two systems is refused untouched (DataError naming the file and line).
        Only a last line without its newline may be repaired, and only when it is a judgment cut short by a
        crash (it starts like every line `add` writes) after lines that are all judgments."""
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        body_end = data.rfind(b"\n") + 1
        records = []
        for line, text in enumerate(data[:body_end].split(b"\n")[:-1], start=1):
            if text.strip():
                records.append(self._judgment(text, line))
        tail = data[body_end:]
        if tail.strip():  # no final newline: a write interrupted by a crash, or not a judgments file at all
            line = data.count(b"\n") + 1
            try:
                json.loads(tail.decode("utf-8"))
                complete = True
            except (UnicodeDecodeError, ValueError, RecursionError):
                complete = False
            if complete or not _is_cut_judgment(tail):
                record = self._judgment(tail, line)  # refuses anything but a judgment
            else:
                record = None
            if record is not None:  # complete, only its newline is missing: add it
                records.append(record)
                data += b"\n"
                if not self._remote:
                    with self.path.open("ab") as f:
                        f.write(b"\n")
            else:  # cut short (maybe mid-character): cut it off, touching nothing before it
                data = data[:body_end]
                if not self._remote:
                    os.truncate(os.fspath(self.path), len(data))
            if self._remote:
                self.path.write_bytes(data)
        self._remote_data = data if self._remote else b""
        return records

    def _judgment(self, text: bytes, line: int) -> dict:
        """One line of the file as a judgment of this store's two systems, else DataError naming it."""
        where = f"{self.path}:{line}"
        try:
            record = parse_json_line(text.decode("utf-8"), self.path, line)
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 (byte offset {e.start}): {_NOT_JUDGMENTS}") from None
        except DataError as e:
            raise DataError(f"{e}: {_NOT_JUDGMENTS}") from None
        check_judgment(record, where, _NOT_JUDGMENTS)
        if (record.get("a_name"), record.get("b_name")) != (self.a_name, self.b_name):
            raise DataError(f"{where}: judges {record.get('a_name')!r} vs {record.get('b_name')!r}, "
                            f"not {self.a_name!r} vs {self.b_name!r}; use another --judgments file (the file was "
                            "left as it is)")
        self._judged_on.setdefault(record["pair_id"], (line, record.get("answers_sha")))
        return record

    def check(self, pairs: Sequence[Pair]) -> None:
        """Refuses to resume on other answers: a pair of `pairs` judged in the file must have the answers it
        was judged on (say the response files were regenerated since), else DataError naming the line."""
        for pair in pairs:
            line, sha = self._judged_on.get(pair.pair_id, (0, pair.answers_sha))
            if sha != pair.answers_sha:
                raise DataError(f"{self.path}:{line}: this pair was judged on different answers (answers_sha "
                                f"{sha}, now {pair.answers_sha}); use a new --judgments file")

    @property
    def done(self) -> frozenset[str]:
        return frozenset(self._done)

    def add(self, pair: Pair, winner: str, **fields) -> dict:
        """Records the verdict on `pair` (winner: "a", "b" or "tie") and syncs it to disk before returning."""
        if winner not in CHOICES:
            raise ValueError(f"winner={winner!r}: not one of {CHOICES}")
        record = {"pair_id": pair.pair_id, "prompt": list(pair.prompt), "answers_sha": pair.answers_sha,
                  "a_name": self.a_name, "b_name": self.b_name, "winner": winner, **fields, "time": _now()}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self._remote:
            self._remote_data += line.encode("utf-8")
            self.path.write_bytes(self._remote_data)  # visible only once complete
        else:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
        self.records.append(record)
        self._done.add(pair.pair_id)
        return record

    def pending(self, pairs: Sequence[Pair]) -> Iterator[Pair]:
        """The pairs not yet judged, re-checked as the iteration goes (another page may judge one)."""
        for pair in pairs:
            if pair.pair_id not in self._done:
                yield pair

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "JudgmentStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_judgments(path: PathLike) -> list[dict]:
    """Judgments of a file written by `JudgmentStore` (any systems), each checked; a pair judged twice by
    the same rater raises DataError naming both lines."""
    records, seen = [], {}
    for line, record in iter_jsonl(path):
        check_judgment(record, f"{path}:{line}")
        key = json.dumps([record[k] for k in ("pair_id", "a_name", "b_name")] + [record.get("rater")])
        if key in seen:
            raise DataError(f"{path}:{line}: pair_id {record['pair_id']!r} is judged twice by the same rater "
                            f"(also at {path}:{seen[key]})")
        seen[key] = line
        records.append(record)
    if not records:
        raise DataError(f"{path}: no judgments")
    names = {(r["a_name"], r["b_name"]) for r in records}
    if len(names) > 1:
        raise DataError(f"{path}: mixes comparisons {sorted(names)}")
    return records
