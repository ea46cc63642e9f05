"""Batched sampling from a lima_jax model under jit, with a key/value cache, on the training mesh.

    python -m lima_jax.generate --config configs/toy.py --checkpoint /tmp/lima_toy \
        --prompts data/toy_dev.jsonl --out /tmp/answers.jsonl [--greedy] [--seed 0]

LIMA's decoding is the default: nucleus sampling p=0.9, temperature 0.7, a repetition penalty of 1.2 on
tokens *generated so far* (never the prompt's), at most 2,048 new tokens, stop at EOT. Prompts are
encoded with `Tokenizer.encode_dialog`, the same turn format as training, and end with the user's EOT;
the model then writes the assistant turn.

Padding: prompts of different lengths share a batch *right-padded*. Every row keeps its own KV-cache
write index (`model._update_kv_cache`), so a row's tokens fill cache slots 0, 1, 2, ... with RoPE
positions equal to the slot, exactly as in a training row; no position offsets are needed and padding
(segment 0) is never attended to. After the prompt pass each row's index is set to its own prompt
length, so the first generated token overwrites the row's first padding slot.

`--checkpoint` is a training workdir (its chosen epoch, see `lima_jax.report choose`, else the latest
checkpoint), one training checkpoint `workdir/checkpoints/<step>`, or a parameter checkpoint (`model.json`
+ `params/`, what `lima_jax.convert` writes).

Output JSONL, one line per prompt in input order: id, input (the prompt record's turns), prompt (turns of
the last round), response, responses (one per round), prompt_tokens, response_tokens, stop_reason
("eot", "eos", "max_new_tokens" or "context"), where (file:line). MT-Bench / Vicuna question files
(`{"turns": [q1, q2, ...]}`) are answered round by round: q2 is asked after the model's own answer to q1.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lima_jax import sharding
from lima_jax.config import ModelConfig
from lima_jax.fileio import atomic_write_text
from lima_jax.data.formats import DataError, iter_jsonl, parse_record
from lima_jax.model import KV_CACHE_AXES, Llama, init_kv_cache
from lima_jax.tokenizer import Tokenizer

STOP_REASONS = ("running", "eot", "eos", "max_new_tokens", "context")
_RUNNING, _EOT, _EOS, _MAX_NEW, _CONTEXT = range(len(STOP_REASONS))
_LENGTH_BUCKET = 32  # prompt batches are padded to a multiple of this: few distinct shapes to compile


# ------------------------------------------------------------------------------------------ settings


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Decoding settings; the defaults are LIMA's (section 2 of the paper)."""

    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.2
    max_new_tokens: int = 2048
    greedy: bool = False
    seed: int = 0
    stop_at_eot: bool = True  # False only for benchmarks that must decode a fixed number of tokens

    def validate(self) -> None:
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0 (use --greedy for argmax decoding)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 = off)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")


# ------------------------------------------------------------------------------------------ sampling


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """CTRL's penalty on the ids in `seen` ([b, V] bool: generated so far): positive logits are divided by
    `penalty`, negative ones multiplied, so a repeated token always becomes less likely."""
    if penalty == 1.0:
        return logits
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def top_p_mask(logits: jax.Array, top_p: float) -> jax.Array:
    """[b, V] bool: the nucleus, the smallest set of most likely tokens whose probability reaches `top_p`
    (the most likely token is always in it)."""
    order = jnp.argsort(-logits, axis=-1)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)


def sampling_logits(logits: jax.Array, seen: jax.Array, settings: SamplingConfig) -> jax.Array:
    """Repetition penalty, then temperature and the nucleus (-inf outside it), in Hugging Face's order."""
    logits = apply_repetition_penalty(logits.astype(jnp.float32), seen, settings.repetition_penalty)
    if settings.greedy:
        return logits
    logits = logits / settings.temperature
    return jnp.where(top_p_mask(logits, settings.top_p), logits, -jnp.inf)


def choose_tokens(logits: jax.Array, seen: jax.Array, keys: jax.Array, settings: SamplingConfig) -> jax.Array:
    """One token per row: argmax when greedy, else a draw from the row's own key."""
    logits = sampling_logits(logits, seen, settings)
    if settings.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


# ---------------------------------------------------------------------------------------- decode loop


def _constrain_cache(cache: dict) -> dict:
    return {k: nn.with_logical_constraint(v, KV_CACHE_AXES[k]) for k, v in cache.items()}


