"""The tokenizer (three file formats behind one interface), LIMA's end-of-turn (EOT) token, and the one turn
format.

`encode_dialog` is the only place a conversation becomes token ids, used by training and by generation alike,
so the two can never tokenize a prompt differently:

    <bos> user_1 <eot> assistant_1 <eot> user_2 <eot> assistant_2 <eot> ...

Each utterance is encoded on its own (never a string template that is re-split), and every assistant token
including its EOT is a training target, so the model learns to stop. `encode` never parses special tokens:
a user who types `<eot>`, `<s>` or `<|eot_id|>` gets the ids of that text, never the special id.

Backends, chosen by the file's content (not its name); a folder is searched for `tokenizer.model`, then
`tokenizer.json`:
- `sentencepiece`: a sentencepiece model (LLaMA-1/2's `tokenizer.model`, the toy and llama2.c tokenizers).
- `tiktoken`: Meta's LLaMA-3 `tokenizer.model`, lines of `base64-token rank`, read with `tiktoken` using
  Meta's split pattern and the 256 special tokens numbered from the last rank + 1 (`LLAMA3_SPECIAL_TOKENS`,
  the names of Meta's LLaMA-3 `llama/tokenizer.py`; LLaMA-3.1+ renamed some reserved ids, whose names are
  then read from a `tokenizer.json` instead).
- `huggingface`: a Hugging Face `tokenizers` file, `tokenizer.json` (LLaMA-3.x's on the Hub, or a
  sentencepiece LLaMA converted to it).

BOS, EOS and EOT per family:
- `llama` (LLaMA-1/2 and every sentencepiece model): BOS and EOS are the model's own (1 and 2 for LLaMA).
- `llama3` (a file holding `<|begin_of_text|>` and `<|end_of_text|>`): BOS 128000, EOS 128001.
- EOT (`config.tokenizer.eot`): `"new_row"` (the paper's recipe, the default) is a new id equal to the
  tokenizer's size (32,000 for LLaMA, 128,256 for LLaMA-3), distinct from EOS and without pretraining
  meaning; the model's vocabulary is then the tokenizer's size + 1 and a pretrained checkpoint grows by that
  row. Or it names one of the tokenizer's own special tokens, e.g. `"<|eot_id|>"` or
  `"<|reserved_special_token_0|>"` for LLaMA-3: no vocabulary growth, and the row keeps its pretrained
  values. BOS and EOS cannot be EOT (a model stops at EOS too, and stop reasons tell the two apart).
  A new row starts as the mean of the pretrained rows, or (`config.tokenizer.eot_init`: "bos" / "eos") as a
  copy of the token that ended documents in pretraining, so the model predicts EOT where a text would end.

The file may be local or a gs:// URL (read through `lima_jax.paths`). The command line lives in the data
entry point: `python -m lima_jax.data tokenizer train --input data/toy_lima.jsonl --output
data/toy_tokenizer.model` builds the toy tokenizer that ships with the repo, and `python -m lima_jax.data
tokenizer encode --tokenizer data/toy_tokenizer.model '["Hi", "Hello!"]'` shows how turns are tokenized.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import io
import re
from typing import Any, Iterable, Iterator, Protocol, Sequence

import sentencepiece as spm
from etils import epath

from lima_jax.errors import ConfigError
from lima_jax.paths import PathLike, as_path

EOT_NEW_ROW = "new_row"  # config.tokenizer.eot: a new id after the tokenizer's own (the paper's recipe)
EOT_PIECE = "<eot>"  # how a new-row EOT is shown (and exported)
# config.tokenizer.eot_init: what a new EOT row of a pretrained checkpoint starts as. "mean": the mean of the
# existing rows (a neutral token); "bos" / "eos": a copy of that token's rows, for a model whose pretraining
# ended every document with it (llama2.c's TinyStories models start each story with BOS; LLaMA ends with EOS),
# so EOT starts out predicted exactly where a document used to end.
EOT_INIT_CHOICES = ("mean", "bos", "eos")
FOLDER_FILES = ("tokenizer.model", "tokenizer.json")  # looked for in this order when the path is a folder

LLAMA3_BOS, LLAMA3_EOS = "<|begin_of_text|>", "<|end_of_text|>"
# Meta's LLaMA-3 `llama/tokenizer.py`: the split pattern and the 256 special tokens after the 128,000 ranks.
LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                        r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL_TOKENS = (
    (LLAMA3_BOS, LLAMA3_EOS) + tuple(f"<|reserved_special_token_{i}|>" for i in range(4))
    + ("<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>")
    + tuple(f"<|reserved_special_token_{i}|>" for i in range(5, 251)))
# Meta's limits for one tiktoken call (pyo3 panics beyond 400k characters; tiktoken issue 195 for long runs).
TIKTOKEN_MAX_CHARS = 400_000
TIKTOKEN_MAX_RUN = 25_000
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+\r?")
_LONG_RUN = re.compile(rf"\s{{{TIKTOKEN_MAX_RUN + 1}}}|\S{{{TIKTOKEN_MAX_RUN + 1}}}")


@dataclasses.dataclass(frozen=True)
class EncodedDialog:
    ids: list[int]
    assistant_mask: list[bool]  # True for tokens of assistant utterances, their EOT included


class Backend(Protocol):
    """One tokenizer file format. `specials` are the file's special tokens by name; `encode` never yields them."""

    kind: str  # "sentencepiece", "tiktoken" or "huggingface"
    family: str  # "llama" or "llama3": which BOS/EOS convention the file follows
    size: int  # ids the file defines, its special tokens included
    specials: dict[str, int]
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...  # ids in [0, size), none of them special

    def piece(self, token: int) -> str: ...  # the token as the format shows it


