"""Generation: KV-cache decoding against full forward passes, sampling, stopping, prompt files."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lima_jax import sharding
from lima_jax.config import load_config_file, model_config
from lima_jax.data.formats import DataError
from lima_jax import generation
from lima_jax.generation import (Generator, SamplingConfig, answer_prompts, apply_repetition_penalty, choose_tokens,
                                 integer_probs, nucleus_mass_units, sample_nucleus, sampling_nucleus, top_p_mask)
from lima_jax.records import read_prompts
from lima_jax.model import Llama
from tests.conftest import REPO, shared_file

PROMPTS = ["Hello there, how are you today?", "Hi", "What is the capital of Portugal and why is it the capital?"]


def _toy(devices):
    from lima_jax.tokenizer import load_tokenizer
    config = load_config_file(REPO / "configs" / "toy.py")
    tokenizer = load_tokenizer(config)
    cfg = model_config(config, tokenizer.vocab_size)
    model = Llama(cfg)
    mesh, rules = sharding.make_mesh(config, devices), sharding.layout_rules(config)
    return model, random_params(model), tokenizer, mesh, rules


def random_params(model, seed=0):
    """Random parameters drawn with numpy from the parameter shapes (compiling `model.init` costs ~10 s on
    a busy 2-core CPU): unit norm scales, normal(0.02) weights, except query/key projections large enough
    that attention is sharp, so wrong positions or a wrong mask change the logits (at 0.02 every score is
    ~0 and attention is uniform whatever the positions)."""
    shapes = jax.eval_shape(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]),
                            jax.random.key(0))
    rng = np.random.default_rng(seed)
    std = {"wq": 0.5, "wk": 0.5}

    def draw(path, s):
        name = path[-1].key
        if name == "scale":
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(rng.normal(0, std.get(name, 0.02), s.shape), s.dtype)
    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def toy_sharded():
    """A randomly initialised toy model on the toy config's 8-device data-parallel mesh."""
    return _toy(jax.devices())


@pytest.fixture(scope="module")
def toy():
    """The same model on one device (compiles faster)."""
    return _toy(jax.devices()[:1])


def _generator(toy, params=None, **kwargs):
    model, base_params, tokenizer, mesh, rules = toy
    kwargs.setdefault("batch_size", 4)
    return Generator(model.cfg, params if params is not None else base_params, tokenizer, mesh, rules, **kwargs)


def _prompt_ids(tokenizer, texts=PROMPTS):
    return [tokenizer.encode_dialog([t]).ids for t in texts]


@jax.jit
def _full_forward(params, tokens, segment_ids):
    cfg = model_config(load_config_file(REPO / "configs" / "toy.py"), toy_vocab())
    return Llama(cfg).apply({"params": params}, tokens, segment_ids)[0]


def toy_vocab() -> int:
    """The toy tokenizer's vocabulary with EOT (the embedding has more rows: model.vocab_multiple padding)."""
    from lima_jax.tokenizer import Tokenizer
    return Tokenizer(load_config_file(REPO / "configs" / "toy.py").tokenizer.path).vocab_size


def _reference_step_logits(model, params, ids, width=256):
    """Next-token logits after `ids` from one plain forward pass (the training path, no cache)."""
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :len(ids)] = ids
    logits = _full_forward(params, tokens, (np.arange(width) < len(ids)).astype(np.int32)[None])
    return np.array(logits[0, len(ids) - 1])


def _assert_greedy(model, params, prompt, generated, penalty=1.0):
    """Each generated token is the argmax of a full forward pass over prompt + the tokens before it (with
    the repetition penalty on generated tokens only), up to float noise between the two computations."""
    for i, token in enumerate(generated):
        logits = _reference_step_logits(model, params, list(prompt) + list(generated[:i]))
        for seen in set(generated[:i]):
            logits[seen] = logits[seen] / penalty if logits[seen] > 0 else logits[seen] * penalty
        assert logits[token] >= logits.max() - 1e-5, (i, token, int(logits.argmax()))


