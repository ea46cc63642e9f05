"""Scaled RoPE (rope_type "llama3", LLaMA-3.1/3.2) through conversion: logit parity with transformers for every
model kind (grouped-query and multi-head attention, tied and untied embeddings, default and llama3 RoPE), both
ways (Hugging Face -> lima_jax and lima_jax -> Hugging Face), Meta's params.json, and the config.json forms.

The tiny llama3 models pretrain at 16 positions (original_max_position_embeddings) and are run on 40, with
theta 10,000 and head_dim 16, so each of the three frequency bands (kept, blended, divided by the factor) has
dimensions and the scaling changes the logits by far more than the tolerance (checked: the same weights with
plain RoPE are far off). `pytest tests/test_convert_rope.py -s` prints one table row per kind and direction.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from lima_jax import checkpoint, conversion
from lima_jax.config import ModelConfig
from lima_jax.conversion.rope import META_LLAMA3_ROPE
from lima_jax.errors import ConversionError
from tests.test_convert import (LOGIT_TOL, META, TOY_TOKENIZER, _meta_weights, _tiny_hf_folder, _write_meta,
                                lima_logits, meta_reference_logits, torch_logits)

TINY_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
KINDS = {  # name: (num_key_value_heads, tie_word_embeddings, RoPE scaling or None)
    "GQA 4/2, untied, default RoPE": (2, False, None),
    "GQA 4/2, tied, default RoPE": (2, True, None),
    "GQA 4/2, untied, llama3 RoPE": (2, False, TINY_LLAMA3),
    "GQA 4/2, tied, llama3 RoPE": (2, True, TINY_LLAMA3),
    "MHA 4/4, untied, llama3 RoPE": (4, False, TINY_LLAMA3),
}
TOKENS = np.random.default_rng(3).integers(0, 513, size=(2, 40))


@pytest.fixture(scope="module", params=list(KINDS))
def kind(request, tmp_path_factory):
    """(name, transformers model, its folder, the lima_jax import, the re-export) for one kind; vocabulary 513
    (the toy tokenizer plus EOT), saved in the transformers 5 config form."""
    torch = pytest.importorskip("torch", reason="torch is in the 'parity' extra")
    transformers = pytest.importorskip("transformers", reason="transformers is in the 'parity' extra")
    n_kv, tied, scaling = KINDS[request.param]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=513, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_parameters={"rope_theta": 10000.0, **(scaling or {"rope_type": "default"})})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # weights large enough that every layer matters to the logits
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("kind")
    model.save_pretrained(root / "hf")
    conversion.import_checkpoint(conversion.HuggingFaceSource(root / "hf"), root / "lima")
    conversion.export_hf(root / "lima", TOY_TOKENIZER, root / "export")
    return request.param, model, root


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)))


def test_import_logits_match_transformers(kind):
    name, model, root = kind
    cfg = ModelConfig(**checkpoint.read_params_meta(root / "lima")["model"])
    n_kv, tied, scaling = KINDS[name]
    assert (cfg.n_kv_heads, cfg.tie_embeddings, cfg.rope_type) == (n_kv, tied, "llama3" if scaling else "default")
    if scaling:
        assert (cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                cfg.rope_original_max_seq_len) == (8.0, 1.0, 4.0, 16)
    diff = _diff(lima_logits(root / "lima", TOKENS), torch_logits(model, TOKENS))
    print(f"\n| {name} | Hugging Face -> lima_jax | {diff:.2e} |")
    assert diff < LOGIT_TOL


def test_export_logits_match_in_transformers(kind):
    import transformers
    name, _, root = kind
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(root / "export", local_files_only=True).eval()
    diff = _diff(torch_logits(reloaded, TOKENS), lima_logits(root / "lima", TOKENS))
    print(f"\n| {name} | lima_jax -> Hugging Face | {diff:.2e} |")
    assert diff < LOGIT_TOL
    hf = json.loads((root / "export" / "config.json").read_text())
    scaling = KINDS[name][2]
    assert hf["rope_scaling"] == scaling  # what transformers 4 reads (null: plain RoPE) ...
    assert hf["rope_parameters"] == {"rope_theta": 10000.0, **(scaling or {"rope_type": "default"})}  # ... and 5
    assert hf["rope_theta"] == 10000.0


def test_the_other_rope_is_far_from_transformers(kind, tmp_path):
    """Guards the parity above: each kind's weights run with the other RoPE (plain for the llama3 kinds, llama3
    scaling for the plain ones) are far from transformers, so the parity really checks the RoPE kind."""
    name, model, root = kind
    params = checkpoint.restore_params(root / "lima")
    cfg = ModelConfig(**checkpoint.read_params_meta(root / "lima")["model"])
    if KINDS[name][2] is None:
        other = dataclasses.replace(cfg, rope_type="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                                    rope_high_freq_factor=4.0, rope_original_max_seq_len=16)
    else:
        other = dataclasses.replace(cfg, rope_type="default", rope_scaling_factor=None, rope_low_freq_factor=None,
                                    rope_high_freq_factor=None, rope_original_max_seq_len=None)
    checkpoint.save_params(tmp_path / "other", params, other)
    assert _diff(lima_logits(tmp_path / "other", TOKENS), torch_logits(model, TOKENS)) > 0.1


@pytest.mark.parametrize("head_dim, theta, factor", [(128, 500000.0, 8.0), (64, 500000.0, 32.0), (16, 1e4, 8.0)])
def test_frequencies_equal_transformers(head_dim, theta, factor):
    """lima_jax's llama3 frequencies against transformers' own `_compute_llama3_parameters` at LLaMA-3.1 8B's
    head (factor 8), LLaMA-3.2 1B's (factor 32) and the tiny test models'."""
    pytest.importorskip("torch", reason="torch is in the 'parity' extra")
    transformers = pytest.importorskip("transformers", reason="transformers is in the 'parity' extra")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from lima_jax.model import rope_frequencies
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192 if head_dim > 16 else 16}
    hf = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=131072,
                                  rope_parameters={"rope_theta": theta, **scaling})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    cfg = ModelConfig(vocab_size=8, dim=head_dim * 4, n_layers=1, n_heads=4, n_kv_heads=4, hidden_dim=8,
                      rope_theta=theta, rope_type="llama3", rope_scaling_factor=factor, rope_low_freq_factor=1.0,
                      rope_high_freq_factor=4.0, rope_original_max_seq_len=scaling["original_max_position_embeddings"])
    ours = np.asarray(rope_frequencies(head_dim, cfg))
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6, atol=0)


def test_hf_config_forms_agree_for_llama3(kind, tmp_path):
    """The transformers 4 form (rope_scaling without theta, rope_theta beside it) reads as the 5 form."""
    name, _, root = kind
    hf = json.loads((root / "hf" / "config.json").read_text())
    parameters = hf.pop("rope_parameters")
    theta = parameters.pop("rope_theta")
    hf.update(rope_theta=theta, rope_scaling=parameters if parameters["rope_type"] != "default" else None)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(hf))
    for f in (root / "hf").glob("*.safetensors"):
        (tmp_path / "old" / f.name).symlink_to(f)
    assert conversion.HuggingFaceSource(tmp_path / "old").config == conversion.HuggingFaceSource(root / "hf").config


@pytest.mark.parametrize("rope, message", [
    ({"rope_parameters": {**TINY_LLAMA3, "rope_theta": 5e5, "factor": 0.5}},
     r"config.json: rope_parameters.factor=0.5: must be a number >= 1"),
    ({"rope_parameters": {**TINY_LLAMA3, "high_freq_factor": 1.0}},
     r"config.json: rope_parameters.high_freq_factor=1.0: must be a number > rope_low_freq_factor=1.0"),
    ({"rope_scaling": {**TINY_LLAMA3, "original_max_position_embeddings": 16.5}},
     r"config.json: rope_scaling.original_max_position_embeddings=16.5: must be a positive int"),
    ({"rope_scaling": {k: v for k, v in TINY_LLAMA3.items() if k != "low_freq_factor"}},
     r"config.json: rope_scaling.low_freq_factor missing \(needed with rope_type 'llama3'\)"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
     r"config.json: rope_parameters.rope_type='yarn': only \('default', 'llama3'\) RoPE is supported"),
    ({"rope_parameters": {**TINY_LLAMA3, "attention_factor": 1.2}},
     r"config.json: rope_parameters has \['attention_factor'\], unknown to the converter"),
    ({"rope_scaling": TINY_LLAMA3, "rope_parameters": {**TINY_LLAMA3, "factor": 32.0}},
     r"config.json: rope_scaling and rope_parameters disagree on \['factor'\]"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "rope_theta": 1e4},
     r"config.json: rope_theta differs: rope_theta=10000.0, rope_parameters.rope_theta=500000.0"),
])
def test_hf_bad_rope_config_is_named(tmp_path, rope, message):
    src = _tiny_hf_folder(tmp_path / "m", **{"rope_scaling": None, "rope_parameters": None, "rope_theta": None,
                                             **rope})
    with pytest.raises(ConversionError, match=message):
        conversion.HuggingFaceSource(src)


# Meta's published config.json of Llama-3.1-8B and Llama-3.2-1B (no weights needed: the config alone)
LLAMA31_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256}
LLAMA32_1B_CONFIG = {
    **LLAMA31_8B_CONFIG, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "head_dim": 64,
    "rope_scaling": {**LLAMA31_8B_CONFIG["rope_scaling"], "factor": 32.0}, "tie_word_embeddings": True}


@pytest.mark.parametrize("hf, preset", [(LLAMA31_8B_CONFIG, "llama31_8b.py"), (LLAMA32_1B_CONFIG, "llama32_1b.py")])
def test_presets_accept_the_import_of_the_real_config(hf, preset):
    """The LLaMA-3.x presets describe exactly what `from_hf` makes of Meta's config.json, so `config.init_from`
    of such an import passes the architecture check (RoPE scaling included) and the context is the same."""
    from lima_jax.config import load_config_file, model_config
    imported, dtype = conversion.hf_config_to_model(hf, "config.json")
    config = load_config_file(pathlib.Path(__file__).resolve().parent.parent / "configs" / preset)
    ours = model_config(config, vocab_size=128256)
    checkpoint.check_model_matches(dataclasses.asdict(imported), ours, "import")
    assert (imported.max_seq_len, imported.rope_type, dtype) == (ours.max_seq_len, "llama3", "bfloat16")
    assert imported.num_params() == ours.num_params()


# ----------------------------------------------------------------------------------------------- Meta


def _meta_llama3_frequencies(freqs: np.ndarray) -> np.ndarray:
    """Meta's `apply_scaling` (llama-models, models/llama3) in float64: factor 8, low 1, high 4, 8,192."""
    wavelen = 2 * np.pi / freqs
    smooth = (8192 / wavelen - 1) / (4 - 1)
    return np.where(wavelen < 8192 / 4, freqs, np.where(wavelen > 8192, freqs / 8,
                                                        (1 - smooth) * freqs / 8 + smooth * freqs))


