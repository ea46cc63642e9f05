"""The Hugging Face tokenizer of an export: a `tokenizers` BPE built from the sentencepiece model that encodes
exactly as sentencepiece does, with lima_jax's EOT as a special token and a chat template for its turn format.

Special-token text typed by a user. Sentencepiece, and so `Tokenizer.encode_dialog`, encodes the text `<eot>`,
`<s>` or `</s>` inside a turn as ordinary characters; Hugging Face matches added special tokens in any input
string, so a message containing `<eot>` would end its turn early (and could inject an assistant turn). The
chat template therefore escapes every special token's text in message content: it inserts `ESCAPE` (U+FDD0,
a Unicode noncharacter, reserved for internal use and never in real text) between the first two characters
of every special token, `<eot>` -> `<\ufdd0eot>`, `<|eot_id|>` -> `<\ufdd0|eot_id|>`, which no longer match;
an `ESCAPE` the user wrote after such a first character is doubled first, so the escaping is reversible.
The first step of the tokenizer's normalizer undoes it (`<` +
ESCAPE -> `<`) before sentencepiece's own normalization, so the content encodes exactly as lima_jax encodes
it, while the template's own `<s>` and `<eot>` still become their ids. `split_special_tokens` was not used:
transformers' `apply_chat_template` tokenizes the rendered text with the tokenizer's setting, so the template's
own special tokens would become text too.

A plain `tokenizer(text)` call still follows the Hugging Face convention and matches special-token text;
`tokenizer(text, split_special_tokens=True)` encodes such text as lima_jax does. Either call differs from
sentencepiece only for text containing a first character of a special token followed by U+FDD0. Clients that
do not run the normalizer (llama.cpp, transformers' sentencepiece `LlamaTokenizer`) see the escape only in
content that contains a special token's text (any `<|` for LLaMA-3)."""
from __future__ import annotations

import json
from typing import Any, Sequence

from etils import epath

from lima_jax.conversion.source import require
from lima_jax.paths import as_path
from lima_jax.tokenizer import EOT_PIECE, LLAMA3_SPLIT_PATTERN, Tokenizer, byte_level_alphabet

_SP_NORMAL, _SP_USER_DEFINED, _SP_BPE = 1, 4, 2
ESCAPE = "\ufdd0"


def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal (non-ASCII characters as \\u escapes)."""
    return "'" + text.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"


ESCAPE_BY_TOKEN_MAX = 8  # special tokens sharing a two-character prefix that are still escaped one by one


def _escapes(specials: Sequence[str]) -> list[tuple[str, str]]:
    """(text, replacement) pairs, applied in order, that leave no special token's text in a string: first
    `<first char> ESCAPE` doubles its ESCAPE, then ESCAPE goes after the first character of each special
    token (`<s>`, `</s>`, `<eot>`: ordinary text such as `<span>` is left alone, so clients that do not run
    the normalizer, llama.cpp and the sentencepiece `LlamaTokenizer`, still read it exactly), or of each
    two-character prefix shared by many tokens: one filter for all of LLaMA-3's 256 `<|...|>` tokens (a
    chain of 256 `replace` filters is too deeply nested for Jinja to compile)."""
    firsts = sorted({token[0] for token in specials})
    by_prefix: dict[str, list[str]] = {}
    for token in specials:
        by_prefix.setdefault(token[:2], []).append(token)
    targets = sorted({t for prefix, tokens in by_prefix.items()
                      for t in (tokens if len(tokens) <= ESCAPE_BY_TOKEN_MAX else [prefix])})
    return ([(c + ESCAPE, c + ESCAPE + ESCAPE) for c in firsts]
            + [(target, target[0] + ESCAPE + target[1:]) for target in targets])


def _unescapes(specials: Sequence[str]) -> list[tuple[str, str]]:
    """The normalizer's literal replacements that undo `_escapes`: `<first char> ESCAPE` -> `<first char>`."""
    return [(c + ESCAPE, c) for c in sorted({token[0] for token in specials})]


def _raise(message: str) -> str:
    """A Jinja statement that fails the rendering with `message` (`raise_exception`: transformers, vLLM,
    llama.cpp and llama-cpp-python all provide it)."""
    return "{{ raise_exception(" + _jinja_string("lima_jax chat template: " + message) + ") }}"


