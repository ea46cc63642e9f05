"""The real pretrained stories260K (llama2.c format, ../shared/data/llama): import, quality, fine-tune, export."""
from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from tests.conftest import shared_file
from lima_jax import checkpoint, convert, rundir
from lima_jax.config import ModelConfig, load_config_file
from lima_jax.data.formats import DataError
from lima_jax.model import Llama
from lima_jax.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parent.parent
# TinyStories-style text written for this test (not from the training set).
STORY = ("Once upon a time, there was a little boy named Tim. Tim liked to play with his red ball in the park. "
         "One day, he saw a big dog. The dog wanted to play too. Tim threw the ball and the dog ran to get it. "
         "They played all day and became best friends. Tim was very happy.")


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    """(checkpoint folder, ModelConfig, params, tokenizer) of stories260K imported through the CLI."""
    bin_path, tok_path = shared_file("llama/stories260K.bin"), shared_file("llama/tok512.model")
    out = tmp_path_factory.mktemp("stories") / "lima"
    convert.main(["from_llama2c", "--input", str(bin_path), "--output", str(out)])
    cfg = ModelConfig(**checkpoint.read_params_meta(out)["model"])
    return out, cfg, checkpoint.restore_params(out), Tokenizer(tok_path)


def _loss_fn(model: Llama):
    """Mean next-token cross-entropy of one token sequence, jitted once per model."""
    @jax.jit
    def loss(params, tokens):
        logits, _ = model.apply({"params": params}, tokens[None, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits[0], tokens[1:]).mean()
    return loss


def test_stories260k_config_and_loss_far_below_random(stories):
    _, cfg, params, tok = stories
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.vocab_size,
            cfg.tie_embeddings) == (64, 5, 8, 4, 172, 512, True)
    assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(params))
    model = Llama(cfg)
    ids = jnp.asarray([tok.bos_id] + tok.encode(STORY))
    loss = _loss_fn(model)
    pretrained = float(loss(params, ids))
    rng = np.random.default_rng(0)  # the model's own init (normal 0.02, norm scales 1), without compiling init
    random_params = jax.tree_util.tree_map_with_path(
        lambda path, x: np.ones_like(x) if "scale" in jax.tree_util.keystr(path) else
        rng.normal(0, 0.02, x.shape).astype(x.dtype), params)
    random = float(loss(random_params, ids))
    print(f"\nstories260K next-token loss on a {len(ids) - 1}-token TinyStories-style text: imported "
          f"{pretrained:.3f} nats, random init {random:.3f} (ln 512 = {np.log(512):.3f})")
    assert pretrained < 2.0 < 5.5 < random


def greedy(model: Llama, params, prompt: list[int], steps: int) -> list[int]:
    """Full-forward argmax decoding (no KV cache): one jitted forward over a fixed-length buffer per token."""
    length = len(prompt) + steps
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
    ids = list(prompt)
    while len(ids) < length:
        buffer = np.zeros((1, length), np.int32)
        buffer[0, :len(ids)] = ids
        ids.append(int(jnp.argmax(forward(params, jnp.asarray(buffer))[0, len(ids) - 1])))
    return ids


def test_stories260k_greedy_from_bos_is_fluent_english(stories):
    _, cfg, params, tok = stories
    ids = greedy(Llama(cfg), params, [tok.bos_id], 48)
    text = tok.decode(ids)
    words = text.split()
    print(f"\nstories260K greedy from BOS, first 30 words: {' '.join(words[:30])}")
    assert len(words) >= 30
    assert text.startswith("Once upon a time, there was a little")
    # English words: nearly all are whole-word pieces of LLaMA's 32,000-piece vocabulary, used as a
    # dictionary (misspelt or invented words are not: "Onc uponna tme, thre wsa litle gril" scores 3 of 13)
    import sentencepiece as spm
    dictionary = spm.SentencePieceProcessor(model_file=str(shared_file("llama/llama_tokenizer.model")))
    known = sum(dictionary.piece_to_id("\u2581" + w.strip(".,!?\"'")) != dictionary.unk_id() for w in words)
    assert known / len(words) > 0.9


@pytest.fixture(scope="module")
def finetuned(stories, tmp_path_factory):
    """configs/stories260k.py run for 2 epochs from the import; returns (workdir, metrics records)."""
    from lima_jax import training
    ckpt, *_ = stories
    config = load_config_file(REPO / "configs" / "stories260k.py")
    config.workdir = str(tmp_path_factory.mktemp("finetune") / "run")
    config.init_from = str(ckpt)
    config.tokenizer.path = str(shared_file("llama/tok512.model"))
    config.data.dev_path = ""
    config.train.num_epochs = 2
    # 4 steps on the 48 toy examples: a rate 10x the experiment's (tuned for ~200 steps) so the loss moves
    config.optimizer.learning_rate, config.optimizer.end_learning_rate = 1e-3, 1e-4
    training.train(config)
    records = [json.loads(line) for line in (pathlib.Path(config.workdir) / "metrics.jsonl").open()]
    return pathlib.Path(config.workdir), records


