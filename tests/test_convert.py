"""lima_jax.conversion / lima_jax.convert: Hugging Face and Meta imports against references, export back, format errors.

Parity tolerance: float32 logits of order 1-10 agree within 1e-4 absolute (observed differences are ~1e-6,
the rounding of different summation orders); a wrong RoPE layout or transpose gives differences of order 1.
"""
from __future__ import annotations

import json
import shutil
import pathlib
import os
import re
import struct
import subprocess
import sys

import jax
import ml_dtypes
import jax.numpy as jnp
import numpy as np
import pytest

from lima_jax import checkpoint, conversion, convert, rundir
from lima_jax.config import ModelConfig
from lima_jax.errors import CheckpointError, ConversionError
from lima_jax.model import Llama

LOGIT_TOL = 1e-4
REPO = pathlib.Path(__file__).resolve().parent.parent
TOY_TOKENIZER = REPO / "data" / "toy_tokenizer.model"


def lima_logits(ckpt: pathlib.Path, tokens: np.ndarray) -> np.ndarray:
    cfg = ModelConfig(**checkpoint.read_params_meta(ckpt)["model"])
    params = checkpoint.restore_params(ckpt)
    cfg = ModelConfig(**{**cfg.__dict__, "param_dtype": "float32"})
    logits, _ = Llama(cfg).apply({"params": jax.tree.map(jnp.asarray, params)}, jnp.asarray(tokens))
    return np.asarray(logits)


# ------------------------------------------------------------------------------------ Hugging Face


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A tiny random transformers LlamaForCausalLM with grouped-query attention (4 query, 2 KV heads), its
    vocabulary the toy tokenizer plus EOT, saved sharded in the transformers 5 config form."""
    torch = pytest.importorskip("torch", reason="torch is in the 'parity' extra")
    transformers = pytest.importorskip("transformers", reason="transformers is in the 'parity' extra")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=513, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # weights large enough that every layer matters to the logits
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    model.save_pretrained(folder, max_shard_size="100KB")
    return model, folder


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


TOKENS = np.random.default_rng(0).integers(0, 513, size=(2, 24))


def _old_style(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """The same model with a transformers 4 config.json (rope_theta / torch_dtype) and one safetensors."""
    from safetensors.numpy import load_file, save_file
    dst.mkdir()
    hf = json.loads((src / "config.json").read_text())
    theta = hf.pop("rope_parameters")["rope_theta"]
    hf.update(rope_theta=theta, torch_dtype=hf.pop("dtype", "float32"), rope_scaling=None)
    (dst / "config.json").write_text(json.dumps(hf))
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(shard))
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_hf_config_forms_agree(hf_model, tmp_path):
    _, folder = hf_model
    assert (folder / "model.safetensors.index.json").is_file()  # the fixture really is sharded
    new = conversion.HuggingFaceSource(folder)
    old = conversion.HuggingFaceSource(_old_style(folder, tmp_path / "old"))
    assert new.config == old.config
    assert (new.config.rope_theta, new.config.n_kv_heads, new.config.param_dtype) == (500000.0, 2, "float32")


@pytest.mark.parametrize("form", ["sharded_v5_config", "single_v4_config"])
def test_hf_import_logits_match_transformers(hf_model, tmp_path, form):
    model, folder = hf_model
    if form == "single_v4_config":
        folder = _old_style(folder, tmp_path / "old")
    conversion.import_checkpoint(conversion.HuggingFaceSource(folder), tmp_path / "lima")
    ours, ref = lima_logits(tmp_path / "lima", TOKENS), torch_logits(model, TOKENS)
    diff = float(np.max(np.abs(ours - ref)))
    print(f"\nHF({form}) -> lima_jax: max |logit diff| = {diff:.2e} (tolerance {LOGIT_TOL}, logit scale "
          f"{np.abs(ref).max():.1f})")
    assert diff < LOGIT_TOL


@pytest.fixture(scope="module")
def exported(hf_model, tmp_path_factory):
    """HF -> lima_jax -> HF (via the CLI), plus the intermediate lima_jax checkpoint."""
    _, folder = hf_model
    root = tmp_path_factory.mktemp("export")
    convert.main(["from_hf", "--input", str(folder), "--output", str(root / "lima")])
    convert.main(["to_hf", "--input", str(root / "lima"), "--tokenizer", str(TOY_TOKENIZER),
                  "--output", str(root / "hf"), "--max_shard_gb", "0.0001"])
    return root / "lima", root / "hf"


def test_export_logits_match_in_transformers(exported):
    import transformers
    lima, hf = exported
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).eval()
    ref = lima_logits(lima, TOKENS)
    diff = float(np.max(np.abs(torch_logits(reloaded, TOKENS) - ref)))
    print(f"\nlima_jax -> HF: max |logit diff| = {diff:.2e} (tolerance {LOGIT_TOL})")
    assert diff < LOGIT_TOL


def _tensors(folder: pathlib.Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def test_hf_round_trip_is_exact(hf_model, exported):
    _, original = hf_model
    _, hf = exported
    assert (hf / "model.safetensors.index.json").is_file()  # --max_shard_gb split the export
    a, b = _tensors(original), _tensors(hf)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name
    assert conversion.HuggingFaceSource(original).config == conversion.HuggingFaceSource(hf).config


def test_export_strips_the_vocabulary_padding(exported, tmp_path):
    """A checkpoint with padded embedding / LM head rows (model.vocab_multiple=128: 513 -> 640) exports the
    same Hugging Face folder as the unpadded one: the real vocabulary's rows only."""
    import dataclasses
    from lima_jax.model import resize_vocab
    lima, hf = exported
    params, cfg = conversion.load_lima_params(lima)
    padded_cfg = dataclasses.replace(cfg, vocab_multiple=128)
    padded = resize_vocab(params, cfg.vocab_size, padded_size=padded_cfg.padded_vocab_size)
    padded["embedding"] = padded["embedding"].at[cfg.vocab_size:].set(1.0)  # padding rows of any value
    assert padded["embedding"].shape == (640, cfg.dim)
    checkpoint.save_params(tmp_path / "padded", jax.tree.map(np.asarray, padded), padded_cfg)
    convert.main(["to_hf", "--input", str(tmp_path / "padded"), "--tokenizer", str(TOY_TOKENIZER),
                  "--output", str(tmp_path / "hf"), "--max_shard_gb", "0.0001"])
    assert _tensors(tmp_path / "hf")["model.embed_tokens.weight"].shape == (513, cfg.dim)
    assert _snapshot(tmp_path / "hf") == _snapshot(hf)