def chat_template(specials: Sequence[str], eot: str = EOT_PIECE) -> str:
    """lima_jax's turn format, `<bos> user <eot> assistant <eot> user <eot> ...` (`eot`: the EOT token's text,
    e.g. `<|eot_id|>` when LLaMA-3's own token is EOT), read as
    `lima_jax.data.formats` reads a `messages` record: an optional leading `system` message is joined to the
    first user message (`system + "\n\n" + user`, LIMA's format has no system slot), then the roles must
    alternate user, assistant, ... starting with the user; anything else, a non-string or empty turn, and
    `add_generation_prompt` after an assistant message raise a template error naming the message. The
    generation prompt adds nothing: the user's `<eot>` already opens the assistant's turn. Each turn's
    content is escaped (`_escapes`) so special-token text in it is encoded as text (module docstring)."""
    filters = "".join(f" | replace({_jinja_string(a)}, {_jinja_string(b)})" for a, b in _escapes(specials))
    order = ("roles must be: an optional system message, then user and assistant alternating, starting with "
             "the user")
    return (
        "{%- if messages | length == 0 %}" + _raise("no messages") + "{%- endif %}"
        "{%- if messages[0]['role'] == 'system' %}"
        "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}{%- set offset = 1 %}"
        "{%- if system is not string %}" + _raise("messages[0] (system): content must be a string") + "{%- endif %}"
        "{%- if turns | length == 0 %}" + _raise("a system message must be followed by a user message")
        + "{%- endif %}"
        "{%- else %}{%- set system = none %}{%- set turns = messages %}{%- set offset = 0 %}{%- endif %}"
        "{{- bos_token }}"
        "{%- for message in turns %}"
        "{%- set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' %}"
        "{%- if message['role'] != expected %}{{ raise_exception('lima_jax chat template: messages[' "
        "~ (loop.index0 + offset) ~ '] has role ' ~ message['role'] ~ ', expected ' ~ expected ~ ' (" + order
        + ")') }}{%- endif %}"
        "{%- if message['content'] is not string %}{{ raise_exception('lima_jax chat template: messages[' "
        "~ (loop.index0 + offset) ~ ']: content must be a string') }}{%- endif %}"
        "{%- set content = message['content'] %}"
        "{%- if loop.first and system is not none %}{%- set content = system ~ '\\n\\n' ~ content %}{%- endif %}"
        "{%- if content | trim == '' %}{{ raise_exception('lima_jax chat template: messages[' "
        "~ (loop.index0 + offset) ~ '] is empty') }}{%- endif %}"
        "{{- content" + filters + " }}" + eot +
        "{%- endfor %}"
        "{%- if add_generation_prompt and turns[-1]['role'] != 'user' %}"
        + _raise("add_generation_prompt needs the last message to be the user's") + "{%- endif %}")


CHAT_TEMPLATE = chat_template(("<unk>", "<s>", "</s>", EOT_PIECE))  # LLaMA's sentencepiece specials