def test_meta_scaled_rope_imports_and_matches_metas_reference(tmp_path):
    """`use_scaled_rope: true` imports as Meta's llama3 scaling; logits equal a numpy forward with Meta's
    `apply_scaling` (theta 500,000, head_dim 16: the two lowest frequencies are scaled or blended)."""
    pytest.importorskip("torch", reason="torch is in the 'parity' extra (reads .pth shards)")
    weights = _meta_weights(np.random.default_rng(1))
    src = _write_meta(tmp_path / "meta", weights, 1)
    params = {**META, "rope_theta": 500000.0, "use_scaled_rope": True}
    (src / "params.json").write_text(json.dumps(params))
    cfg = conversion.import_checkpoint(conversion.MetaSource(src), tmp_path / "lima", "float32")
    assert (cfg.rope_type, cfg.max_seq_len) == ("llama3", 131072)
    assert {f: getattr(cfg, f) for f in META_LLAMA3_ROPE} == META_LLAMA3_ROPE
    tokens = np.random.default_rng(2).integers(0, META["vocab_size"], size=(1, 600))
    ours = lima_logits(tmp_path / "lima", tokens)
    scaled = meta_reference_logits(weights, params, tokens, _meta_llama3_frequencies)
    plain = meta_reference_logits(weights, params, tokens)
    print(f"\n| Meta params.json use_scaled_rope, GQA 4/2, untied | Meta -> lima_jax | "
          f"{_diff(ours, scaled):.2e} |  (vs plain RoPE: {_diff(ours, plain):.2e})")
    assert _diff(ours, scaled) < LOGIT_TOL and _diff(ours, plain) > 100 * LOGIT_TOL