def test_stories260k_finetunes_from_import(stories, finetuned):
    _, cfg, params, tok = stories
    workdir, records = finetuned
    losses = [r["loss"] for r in records if "loss" in r]
    print(f"\nstories260K fine-tuning on data/toy_lima.jsonl from the import: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[0] < 5.0  # from a random init it would start near ln(513) = 6.24: init_from took effect
    assert losses[-1] < losses[0] - 0.3
    trained, trained_cfg = checkpoint.restore_train_params(max(workdir.glob("checkpoints/[0-9]*"),
                                                               key=lambda p: int(p.name)))
    assert trained_cfg.vocab_size == tok.vocab_size == 513  # EOT added
    # the pretrained rows survive fine-tuning approximately; EOT's started as their mean
    start = np.asarray(params["embedding"])
    assert np.abs(trained["embedding"][:512] - start).max() < 0.5


def test_stories260k_init_from_rejects_mismatched_model(stories, tmp_path):
    from lima_jax.errors import ConfigError
    ckpt, cfg, *_ = stories
    stored = rundir.stored_model_config(rundir.resolve_checkpoint(ckpt))
    checkpoint.check_model_matches(stored, ModelConfig(**{**cfg.__dict__, "vocab_size": 513}), "x",
                                   allow_smaller_vocab=True)  # the EOT row may be missing
    for field, value in (("n_layers", 4), ("rope_theta", 500000.0)):
        wrong = ModelConfig(**{**cfg.__dict__, field: value, "vocab_size": 513})
        with pytest.raises(ConfigError, match=f"checkpoint has model.{field}"):
            checkpoint.check_model_matches(stored, wrong, str(ckpt), allow_smaller_vocab=True)
    with pytest.raises(ConfigError, match="vocabulary 512 differs"):  # generation needs the exact vocabulary
        checkpoint.check_model_matches(stored, ModelConfig(**{**cfg.__dict__, "vocab_size": 513}), str(ckpt))


def test_stories260k_finetuned_export_matches_in_transformers(stories, finetuned, tmp_path):
    torch = pytest.importorskip("torch", reason="torch is in the 'parity' extra")
    transformers = pytest.importorskip("transformers", reason="transformers is in the 'parity' extra")
    *_, tok = stories
    workdir, _ = finetuned
    step_dir = max(workdir.glob("checkpoints/[0-9]*"), key=lambda p: int(p.name))
    convert.main(["to_hf", "--input", str(step_dir), "--tokenizer", str(tok.path), "--output", str(tmp_path / "hf")])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert model.config.tie_word_embeddings and model.config.vocab_size == 513
    params, cfg = checkpoint.restore_train_params(step_dir)
    ids = tok.encode_dialog(["Tell me a story about a dog.", "Once upon a time"]).ids
    ours, _ = Llama(cfg).apply({"params": params}, jnp.asarray([ids]))
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.numpy()
    ours = np.asarray(ours)[..., :cfg.vocab_size]  # the export strips the vocabulary padding
    diff = float(np.max(np.abs(ours - theirs)))
    print(f"\nfine-tuned stories260K (tied embeddings, EOT) lima_jax -> HF: max |logit diff| = {diff:.2e} (tol 1e-4)")
    assert diff < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert hf_tok.eos_token_id == tok.eot_id
    assert model.generation_config.eos_token_id == [tok.eot_id, tok.eos_id]
    assert hf_tok(STORY).input_ids == [tok.bos_id] + tok.encode(STORY)


def test_stories260k_run_exports_without_tokenizer_flag(finetuned, tmp_path, capsys):
    """`to_hf --input WORKDIR`: the run's latest checkpoint (no epoch chosen) and its config.tokenizer.path."""
    workdir, _ = finetuned
    step_dir = max(workdir.glob("checkpoints/[0-9]*"), key=lambda p: int(p.name))
    convert.main(["to_hf", "--input", str(workdir), "--output", str(tmp_path / "hf")])
    out = capsys.readouterr().out
    assert f"training checkpoint {step_dir} (step {step_dir.name}, epoch 2): the latest checkpoint" in out
    assert f"tokenizer {shared_file('llama/tok512.model')}: config.tokenizer.path of the run's" in out
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["vocab_size"] == 513 and (tmp_path / "hf" / "tokenizer.json").is_file()


def test_init_from_bfloat16_import_grows_eot_row(stories, tmp_path):
    """`runtime.load_pretrained_params` on a bfloat16 import: cast to the model's float32, EOT row = mean row,
    or a copy of BOS's row (`tokenizer.eot_init="bos"`: the story separator of llama2.c's pretraining)."""
    from lima_jax import runtime, sharding
    _, cfg, params, tok = stories
    convert.main(["from_llama2c", "--input", str(shared_file("llama/stories260K.bin")), "--output",
                  str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    model_cfg = ModelConfig(**{**cfg.__dict__, "vocab_size": tok.vocab_size, "param_dtype": "float32"})
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
    choice = rundir.resolve_checkpoint(tmp_path / "bf16")
    stored = rundir.stored_model_config(choice)
    loaded = runtime.load_pretrained_params(choice, model_cfg, stored, mesh, sharding.LAYOUTS["data"])
    embedding = np.asarray(loaded["embedding"])
    assert embedding.dtype == np.float32 and embedding.shape == (513, 64)
    expected = np.asarray(params["embedding"]).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(embedding[:512], expected)
    np.testing.assert_allclose(embedding[512], expected.mean(0), rtol=1e-5, atol=1e-6)
    assert "lm_head" not in loaded  # tied: the EOT logit uses the new embedding row
    from_bos = runtime.load_pretrained_params(choice, model_cfg, stored, mesh, sharding.LAYOUTS["data"],
                                              tok.bos_id)
    np.testing.assert_array_equal(np.asarray(from_bos["embedding"])[512], expected[tok.bos_id])


def test_base_model_is_sampled_as_plain_completion(stories, tmp_path, capsys):
    """`generate --prompt_format=completion` on the import (no EOT row): `<bos> text`, continued greedily
    exactly as the full-forward reference does; the chat format refuses the base model, naming the way out."""
    from lima_jax import generate
    from lima_jax.errors import ConfigError
    ckpt, cfg, params, tok = stories
    text = "Once upon a time, there was a little girl"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "text": text}) + "\n")
    out = tmp_path / "base.jsonl"
    flags = ["--config", str(REPO / "configs" / "stories260k.py"),
             f"--config.tokenizer.path={shared_file('llama/tok512.model')}", "--checkpoint", str(ckpt),
             "--prompts", str(prompts), "--out", str(out), "--greedy", "--repetition_penalty", "1", "--max_new_tokens",
             "24", "--batch_size", "1"]
    with pytest.raises(ConfigError, match="a base model .* --prompt_format=completion"):
        generate.main(flags)
    generate.main(flags + ["--prompt_format", "completion"])
    assert "prompt format: completion" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    prompt = [tok.bos_id] + tok.encode(text)
    reference = greedy(Llama(cfg), params, prompt, 24)[len(prompt):]
    if tok.eos_id in reference:
        reference = reference[:reference.index(tok.eos_id)]
    assert record["response"] == tok.decode(reference) and record["prompt_tokens"] == len(prompt)
    assert record["response_tokens"] == len(reference) and record["stop_reason"] in ("eos", "max_new_tokens")
    multi = tmp_path / "multi.jsonl"
    multi.write_text(json.dumps({"id": "m", "turns": ["Hi", "And then?"]}) + "\n")
    with pytest.raises(DataError, match="2 turns; a completion prompt is one text"):
        generate.main(flags[:5] + ["--prompts", str(multi)] + flags[7:] + ["--prompt_format", "completion"])