def test_kv_cache_greedy_equals_argmax_of_full_forward_passes(toy_sharded):
    toy = toy_sharded
    model, params, tokenizer, *_ = toy
    prompts = _prompt_ids(tokenizer)  # three lengths, right-padded into one batch
    settings = SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=10, stop_at_eot=False)
    cached = _generator(toy).generate_ids(prompts, settings)
    for prompt, completion in zip(prompts, cached):
        assert completion.response_tokens == 10 and completion.stop_reason == "max_new_tokens"
        _assert_greedy(model, params, prompt, completion.ids)
    uncached = _generator(toy, use_cache=False).generate_ids(prompts, settings)
    assert [c.ids for c in uncached] == [c.ids for c in cached]


def test_repetition_penalty_touches_generated_tokens_only(toy):
    model, params, tokenizer, *_ = toy
    # A prompt that contains the model's own first greedy choice: penalizing prompt tokens would change it.
    rng = np.random.default_rng(0)
    for _ in range(50):
        prompt = [tokenizer.bos_id] + rng.integers(3, tokenizer.eot_id, 40).tolist() + [tokenizer.eot_id]
        first = int(_reference_step_logits(model, params, prompt).argmax())
        if first in prompt:
            break
    assert first in prompt
    settings = SamplingConfig(greedy=True, repetition_penalty=1.5, max_new_tokens=8, stop_at_eot=False)
    (completion,) = _generator(toy).generate_ids([prompt], settings)
    assert completion.ids[0] == first
    _assert_greedy(model, params, prompt, completion.ids, penalty=1.5)

    logits = jnp.array([[2.0, -2.0, 2.0, -2.0]])
    seen = jnp.array([[True, True, False, False]])
    np.testing.assert_allclose(apply_repetition_penalty(logits, seen, 2.0), [[1.0, -4.0, 2.0, -2.0]])


def test_sampling_with_a_fixed_seed_is_reproducible(toy):
    tokenizer = toy[2]
    prompts = _prompt_ids(tokenizer)
    settings = SamplingConfig(max_new_tokens=12, seed=7, stop_at_eot=False)
    generator = _generator(toy)
    first = [c.ids for c in generator.generate_ids(prompts, settings)]
    assert [c.ids for c in generator.generate_ids(prompts, settings)] == first
    other_seed = [c.ids for c in generator.generate_ids(prompts, SamplingConfig(max_new_tokens=12, seed=8,
                                                                                 stop_at_eot=False))]
    assert other_seed != first
    # A row's draws depend on (seed, row id), not on the other rows of its batch.
    alone = generator.generate_ids([prompts[1]], settings, row_ids=[1])
    assert alone[0].ids == first[1]


def test_top_p_never_samples_outside_the_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.log(jnp.asarray(np.tile(probs[[2, 0, 3, 1]], (2000, 1))))  # shuffled: order must not matter
    nucleus = {1, 3}  # 0.5 and 0.3: the mass before 0.15 is already 0.8 >= 0.7
    np.testing.assert_array_equal(np.asarray(top_p_mask(logits[:1], 0.7))[0], [False, True, False, True])
    settings = SamplingConfig(temperature=1.0, top_p=0.7, repetition_penalty=1.0)
    keys = jax.random.split(jax.random.key(0), logits.shape[0])
    choose = jax.jit(choose_tokens, static_argnums=3)
    tokens = np.asarray(choose(logits, jnp.zeros(logits.shape, bool), keys, settings))
    assert set(tokens.tolist()) == nucleus
    assert abs((tokens == 1).mean() - 0.5 / 0.8) < 0.05  # renormalized inside the nucleus
    assert np.asarray(top_p_mask(logits[:1], 1e-6)).sum() == 1  # the top token is always kept


def _with_eot_favoured(params, tokenizer, factor=3.0):
    """Params whose EOT logit is `factor` x the logit of token 100 (so greedy decoding soon picks EOT)."""
    params = jax.tree.map(lambda x: x, params)
    params["lm_head"] = params["lm_head"].at[:, tokenizer.eot_id].set(params["lm_head"][:, 100] * factor)
    return params