def test_export_tokenizer_and_stop_token(exported):
    import transformers
    from lima_jax.tokenizer import Tokenizer
    _, hf = exported
    ours = Tokenizer(TOY_TOKENIZER)
    tok = transformers.AutoTokenizer.from_pretrained(hf, local_files_only=True)
    texts = ["What is the capital of France?", "  two  spaces\tand\nlines  ", "Ünïcödé ﬁ ½ 123456789", ""]
    for text in texts:
        assert tok(text, add_special_tokens=False).input_ids == ours.encode(text), text
        assert tok(text).input_ids == [ours.bos_id] + ours.encode(text)
    assert tok.convert_tokens_to_ids("<eot>") == ours.eot_id and "<eot>" in tok.all_special_tokens
    assert tok.eos_token_id == ours.eot_id
    gen = transformers.GenerationConfig.from_pretrained(hf, local_files_only=True)
    assert gen.eos_token_id == [ours.eot_id, ours.eos_id]  # every id lima_jax stops on
    turns = ["Hi there, how are you?", "Fine, thanks. 42!", "And now?"]
    messages = [{"role": role, "content": text} for role, text in zip(["user", "assistant"] * 2, turns)]
    assert tok.apply_chat_template(messages, return_dict=True)["input_ids"] == ours.encode_dialog(turns).ids