class SentencePieceBackend:
    kind, family = "sentencepiece", "llama"

    def __init__(self, data: bytes, path: epath.Path):
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"{path}: not a sentencepiece model ({e}), nor a tiktoken tokenizer.model (lines "
                              "of `base64-token rank`) or a Hugging Face tokenizer.json (docs/model.md)") from None
        self.size = self.sp.get_piece_size()
        # Control pieces (<s>, </s>) are never produced from text; user-defined ones are, so they are not special.
        self.specials = {self.sp.id_to_piece(i): i for i in range(self.size) if self.sp.is_control(i)}
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0:
            raise ConfigError(f"{path}: the sentencepiece model has no BOS id")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def piece(self, token: int) -> str:
        return self.sp.id_to_piece(token)


def _family_ids(specials: dict[str, int], path: epath.Path, kind: str) -> tuple[str, int, int]:
    """(family, bos id, eos id) of a file by the special tokens it holds."""
    for family, bos, eos in (("llama3", LLAMA3_BOS, LLAMA3_EOS), ("llama", "<s>", "</s>")):
        if bos in specials and eos in specials:
            return family, specials[bos], specials[eos]
    raise ConfigError(f"{path}: a {kind} tokenizer without the special tokens of a known family "
                      f"(LLaMA-3: {LLAMA3_BOS} and {LLAMA3_EOS}; LLaMA-1/2: <s> and </s>), so BOS and EOS are "
                      "unknown")