def test_generation_stops_at_eot_and_reports_it(toy):
    model, params, tokenizer, *_ = toy
    params = _with_eot_favoured(params, tokenizer)
    prompts = _prompt_ids(tokenizer)
    settings = SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=40)
    completions = _generator(toy, params).generate_ids(prompts, settings)
    for prompt, completion in zip(prompts, completions):
        expected = []
        while len(expected) < 40:
            expected.append(int(_reference_step_logits(model, params, prompt + expected).argmax()))
            if expected[-1] == tokenizer.eot_id:
                break
        assert expected[-1] == tokenizer.eot_id, "setup: the reference never emits EOT"
        assert completion.stop_reason == "eot"
        assert completion.ids == expected[:-1]  # EOT itself is not part of the answer
        assert completion.response_tokens == len(expected) - 1 and completion.prompt_tokens == len(prompt)


def test_context_limit_is_reported(toy):
    tokenizer, cfg = toy[2], toy[0].cfg
    prompt = [tokenizer.bos_id] + [50] * (cfg.max_seq_len - 4)  # room for 3 tokens
    settings = SamplingConfig(greedy=True, max_new_tokens=10, stop_at_eot=False)
    (completion,) = _generator(toy).generate_ids([prompt], settings)
    assert completion.stop_reason == "context" and completion.response_tokens == 3
    with pytest.raises(DataError, match="leaves no room"):
        _generator(toy).generate_ids([[tokenizer.bos_id] * cfg.max_seq_len], settings)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_prompt_files_in_every_schema(tmp_path):
    path = _write(tmp_path / "p.jsonl", [
        {"conversations": ["lima prompt"], "source": "x"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "chat prompt"}]},
        {"instruction": "do it", "input": "now"},
        {"question_id": 81, "category": "writing", "turns": ["first", "second"]},
        {"question_id": 7, "text": "vicuna style"},
    ])
    prompts = read_prompts(path)
    assert [p.turns for p in prompts] == [("lima prompt",), ("be brief\n\nchat prompt",), ("do it\n\nnow",),
                                         ("first",), ("vicuna style",)]
    assert prompts[3].followups == ("second",) and prompts[3].id == "81"
    assert prompts[3].extra == {"category": "writing"}


@pytest.mark.parametrize("record, message", [
    ({"conversations": ["q", "an answer"]}, "must end with the user"),
    ({"turns": []}, "'turns' must be a non-empty list"),
    ({"turns": ["ok", 3]}, r"'turns'\[1\]"),
    ({"prompt_text": "?"}, "unknown schema"),
])
def test_bad_prompt_files_name_file_line_and_field(tmp_path, record, message):
    path = _write(tmp_path / "bad.jsonl", [{"conversations": ["fine"]}, record])
    with pytest.raises(DataError, match=rf"bad.jsonl:2: .*{message}"):
        read_prompts(path)


@pytest.mark.parametrize("relative", ["lima/lima_test.jsonl", "eval/mt_bench_question.jsonl",
                                      "eval/vicuna_bench_question.jsonl"])
def test_real_prompt_files_parse(relative):
    prompts = read_prompts(shared_file(relative))
    assert len(prompts) in (300, 80)
    assert all(p.turns and p.turns[0].strip() for p in prompts)


def test_multi_turn_questions_are_answered_round_by_round(toy, tmp_path):
    tokenizer = toy[2]
    path = _write(tmp_path / "q.jsonl", [{"question_id": 1, "turns": ["Tell me a story.", "Shorter please."]},
                                         {"question_id": 2, "turns": ["Hi"]},
                                         {"question_id": 3, "turns": ["Hi", "very long " * 200]}])
    settings = SamplingConfig(greedy=True, max_new_tokens=6, stop_at_eot=False)
    records = answer_prompts(_generator(toy), read_prompts(path), settings)
    two_rounds, one_round, too_long = records
    assert too_long["responses"][1] == "" and too_long["stop_reason"] == "context"  # round 2 outgrew the context
    assert len(two_rounds["responses"]) == 2 and len(one_round["responses"]) == 1
    # Round 2 sees the model's own first answer in the training turn format.
    assert two_rounds["prompt"] == ["Tell me a story.", two_rounds["responses"][0], "Shorter please."]
    assert two_rounds["prompt_tokens"] == len(tokenizer.encode_dialog(two_rounds["prompt"]).ids)
    assert two_rounds["input"] == ["Tell me a story.", "Shorter please."]
    assert {r["stop_reason"] for r in records[:2]} == {"max_new_tokens"}


