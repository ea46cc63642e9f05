"""A `to_hf` export read by the real client, transformers (the `parity` extra): the original tokenizer file
ships beside tokenizer.json, every special id is declared, every stop id is listed, LIMA's sampling settings
are the generation defaults, the chat template formats exactly what lima_jax's reader and `encode_dialog`
make of a `messages` record (system message included) and refuses what the reader refuses, and the example
of docs/checkpoints.md runs. Tiny models written without transformers, so every test takes seconds; the
real stories260K's generation through transformers is in test_convert_stories260k.py, llama.cpp and
transformers 4.57 in benchmarks/export_clients.py."""
from __future__ import annotations

import contextlib
import io
import json
import pathlib
import re

import pytest

from lima_jax import convert
from lima_jax.data.formats import DataError, parse_record
from lima_jax.generation import SamplingConfig
from lima_jax.tokenizer import Tokenizer
from tests.test_convert import REPO, TOY_TOKENIZER, _tiny_hf_folder

transformers = pytest.importorskip("transformers", reason="transformers is in the 'parity' extra (the client "
                                                          "that loads the export)")


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> pathlib.Path:
    """A tiny fine-tuned-shaped model (toy tokenizer + EOT) exported with `to_hf`."""
    root = tmp_path_factory.mktemp("export")
    convert.main(["from_hf", "--input", str(_tiny_hf_folder(root / "src", vocab_size=513)),
                  "--output", str(root / "lima")])
    convert.main(["to_hf", "--input", str(root / "lima"), "--tokenizer", str(TOY_TOKENIZER),
                  "--output", str(root / "hf")])
    return root / "hf"


