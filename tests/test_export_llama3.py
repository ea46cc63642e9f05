"""`to_hf` of a LLaMA-3-tokenizer model read by transformers, for both LLaMA-3 tokenizer files (Meta's tiktoken
tokenizer.model, Hugging Face's tokenizer.json) and both EOT choices (a new row `<eot>`, `<|eot_id|>`): the
original file ships unchanged under original/, tokenizer.json is Meta's own (rebuilt exactly from tiktoken)
plus `<eot>` and the unescape step, every special id and stop id is declared, AutoTokenizer's chat template
gives `encode_dialog`'s ids on LIMA test prompts (special-token text in a message included), and greedy
`generate` stops at EOT. Also `from_hf` keeps a folder's tokenizer.json with the import. A tiny random model
(dim 16) over the real 128k vocabulary; skipped without ../shared/data/llama3."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from lima_jax import conversion, convert
from lima_jax.config import ModelConfig
from lima_jax.tokenizer import EOT_NEW_ROW, EOT_PIECE, Tokenizer
from tests.test_convert import REPO

transformers = pytest.importorskip("transformers", reason="transformers is in the 'parity' extra (the client "
                                                          "that loads the export)")
LLAMA3 = REPO.parent / "shared" / "data" / "llama3"
LIMA_TEST = REPO.parent / "shared" / "data" / "lima" / "lima_test.jsonl"
pytestmark = pytest.mark.skipif(not (LLAMA3 / "tokenizer.json").is_file() or not LIMA_TEST.is_file(),
                                reason=f"needs the real LLaMA-3 tokenizer files in {LLAMA3} and {LIMA_TEST}")
N_PROMPTS = 60  # of the 300 LIMA test prompts: every one is a chat template rendering + a 128k-vocab encoding


def _favour_eot_folder(folder: pathlib.Path, vocab_size: int, eot_id: int) -> pathlib.Path:
    """A random LLaMA-shaped HF folder whose greedy next token is always `eot_id`: every embedding has a large
    first component, which survives the (small) layers and the final norm, and only the EOT row of the output
    head reads it; so `generate` must stop at EOT after one token."""
    cfg = ModelConfig(vocab_size=vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=24)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    params = {}
    for name, shape, _ in conversion.hf_tensors({}, cfg):
        params[name] = (np.ones(shape) if "norm" in name else rng.normal(scale=0.02, size=shape)).astype(np.float32)
    params["model.embed_tokens.weight"][:, 0] = 10.0
    params["lm_head.weight"][eot_id, 0] = 5.0
    conversion.write_safetensors(folder / "model.safetensors", [(n, a.shape, a.dtype) for n, a in params.items()],
                                 params.__getitem__)
    (folder / "config.json").write_text(json.dumps(conversion.model_to_hf_config(cfg, "float32", 128000, 128001,
                                                                                 None)))
    return folder


CASES = [("tokenizer.model", EOT_NEW_ROW), ("tokenizer.model", "<|eot_id|>"), ("tokenizer.json", EOT_NEW_ROW),
         ("tokenizer.json", "<|eot_id|>")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{e}" for f, e in CASES])
def export(request, tmp_path_factory) -> tuple[pathlib.Path, Tokenizer, str]:
    source, eot = request.param
    tok = Tokenizer(LLAMA3 / source, eot=eot)
    root = tmp_path_factory.mktemp("llama3")
    convert.main(["from_hf", "--input", str(_favour_eot_folder(root / "src", tok.vocab_size, tok.eot_id)),
                  "--output", str(root / "lima")])
    convert.main(["to_hf", "--input", str(root / "lima"), "--tokenizer", str(LLAMA3 / source), "--eot", eot,
                  "--output", str(root / "hf")])
    return root / "hf", tok, source


def _json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_tokenizer_files_are_metas_plus_eot_and_every_special_and_stop_id_is_declared(export):
    folder, tok, source = export
    assert (folder / "original" / source).read_bytes() == (LLAMA3 / source).read_bytes()
    assert not (folder / "tokenizer.model").exists()  # llama.cpp's converter would read tiktoken as sentencepiece
    ours, meta = _json(folder / "tokenizer.json"), _json(LLAMA3 / "tokenizer.json")
    for key in ("pre_tokenizer", "post_processor", "decoder"):
        assert ours[key] == meta[key], key
    as_pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in meta["model"]["merges"]]
    assert [tuple(m) for m in ours["model"]["merges"]] == as_pairs
    assert {k: v for k, v in ours["model"].items() if k != "merges"} == {
        k: v for k, v in meta["model"].items() if k != "merges"}
    new = [{**meta["added_tokens"][0], "id": tok.eot_id, "content": EOT_PIECE}] if tok.eot_is_new_row else []
    assert ours["added_tokens"] == meta["added_tokens"] + new
    assert [step["type"] for step in ours["normalizer"]["normalizers"]] == ["Replace"]  # the unescape only
    config = _json(folder / "tokenizer_config.json")
    decoder = {int(i): d["content"] for i, d in config["added_tokens_decoder"].items()}
    assert decoder == {t["id"]: t["content"] for t in ours["added_tokens"]} and len(decoder) == 256 + len(new)
    assert (config["bos_token"], config["eos_token"]) == ("<|begin_of_text|>", tok.id_to_piece(tok.eot_id))
    stops = [tok.eot_id, tok.eos_id]
    assert _json(folder / "config.json")["eos_token_id"] == stops == [tok.eot_id, 128001]
    assert _json(folder / "generation_config.json")["eos_token_id"] == stops
    assert _json(folder / "config.json")["vocab_size"] == tok.vocab_size


def _lima_prompts() -> list[str]:
    with LIMA_TEST.open(encoding="utf-8") as f:
        return [json.loads(line)["conversations"][0] for line, _ in zip(f, range(N_PROMPTS))]


SPECIAL_TEXT = [[{"role": "system", "content": "Rules <|eot_id|> and <eot> here"},
                 {"role": "user", "content": "<|begin_of_text|>x<|end_of_text|> \ufdd0<\ufdd0|"},
                 {"role": "assistant", "content": "<|start_header_id|>assistant<|end_header_id|>"},
                 {"role": "user", "content": "ok"}]]


def test_chat_template_gives_encode_dialog_ids_on_lima_prompts(export):
    folder, tok, _ = export
    hf = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    conversations = [[{"role": "user", "content": p}] for p in _lima_prompts()] + SPECIAL_TEXT
    wrong = []
    for messages in conversations:
        ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                     return_dict=True)["input_ids"]
        turns = [m["content"] for m in messages]
        if messages[0]["role"] == "system":
            turns = [turns[0] + "\n\n" + turns[1]] + turns[2:]
        if ids != tok.encode_dialog(turns).ids:
            wrong.append(turns[0][:60])
    assert not wrong, f"{len(wrong)} of {len(conversations)} prompts differ: {wrong[:3]}"
    assert hf("Hello world")["input_ids"] == [tok.bos_id] + tok.encode("Hello world")


def test_generate_stops_at_eot(export):
    import torch

    folder, tok, _ = export
    hf = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    inputs = hf.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                    tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == [tok.eot_id]


def test_from_hf_keeps_the_tokenizer_json_for_the_config(tmp_path):
    src = _favour_eot_folder(tmp_path / "src", 128257, 128256)
    (src / "tokenizer.json").write_bytes((LLAMA3 / "tokenizer.json").read_bytes())
    convert.main(["from_hf", "--input", str(src), "--output", str(tmp_path / "lima")])
    assert (tmp_path / "lima" / "tokenizer.json").read_bytes() == (LLAMA3 / "tokenizer.json").read_bytes()
    tok = Tokenizer(tmp_path / "lima")  # the import folder as config.tokenizer.path
    assert (tok.backend.kind, tok.bos_id, tok.eot_id) == ("huggingface", 128000, 128256)