def test_exported_model_stops_at_eot(exported, tmp_path):
    """`generate` stops at EOT, and at EOS: a model rigged so that EOT (then EOS) is always the argmax stops
    after one token."""
    import torch
    import transformers
    lima, _ = exported
    params = checkpoint.restore_params(lima)
    cfg = ModelConfig(**checkpoint.read_params_meta(lima)["model"])
    params["layers"]["attention"]["wo"][:] = 0.0  # residual stream = the token's embedding ...
    params["layers"]["mlp"]["w2"][:] = 0.0
    params["embedding"][:] = 1.0  # ... = ones for every token, so logits = column sums of lm_head
    params["final_norm"]["scale"][:] = 1.0
    params["lm_head"][:] = 0.0
    params["lm_head"][:, 512] = 1.0
    checkpoint.save_params(tmp_path / "lima", params, cfg)
    conversion.export_hf(tmp_path / "lima", TOY_TOKENIZER, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    prompt = torch.tensor([[1, 5, 6]])
    out = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert out[0].tolist() == [1, 5, 6, 512]
    longer = model.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert longer[0].tolist() == [1, 5, 6] + [512] * 10  # without the stop token it would run on
    params["lm_head"][:, 512] = 0.0  # now EOS is always the argmax: generation_config lists it too
    params["lm_head"][:, 2] = 1.0
    checkpoint.save_params(tmp_path / "lima_eos", params, cfg)
    conversion.export_hf(tmp_path / "lima_eos", TOY_TOKENIZER, tmp_path / "hf_eos")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_eos", local_files_only=True)
    assert model.generate(prompt, max_new_tokens=10, do_sample=False)[0].tolist() == [1, 5, 6, 2]


# ----------------------------------------------------------------------------------------------- Meta


def _meta_hidden(dim: int, multiple_of: int) -> int:
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


META = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 96, "multiple_of": 32,
        "norm_eps": 1e-5, "rope_theta": 10000.0}


def _meta_weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    d, hd, hidden, v = META["dim"], META["dim"] // META["n_heads"], _meta_hidden(64, 32), META["vocab_size"]
    kv = META["n_kv_heads"] * hd
    w = {"tok_embeddings.weight": rng.normal(0, 0.5, (v, d)), "norm.weight": 1 + 0.2 * rng.normal(size=d),
         "output.weight": rng.normal(0, 0.15, (v, d))}
    for i in range(META["n_layers"]):
        shapes = {"attention.wq": (d, d), "attention.wk": (kv, d), "attention.wv": (kv, d), "attention.wo": (d, d),
                  "feed_forward.w1": (hidden, d), "feed_forward.w3": (hidden, d), "feed_forward.w2": (d, hidden)}
        for name, shape in shapes.items():
            w[f"layers.{i}.{name}.weight"] = rng.normal(0, 0.15, shape)
        w[f"layers.{i}.attention_norm.weight"] = 1 + 0.2 * rng.normal(size=d)
        w[f"layers.{i}.ffn_norm.weight"] = 1 + 0.2 * rng.normal(size=d)
    # bfloat16-representable, so the bfloat16 shards hold exactly these values
    return {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in w.items()}