@pytest.mark.parametrize("params, factor, high", [
    ({"dim": 4096, "n_layers": 32}, 8.0, 4.0),  # LLaMA-3.1 8B
    ({"dim": 2048, "n_layers": 16}, 32.0, 4.0),  # LLaMA-3.2 1B
    ({"dim": 3072, "n_layers": 28}, 32.0, 4.0),  # LLaMA-3.2 3B
    ({"dim": 4096, "n_layers": 32, "rope_scaling_factor": 16, "rope_high_freq_factor": 2.0}, 16.0, 2.0),
])
def test_meta_scaled_rope_parameters(params, factor, high):
    from lima_jax.conversion.rope import meta_rope_fields
    fields = meta_rope_fields({**params, "rope_theta": 500000.0, "use_scaled_rope": True}, "params.json")
    assert fields == {"rope_theta": 500000.0, "rope_type": "llama3", "rope_scaling_factor": factor,
                      "rope_low_freq_factor": 1.0, "rope_high_freq_factor": high, "rope_original_max_seq_len": 8192}
    assert meta_rope_fields({**params, "use_scaled_rope": False}, "params.json")["rope_type"] == "default"
    with pytest.raises(ConversionError, match=r"params.json: use_scaled_rope=true with rope_high_freq_factor=0.5"):
        meta_rope_fields({**params, "use_scaled_rope": True, "rope_high_freq_factor": 0.5}, "params.json")