def decode(params: Any, tokens: jax.Array, lengths: jax.Array, limits: jax.Array, row_ids: jax.Array,
           seed: jax.Array, *, model: Llama, settings: SamplingConfig, stop_ids: tuple[int, int],
           cache_len: int, use_cache: bool = True) -> dict[str, jax.Array]:
    """Generates up to `limits[r]` tokens after each right-padded prompt row (jit this, static after `*`).

    tokens [b, T] with row r's prompt in tokens[r, :lengths[r]]. Row r draws from keys derived from
    (seed, row_ids[r], step), so its answer does not depend on which rows share its batch. Without the
    cache every step reruns the full forward pass over a [b, cache_len] buffer (the reference and the
    benchmark baseline). Returns generated [b, max_new_tokens] (valid up to num_generated, stop token
    included), num_generated [b] and stop_reason [b] (index into STOP_REASONS).
    """
    b, prompt_len = tokens.shape
    cfg: ModelConfig = model.cfg
    steps = settings.max_new_tokens
    eot_id, eos_id = stop_ids
    row_keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(seed), r))(row_ids)
    segments = (jnp.arange(prompt_len)[None, :] < lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(prompt_len), tokens.shape)
    full_positions = jnp.broadcast_to(jnp.arange(cache_len), (b, cache_len))

    def forward(*args, **kwargs):
        return model.apply({"params": params}, *args, deterministic=True, **kwargs)

    if use_cache:
        cache = _constrain_cache(init_kv_cache(cfg, b, cache_len))
        logits, cache = forward(tokens, segments, positions, kv_cache=cache)
        cache["index"] = jnp.broadcast_to(lengths, cache["index"].shape).astype(jnp.int32)
        memory = _constrain_cache(cache)
    else:
        pad = cache_len - prompt_len
        memory = {"tokens": jnp.pad(tokens, ((0, 0), (0, pad))), "segment_ids": jnp.pad(segments, ((0, 0), (0, pad)))}
        logits, _ = forward(memory["tokens"], memory["segment_ids"], full_positions)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]

    def emit(step, token_logits, state):
        """Chooses token `step` for every row from its logits and records it and why a row stopped."""
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
        token = choose_tokens(token_logits, state["seen"], keys, settings)
        running = state["reason"] == _RUNNING
        count = step + 1
        if settings.stop_at_eot:
            reason = jnp.where(token == eot_id, _EOT, jnp.where(token == eos_id, _EOS, _RUNNING))
        else:
            reason = jnp.full_like(token, _RUNNING)
        # a row's limit is below max_new_tokens only when the context (model.max_seq_len) is the bound
        reason = jnp.where((reason == _RUNNING) & (count >= limits),
                           jnp.where(limits < steps, _CONTEXT, _MAX_NEW), reason)
        rows = jnp.arange(b)
        return {
            "token": token,
            "generated": state["generated"].at[:, step].set(jnp.where(running, token, 0)),
            "seen": state["seen"].at[rows, token].set(state["seen"][rows, token] | running),
            "num_generated": jnp.where(running, count, state["num_generated"]),
            "reason": jnp.where(running, reason, state["reason"]),
        }

    state = emit(0, last, {
        "generated": jnp.zeros((b, steps), jnp.int32),
        "seen": nn.with_logical_constraint(jnp.zeros((b, cfg.vocab_size), bool), ("batch", None)),
        "num_generated": jnp.zeros((b,), jnp.int32),
        "reason": jnp.zeros((b,), jnp.int32),
    })

    def cond(carry):
        step, state, _ = carry
        return (step < steps) & jnp.any(state["reason"] == _RUNNING)

    def body(carry):
        step, state, memory = carry
        slot = jnp.minimum(lengths + step - 1, cache_len - 1)  # where the previous token goes
        if use_cache:
            logits, memory = forward(state["token"][:, None], jnp.ones((b, 1), jnp.int32), slot[:, None],
                                     kv_cache=memory)
            memory = _constrain_cache(memory)
            token_logits = logits[:, 0]
        else:
            rows = jnp.arange(b)
            memory = {"tokens": memory["tokens"].at[rows, slot].set(state["token"]),
                      "segment_ids": memory["segment_ids"].at[rows, slot].set(1)}
            logits, _ = forward(memory["tokens"], memory["segment_ids"], full_positions)
            token_logits = jnp.take_along_axis(logits, slot[:, None, None], axis=1)[:, 0]
        return step + 1, emit(step, token_logits, state), memory

    _, state, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), state, memory))
    return {"generated": state["generated"], "num_generated": state["num_generated"], "reason": state["reason"]}