def test_stories260k_finetuned_export_generates_as_lima_jax_in_transformers(finetuned, tmp_path):
    """Greedy decoding (no repetition penalty) of the fine-tuned model: transformers' `generate` on the
    export gives lima_jax's tokens, stop token included where lima_jax stopped; its chat ids are lima_jax's."""
    torch = pytest.importorskip("torch", reason="torch is in the 'parity' extra")
    transformers = pytest.importorskip("transformers", reason="transformers is in the 'parity' extra")
    from lima_jax.generation import SamplingConfig, build_generator
    workdir, _ = finetuned
    convert.main(["to_hf", "--input", str(workdir), "--output", str(tmp_path / "hf")])
    config = load_config_file(workdir / "config.json")
    generator = build_generator(config, rundir.resolve_checkpoint(workdir), 4)
    tok = generator.tokenizer
    questions = ["How do I make coffee?", "What is the capital of France?", "Tell me a story about a dog."]
    prompts = [tok.encode_dialog([q]).ids for q in questions]
    ours = generator.generate_ids(prompts, SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=24))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    for question, prompt, completion in zip(questions, prompts, ours):
        inputs = hf_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        assert inputs["input_ids"][0].tolist() == prompt
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, repetition_penalty=1.0, max_new_tokens=24)
        stop = {"eot": [tok.eot_id], "eos": [tok.eos_id]}.get(completion.stop_reason, [])
        assert out[0, len(prompt):].tolist() == completion.ids + stop, question
