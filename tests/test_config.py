"""Presets load and validate; lima_65b.py is the paper's recipe; bad values name file and field."""
import pathlib

import pytest

from lima_jax.config import ConfigError, load_config_file, model_config, validate

REPO = pathlib.Path(__file__).resolve().parent.parent
PRESETS = sorted(p.name for p in (REPO / "configs").glob("*.py"))


def filled(name: str):
    config = load_config_file(REPO / "configs" / name)
    config.workdir = config.workdir or "/tmp/unused"
    config.data.train_path = config.data.train_path or "/data/train.jsonl"
    config.tokenizer.path = config.tokenizer.path or "/llama/tokenizer.model"
    config.init_from = config.init_from or "/base"  # presets that require_init_from
    return config


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_validates(name):
    validate(filled(name))


def test_lima_65b_is_the_papers_recipe():
    c = filled("lima_65b.py")
    m = model_config(c, vocab_size=32001)
    # LLaMA-1 65B
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.hidden_dim) == (8192, 80, 64, 64, 22016)
    assert 65.0e9 < m.num_params() < 65.5e9
    # optimizer: AdamW b1 0.9, b2 0.95, weight decay 0.1; lr 1e-5 -> 1e-6 linear, no warmup
    o = c.optimizer
    assert (o.b1, o.b2, o.weight_decay) == (0.9, 0.95, 0.1)
    assert (o.learning_rate, o.end_learning_rate, o.warmup_steps) == (1e-5, 1e-6, 0)
    # batch 32, 15 epochs, 2,048 tokens, residual dropout 0.3 at the top layer
    assert (c.train.batch_size, c.train.num_epochs, c.data.max_len) == (32, 15, 2048)
    assert c.model.residual_dropout_max == 0.3
    assert c.data.loss_on == "assistant"
    assert tuple(c.dev_report.epochs) == (5, 6, 7, 8, 9, 10)


@pytest.mark.parametrize("name,params_b", [("lima_7b.py", 6.7), ("lima_13b.py", 13.0), ("lima_33b.py", 32.5),
                                            ("llama2_70b.py", 69.0), ("llama3_8b.py", 8.03)])
def test_model_shapes_have_the_published_sizes(name, params_b):
    c = filled(name)
    vocab = 128256 if "llama3" in name else 32001
    assert model_config(c, vocab).num_params() / 1e9 == pytest.approx(params_b, rel=0.04)


def test_smaller_models_use_batch_64_and_dropout_0_2():
    c = filled("lima_7b.py")
    assert (c.train.batch_size, c.model.residual_dropout_max) == (64, 0.2)
    assert (c.optimizer.learning_rate, c.train.num_epochs) == (1e-5, 15)  # the rest is the recipe


@pytest.mark.parametrize("field,value,message", [
    ("model.n_kv_heads", 3, "must divide n_heads"),
    ("model.residual_dropout_max", 1.5, r"must be in \[0, 1\)"),
    ("data.packing", "packed", "must be one of"),
    ("optimizer.end_learning_rate", 1.0, "must be in"),
    ("data.loss_on", "prompt", "must be one of"),
    ("model.remat_policy", "sometimes", "must be one of"),
    ("model.attention", "flash", "must be one of"),
    ("model.attention", "cudnn", "takes bfloat16 or float16 only"),  # the toy computes in float32
    ("data.max_len", 4096, "exceeds model.max_seq_len"),
    ("workdir", "", "set an output folder"),
    ("data.max_line_bytes", 0, "must be a positive int"),
    ("data.max_line_bytes", -1, "must be a positive int"),
    ("train.checkpoint_every_minutes", -1.0, "must be a number >= 0"),
    ("train.loss_chunk_length", -1, "must be an int >= 0"),
    ("model.vocab_multiple", 0, "must be a positive int"),
    ("optimizer.mu_dtype", "float16", "must be one of"),
    ("tokenizer.eot_init", "first", "must be one of"),
])
def test_bad_values_name_the_file_and_field(field, value, message):
    c = filled("toy.py")
    section, _, key = field.rpartition(".")
    (c[section] if section else c)[key] = value
    with pytest.raises(ConfigError, match=message) as error:
        validate(c)
    assert "configs/toy.py" in str(error.value) and f"config.{field}=" in str(error.value)


@pytest.mark.parametrize("packing, ok", [("none", False), ("rows", False), ("examples", True)])
def test_grad_accum_steps_must_divide_the_batch_unless_packing_examples_rounds_the_rows_up(packing, ok):
    c = filled("toy.py")
    c.data.packing, c.train.grad_accum_steps = packing, 3  # batch_size 8
    if ok:
        validate(c)
    else:
        with pytest.raises(ConfigError, match="must divide train.batch_size=8"):
            validate(c)


def test_max_line_bytes_defaults_to_the_readers_limit_and_may_be_absent_in_an_older_config_json():
    from lima_jax.data.formats import MAX_LINE_BYTES
    c = filled("lima_65b.py")
    assert c.data.max_line_bytes == MAX_LINE_BYTES == 4 * 2**20
    del c.data["max_line_bytes"]  # a run's config.json written before the field existed
    validate(c)