def test_parameter_checkpoints_load_onto_the_mesh(toy, tmp_path):
    from lima_jax import checkpoint, runtime
    from lima_jax.errors import CheckpointError
    from lima_jax.rundir import resolve_checkpoint
    model, params, tokenizer, mesh, rules = toy
    checkpoint.save_params(tmp_path / "ckpt", params, model.cfg)
    choice = resolve_checkpoint(tmp_path / "ckpt")
    assert (choice.kind, str(choice.folder), choice.reason) == ("params", str(tmp_path / "ckpt"), "given")
    loaded = runtime.load_params(choice, runtime.Runtime(tokenizer, model.cfg, mesh, rules))
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    with pytest.raises(CheckpointError, match="not a training workdir"):
        resolve_checkpoint(tmp_path)


def test_config_overrides_keep_the_field_type():
    from lima_jax.config import apply_overrides
    from lima_jax.errors import ConfigError
    config = load_config_file(REPO / "configs" / "toy.py")
    apply_overrides(config, [("mesh.data", "1"), ("dev_report.epochs", "[1, 2]"), ("data.shuffle", "false"),
                             ("data.packing", "rows"), ("optimizer.learning_rate", "1e-4")])
    assert config.mesh.data == 1 and config.dev_report.epochs == (1, 2) and config.data.shuffle is False
    assert config.data.packing == "rows"
    assert config.optimizer.learning_rate == 1e-4
    with pytest.raises(ConfigError, match="no field 'mesh.nope'"):
        apply_overrides(config, [("mesh.nope", "1")])
    with pytest.raises(ConfigError, match="expected an integer"):
        apply_overrides(config, [("train.batch_size", "eight")])


def _sorted_nucleus(logits: np.ndarray, top_p: float) -> np.ndarray:
    """The reference: sort the whole vocabulary (ties: lower id first), keep a token while the exact mass of
    the tokens before it is below top_p."""
    order = np.argsort(-logits, axis=-1, kind="stable")
    mass = np.take_along_axis(np.asarray(integer_probs(jnp.asarray(logits))).astype(np.int64), order, axis=-1)
    keep_sorted = np.cumsum(mass, axis=-1) - mass < nucleus_mass_units(top_p)
    keep = np.zeros(logits.shape, bool)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return keep


def _adversarial_logits(rng: np.random.Generator, vocab: int) -> list[np.ndarray]:
    flat = np.zeros((3, vocab), np.float32)  # every token tied: the cut falls inside the tie
    ten_equal = np.full((3, vocab), -1e9, np.float32)
    ten_equal[:, rng.choice(vocab, 10, replace=False)] = 0.0  # ten tokens of mass 0.1: top_p 0.9 is on a boundary
    peaked = rng.normal(size=(3, vocab)).astype(np.float32)
    peaked[np.arange(3), rng.integers(0, vocab, 3)] = 40.0  # one token holds nearly all the mass
    few_levels = rng.integers(0, 4, (3, vocab)).astype(np.float32) * 2.0  # large tie groups at a few levels
    signed_zero = np.where(rng.random((3, vocab)) < 0.5, 0.0, -0.0).astype(np.float32)
    signed_zero[:, :5] = 1.0
    with_inf = rng.normal(size=(3, vocab)).astype(np.float32) * 4
    with_inf[:, ::3] = -np.inf  # masked tokens (e.g. padded vocabulary rows) have no mass
    return [flat, ten_equal, peaked, few_levels, signed_zero, with_inf]