def meta_reference_logits(w: dict[str, np.ndarray], p: dict, tokens: np.ndarray,
                          scale_frequencies=lambda freqs: freqs) -> np.ndarray:
    """Meta's LLaMA forward in numpy, RoPE on interleaved pairs via complex numbers as in Meta's model.py."""
    n_h, n_kv, d = p["n_heads"], p["n_kv_heads"], p["dim"]
    hd = d // n_h
    t = tokens.shape[1]
    freqs = scale_frequencies(1.0 / p["rope_theta"] ** (np.arange(0, hd, 2) / hd))
    rot = np.exp(1j * np.outer(np.arange(t), freqs))  # [t, hd/2]

    def norm(x, g):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + p["norm_eps"]) * g

    def rope(x):  # [b, t, h, hd]
        c = (x[..., 0::2] + 1j * x[..., 1::2]) * rot[None, :, None]
        return np.stack([c.real, c.imag], -1).reshape(x.shape)

    x = w["tok_embeddings.weight"][tokens].astype(np.float64)
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(p["n_layers"]):
        lw = lambda name: w[f"layers.{i}.{name}.weight"]  # noqa: E731
        h = norm(x, lw("attention_norm"))
        q = rope((h @ lw("attention.wq").T).reshape(*h.shape[:2], n_h, hd))
        k = rope((h @ lw("attention.wk").T).reshape(*h.shape[:2], n_kv, hd)).repeat(n_h // n_kv, axis=2)
        v = (h @ lw("attention.wv").T).reshape(*h.shape[:2], n_kv, hd).repeat(n_h // n_kv, axis=2)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd) + mask
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("bhqk,bkhd->bqhd", a, v).reshape(x.shape) @ lw("attention.wo").T
        h = norm(x, lw("ffn_norm"))
        g = h @ lw("feed_forward.w1").T
        x = x + (g / (1 + np.exp(-g)) * (h @ lw("feed_forward.w3").T)) @ lw("feed_forward.w2").T
    return norm(x, w["norm.weight"]) @ w["output.weight"].T


_ROW_PARALLEL = ("attention.wo", "feed_forward.w2")


def _write_meta(folder: pathlib.Path, weights: dict[str, np.ndarray], n_shards: int) -> pathlib.Path:
    """Meta's release layout: column-parallel split on dim 0, row-parallel (wo, w2) and the embedding on
    dim 1, norms replicated in every shard."""
    import torch
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(META))
    for rank in range(n_shards):
        shard = {}
        for name, array in weights.items():
            if "norm" in name:
                part = array
            else:
                axis = 1 if name.startswith("tok_embeddings") or any(r in name for r in _ROW_PARALLEL) else 0
                part = np.split(array, n_shards, axis=axis)[rank]
            shard[name] = torch.from_numpy(np.ascontiguousarray(part)).to(torch.bfloat16)  # as LLaMA-2 ships
        shard["rope.freqs"] = torch.zeros(8)  # LLaMA-1 files carry this buffer; it must be ignored
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    return folder


@pytest.fixture(scope="module")
def meta_weights():
    return _meta_weights(np.random.default_rng(1))


def test_meta_two_shards_merge_to_unsplit_and_reference(meta_weights, tmp_path):
    pytest.importorskip("torch", reason="torch is in the 'parity' extra (reads .pth shards)")
    tokens = np.random.default_rng(2).integers(0, META["vocab_size"], size=(2, 16))
    results = {}
    for n in (1, 2):
        src = _write_meta(tmp_path / f"meta{n}", meta_weights, n)
        convert.main(["from_meta", "--input", str(src), "--output", str(tmp_path / f"lima{n}"), "--dtype", "float32"])
        results[n] = (checkpoint.restore_params(tmp_path / f"lima{n}"), lima_logits(tmp_path / f"lima{n}", tokens))
    for a, b in zip(jax.tree.leaves(results[1][0]), jax.tree.leaves(results[2][0])):
        assert np.array_equal(a, b)  # the merged split checkpoint is the unsplit one, bit for bit
    split_vs_unsplit = float(np.max(np.abs(results[2][1] - results[1][1])))
    ref = meta_reference_logits(meta_weights, META, tokens)
    vs_reference = float(np.max(np.abs(results[2][1] - ref)))
    cfg = ModelConfig(**checkpoint.read_params_meta(tmp_path / "lima2")["model"])
    print(f"\nMeta 2 shards vs unsplit: max |logit diff| = {split_vs_unsplit:.2e}; vs numpy Meta reference "
          f"(interleaved RoPE): {vs_reference:.2e} (tolerance {LOGIT_TOL})")
    assert split_vs_unsplit == 0.0 and vs_reference < LOGIT_TOL
    assert (cfg.hidden_dim, cfg.n_kv_heads, cfg.vocab_size) == (_meta_hidden(64, 32), 2, META["vocab_size"])


def test_meta_rope_layout_matters(meta_weights, tmp_path):
    """Guards the test above: importing Meta weights as if already rotate-half gives far different logits."""
    pytest.importorskip("torch", reason="torch is in the 'parity' extra (reads .pth shards)")
    source = conversion.MetaSource(_write_meta(tmp_path / "meta", meta_weights, 1))
    source.rope_layout = "halves"  # skip the interleaved -> halves permutation
    conversion.import_checkpoint(source, tmp_path / "lima", "float32")
    tokens = np.random.default_rng(2).integers(0, META["vocab_size"], size=(1, 16))
    reference = meta_reference_logits(meta_weights, META, tokens)
    assert np.max(np.abs(lima_logits(tmp_path / "lima", tokens) - reference)) > 0.1
    q = meta_weights["layers.0.attention.wq.weight"].T.reshape(64, 4, 16)
    np.testing.assert_array_equal(conversion.halves_to_interleaved(conversion.interleaved_to_halves(q)), q)


def test_meta_missing_shard_tensor_is_named(meta_weights, tmp_path):
    torch = pytest.importorskip("torch", reason="torch is in the 'parity' extra")
    src = _write_meta(tmp_path / "meta", meta_weights, 2)
    shard = torch.load(src / "consolidated.01.pth", weights_only=True)
    del shard["layers.1.feed_forward.w2.weight"]
    torch.save(shard, src / "consolidated.01.pth")
    with pytest.raises(ConversionError, match=r"consolidated.01.pth: tensor layers.1.feed_forward.w2"):
        conversion.import_checkpoint(conversion.MetaSource(src), tmp_path / "out")
    (src / "consolidated.01.pth").rename(src / "consolidated.03.pth")
    with pytest.raises(ConversionError, match=r"consolidated.00.pth .. 01"):
        conversion.MetaSource(src)


@pytest.mark.parametrize("field, value, message", [
    ("use_qk_norm", True, r"params.json: field 'use_qk_norm'=true is not supported"),
    ("moe_args", {"num_experts": 16}, r"params.json: field 'moe_args'=\{\"num_experts\": 16\} is not supported"),
    ("vision_chunk_size", 560, r"params.json: field 'vision_chunk_size'=560 is not supported"),
])
def test_meta_unsupported_params_refused_before_any_tensor(meta_weights, tmp_path, monkeypatch, field, value,
                                                           message):
    """Fields of later releases would import silently as another function: refused from params.json alone,
    before a shard is opened, and nothing is written."""
    torch = pytest.importorskip("torch", reason="torch is in the 'parity' extra")
    src = _write_meta(tmp_path / "meta", meta_weights, 1)
    (src / "params.json").write_text(json.dumps({**META, "rope_theta": 500000.0, field: value}))

    def no_tensor_reads(*args, **kwargs):
        raise AssertionError("a shard was opened before params.json was validated")
    monkeypatch.setattr(torch, "load", no_tensor_reads)
    with pytest.raises(ConversionError, match=re.escape(f"{src / 'params.json'}: ")):
        conversion.MetaSource(src)
    with pytest.raises(ConversionError, match=message):
        convert.main(["from_meta", "--input", str(src), "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_meta_harmless_params_accepted(meta_weights, tmp_path):
    """use_scaled_rope=false, inference-only fields and null fields import as before."""
    pytest.importorskip("torch", reason="torch is in the 'parity' extra")
    src = _write_meta(tmp_path / "meta", meta_weights, 1)
    extra = {"use_scaled_rope": False, "max_seq_len": 64, "max_batch_size": 4, "ffn_dim_multiplier": None,
             "vision_chunk_size": None}
    (src / "params.json").write_text(json.dumps({**META, **extra}))
    cfg = conversion.MetaSource(src).config
    assert (cfg.max_seq_len, cfg.hidden_dim) == (64, _meta_hidden(64, 32))


@pytest.mark.parametrize("params, intermediate_size", [
    ({"dim": 4096, "multiple_of": 256}, 11008),  # LLaMA-2 7B
    ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3}, 28672),  # LLaMA-2 70B, LLaMA-3 70B
    ({"dim": 4096, "multiple_of": 1024, "ffn_dim_multiplier": 1.3}, 14336),  # LLaMA-3 8B
    ({"dim": 2048, "multiple_of": 256, "ffn_dim_multiplier": 1.5}, 8192),  # LLaMA-3.2 1B
])
def test_meta_hidden_dim_honours_ffn_dim_multiplier(params, intermediate_size):
    """Meta's FeedForward size rule gives the intermediate_size of the released models."""
    assert conversion.meta_hidden_dim(params) == intermediate_size


# ------------------------------------------------------------------------------- output folders


def _snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def _siblings(folder: pathlib.Path) -> list[str]:
    """Names next to `folder` that start with its name (leftover temporary folders)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(folder.name))


@pytest.fixture(scope="module")
def other_lima(exported, tmp_path_factory):
    """The exported lima_jax checkpoint with another lm_head: a second model to export over the first."""
    lima, _ = exported
    params = checkpoint.restore_params(lima)
    params["lm_head"] = params["lm_head"][:, ::-1].copy()
    folder = tmp_path_factory.mktemp("other") / "lima"
    checkpoint.save_params(folder, params, ModelConfig(**checkpoint.read_params_meta(lima)["model"]))
    return folder


def test_export_over_earlier_export_needs_overwrite_and_leaves_no_stale_file(exported, other_lima, tmp_path):
    """An earlier single-file export is refused without --overwrite and replaced as a whole with it: its
    model.safetensors (which transformers prefers to a shard index) must not survive a sharded re-export."""
    import transformers
    lima, _ = exported
    hf = tmp_path / "hf"
    convert.main(["to_hf", "--input", str(lima), "--tokenizer", str(TOY_TOKENIZER), "--output", str(hf)])
    assert (hf / "model.safetensors").is_file()
    before = _snapshot(hf)
    sharded = ["to_hf", "--input", str(other_lima), "--tokenizer", str(TOY_TOKENIZER), "--output", str(hf),
               "--max_shard_gb", "0.0001"]
    with pytest.raises(ConversionError, match=r"/hf: exists and is not empty: pass --overwrite"):
        convert.main(sharded)
    assert _snapshot(hf) == before and _siblings(hf) == ["hf"]

    convert.main(sharded + ["--overwrite"])
    assert not (hf / "model.safetensors").exists() and (hf / "model.safetensors.index.json").is_file()
    assert _siblings(hf) == ["hf"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(hf, local_files_only=True).eval()
    ours = torch_logits(reloaded, TOKENS)
    assert np.max(np.abs(ours - lima_logits(other_lima, TOKENS))) < LOGIT_TOL  # the new weights ...
    assert np.max(np.abs(ours - lima_logits(lima, TOKENS))) > 0.1  # ... not the old ones


def _crashing_writer(monkeypatch):
    """Makes the safetensors writer write part of its file, then fail (a crash or full disk midway)."""
    def write(path, tensors, produce):
        pathlib.Path(path).write_bytes(b"\0" * 100)
        raise OSError("No space left on device (simulated)")
    monkeypatch.setattr(conversion.hf_writer, "write_safetensors", write)


def test_export_failing_midway_leaves_output_as_it_was(exported, other_lima, tmp_path, monkeypatch):
    lima, _ = exported
    hf = tmp_path / "hf"
    (tmp_path / "hf.partial").mkdir()  # a user's folder with a temporary-looking name: never touched
    (tmp_path / "hf.partial" / "model.safetensors").write_bytes(b"user's")
    with monkeypatch.context() as m:
        _crashing_writer(m)
        with pytest.raises(OSError, match="simulated"):
            conversion.export_hf(lima, TOY_TOKENIZER, hf)
    assert _siblings(hf) == ["hf.partial"]  # no output (not even an empty folder), no temporary folder
    assert (tmp_path / "hf.partial" / "model.safetensors").read_bytes() == b"user's"

    conversion.export_hf(lima, TOY_TOKENIZER, hf)
    before = _snapshot(hf)
    with monkeypatch.context() as m:
        _crashing_writer(m)
        with pytest.raises(OSError, match="simulated"):
            conversion.export_hf(other_lima, TOY_TOKENIZER, hf, overwrite=True)
    assert _snapshot(hf) == before and _siblings(hf) == ["hf", "hf.partial"]


def test_import_into_existing_checkpoint_needs_overwrite(tmp_path, monkeypatch):
    src = _tiny_hf_folder(tmp_path / "src")
    out = tmp_path / "lima"
    convert.main(["from_hf", "--input", str(src), "--output", str(out)])
    before = _snapshot(out)
    with pytest.raises(ConversionError, match=r"/lima: exists and is not empty: pass --overwrite"):
        convert.main(["from_hf", "--input", str(src), "--output", str(out), "--dtype", "bfloat16"])
    assert _snapshot(out) == before

    calls = []

    def failing_read(self, name):  # the source fails after a few tensors, while the checkpoint is written
        calls.append(name)
        if len(calls) > 4:
            raise OSError("read error (simulated)")
        return conversion.read_tensor(self.entries[name])
    with monkeypatch.context() as m:
        m.setattr(conversion.HuggingFaceSource, "read", failing_read)
        with pytest.raises(OSError, match="simulated"):
            convert.main(["from_hf", "--input", str(src), "--output", str(out), "--overwrite"])
    assert len(calls) == 5 and _snapshot(out) == before and _siblings(out) == ["lima"]

    convert.main(["from_hf", "--input", str(src), "--output", str(out), "--dtype", "bfloat16", "--overwrite"])
    assert checkpoint.read_params_meta(out)["model"]["param_dtype"] == "bfloat16"
    assert {str(x.dtype) for x in jax.tree.leaves(checkpoint.restore_params(out))} == {"bfloat16"}
    assert _siblings(out) == ["lima"]
    with pytest.raises(ConversionError, match=r"--overwrite would delete the input"):
        convert.main(["from_hf", "--input", str(src), "--output", str(tmp_path), "--overwrite"])
    assert src.is_dir() and out.is_dir()


def test_import_without_model_json_is_not_a_checkpoint(tmp_path):
    """model.json is written last: a folder without it (an import that died midway) is refused by readers."""
    out = tmp_path / "lima"
    conversion.import_checkpoint(conversion.HuggingFaceSource(_tiny_hf_folder(tmp_path / "src")), out)
    assert conversion.load_lima_params(out)[1].dim == 16
    (out / "model.json").unlink()
    with pytest.raises(CheckpointError, match=r"model.json"):
        conversion.load_lima_params(out)
    with pytest.raises(CheckpointError, match=r"model.json"):  # what config.init_from reads
        rundir.stored_model_config(rundir.resolve_checkpoint(out))


# ------------------------------------------------------------------------------------- bad input


def _tiny_hf_folder(folder: pathlib.Path, dtype: str = "float32", vocab_size: int = 32, **config) -> pathlib.Path:
    """A minimal valid HF folder written without transformers (config + one safetensors); vocab_size=513 is the
    toy tokenizer plus EOT."""
    cfg = ModelConfig(vocab_size=vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=24)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    params = {name: rng.normal(size=shape).astype(np_dtype) for name, shape, _ in conversion.hf_tensors({}, cfg)}
    conversion.write_safetensors(folder / "model.safetensors", [(n, a.shape, a.dtype) for n, a in params.items()],
                              params.__getitem__)
    hf = conversion.model_to_hf_config(cfg, dtype, 1, 2, None)
    hf.update(config)
    (folder / "config.json").write_text(json.dumps(hf))
    return folder


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_round_trip_without_torch(tmp_path, dtype):
    """Our own safetensors reader/writer: HF -> lima_jax -> HF is exact with numpy alone, bfloat16 included."""
    src = _tiny_hf_folder(tmp_path / "src", dtype)
    cfg = conversion.import_checkpoint(conversion.HuggingFaceSource(src), tmp_path / "lima")
    assert cfg.param_dtype == dtype
    params = checkpoint.restore_params(tmp_path / "lima")
    assert {str(x.dtype) for x in jax.tree.leaves(params)} == {dtype}
    conversion.write_hf_weights(tmp_path, params, cfg, np.dtype(params["embedding"].dtype), 2**30)
    a = conversion.read_safetensors_header(src / "model.safetensors")
    b = conversion.read_safetensors_header(tmp_path / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = conversion.read_tensor(a[name]), conversion.read_tensor(b[name])
        assert x.dtype == y.dtype and np.array_equal(x, y), name


@pytest.mark.parametrize("field, value, message", [
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0},
     r"config.json: rope_parameters.low_freq_factor missing \(needed with rope_type 'llama3'\)"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, r"config.json: rope_scaling.rope_type='linear'"),
    ("model_type", "mistral", r"config.json: model_type='mistral'"),
    ("attention_bias", True, r"config.json: attention_bias=true"),
    ("head_dim", 4, r"config.json: head_dim=4"),
    ("hidden_act", "gelu", r"config.json: hidden_act='gelu'"),
])
def test_hf_bad_config_is_named(tmp_path, field, value, message):
    if field == "rope_scaling":
        src = _tiny_hf_folder(tmp_path / "m", rope_parameters=None, rope_scaling=value)
    else:
        src = _tiny_hf_folder(tmp_path / "m", **{field: value})
    with pytest.raises(ConversionError, match=message):
        conversion.HuggingFaceSource(src)


def test_hf_shape_mismatch_and_missing_shard_are_named(tmp_path):
    src = _tiny_hf_folder(tmp_path / "m", intermediate_size=20)
    with pytest.raises(ConversionError, match=r"model.safetensors: tensor model.layers.0.mlp.gate_proj.weight"
                                                      r": shape \[24, 16\]"):
        conversion.import_checkpoint(conversion.HuggingFaceSource(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # validated before anything was written
    src = _tiny_hf_folder(tmp_path / "s")
    index = {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"shard model-00002-of-00002.safetensors is listed but missing"):
        conversion.HuggingFaceSource(src)


def test_llama2c_truncated_file_is_named(tmp_path):
    header = struct.pack("<7i", 16, 24, 1, 2, 1, 32, 8)
    path = tmp_path / "m.bin"
    path.write_bytes(header + b"\0" * 100)
    with pytest.raises(ConversionError, match=r"m.bin: size 128 bytes, but the header"):
        conversion.Llama2cSource(path)


def test_cli_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("from_hf", "from_meta", "from_llama2c", "to_hf"):
        assert command in out


@pytest.mark.parametrize("flags", [[], ["--verbose"]])
def test_cli_bad_input_is_one_error_paragraph_and_exit_2(tmp_path, flags):
    """A ConversionError reaches the user as `error: <file>: <what>` and exit status 2, no traceback (with
    --verbose, the traceback too)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("LIMA_VERBOSE", None)
    proc = subprocess.run([sys.executable, "-m", "lima_jax.convert", "from_hf", "--input", "/nonexistent",
                           "--output", str(tmp_path / "X"), *flags], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert ("Traceback" in proc.stderr) == bool(flags), proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "error: /nonexistent/config.json: not found (expected a Hugging Face model folder)"
    assert len(lines) == 1 or flags, proc.stderr
    assert not (tmp_path / "X").exists() and not (tmp_path / "X.partial").exists()


# ------------------------------------------------------------------------------------- to_hf from a run


def _fake_run(root: pathlib.Path, lima: pathlib.Path, tokenizer: pathlib.Path | None) -> pathlib.Path:
    """A run directory: `config.json` (with `tokenizer.path` unless None) and one training checkpoint (step 3,
    epoch 1) holding the parameters of the parameter checkpoint `lima`."""
    run = root / "run"
    saved = checkpoint.TrainCheckpoints(run / rundir.CHECKPOINTS)
    try:
        meta = {"epoch": 1, "step": 3, "model": checkpoint.read_params_meta(lima)["model"]}
        saved.save(3, {"params": checkpoint.restore_params(lima)}, meta)
    finally:
        saved.close()
    config = {"workdir": str(run), "tokenizer": {} if tokenizer is None else {"path": str(tokenizer)}}
    (run / rundir.CONFIG).write_text(json.dumps(config))
    return run


def test_to_hf_from_a_run_takes_its_checkpoint_and_tokenizer(exported, tmp_path, capsys):
    """`to_hf --input RUN` without --tokenizer: the latest checkpoint (no epoch chosen) and the run's
    config.tokenizer.path, both printed; the export equals the one made from the parameter checkpoint."""
    lima, hf = exported
    run = _fake_run(tmp_path, lima, TOY_TOKENIZER)
    convert.main(["to_hf", "--input", str(run), "--output", str(tmp_path / "hf"), "--max_shard_gb", "0.0001"])
    out = capsys.readouterr().out
    assert f"training checkpoint {run / 'checkpoints' / '3'} (step 3, epoch 1): the latest checkpoint" in out
    assert f"tokenizer {TOY_TOKENIZER}: config.tokenizer.path of the run's {run / 'config.json'}" in out
    assert _snapshot(tmp_path / "hf") == _snapshot(hf)


def test_to_hf_from_a_run_whose_tokenizer_path_is_a_folder(exported, tmp_path, capsys):
    """config.tokenizer.path may name a folder (training reads the file in it): to_hf exports that file."""
    lima, hf = exported
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(TOY_TOKENIZER, folder / "tokenizer.model")
    run = _fake_run(tmp_path, lima, folder)
    convert.main(["to_hf", "--input", str(run), "--output", str(tmp_path / "hf"), "--max_shard_gb", "0.0001"])
    assert f"tokenizer {folder / 'tokenizer.model'}: config.tokenizer.path of the run's" in capsys.readouterr().out
    assert _snapshot(tmp_path / "hf") == _snapshot(hf)


def test_to_hf_without_tokenizer_outside_a_run_is_refused(exported, tmp_path):
    lima, _ = exported
    with pytest.raises(ConversionError, match=r"no --tokenizer given, and this is not a checkpoint of a training "
                                              r"run .*: pass --tokenizer"):
        convert.main(["to_hf", "--input", str(lima), "--output", str(tmp_path / "hf")])
    run = _fake_run(tmp_path, lima, None)
    with pytest.raises(ConversionError, match=r"config.json: tokenizer.path is not set: pass --tokenizer"):
        convert.main(["to_hf", "--input", str(run), "--output", str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()