def _json(folder: pathlib.Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def test_export_ships_the_original_tokenizer_and_declares_every_special_and_stop_id(export):
    ours = Tokenizer(TOY_TOKENIZER)
    assert (export / "tokenizer.model").read_bytes() == TOY_TOKENIZER.read_bytes()
    decoder = _json(export, "tokenizer_config.json")["added_tokens_decoder"]
    assert {int(i): d["content"] for i, d in decoder.items()} == {0: "<unk>", ours.bos_id: "<s>", ours.eos_id: "</s>",
                                                                  ours.eot_id: "<eot>"}
    assert all(d["special"] and not d["normalized"] for d in decoder.values())
    stops = [ours.eot_id, ours.eos_id]  # what lima_jax's generation stops on
    assert _json(export, "config.json")["eos_token_id"] == stops
    generation = _json(export, "generation_config.json")
    lima = SamplingConfig()
    assert generation["eos_token_id"] == stops and generation["do_sample"] is True
    assert (generation["temperature"], generation["top_p"], generation["repetition_penalty"],
            generation["max_new_tokens"], generation["top_k"]) == (lima.temperature, lima.top_p,
                                                                   lima.repetition_penalty, lima.max_new_tokens, 0)
    assert _json(export, "tokenizer_config.json")["model_input_names"] == ["input_ids", "attention_mask"]
    model_generation = transformers.GenerationConfig.from_pretrained(export)
    assert model_generation.eos_token_id == stops and model_generation.temperature == lima.temperature


def _messages(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


CONVERSATIONS = [
    _messages(("user", "What is the capital of France?")),
    _messages(("system", "Answer briefly."), ("user", "What is the capital of France?")),
    _messages(("system", "Be kind.\nAlways."), ("user", "Hi there"), ("assistant", "Hello! How are you?"),
              ("user", "Fine, thanks. And you?")),
    _messages(("user", "Hi"), ("assistant", "Hello."), ("user", "Bye"), ("assistant", "Goodbye.")),
    _messages(("system", "Rules <eot> here"), ("user", "<s>x</s>")),
]


def _reader_ids(messages: list[dict]) -> list[int]:
    """The ids lima_jax trains on / prompts with for a `messages` record: its reader, then encode_dialog."""
    turns = parse_record({"messages": messages}, "x.jsonl", 1, for_training=None).turns
    return Tokenizer(TOY_TOKENIZER).encode_dialog(turns).ids


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_gives_the_readers_ids_system_message_included(export, messages):
    tok = transformers.AutoTokenizer.from_pretrained(export, local_files_only=True)
    encoded = tok.apply_chat_template(messages, tokenize=True, return_dict=True)
    assert set(encoded) == {"input_ids", "attention_mask"}  # what generate(**encoded) takes (transformers 4 too)
    ids = encoded["input_ids"]
    assert ids == _reader_ids(messages)
    if messages[-1]["role"] == "user":  # a prompt: the generation prompt adds nothing after the user's EOT
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
        assert prompt == ids


@pytest.mark.parametrize("messages, reason", [
    (_messages(("assistant", "Hi")), r"messages\[0\] has role assistant, expected user"),
    (_messages(("user", "a"), ("user", "b")), r"messages\[1\] has role user, expected assistant"),
    (_messages(("system", "s")), "a system message must be followed by a user message"),
    (_messages(("user", "a"), ("system", "s")), r"messages\[1\] has role system, expected assistant"),
    (_messages(("system", "s"), ("system", "t"), ("user", "u")), r"messages\[1\] has role system, expected user"),
    (_messages(("user", "a"), ("assistant", "b"), ("tool", "c")), r"messages\[2\] has role tool, expected user"),
    (_messages(("user", "  ")), r"messages\[0\] is empty"),
])
def test_chat_template_refuses_what_the_reader_refuses(export, messages, reason):
    tok = transformers.AutoTokenizer.from_pretrained(export, local_files_only=True)
    with pytest.raises(DataError):
        parse_record({"messages": messages}, "x.jsonl", 1, for_training=None)
    with pytest.raises(Exception, match=reason) as caught:
        tok.apply_chat_template(messages, tokenize=False)
    assert "TemplateError" in type(caught.value).__name__ and "lima_jax chat template" in str(caught.value)


def test_generation_prompt_after_the_assistant_is_refused(export):
    """lima_jax refuses a prompt that ends with the assistant; so does the template's generation prompt."""
    tok = transformers.AutoTokenizer.from_pretrained(export, local_files_only=True)
    messages = _messages(("user", "Hi"), ("assistant", "Hello."))
    with pytest.raises(DataError, match="a prompt must end with the user"):
        parse_record({"messages": messages}, "x.jsonl", 1, for_training=False)
    with pytest.raises(Exception, match="add_generation_prompt needs the last message to be the user's"):
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_llama_tokenizer_loads_the_export_with_exact_chat_ids_for_plain_text(export):
    """`LlamaTokenizer` (by name, as many scripts load LLaMA) reads the export; on transformers 5 it rebuilds
    LLaMA's own pipeline, which has no normalizer, so the ids are exact for text the sentencepiece
    normalization leaves alone (single spaces; the toy tokenizer's NFKC also turns a newline into a space, so
    no system message here, which is joined with "\n\n"); AutoTokenizer is exact for all text."""
    tok = transformers.LlamaTokenizer.from_pretrained(export, local_files_only=True)
    for messages in (CONVERSATIONS[0], CONVERSATIONS[3]):
        ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ids == _reader_ids(messages), messages
    assert tok.convert_tokens_to_ids("<eot>") == Tokenizer(TOY_TOKENIZER).eot_id


def test_docs_example_runs_on_the_installed_transformers(export):
    """The Python example of docs/checkpoints.md, run as written with the export's path."""
    docs = (REPO / "docs" / "checkpoints.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", docs, re.S) if "apply_chat_template" in block]
    assert '"/hf/lima-65b"' in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace('"/hf/lima-65b"', repr(str(export))), "docs/checkpoints.md", "exec"), {})
    assert isinstance(out.getvalue(), str) and out.getvalue().endswith("\n")