@pytest.mark.parametrize("top_p", [1e-6, 0.5, 0.9, 0.999999])
def test_top_p_without_sorting_keeps_exactly_the_sorted_nucleus(top_p):
    rng = np.random.default_rng(int(top_p * 1e6))
    mask = jax.jit(top_p_mask, static_argnums=1)
    random_rows = np.concatenate([(rng.normal(size=(8, 1000)) * scale).astype(np.float32)
                                  for scale in (0.1, 1.0, 3.0, 10.0)])
    cauchy = rng.standard_cauchy((4, 32001)).astype(np.float32) / 0.7  # LIMA's vocabulary and temperature
    for logits in (np.concatenate(_adversarial_logits(rng, 300)), random_rows, cauchy):
        expected = _sorted_nucleus(logits, top_p)
        got = np.asarray(mask(jnp.asarray(logits), top_p))
        np.testing.assert_array_equal(got, expected)
        assert got.any(axis=-1).all()  # never empty
        keys = jax.random.split(jax.random.key(3), logits.shape[0])
        draw = jax.vmap(jax.random.categorical)
        np.testing.assert_array_equal(draw(keys, jnp.where(got, logits, -jnp.inf)),
                                      draw(keys, jnp.where(expected, logits, -jnp.inf)))


def _ties_around_the_candidate_edge(rng: np.random.Generator, vocab: int = 300) -> np.ndarray:
    """Rows whose sorted order has K - 24 distinct leaders, then a run of 50 equal logits across the K-th
    candidate (K = TOP_P_CANDIDATES), then a tail; columns shuffled so the tie is broken by id. The tie's
    probability per token varies by row, so at top_p 0.9 the cut falls inside the run before the K-th
    candidate (the candidate path cuts the tie), just at or just after it, or well after it (the full path)."""
    k = generation.TOP_P_CANDIDATES
    rows = []
    for each in (0.004, 0.0025, 0.00209, 0.00205, 0.002, 0.001):
        probs = np.full(vocab, 0.0)
        probs[:k - 24] = np.linspace(1.5, 0.5, k - 24) * 0.85 / (k - 24)
        probs[k - 24:k + 26] = each
        probs[k + 26:] = max(1e-6, 1 - probs.sum()) / (vocab - k - 26)
        rows.append(np.log(probs / probs.sum()).astype(np.float32)[rng.permutation(vocab)])
    return np.stack(rows)


@pytest.mark.parametrize("top_p", [1e-6, 0.5, 0.9, 0.999999])
def test_sampler_nucleus_is_the_sorted_nucleus_on_both_paths(top_p):
    """The set `sample_nucleus` draws from (candidate path or full-vocabulary fallback) equals the sorted
    nucleus: peaked rows (a fine-tuned model at temperature 0.7), flat rows (the fallback), ties straddling the
    top_p boundary and ties across the K-th candidate."""
    rng = np.random.default_rng(int(top_p * 1e6) + 1)
    nucleus = jax.jit(sampling_nucleus, static_argnums=1)
    peaked = (rng.normal(size=(6, 32001)) * 4 / 0.7).astype(np.float32)
    peaked[:3, :2000] = np.sort(peaked[:3, :2000], axis=-1)  # more tied and ordered structure near the top
    flat = rng.normal(size=(4, 32001)).astype(np.float32)
    near_ties = np.round(rng.normal(size=(8, 500)) * 8).astype(np.float32) / 2  # many equal logits near the top
    paths = []
    for logits in (peaked, flat, near_ties, _ties_around_the_candidate_edge(rng),
                   np.concatenate(_adversarial_logits(rng, 300))):
        got, covered = (np.asarray(x) for x in nucleus(jnp.asarray(logits), top_p))
        np.testing.assert_array_equal(got, _sorted_nucleus(logits, top_p))
        paths.append(covered)
    paths = np.concatenate(paths)
    assert paths.any()
    if 0.1 < top_p < 0.99:  # (at 1e-6 every nucleus is one token; near 1 every row falls back)
        assert not paths.all()  # both paths were taken
    if top_p == 0.9:
        edge = nucleus(jnp.asarray(_ties_around_the_candidate_edge(rng)), 0.9)[1]
        assert np.asarray(edge).tolist() == [True, True, True, False, False, False]  # setup: the cut moves past K