@functools.lru_cache(maxsize=1)
def byte_level_alphabet() -> tuple[str, ...]:
    """GPT-2's byte-to-character table, the pieces of a byte-level BPE `tokenizer.json` (so tiktoken's and
    Hugging Face's backends show a LLaMA-3 token the same way)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


def _tiktoken_ranks(data: bytes, path: epath.Path) -> dict[bytes, int]:
    ranks = {}
    for number, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        token, _, rank = line.partition(b" ")
        try:
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{path}:{number}: not a `base64-token rank` line of a tiktoken tokenizer.model") \
                from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ConfigError(f"{path}: the ranks of this tiktoken tokenizer.model are not 0..{len(ranks) - 1}, each "
                          "once (a token listed twice, or a gap)")
    return ranks


class TiktokenBackend:
    """Meta's LLaMA-3 tokenizer: the ranks file with Meta's split pattern and special tokens."""

    kind, family = "tiktoken", "llama3"

    def __init__(self, data: bytes, path: epath.Path):
        import tiktoken

        ranks = _tiktoken_ranks(data, path)
        self.mergeable_ranks = ranks  # token bytes -> rank, as the file lists them (the export rebuilds a BPE)
        self.specials = {name: len(ranks) + i for i, name in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks,
                                          special_tokens=self.specials)
        self.size = self.encoding.n_vocab
        self.bos_id, self.eos_id = self.specials[LLAMA3_BOS], self.specials[LLAMA3_EOS]
        self._names = {i: name for name, i in self.specials.items()}

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in _tiktoken_parts(text):
            # disallowed_special=(): special-token text is encoded as text (allowed_special is empty).
            ids.extend(self.encoding.encode(part, allowed_special=set(), disallowed_special=()))
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def piece(self, token: int) -> str:
        if token in self._names:
            return self._names[token]
        alphabet = byte_level_alphabet()
        return "".join(alphabet[b] for b in self.encoding.decode_single_token_bytes(token))


def _tiktoken_parts(text: str) -> Iterator[str]:
    """`text` in pieces tiktoken encodes safely, cut as Meta's tokenizer cuts them: every TIKTOKEN_MAX_CHARS
    characters, and inside a run of more than TIKTOKEN_MAX_RUN whitespace or non-whitespace characters."""
    for start in range(0, len(text), TIKTOKEN_MAX_CHARS):
        chunk = text[start:start + TIKTOKEN_MAX_CHARS]
        if not _LONG_RUN.search(chunk):  # the common case, where the loop below would not cut
            yield chunk
            continue
        run, is_space, cut = 0, chunk[:1].isspace(), 0
        for i, char in enumerate(chunk):
            if char.isspace() != is_space:
                run, is_space = 1, char.isspace()
                continue
            run += 1
            if run > TIKTOKEN_MAX_RUN:
                yield chunk[cut:i]
                cut, run = i, 1
        yield chunk[cut:]


class HuggingFaceBackend:
    """A `tokenizers` file (tokenizer.json): plain text encoded without BOS and without matching special tokens."""

    kind = "huggingface"

    def __init__(self, data: bytes, path: epath.Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.hf = HFTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on a malformed file
            raise ConfigError(f"{path}: not a Hugging Face tokenizer.json ({str(e).strip()})") from None
        self.hf.encode_special_tokens = True  # special-token text in the input is text
        self.specials = {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        self.size = self.hf.get_vocab_size(with_added_tokens=True)
        self.family, self.bos_id, self.eos_id = _family_ids(self.specials, path, self.kind)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def piece(self, token: int) -> str:
        return self.hf.id_to_token(token)


def tokenizer_file(path: PathLike, setting: str = "config.tokenizer.path") -> epath.Path:
    """The tokenizer file `path` names: itself, or in a folder the first of FOLDER_FILES present."""
    path = as_path(path)
    if path.is_dir():
        for name in FOLDER_FILES:
            if (path / name).is_file():
                return path / name
        raise ConfigError(f"{path}: a folder without {' or '.join(FOLDER_FILES)} ({setting})")
    if not path.is_file():
        raise ConfigError(f"{path}: tokenizer file not found ({setting})")
    return path


def detect_backend(data: bytes) -> str:
    """The backend of a tokenizer file by its content: JSON is `tokenizers`, `base64 rank` lines tiktoken,
    anything else is tried as a sentencepiece model (a binary protobuf)."""
    if data.lstrip()[:1] == b"{":
        return HuggingFaceBackend.kind
    if _TIKTOKEN_LINE.fullmatch(data[:data.find(b"\n")] if b"\n" in data else data):
        return TiktokenBackend.kind
    return SentencePieceBackend.kind


BACKENDS = {b.kind: b for b in (SentencePieceBackend, TiktokenBackend, HuggingFaceBackend)}


class Tokenizer:
    """A tokenizer file (any backend) plus the EOT choice; see the module docstring."""

    def __init__(self, path: PathLike, setting: str = "config.tokenizer.path", eot: str = EOT_NEW_ROW,
                 eot_setting: str = "config.tokenizer.eot"):
        """`path` is a tokenizer file or a folder holding one; `setting` and `eot_setting` name where the path
        and the EOT choice came from (a config field or a flag), for error messages."""
        self.path = tokenizer_file(path, setting)
        data = self.path.read_bytes()  # through epath, so a gs:// file loads like a local one
        self.backend: Backend = BACKENDS[detect_backend(data)](data, self.path)
        self.bos_id, self.eos_id = self.backend.bos_id, self.backend.eos_id
        self.eot = eot
        self.eot_id = self._eot_id(eot, eot_setting)
        self._dropped = frozenset(self.backend.specials.values()) | {self.bos_id, self.eos_id, self.eot_id}

    def _eot_id(self, eot: Any, setting: str) -> int:
        if eot == EOT_NEW_ROW:
            return self.backend.size
        usable = sorted((name for name, i in self.backend.specials.items() if i not in (self.bos_id, self.eos_id)),
                        key=lambda name: "reserved" in name)  # named ones first: <|eot_id|> before reserved ids
        if isinstance(eot, str) and eot in usable:
            return self.backend.specials[eot]
        shown = ", ".join(usable[:4]) + (f" ... ({len(usable)} in all)" if len(usable) > 4 else "")
        why = ("BOS and EOS cannot be EOT" if eot in self.backend.specials
               else f"not a special token of {self.path}")
        raise ConfigError(f"{setting}={eot!r}: {why}. Use {EOT_NEW_ROW!r} (a new id {self.backend.size}, the "
                          "model's vocabulary grows by one: the paper's recipe)"
                          + (f" or one of this {self.backend.kind} tokenizer's special tokens: {shown}" if usable
                             else f"; this {self.backend.kind} tokenizer has no other special token to use"))

    @property
    def base_vocab_size(self) -> int:
        """Ids the tokenizer file defines, its special tokens included."""
        return self.backend.size

    @property
    def eot_is_new_row(self) -> bool:
        return self.eot_id == self.backend.size

    @property
    def vocab_size(self) -> int:
        """Model vocabulary: the tokenizer's ids, plus EOT when it is a new row."""
        return self.backend.size + int(self.eot_is_new_row)

    @property
    def special_ids(self) -> frozenset[int]:
        """Every id `decode` leaves out: the file's special tokens, BOS, EOS and EOT."""
        return self._dropped

    def describe(self) -> str:
        """One line of what was chosen: the file, backend, family, BOS/EOS/EOT and the model vocabulary."""
        eot = (f"EOT {self.eot_id} (a new row: {EOT_NEW_ROW})" if self.eot_is_new_row
               else f"EOT {self.eot_id} {self.eot}")
        return (f"{self.path} ({self.backend.kind}, {self.backend.family} family, {self.base_vocab_size:,} ids): "
                f"BOS {self.bos_id} {self.id_to_piece(self.bos_id)}, EOS {self.eos_id} "
                f"{self.id_to_piece(self.eos_id)}, {eot}; model vocabulary {self.vocab_size:,}")

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, no BOS; special-token text is encoded as text."""
        return self.backend.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, with special ids (EOT, BOS, EOS, the file's other specials) left out."""
        return self.backend.decode([int(i) for i in ids
                                    if int(i) not in self._dropped and 0 <= int(i) < self.backend.size])

    def id_to_piece(self, token: int) -> str:
        """The piece of one id as text: `<eot>` for a new-row EOT, else the backend's own piece."""
        return EOT_PIECE if int(token) == self.eot_id and self.eot_is_new_row else self.backend.piece(int(token))

    def encode_dialog(self, turns: Sequence[str]) -> EncodedDialog:
        """Turns alternate user, assistant, user, ...; each is followed by EOT. See the module docstring."""
        ids, mask = [self.bos_id], [False]
        for i, turn in enumerate(turns):
            piece = self.encode(turn) + [self.eot_id]
            ids.extend(piece)
            mask.extend([i % 2 == 1] * len(piece))
        return EncodedDialog(ids, mask)


