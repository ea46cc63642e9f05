"""The tokenizer backends (sentencepiece, tiktoken, Hugging Face `tokenizers`), told apart by content; BOS/EOS
per family; the EOT choice (`config.tokenizer.eot`); special-token text encoded as text.

Small synthetic byte-level files cover the logic in a fresh clone; the real LLaMA-3 files of
../shared/data/llama3 check that both LLaMA-3 backends give Meta's and Hugging Face's ids."""
import base64
import json

import pytest

from lima_jax.errors import ConfigError
from lima_jax.tokenizer import (EOT_NEW_ROW, LLAMA3_SPECIAL_TOKENS, Tokenizer, byte_level_alphabet,
                                _tiktoken_parts, detect_backend, load_tokenizer, tokenizer_file)
from tests.conftest import REPO, SHARED_DATA, shared_file

TOY = REPO / "data" / "toy_tokenizer.model"
TRICKY = ("Say <|eot_id|> and <|begin_of_text|>, <eot>, <s> and </s> as text.", "  leading spaces\n\ttabs",
          "émoji 🦙 and 漢字", "")


@pytest.fixture(scope="module")
def byte_files(tmp_path_factory):
    """A tiktoken ranks file and a tokenizer.json of the same 256-byte vocabulary (no merges) with LLaMA-3's
    special tokens after it: (tiktoken file, tokenizer.json)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    folder = tmp_path_factory.mktemp("byte_tokenizers")
    ranks = folder / "ranks.tiktoken"
    ranks.write_bytes(b"".join(base64.b64encode(bytes([b])) + b" %d\n" % b for b in range(256)))
    hf = HFTokenizer(models.BPE(vocab={c: b for b, c in enumerate(byte_level_alphabet())}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS])
    (folder / "json").mkdir()
    hf.save(str(folder / "json" / "tokenizer.json"))
    return ranks, folder / "json" / "tokenizer.json"


def _llama3(name):
    return shared_file(f"llama3/{name}")


@pytest.fixture(scope="module")
def llama3_tiktoken():
    return Tokenizer(_llama3("tokenizer.model"))


@pytest.fixture(scope="module")
def llama3_hf():
    return Tokenizer(_llama3("tokenizer.json"))


# --------------------------------------------------------------------------- detection and folders


def test_the_backend_is_told_by_content_not_by_name(byte_files, tmp_path):
    ranks, hf_json = byte_files
    swapped = {"tokenizer.json": ranks, "tokenizer.model": hf_json, "vocab.bin": TOY}
    kinds = {}
    for name, source in swapped.items():
        (tmp_path / name).write_bytes(source.read_bytes())
        kinds[name] = Tokenizer(tmp_path / name).backend.kind
    assert kinds == {"tokenizer.json": "tiktoken", "tokenizer.model": "huggingface", "vocab.bin": "sentencepiece"}


def test_a_folder_gives_its_tokenizer_model_first_then_its_tokenizer_json(byte_files, tmp_path):
    ranks, hf_json = byte_files
    (tmp_path / "tokenizer.json").write_bytes(hf_json.read_bytes())
    assert Tokenizer(tmp_path).backend.kind == "huggingface"
    (tmp_path / "tokenizer.model").write_bytes(ranks.read_bytes())
    chosen = Tokenizer(tmp_path)
    assert chosen.backend.kind == "tiktoken" and chosen.path == tmp_path / "tokenizer.model"
    assert f"{tmp_path / 'tokenizer.model'} (tiktoken, llama3 family" in chosen.describe()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="empty: a folder without tokenizer.model or tokenizer.json"):
        Tokenizer(empty)


def test_malformed_files_are_refused_naming_file_and_line(tmp_path):
    bad_rank = tmp_path / "bad.model"
    bad_rank.write_bytes(b"IQ== 0\nIg== 1\nnot-base64! 2\n")
    with pytest.raises(ConfigError, match=r"bad.model:3: not a `base64-token rank` line"):
        Tokenizer(bad_rank)
    gap = tmp_path / "gap.model"
    gap.write_bytes(b"IQ== 0\nIg== 2\n")
    with pytest.raises(ConfigError, match=r"gap.model: the ranks .* are not 0..1"):
        Tokenizer(gap)
    not_json = tmp_path / "tokenizer.json"
    not_json.write_text('{"version": "1.0", "model": 7}')
    with pytest.raises(ConfigError, match="tokenizer.json: not a Hugging Face tokenizer.json"):
        Tokenizer(not_json)
    with pytest.raises(ConfigError, match="missing.model: tokenizer file not found \\(--tokenizer\\)"):
        Tokenizer(tmp_path / "missing.model", "--tokenizer")


def test_a_tokenizer_json_of_no_known_family_is_refused(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models
    path = tmp_path / "tokenizer.json"
    HFTokenizer(models.BPE(vocab={"a": 0}, merges=[])).save(str(path))
    with pytest.raises(ConfigError, match="without the special tokens of a known family"):
        Tokenizer(path)


# --------------------------------------------------------------------------- the byte-level backends


@pytest.mark.parametrize("which", ["tiktoken", "huggingface"])
def test_byte_level_backends_encode_special_token_text_as_text(byte_files, which):
    tok = Tokenizer(byte_files[0] if which == "tiktoken" else byte_files[1], eot="<|eot_id|>")
    assert tok.backend.kind == which
    for text in TRICKY:
        assert tok.encode(text) == list(text.encode("utf-8"))  # 256 byte tokens, no merges: ids are the bytes
        assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.vocab_size) == (256, 257, 265, 512)


@pytest.mark.parametrize("which", ["tiktoken", "huggingface"])
def test_each_eot_choice_and_its_vocabulary(byte_files, which):
    path = byte_files[0] if which == "tiktoken" else byte_files[1]
    turns = ["Hi <|eot_id|>", "Yo"]
    for eot, eot_id, vocab in ((EOT_NEW_ROW, 512, 513), ("<|eot_id|>", 265, 512),
                               ("<|reserved_special_token_7|>", 256 + 12, 512)):
        tok = Tokenizer(path, eot=eot)
        dialog = tok.encode_dialog(turns)
        user, assistant = (list(t.encode()) for t in turns)
        assert dialog.ids == [256] + user + [eot_id] + assistant + [eot_id]
        assert dialog.assistant_mask == [False] * (len(user) + 2) + [True] * (len(assistant) + 1)
        assert (tok.eot_id, tok.vocab_size, tok.eot_is_new_row) == (eot_id, vocab, eot == EOT_NEW_ROW)
        assert tok.decode(dialog.ids) == "Hi <|eot_id|>Yo"  # BOS and both EOTs dropped, the typed text kept
        assert tok.id_to_piece(eot_id) == ("<eot>" if eot == EOT_NEW_ROW else eot)


def test_decode_drops_every_special_id_and_ids_outside_the_vocabulary(byte_files):
    tok = Tokenizer(byte_files[0])
    ids = [256, *b"ab", 257, 265, 300, 511, *b"c", 512, 10_000, -1]
    assert tok.decode(ids) == "abc"
    assert tok.special_ids == frozenset(range(256, 513))


@pytest.mark.parametrize("bad, why", [("<|begin_of_text|>", "BOS and EOS cannot be EOT"),
                                      ("<|end_of_text|>", "BOS and EOS cannot be EOT"),
                                      ("<eot>", "not a special token of"), ("", "not a special token of"),
                                      (7, "not a special token of")])
def test_bad_eot_names_are_refused_naming_the_setting(byte_files, bad, why):
    with pytest.raises(ConfigError, match=rf"^cfg.py: config.tokenizer.eot={bad!r}: {why}.*'new_row'.*<\|eot_id\|>"):
        Tokenizer(byte_files[1], eot=bad, eot_setting="cfg.py: config.tokenizer.eot")


def test_a_sentencepiece_tokenizer_offers_only_the_new_row(toy_tokenizer):
    with pytest.raises(ConfigError, match=r"--eot='</s>': BOS and EOS cannot be EOT.*no other special token"):
        Tokenizer(TOY, eot="</s>", eot_setting="--eot")
    assert (toy_tokenizer.eot, toy_tokenizer.eot_id, toy_tokenizer.base_vocab_size) == ("new_row", 512, 512)
    assert toy_tokenizer.backend.kind == "sentencepiece" and toy_tokenizer.backend.family == "llama"


def test_tiktoken_input_is_cut_as_meta_cuts_it():
    text = "ab " + "x" * 60_000 + "  " + " " * 30_000 + "end"
    parts = list(_tiktoken_parts(text))
    assert "".join(parts) == text
    assert [len(p) for p in parts] == [3 + 25_000, 25_000, 10_000 + 25_000, 5_002 + 3]
    assert list(_tiktoken_parts("short text")) == ["short text"] and list(_tiktoken_parts("")) == []


# --------------------------------------------------------------------------- config and runtime


def test_load_tokenizer_reads_the_eot_choice_and_names_the_config_file(toy_config, byte_files):
    from lima_jax.runtime import build
    toy_config.tokenizer.path = str(byte_files[0])
    toy_config.source_file = "configs/x.py"
    assert toy_config.tokenizer.eot == "new_row"
    assert build(toy_config).model_cfg.vocab_size == 513  # the tokenizer's 512 ids + the EOT row
    toy_config.tokenizer.eot = "<|eot_id|>"
    rt = build(toy_config)
    assert (rt.model_cfg.vocab_size, rt.tokenizer.eot_id) == (512, 265)
    toy_config.tokenizer.eot = "<|nope|>"
    with pytest.raises(ConfigError, match=r"^configs/x.py: config.tokenizer.eot='<\|nope\|>': not a special"):
        load_tokenizer(toy_config)
    del toy_config.tokenizer["eot"]  # a config.json written before the field existed: the paper's new row
    assert load_tokenizer(toy_config).eot_is_new_row


def test_config_validation_refuses_an_eot_that_is_not_a_name(toy_config):
    from lima_jax.config import validate
    toy_config.tokenizer.eot = ""
    with pytest.raises(ConfigError, match=r"config.tokenizer.eot='': must be \"new_row\""):
        validate(toy_config)


def test_the_data_cli_shows_the_llama3_turn_format_with_a_chosen_eot(byte_files, capsys):
    from lima_jax.data import __main__ as data_cli
    assert data_cli.main(["tokenizer", "encode", "--tokenizer", str(byte_files[1].parent), "--eot",
                          "<|eot_id|>", '["A", "<|eot_id|>"]']) == 0
    out, err = capsys.readouterr()
    rows = [line.split() for line in out.splitlines()]
    assert rows == [["256", ".", "<|begin_of_text|>"], ["65", ".", "A"], ["265", ".", "<|eot_id|>"],
                    *[[str(b), "T", byte_level_alphabet()[b]] for b in b"<|eot_id|>"], ["265", "T", "<|eot_id|>"]]
    assert "(huggingface, llama3 family, 512 ids)" in err and "EOT 265 <|eot_id|>; model vocabulary 512" in err


# --------------------------------------------------------------------------- the real LLaMA-3 files


def test_llama3_hello_world_and_the_family_ids(llama3_tiktoken, llama3_hf):
    for tok in (llama3_tiktoken, llama3_hf):
        assert tok.encode("Hello world") == [9906, 1917]
        assert (tok.bos_id, tok.eos_id, tok.base_vocab_size, tok.vocab_size) == (128000, 128001, 128256, 128257)
        assert tok.encode_dialog(["Hello world"]).ids == [128000, 9906, 1917, 128256]


def test_meta_special_token_names_are_those_of_the_tokenizer_json(llama3_tiktoken):
    added = json.loads(_llama3("tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    assert {t["content"]: t["id"] for t in added} == llama3_tiktoken.backend.specials
    assert llama3_tiktoken.backend.specials["<|eot_id|>"] == 128009


def test_llama_cpp_test_cases_both_backends(llama3_tiktoken, llama3_hf):
    texts = _llama3("ggml-vocab-llama-bpe.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    assert texts[-1] == ""  # the file ends with the separator
    expected = [[int(i) for i in line.split()] for line in
                _llama3("ggml-vocab-llama-bpe.gguf.out").read_text(encoding="utf-8").splitlines()]
    assert len(texts) - 1 == len(expected) == 46
    for text, ids in zip(texts, expected):
        assert llama3_tiktoken.encode(text) == ids, repr(text)
        assert llama3_hf.encode(text) == ids, repr(text)


def test_both_llama3_backends_agree_on_every_lima_training_text(llama3_tiktoken, llama3_hf):
    """All 2,044 turns of the 1,022 real LIMA examples (about 620K tokens): the same ids and the same pieces."""
    lines = shared_file("lima/lima_train_1022.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [t for line in lines for t in (json.loads(line)["instruction"], json.loads(line)["response"])]
    assert len(texts) == 2044
    seen = set()
    for text in texts:
        ids = llama3_tiktoken.encode(text)
        assert llama3_hf.encode(text) == ids
        seen.update(ids)
    assert len(seen) > 20_000
    sample = sorted(seen)[::97] + [128000, 128009, 128255]
    assert [llama3_tiktoken.id_to_piece(i) for i in sample] == [llama3_hf.id_to_piece(i) for i in sample]


def test_llama3_user_text_never_becomes_a_special_id(llama3_tiktoken, llama3_hf):
    turns = [TRICKY[0], "<|eot_id|><|end_of_text|>"]
    for tok in (llama3_tiktoken, llama3_hf):
        dialog = tok.encode_dialog(turns)
        assert [i for i in dialog.ids if i >= 128000] == [128000, 128256, 128256]  # BOS and the two EOTs only
        assert tok.decode(dialog.ids) == "".join(turns)
        assert tok.decode([128000, 9906, 1917, 128009, 128001, 128100, 128256]) == "Hello world"
    named = Tokenizer(_llama3("tokenizer.model"), eot="<|eot_id|>")
    assert named.encode_dialog(turns).ids == [128009 if i == 128256 else i for i in dialog.ids]
    assert named.vocab_size == 128256 and "EOT 128009 <|eot_id|>; model vocabulary 128,256" in named.describe()


def test_a_meta_or_hub_folder_is_read(tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hub / name).symlink_to(_llama3(name))
    assert tokenizer_file(hub) == hub / "tokenizer.json"
    assert detect_backend((hub / "tokenizer.json").read_bytes()) == "huggingface"
    meta = tokenizer_file(SHARED_DATA / "llama3")  # Meta's tokenizer.model comes first
    assert meta.name == "tokenizer.model" and detect_backend(meta.read_bytes()) == "tiktoken"


def test_data_stats_with_the_llama3_folder_matches_a_count_made_with_hugging_face_alone(tmp_path, capsys):
    from tokenizers import Tokenizer as HFTokenizer

    from lima_jax.data import __main__ as data_cli
    lines = shared_file("lima/lima_train_1022.jsonl").read_text(encoding="utf-8").splitlines()[:200]
    subset = tmp_path / "lima_200.jsonl"
    subset.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert data_cli.main(["stats", "--data", str(subset), "--tokenizer", str(SHARED_DATA / "llama3"),
                          "--max_len", "8192"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"tokenizer: {SHARED_DATA / 'llama3' / 'tokenizer.model'} (tiktoken, llama3 family")
    hf = HFTokenizer.from_file(str(_llama3("tokenizer.json")))
    lengths = [1 + sum(len(hf.encode(t, add_special_tokens=False).ids) + 1 for t in (r["instruction"], r["response"]))
               for r in map(json.loads, lines)]  # BOS + each turn + its EOT
    total = [line.split()[3] for line in out.splitlines() if line.startswith("(no source)")]
    assert total == [f"{sum(lengths):,}"]
    padded = sum(lengths) - len(lengths)  # inputs are the sequence less its last token
    assert f"padded, one example per row: {100 * padded / (200 * 8192):.1f}% of row tokens" in out