def _chi_square(tokens: np.ndarray, logits: np.ndarray, top_p: float) -> tuple[float, int]:
    """Pearson's statistic of draws against the softmax renormalised over the sorted nucleus (float64), and
    its degrees of freedom; every draw must be inside the nucleus."""
    keep = _sorted_nucleus(logits[None], top_p)[0]
    assert keep[tokens].all(), "drew a token outside the nucleus"
    p = np.exp(logits.astype(np.float64) - logits.max())
    p = np.where(keep, p, 0.0)
    p /= p.sum()
    ids = np.flatnonzero(keep)
    expected = p[ids] * len(tokens)
    observed = np.bincount(tokens, minlength=len(logits))[ids]
    return float(((observed - expected) ** 2 / expected).sum()), len(ids) - 1


@pytest.mark.parametrize("regime", ["peaked", "flat"])
def test_sampled_tokens_follow_the_renormalised_softmax(regime):
    """Draws from one row with 40,000 keys: inside the nucleus only, frequencies as the softmax renormalised
    over it (chi-square below mean + 6 sd; drawing uniformly inside the nucleus gives several times that),
    on the candidate path (peaked) and the full-vocabulary path (flat)."""
    rng = np.random.default_rng(5)
    vocab, draws = 2000, 40_000
    scale = {"peaked": 4 / 0.7, "flat": 0.7}[regime]
    row = (rng.normal(size=vocab) * scale).astype(np.float32)
    assert bool(np.asarray(sampling_nucleus(jnp.asarray(row[None]), 0.9)[1])[0]) == (regime == "peaked")
    keys = jax.random.split(jax.random.key(11), draws)
    tokens = np.asarray(jax.jit(sample_nucleus, static_argnums=2)(jnp.broadcast_to(jnp.asarray(row), (draws, vocab)),
                                                                 keys, 0.9))
    stat, dof = _chi_square(tokens, row, 0.9)
    assert dof >= (5 if regime == "peaked" else 1000)  # setup: a real nucleus to spread over
    assert stat < dof + 6 * np.sqrt(2 * dof), (stat, dof)
    keep = _sorted_nucleus(row[None], 0.9)[0]
    uniform = rng.choice(np.flatnonzero(keep), draws)  # the bug this test must catch
    assert _chi_square(uniform, row, 0.9)[0] > dof + 20 * np.sqrt(2 * dof)


@pytest.mark.parametrize("flat_rows", [0, 1, 3, 5, 16])
def test_a_rows_draw_does_not_depend_on_the_path_its_batch_takes(flat_rows):
    """Batches of 16 rows of which 0, 1, 3, 5 or all take the full path (so the full path runs on none, one
    gathered row, 4 gathered rows, or the whole batch): every row gets the token it gets alone, from its key."""
    rng = np.random.default_rng(2)
    logits = (rng.normal(size=(16, 4000)) * 4 / 0.7).astype(np.float32)
    flat = rng.permutation(16)[:flat_rows]
    logits[flat] = rng.normal(size=(flat_rows, 4000))
    logits = jnp.asarray(logits)
    assert np.asarray(sampling_nucleus(logits, 0.9)[1]).sum() == 16 - flat_rows  # setup
    keys = jax.random.split(jax.random.key(4), 16)
    draw = jax.jit(sample_nucleus, static_argnums=2)
    batch = np.asarray(draw(logits, keys, 0.9))
    alone = [int(draw(logits[i:i + 1], keys[i:i + 1], 0.9)[0]) for i in range(16)]
    np.testing.assert_array_equal(batch, alone)
    assert _sorted_nucleus(np.asarray(logits), 0.9)[np.arange(16), batch].all()