def _bpe_merges(pieces: Sequence[Any]) -> list[tuple[str, str]]:
    """Merge rules that make Hugging Face's rank-based BPE pick what sentencepiece's score-based BPE picks:
    a pair ranks by the score of the piece it forms (higher first)."""
    mergeable = {p.piece: (-p.score, i) for i, p in enumerate(pieces) if p.type == _SP_NORMAL}
    ranked = []
    for piece, rank in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((rank, mergeable[left][1], mergeable[right][1], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def write_hf_tokenizer(tok: Tokenizer, folder: epath.Path, with_eot: bool) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json that encode exactly as `tok` does, the
    original file shipped too (`ship_original_tokenizer`): a sentencepiece model becomes an equivalent BPE
    (`_write_sentencepiece_tokenizer`), a LLaMA-3 tokenizer (tiktoken or tokenizer.json) its byte-level BPE
    (`_write_llama3_tokenizer`)."""
    if tok.backend.kind == "sentencepiece":
        _write_sentencepiece_tokenizer(tok, folder, with_eot)
    else:
        _write_llama3_tokenizer(tok, folder, with_eot)
    ship_original_tokenizer(tok, folder)


def _write_sentencepiece_tokenizer(tok: Tokenizer, folder: epath.Path, with_eot: bool) -> None:
    """tokenizer.json (+ config) reproducing the sentencepiece BPE encoding exactly: same normalization
    (charsmap, whitespace, dummy prefix), byte fallback, BOS added; `<eot>` special when `with_eot`, with a
    chat template that yields `Tokenizer.encode_dialog`'s ids, special-token text in messages included."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, decoders, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    folder = as_path(folder)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(as_path(tok.path).read_bytes())
    require(proto.trainer_spec.model_type == _SP_BPE, tok.path, f"trainer_spec.model_type="
            f"{proto.trainer_spec.model_type}: only BPE sentencepiece models (LLaMA's kind) can be exported")
    require(not any(p.type == _SP_USER_DEFINED for p in proto.pieces), tok.path,
            "user-defined pieces are not supported")
    require(not proto.trainer_spec.treat_whitespace_as_suffix, tok.path, "treat_whitespace_as_suffix=true "
            "is not supported")
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    hf = HFTokenizer(BPE(vocab=vocab, merges=_bpe_merges(proto.pieces), unk_token=unk, fuse_unk=True,
                         byte_fallback=proto.trainer_spec.byte_fallback))
    bos = proto.pieces[tok.bos_id].piece
    eos = proto.pieces[tok.eos_id].piece
    specials = [unk, bos, eos] + ([EOT_PIECE] if with_eot else [])
    require(all(token and ESCAPE not in token for token in specials), tok.path,
            f"special pieces {specials} must be non-empty and free of U+FDD0")
    spec = proto.normalizer_spec
    steps = [normalizers.Replace(a, b) for a, b in _unescapes(specials)]  # before anything else: see above
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # strip and collapse spaces; \A and \z, as ^ and $ match at every line
        steps += [normalizers.Replace(Regex(r"\A +"), ""), normalizers.Replace(Regex(r" +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "\u2581"))
    hf.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    hf.decoder = decoders.Sequence(decode)
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if with_eot:
        require(hf.token_to_id(EOT_PIECE) == tok.eot_id, tok.path, "EOT id mismatch")
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                      special_tokens=[(bos, tok.bos_id)])
    (folder / "tokenizer.json").write_text(hf.to_str(pretty=True), encoding="utf-8")
    ids = {unk: proto.trainer_spec.unk_id, bos: tok.bos_id, eos: tok.eos_id}
    if with_eot:
        ids[EOT_PIECE] = tok.eot_id
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "unk_token": unk,
              "eos_token": EOT_PIECE if with_eot else eos, "add_bos_token": True, "add_eos_token": False,
              # each turn encoded on its own, with sentencepiece's dummy prefix, as `encode_dialog` does:
              # what transformers' slow LlamaTokenizer calls legacy
              "legacy": True, "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000,
              # what LLaMA takes: without it transformers 4's PreTrainedTokenizerFast also returns
              # token_type_ids, which `generate(**inputs)` refuses
              "model_input_names": ["input_ids", "attention_mask"],
              "added_tokens_decoder": added_tokens_decoder(ids)}
    if with_eot:
        config["chat_template"] = chat_template(specials)
    _write_configs(folder, config, ("bos_token", "eos_token", "unk_token"))


def _write_configs(folder: epath.Path, config: dict, special_keys: Sequence[str]) -> None:
    """tokenizer_config.json and special_tokens_map.json (the named special tokens of `config`)."""
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {k: config[k] for k in special_keys}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merge list equivalent to tiktoken's ranks (as Hugging Face's converter builds it): every split of
    a token into two tokens, ordered by the rank of the token they form, then by the ranks of the two parts."""
    merges = []
    for token, rank in ranks.items():
        pairs = [(token[:cut], token[cut:]) for cut in range(1, len(token))
                 if token[:cut] in ranks and token[cut:] in ranks]
        merges.extend((rank, ranks[left], ranks[right], left, right) for left, right in pairs)
    return [(left, right) for *_, left, right in sorted(merges)]


def tiktoken_to_hf(tok: Tokenizer) -> Any:
    """A `tokenizers.Tokenizer` for Meta's tiktoken LLaMA-3 file: the byte-level BPE of Meta's Hugging Face
    tokenizer.json (same vocabulary, merges, split pattern, BOS post-processor, byte-level decoder and special
    tokens), which encodes as tiktoken does."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    alphabet = byte_level_alphabet()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    ranks = tok.backend.mergeable_ranks
    hf = HFTokenizer(BPE(vocab={text(t): r for t, r in ranks.items()},
                         merges=[(text(a), text(b)) for a, b in tiktoken_merges(ranks)], ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    bos = tok.id_to_piece(tok.bos_id)
    hf.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.bos_id)])])
    hf.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    specials = sorted(tok.backend.specials.items(), key=lambda item: item[1])
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in specials])
    require(all(hf.token_to_id(name) == i for name, i in specials), tok.path, "special token ids mismatch")
    return hf