def eot_choice(config: Any) -> str:
    """`config.tokenizer.eot`, or the paper's new row where a config (an older config.json) lacks it."""
    return config.tokenizer.get("eot", EOT_NEW_ROW)


def eot_init(config: Any) -> str:
    """`config.tokenizer.eot_init`, or "mean" where a config (an older config.json) lacks it."""
    return config.tokenizer.get("eot_init", "mean")


def eot_init_row(config: Any, tokenizer: Tokenizer) -> int | None:
    """The id whose rows a new EOT row copies (`config.tokenizer.eot_init`), or None for the mean row."""
    return {"mean": None, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id}[eot_init(config)]


def load_tokenizer(config: Any) -> Tokenizer:
    """The tokenizer of a config: `config.tokenizer.path` (a file or folder) with `config.tokenizer.eot`; errors
    name the config file and the field."""
    where = config.get("source_file", "") or "<config>"
    return Tokenizer(config.tokenizer.path, f"config.tokenizer.path of {where}", eot_choice(config),
                     f"{where}: config.tokenizer.eot")


def train_sentencepiece(texts: Iterable[str], output: PathLike, vocab_size: int) -> None:
    """Trains a byte-fallback BPE sentencepiece model (LLaMA's special ids: unk 0, bos 1, eos 2) and writes
    it to `output` (a local path or a gs:// URL)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        num_threads=1, split_digits=True, minloglevel=2)
    output = as_path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(model.getvalue())
