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
    ("data.max_len", 4096, "exceeds model.max_seq_len"),
    ("workdir", "", "set an output folder"),
    ("data.max_line_bytes", 0, "must be a positive int"),
    ("data.max_line_bytes", -1, "must be a positive int"),
    ("train.checkpoint_every_minutes", -1.0, "must be a number >= 0"),
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