def _llama3_hf(tok: Tokenizer) -> Any:
    """The LLaMA-3 tokenizer as `tokenizers` reads it: a tokenizer.json source as written, tiktoken rebuilt."""
    from tokenizers import Tokenizer as HFTokenizer

    if tok.backend.kind == "huggingface":
        return HFTokenizer.from_str(as_path(tok.path).read_text(encoding="utf-8"))
    return tiktoken_to_hf(tok)


def _write_llama3_tokenizer(tok: Tokenizer, folder: epath.Path, with_eot: bool) -> None:
    """tokenizer.json: the source's byte-level BPE (a tokenizer.json as is, tiktoken rebuilt: `tiktoken_to_hf`)
    plus `<eot>` as an added special token when EOT is a new row, and one normalizer step in front, the
    unescape of the chat template's escape (module docstring; a no-op on text without U+FDD0). The config
    declares every special id, BOS, EOT as eos_token and, with EOT, lima_jax's chat template."""
    from tokenizers import AddedToken, normalizers

    folder = as_path(folder)
    hf = _llama3_hf(tok)
    if with_eot and tok.eot_is_new_row:
        require(hf.get_vocab_size(with_added_tokens=True) == tok.eot_id, tok.path, "the tokenizer's size is not "
                f"{tok.eot_id}, the new-row EOT id")
        hf.add_special_tokens([AddedToken(EOT_PIECE, special=True, normalized=False)])
    added = hf.get_added_tokens_decoder()
    specials = [t.content for _, t in sorted(added.items()) if t.special]
    require(all(token and ESCAPE not in token for token in specials), tok.path,
            "special tokens must be non-empty and free of U+FDD0")
    unescape = [normalizers.Replace(a, b) for a, b in _unescapes(specials)]
    hf.normalizer = normalizers.Sequence(unescape + ([hf.normalizer] if hf.normalizer is not None else []))
    (folder / "tokenizer.json").write_text(hf.to_str(pretty=True), encoding="utf-8")
    decoder = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                        "single_word": t.single_word, "special": t.special} for i, t in sorted(added.items())}
    eos = tok.id_to_piece(tok.eot_id if with_eot else tok.eos_id)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.id_to_piece(tok.bos_id),
              "eos_token": eos, "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000,
              "model_input_names": ["input_ids", "attention_mask"], "added_tokens_decoder": decoder}
    if with_eot:
        config["chat_template"] = chat_template(specials, eos)
    _write_configs(folder, config, ("bos_token", "eos_token"))


def added_tokens_decoder(ids: dict[str, int]) -> dict[str, dict]:
    """tokenizer_config.json's `added_tokens_decoder`: every special token (text -> id) marked special and
    matched as written (not normalized, no stripping). Without it llama.cpp's converter takes the EOT id for
    an unused `[PAD]` and transformers' slow tokenizer does not know `<eot>`."""
    return {str(i): {"content": text, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True} for text, i in sorted(ids.items(), key=lambda item: item[1])}


ORIGINAL_TOKENIZER_FILE = "tokenizer.model"  # the sentencepiece (or Meta tiktoken) file's conventional name
ORIGINAL_FOLDER = "original"  # where a LLaMA-3 export keeps its source file, as Meta's Hugging Face repos do


def original_tokenizer_path(tok: Tokenizer) -> str:
    """Where in an export the original tokenizer file lies: `tokenizer.model` for sentencepiece;
    `original/tokenizer.model` (tiktoken) or `original/tokenizer.json` for LLaMA-3, the layout of Meta's
    Hugging Face repos: a tiktoken file at the top would be read as sentencepiece by llama.cpp's converter
    (which tries tokenizer.model first), and tokenizer.json is the export's own there."""
    if tok.backend.kind == "sentencepiece":
        return ORIGINAL_TOKENIZER_FILE
    name = ORIGINAL_TOKENIZER_FILE if tok.backend.kind == "tiktoken" else "tokenizer.json"
    return f"{ORIGINAL_FOLDER}/{name}"


def ship_original_tokenizer(tok: Tokenizer, folder: epath.Path) -> None:
    """The tokenizer file the model was trained with, copied byte for byte (`original_tokenizer_path`). For
    sentencepiece, transformers' `LlamaTokenizer` and llama.cpp's converter (piece scores and types) read it,
    and without it llama.cpp gives every piece the same score; for LLaMA-3 it is the record of the source
    (the export's tokenizer.json is that file, or its byte-level BPE, plus `<eot>` and the unescape step)."""
    target = as_path(folder) / original_tokenizer_path(tok)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(as_path(tok.path).read_bytes())