# ------------------------------------------------------------------------------------ init_from, resume


def test_init_from_and_resume_checks_cover_the_rope_fields():
    """A lima_jax checkpoint of a LLaMA-3.1 import refuses a config with plain RoPE (and back); a model.json
    written before the fields existed means plain RoPE."""
    from lima_jax.config import ConfigError
    base = ModelConfig(vocab_size=8, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=8, rope_theta=5e5)
    scaled = dataclasses.replace(base, rope_type="llama3", **META_LLAMA3_ROPE)
    stored_scaled, stored_old = dataclasses.asdict(scaled), dataclasses.asdict(base)
    for field in ("rope_type", *META_LLAMA3_ROPE):
        del stored_old[field]
    checkpoint.check_model_matches(stored_scaled, scaled, "ckpt")
    checkpoint.check_model_matches(stored_old, base, "ckpt")
    checkpoint.check_resume_matches(stored_old, base, "ckpt")
    with pytest.raises(ConfigError, match=r"ckpt: checkpoint has model.rope_type=llama3, the config has default"):
        checkpoint.check_model_matches(stored_scaled, base, "ckpt")
    with pytest.raises(ConfigError, match=r"ckpt: checkpoint has model.rope_type=default, the config has llama3"):
        checkpoint.check_model_matches(stored_old, scaled, "ckpt")
    with pytest.raises(ConfigError, match=r"model.rope_scaling_factor: checkpoint 8.0, config 32.0"):
        checkpoint.check_resume_matches(stored_scaled, dataclasses.replace(scaled, rope_scaling_factor=32.0), "ckpt")
    with pytest.raises(ConfigError, match=r"model.rope_type: checkpoint 'default', config 'llama3'"):
        checkpoint.check_resume_matches(stored_old, scaled, "ckpt")