# ----------------------------------------------------------------------------------------- generator


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated answer: ids exclude the stop token."""

    ids: list[int]
    text: str
    prompt_tokens: int
    stop_reason: str

    @property
    def response_tokens(self) -> int:
        return len(self.ids)


def _ceil_to(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


class Generator:
    """Batched generation with one model's parameters (already placed on `mesh`, e.g. the train state's).

    Prompts are sorted by length and cut into batches of `batch_size` rows (rounded up to a multiple of the
    mesh's data-parallel ways), so rows of similar length share a batch.
    """

    def __init__(self, model_cfg: ModelConfig, params: Any, tokenizer: Tokenizer, mesh: Mesh, rules,
                 batch_size: int = 8, use_cache: bool = True):
        self.model = Llama(model_cfg)
        self.cfg = model_cfg
        self.params = params
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.rules = rules
        self.use_cache = use_cache
        data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_size = _ceil_to(max(batch_size, 1), data_ways)
        self._batch_sharding = sharding.batch_sharding(mesh, rules)
        self._row_sharding = sharding.logical_sharding(mesh, rules, ("batch",))
        self._replicated = sharding.replicated(mesh)

    @functools.lru_cache(maxsize=16)
    def _compiled(self, settings: SamplingConfig, cache_len: int):
        fn = functools.partial(decode, model=self.model, settings=settings, cache_len=cache_len,
                               stop_ids=(self.tokenizer.eot_id, self.tokenizer.eos_id), use_cache=self.use_cache)
        return jax.jit(fn, out_shardings=self._replicated)

    def _put(self, array: np.ndarray, target: jax.sharding.Sharding) -> jax.Array:
        return jax.make_array_from_callback(array.shape, target, lambda index: array[index])

    def check_prompt_length(self, num_tokens: int, where: str) -> None:
        if num_tokens >= self.cfg.max_seq_len:
            raise DataError(f"{where}: the prompt is {num_tokens} tokens; model.max_seq_len={self.cfg.max_seq_len} "
                            "leaves no room for an answer")

    def generate_ids(self, prompts: Sequence[Sequence[int]], settings: SamplingConfig,
                     row_ids: Sequence[int] | None = None) -> list[Completion]:
        """Completions of token-id prompts, in input order. `row_ids` (default 0..n-1) seed each row."""
        settings.validate()
        row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
        for i, ids in enumerate(prompts):
            self.check_prompt_length(len(ids), f"prompt {i}")
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Completion | None] = [None] * len(prompts)
        static = dataclasses.replace(settings, seed=0)
        with sharding.activate(self.mesh, self.rules):
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                for i, completion in zip(chunk, self._generate_batch([prompts[i] for i in chunk],
                                                                     [row_ids[i] for i in chunk], static,
                                                                     settings.seed)):
                    results[i] = completion
        return results  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[Sequence[int]], row_ids: list[int], settings: SamplingConfig,
                        seed: int) -> list[Completion]:
        n, b = len(prompts), self.batch_size
        longest = max(len(p) for p in prompts)
        prompt_len = min(_ceil_to(longest, _LENGTH_BUCKET), self.cfg.max_seq_len)
        cache_len = min(prompt_len + settings.max_new_tokens, self.cfg.max_seq_len)
        tokens = np.zeros((b, prompt_len), np.int32)
        lengths = np.ones((b,), np.int32)  # filler rows: a lone BOS, answer discarded
        tokens[n:, 0] = self.tokenizer.bos_id
        for r, ids in enumerate(prompts):
            tokens[r, :len(ids)] = ids
            lengths[r] = len(ids)
        limits = np.minimum(settings.max_new_tokens, self.cfg.max_seq_len - lengths).astype(np.int32)
        limits[n:] = 1  # filler rows stop at once so they never keep the loop going
        ids = np.asarray(row_ids + [0] * (b - n), np.int32)
        out = self._compiled(settings, cache_len)(
            self.params, self._put(tokens, self._batch_sharding), self._put(lengths, self._row_sharding),
            self._put(limits, self._row_sharding), self._put(ids, self._row_sharding), jnp.int32(seed))
        out = jax.device_get(out)
        completions = []
        for r in range(n):
            reason = STOP_REASONS[int(out["reason"][r])]
            count = int(out["num_generated"][r])
            answer = [int(t) for t in out["generated"][r, :count]]
            if reason in ("eot", "eos"):
                answer = answer[:-1]
            completions.append(Completion(answer, self.tokenizer.decode(answer), len(prompts[r]), reason))
        return completions


# ----------------------------------------------------------------------------------------- prompt files


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One prompt: `turns` end with the user; `followups` are later user turns (MT-Bench) asked after the
    model's own answer to the previous round."""

    id: str
    turns: tuple[str, ...]
    followups: tuple[str, ...]
    where: str
    extra: dict

    @property
    def input(self) -> list[str]:
        return list(self.turns) + list(self.followups)


def _question_turns(record: dict, where: str) -> list[str]:
    turns = record["turns"] if "turns" in record else [record["text"]]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'turns' must be a non-empty list of strings")
    for i, turn in enumerate(turns):
        if not isinstance(turn, str) or not turn.strip():
            raise DataError(f"{where}: field 'turns'[{i}] must be a non-empty string")
    return turns


def parse_prompt(record: object, path: str, line: int) -> PromptRecord:
    """A prompt from any supported schema; raises DataError naming path:line and the field."""
    where = f"{path}:{line}"
    if isinstance(record, dict) and ("turns" in record or "text" in record) and "conversations" not in record:
        questions = _question_turns(record, where)
        turns, followups = (questions[0],), tuple(questions[1:])
    elif isinstance(record, dict) and "instruction" in record and not {"response", "output"} & set(record):
        turns = parse_record({**record, "response": "-"}, path, line, "instruction").turns[:1]
        followups = ()
    else:
        turns, followups = parse_record(record, path, line, for_training=False).turns, ()
    ident = record.get("question_id", record.get("id", line)) if isinstance(record, dict) else line
    extra = {k: record[k] for k in ("category", "source") if k in record and isinstance(record[k], str)}
    return PromptRecord(str(ident), tuple(turns), followups, where, extra)


def read_prompts(path: str | pathlib.Path) -> list[PromptRecord]:
    """Every prompt of a JSONL file: LIMA `conversations`, `messages`, `instruction`, or question files
    with `turns` / `text` (MT-Bench, Vicuna). The first bad record raises DataError with file:line."""
    prompts = [parse_prompt(record, str(path), line) for line, record in iter_jsonl(path)]
    if not prompts:
        raise DataError(f"{path}: no prompts")
    seen: dict[str, str] = {}
    for p in prompts:
        if p.id in seen:
            raise DataError(f"{p.where}: duplicate id {p.id!r} (first at {seen[p.id]})")
        seen[p.id] = p.where
    return prompts


def check_prompts_fit(prompts: Sequence[PromptRecord], tokenizer: Tokenizer, max_seq_len: int) -> None:
    """Fails before any compilation if a first-round prompt leaves no room for an answer."""
    for p in prompts:
        n = len(tokenizer.encode_dialog(p.turns).ids)
        if n >= max_seq_len:
            raise DataError(f"{p.where}: the prompt is {n} tokens; model.max_seq_len={max_seq_len} leaves no "
                            "room for an answer")


def answer_prompts(generator: Generator, prompts: Sequence[PromptRecord], settings: SamplingConfig) -> list[dict]:
    """Answers every prompt (all rounds of multi-turn questions, batched per round); output records."""
    tokenizer = generator.tokenizer
    conversations = [list(p.turns) for p in prompts]
    history: list[list[Completion]] = [[] for _ in prompts]
    for round_index in range(1 + max(len(p.followups) for p in prompts)):
        active = [i for i, p in enumerate(prompts) if len(p.followups) >= round_index]
        if round_index:
            for i in active:
                conversations[i] += [history[i][-1].text, prompts[i].followups[round_index - 1]]
        ids = {i: tokenizer.encode_dialog(conversations[i]).ids for i in active}
        # First rounds were checked up front (check_prompts_fit); a later round that outgrew the context
        # is answered with nothing and stop reason "context" rather than failing after hours of decoding.
        fits = [i for i in active if len(ids[i]) < generator.cfg.max_seq_len]
        for i in set(active) - set(fits):
            history[i].append(Completion([], "", len(ids[i]), "context"))
        row_ids = [i + round_index * len(prompts) for i in fits]  # a fresh random stream per round
        if fits:
            for i, completion in zip(fits, generator.generate_ids([ids[i] for i in fits], settings, row_ids)):
                history[i].append(completion)
    return [output_record(p, conv, done) for p, conv, done in zip(prompts, conversations, history)]


def output_record(prompt: PromptRecord, conversation: list[str], rounds: list[Completion]) -> dict:
    last = rounds[-1]
    return {"id": prompt.id, "input": prompt.input, "prompt": conversation, "response": last.text,
            "responses": [c.text for c in rounds], "prompt_tokens": last.prompt_tokens,
            "response_tokens": last.response_tokens, "stop_reason": last.stop_reason,
            "where": prompt.where, **prompt.extra}


def write_jsonl(path: str | pathlib.Path, records: Sequence[dict]) -> None:
    """Writes records atomically: a crash never leaves half a file."""
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


# --------------------------------------------------------------------------------------- checkpoints


def load_params(path: str | pathlib.Path, model_cfg: ModelConfig, mesh: Mesh, rules) -> Any:
    """The parameters at `path` (see `checkpoint.resolve_checkpoint`), checked against `model_cfg` and
    restored straight onto `mesh`'s shardings; of a training checkpoint only the parameters are read."""
    from lima_jax import checkpoint
    from lima_jax.train import abstract_params
    checkpoint.check_model_matches(checkpoint.stored_model_config(path), model_cfg, f"--checkpoint {path}")
    params, _ = checkpoint.load_checkpoint_params(path, abstract_params(Llama(model_cfg), mesh, rules))
    return params


def build_generator(config, checkpoint_path: str, batch_size: int, use_cache: bool = True) -> Generator:
    """Tokenizer, mesh and parameters from a config and a checkpoint (see `checkpoint.resolve_checkpoint`)."""
    from lima_jax.train import model_setup
    tokenizer, model_cfg, mesh, rules = model_setup(config)
    params = load_params(checkpoint_path, model_cfg, mesh, rules)
    return Generator(model_cfg, params, tokenizer, mesh, rules, batch_size, use_cache)


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    from lima_jax.config import load_config_file
    parser = argparse.ArgumentParser(prog="python -m lima_jax.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file (model shape, tokenizer, mesh)")
    parser.add_argument("--checkpoint", required=True, help="workdir, workdir/checkpoints/<step> or params folder")
    parser.add_argument("--prompts", required=True, type=pathlib.Path, help="prompt JSONL")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="output JSONL")
    defaults = SamplingConfig()
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--top_p", type=float, default=defaults.top_p)
    parser.add_argument("--repetition_penalty", type=float, default=defaults.repetition_penalty)
    parser.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (repetition penalty still applies)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--batch_size", type=int, default=8, help="rows per batch (rounded up to the data ways)")
    parser.add_argument("--no_cache", action="store_true", help="recompute the full forward pass every step")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="config override, e.g. --set mesh.fsdp=8 (repeatable)")
    args = parser.parse_args(argv)
    settings = SamplingConfig(args.temperature, args.top_p, args.repetition_penalty, args.max_new_tokens,
                              args.greedy, args.seed)
    settings.validate()
    config = load_config_file(args.config)
    for item in args.set:
        apply_override(config, item)
    prompts = read_prompts(args.prompts)  # bad input fails here, before the model is loaded
    tokenizer = Tokenizer(config.tokenizer.path)
    check_prompts_fit(prompts, tokenizer, config.model.max_seq_len)
    generator = build_generator(config, args.checkpoint, args.batch_size, not args.no_cache)
    records = answer_prompts(generator, prompts, settings)
    if jax.process_index() == 0:
        write_jsonl(args.out, records)
        reasons = {r: sum(rec["stop_reason"] == r for rec in records) for r in STOP_REASONS[1:]}
        print(f"wrote {len(records)} answers to {args.out}; stop reasons {reasons}")


def apply_override(config, item: str) -> None:
    """Sets `field=value` (dotted field) in a ConfigDict, parsing the value as the field's current type."""
    field, sep, value = item.partition("=")
    node = config
    *parents, leaf = field.split(".")
    try:
        for part in parents:
            node = node[part]
        current = node[leaf]
    except KeyError:
        raise ValueError(f"--set {item!r}: config has no field {field!r}") from None
    if not sep:
        raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
    if isinstance(current, bool):
        node[leaf] = value.lower() in ("1", "true", "yes")
    elif isinstance(current, (tuple, list)):
        node[leaf] = tuple(json.loads(value))
    else:
        node[leaf] = type(current)(value)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad input: the message names file, line and field
        raise SystemExit(f"error: {e}") from None