def test_checkpoint_every_minutes_is_off_by_default_and_may_be_absent_in_an_older_config_json():
    c = filled("lima_65b.py")
    assert c.train.checkpoint_every_minutes == 0.0
    del c.train["checkpoint_every_minutes"]  # a run's config.json written before the field existed
    validate(c)


def test_async_checkpointing_is_on_by_default_must_be_a_bool_and_may_be_absent_in_an_older_config_json():
    c = filled("lima_65b.py")
    assert c.train.async_checkpointing is True
    del c.train["async_checkpointing"]  # a run's config.json written before the field existed: on
    validate(c)
    c.train.async_checkpointing = "sometimes"  # e.g. a hand-edited config.json
    with pytest.raises(ConfigError, match=r"config.train.async_checkpointing='sometimes': must be true or false"):
        validate(c)


# ------------------------------------------------------------------------------------------ LLaMA-3.x, RoPE


@pytest.mark.parametrize("name, billions, tied, factor", [
    ("llama31_8b.py", 8.03, False, 8.0), ("llama31_70b.py", 70.6, False, 8.0),
    ("llama32_1b.py", 1.24, True, 32.0), ("llama32_3b.py", 3.21, True, 32.0)])
def test_llama3x_presets_have_the_published_shapes_and_scaled_rope(name, billions, tied, factor):
    """The published totals (8.03B, 70.6B, 1.24B, 3.21B at vocabulary 128,256) and Meta's config.json RoPE:
    theta 500,000, llama3 scaling (factor 8 for 3.1, 32 for 3.2 1B/3B; 1 / 4; 8,192), 131,072 context."""
    m = model_config(filled(name), vocab_size=128256)
    assert round(m.num_params() / 1e9, 2 if billions < 10 else 1) == billions
    assert (m.n_kv_heads, m.tie_embeddings, m.max_seq_len) == (8, tied, 131072)
    assert (m.rope_theta, m.rope_type, m.rope_scaling_factor, m.rope_low_freq_factor, m.rope_high_freq_factor,
            m.rope_original_max_seq_len) == (500000.0, "llama3", factor, 1.0, 4.0, 8192)


def test_rope_type_default_override_drops_the_scaling_parameters():
    from lima_jax.config import apply_overrides
    c = filled("llama31_8b.py")
    apply_overrides(c, [("model.rope_type", "default")])
    validate(c)
    m = model_config(c, vocab_size=128256)
    assert (m.rope_type, m.rope_scaling_factor, m.rope_original_max_seq_len) == ("default", None, None)
    apply_overrides(c, [("model.rope_type", "llama3"), ("model.rope_scaling_factor", "16")])
    assert model_config(c, vocab_size=128256).rope_scaling_factor == 16.0


@pytest.mark.parametrize("field, value, message", [
    ("rope_type", "yarn", r"config.model.rope_type='yarn': must be one of \('default', 'llama3'\)"),
    ("rope_scaling_factor", None, r"config.model.rope_scaling_factor=None: must be a number >= 1 with "
                                  r"rope_type='llama3'"),
    ("rope_high_freq_factor", 0.5, r"config.model.rope_high_freq_factor=0.5: must be a number > "
                                   r"rope_low_freq_factor=1.0"),
    ("rope_original_max_seq_len", 8192.0, r"config.model.rope_original_max_seq_len=8192.0: must be a positive int"),
])
def test_bad_rope_values_name_the_file_and_field(field, value, message):
    c = filled("llama31_8b.py")
    with c.ignore_type():
        c.model[field] = value
    with pytest.raises(ConfigError, match=message) as error:
        validate(c)
    assert "configs/llama31_8b.py" in str(error.value)


def test_rope_fields_may_be_absent_in_an_older_config_json(tmp_path):
    """A run's config.json written before the RoPE scaling fields: plain RoPE, as it was trained."""
    import json
    from lima_jax.config import LLAMA3_ROPE_FIELDS
    c = filled("toy.py").to_dict()
    for field in ("rope_type", *LLAMA3_ROPE_FIELDS):
        del c["model"][field]
    (tmp_path / "config.json").write_text(json.dumps(c))
    old = load_config_file(tmp_path / "config.json")
    validate(old)
    assert model_config(old, vocab_size=513) == model_config(filled("toy.py"), vocab_size=513)


def test_stories260k_requires_init_from(repo, tmp_path):
    """Without init_from configs/stories260k.py would fine-tune a random model: a ConfigError naming the field."""
    from lima_jax.config import load_config_file, validate
    from lima_jax.errors import ConfigError
    config = load_config_file(repo / "configs" / "stories260k.py")
    config.workdir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"config\.init_from='': .*--config\.init_from="):
        validate(config)
    config.init_from = str(tmp_path / "base")
    validate(config)  # the value is checked when training starts (check_init_from)
    validate(load_config_file(repo / "configs" / "toy.py"), paths=False)  # toy trains from scratch


def test_eot_init_applies_to_a_new_row_only():
    """Copying BOS/EOS into EOT's row only makes sense where that row is new; an existing token's row stays."""
    c = filled("toy.py")
    c.tokenizer.eot_init = "bos"
    validate(c)
    c.tokenizer.eot = "<|eot_id|>"
    with pytest.raises(ConfigError, match=r"config.tokenizer.eot_init='bos'.*existing token"):
        validate(c)
