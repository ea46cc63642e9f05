"""Batched sampling from a lima_jax model under jit, with a key/value cache, on the training mesh.

LIMA's decoding is the default: nucleus sampling p=0.9, temperature 0.7, a repetition penalty of 1.2 on
tokens *generated so far* (never the prompt's), at most 2,048 new tokens, stop at EOT. Prompts are
encoded with `Tokenizer.encode_dialog`, the same turn format as training, and end with the user's EOT;
the model then writes the assistant turn.

Padding: prompts of different lengths share a batch *right-padded*. Every row keeps its own KV-cache
write index (`model._update_kv_cache`), so a row's tokens fill cache slots 0, 1, 2, ... with RoPE
positions equal to the slot, exactly as in a training row; no position offsets are needed and padding
(segment 0) is never attended to. After the prompt pass each row's index is set to its own prompt
length, so the first generated token overwrites the row's first padding slot.

Prompt and answer files: see `lima_jax.records`. MT-Bench / Vicuna question files (`{"turns": [q1, q2, ...]}`)
are answered round by round: q2 is asked after the model's own answer to q1.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import ml_collections

from lima_jax import rundir, runtime, sharding
from lima_jax.config import ModelConfig
from lima_jax.errors import ConfigError, DataError
from lima_jax.model import KV_CACHE_AXES, Llama, init_kv_cache
from lima_jax.records import STOP_REASONS, PromptRecord, answer_record, prompt_ids
from lima_jax.rundir import CheckpointChoice
from lima_jax.tokenizer import Tokenizer, load_tokenizer

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
            raise ConfigError(f"temperature={self.temperature}: must be > 0 (use --greedy for argmax decoding)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 = off)")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")


# ------------------------------------------------------------------------------------------ sampling


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """CTRL's penalty on the ids in `seen` ([b, V] bool: generated so far): positive logits are divided by
    `penalty`, negative ones multiplied, so a repeated token always becomes less likely."""
    if penalty == 1.0:
        return logits
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


MASS_BITS = 30  # nucleus masses in integer units of 2^-30: their sums are exact in any order (and fit int32)


def integer_probs(logits: jax.Array) -> jax.Array:
    """[b, V] int32: softmax(logits) in units of 2^-MASS_BITS, rounded down (what the nucleus sums)."""
    return jnp.floor(jax.nn.softmax(logits.astype(jnp.float32), axis=-1) * 2.0 ** MASS_BITS).astype(jnp.int32)


def nucleus_mass_units(top_p: float) -> int:
    """`top_p` in units of 2^-MASS_BITS (at least 1: the most likely token is always in the nucleus)."""
    return max(1, math.ceil(top_p * 2 ** MASS_BITS))


def _order_keys(logits: jax.Array) -> jax.Array:
    """uint32 keys in the order of the float32 logits (-0.0 taken as 0.0, so equal logits get equal keys)."""
    x = logits.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.zeros_like(x), x), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def top_p_mask(logits: jax.Array, top_p: float) -> jax.Array:
    """[b, V] bool: the nucleus, the smallest set of most likely tokens whose probability reaches `top_p`
    (the most likely token is always in it), without sorting the vocabulary.

    Defined as the sorted nucleus: tokens ordered by logit (ties: lower id first), a token kept when the mass
    of the tokens before it is below `top_p`, masses summed in exact integer units (`integer_probs`). Found by
    a threshold search instead: the largest logit key y whose strictly-greater mass still reaches top_p is
    built bit by bit (32 masked sums over the vocabulary); every token above the lowest key over y is kept,
    and of the tokens tied at that key the first ones by id while the mass before them stays below top_p."""
    if top_p >= 1.0:
        return jnp.ones(logits.shape, bool)
    return _threshold_nucleus(logits, integer_probs(logits), jnp.int32(nucleus_mass_units(top_p)))


def _threshold_nucleus(logits: jax.Array, mass: jax.Array, target: jax.Array) -> jax.Array:
    """`top_p_mask`'s search, given the row's `integer_probs` and the target mass in units."""
    keys = _order_keys(logits)

    def mass_above(threshold: jax.Array) -> jax.Array:  # [b]: mass of the tokens with keys > threshold
        return jnp.sum(jnp.where(keys > threshold[:, None], mass, 0), axis=-1)

    def add_bit(bit, y):
        candidate = y | (jnp.uint32(1) << (31 - bit).astype(jnp.uint32))
        return jnp.where(mass_above(candidate) >= target, candidate, y)

    y = jax.lax.fori_loop(0, 32, add_bit, jnp.zeros(logits.shape[:1], jnp.uint32))
    # The last kept token's logit: the lowest key above y. Its group of equal logits may be cut short.
    edge = jnp.min(jnp.where(keys > y[:, None], keys, jnp.uint32(0xFFFFFFFF)), axis=-1)
    at_edge = keys == edge[:, None]
    edge_mass = jnp.max(jnp.where(at_edge, mass, 0), axis=-1)  # equal logits: equal masses
    room = target - mass_above(edge)  # > 0 by the choice of y
    tied = jnp.sum(at_edge, axis=-1, dtype=jnp.int32)
    keep_tied = jnp.where(edge_mass > 0, jnp.minimum(tied, (room + edge_mass - 1) // jnp.maximum(edge_mass, 1)),
                          tied)
    above = keys > edge[:, None]

    def cut_ties():  # rare: only when a run of equal logits straddles the top_p boundary
        rank = jnp.cumsum(at_edge, axis=-1, dtype=jnp.int32) - 1
        return above | (at_edge & (rank < keep_tied[:, None]))

    return jax.lax.cond(jnp.all(keep_tied == tied), lambda: above | at_edge, cut_ties)


def sampling_logits(logits: jax.Array, seen: jax.Array, settings: SamplingConfig) -> jax.Array:
    """Repetition penalty, then temperature and the nucleus (-inf outside it), in Hugging Face's order."""
    logits = apply_repetition_penalty(logits.astype(jnp.float32), seen, settings.repetition_penalty)
    if settings.greedy:
        return logits
    logits = logits / settings.temperature
    return jnp.where(top_p_mask(logits, settings.top_p), logits, -jnp.inf)


TOP_P_CANDIDATES = 64  # `lax.top_k` candidates per row: a nucleus inside them is drawn without a vocabulary pass
_DRAW_BLOCK = 256  # the full-vocabulary draw sums blocks of this many masses, then walks one block


def _wide_product(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(high, low) 32-bit halves of the 64-bit product of two uint32 arrays, from 16-bit limbs."""
    low16 = jnp.uint32(0xFFFF)
    x0, x1, y0, y1 = x & low16, x >> 16, y & low16, y >> 16
    p00, p01, p10, p11 = x0 * y0, x0 * y1, x1 * y0, x1 * y1
    mid = (p00 >> 16) + (p01 & low16) + (p10 & low16)
    return p11 + (p01 >> 16) + (p10 >> 16) + (mid >> 16), (p00 & low16) | (mid << 16)


def _draw_units(keys: jax.Array, total: jax.Array) -> jax.Array:
    """[b] int32: one uniform integer in [0, total[r]) per row from the row's own key: floor(R * total / 2^64)
    for 64 random bits R, so each value is hit by floor or ceil of 2^64 / total of the 2^64 bit patterns
    (relative bias below total / 2^64 < 2^-33). Not `jax.random.randint`: at spans above 2^16 its
    modular reduction overflows 32 bits (JAX 0.10: the low half of [0, 967634689) drawn 1.25x too often)."""
    bits = jax.vmap(lambda key: jax.random.bits(key, (2,), jnp.uint32))(keys)
    n = jnp.maximum(total, 1).astype(jnp.uint32)
    high, low = _wide_product(bits[:, 0], n)
    low_sum = low + _wide_product(bits[:, 1], n)[0]
    return (high + (low_sum < low).astype(jnp.uint32)).astype(jnp.int32)


def _candidates(logits: jax.Array, mass: jax.Array, target: jax.Array):
    """The `TOP_P_CANDIDATES` most likely tokens of each row: (ids [b, K] in the sorted order, their cumulative
    mass cum [b, K], kept [b, K]: in the nucleus, covered [b]: the candidates' mass reaches `target`).

    `lax.top_k` orders ties lower index first, as the sorted nucleus does (-0.0 is made 0.0 first, so equal
    logits compare equal): the candidates are the first K tokens of the sorted order. When their mass reaches
    the target, the token after them is already out of the nucleus, so the nucleus is exactly the kept prefix
    of the candidates (the mass before a token below the target, as in the definition)."""
    k = min(TOP_P_CANDIDATES, logits.shape[-1])
    _, ids = jax.lax.top_k(jnp.where(logits == 0, jnp.zeros_like(logits), logits), k)
    candidate_mass = jnp.take_along_axis(mass, ids, axis=-1)
    cum = jnp.cumsum(candidate_mass, axis=-1)  # exact: int32 sums of at most 2^30
    return ids, cum, cum - candidate_mass < target, cum[:, -1] >= target


def _candidate_draw(ids: jax.Array, cum: jax.Array, kept: jax.Array, keys: jax.Array) -> jax.Array:
    """[b]: a kept candidate drawn with probability mass / (kept mass): one uniform integer u per row, the
    first candidate whose cumulative mass exceeds u (kept candidates are a prefix, so no later one can be)."""
    units = _draw_units(keys, jnp.max(jnp.where(kept, cum, 0), axis=-1))
    pick = jnp.minimum(jnp.sum(cum <= units[:, None], axis=-1), ids.shape[-1] - 1)
    return jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0]


def _vocabulary_draw(mass: jax.Array, keep: jax.Array, keys: jax.Array) -> jax.Array:
    """[b]: a token drawn with probability mass / (nucleus mass) among `keep` by inverse CDF over the
    vocabulary in id order: one uniform integer per row; the block holding it is found from block sums and
    only that block is walked (no full-vocabulary cumsum, no V random numbers)."""
    b, v = mass.shape
    blocks = -(-v // _DRAW_BLOCK)
    masses = jnp.pad(jnp.where(keep, mass, 0), ((0, 0), (0, blocks * _DRAW_BLOCK - v)))
    masses = masses.reshape(b, blocks, _DRAW_BLOCK)
    block_mass = jnp.sum(masses, axis=-1)  # [b, blocks]
    block_cum = jnp.cumsum(block_mass, axis=-1)
    units = _draw_units(keys, block_cum[:, -1])
    block = jnp.minimum(jnp.sum(block_cum <= units[:, None], axis=-1), blocks - 1)
    before = jnp.take_along_axis(block_cum - block_mass, block[:, None], axis=-1)[:, 0]  # mass of earlier blocks
    inner = jnp.cumsum(jnp.take_along_axis(masses, block[:, None, None], axis=1)[:, 0], axis=-1)
    offset = jnp.minimum(jnp.sum(inner <= (units - before)[:, None], axis=-1), _DRAW_BLOCK - 1)
    return block * _DRAW_BLOCK + offset


def _fallback_capacities(rows: int) -> list[int]:
    """How many rows the full path is compiled for: 1, a quarter of the batch, the whole batch (distinct)."""
    return sorted({1, max(1, rows // 4), rows})


def sample_nucleus(logits: jax.Array, keys: jax.Array, top_p: float) -> jax.Array:
    """[b] int32: one token per row from the nucleus of `logits` (`top_p_mask`'s set), each kept token with
    probability proportional to its integer mass (`integer_probs`: the softmax rounded down to 2^-30 units).

    Fast path: the nucleus within the `TOP_P_CANDIDATES` most likely tokens (`lax.top_k`), drawn by inverse
    CDF over the sorted candidates. A row whose nucleus is larger (a flat distribution) takes the full path:
    the threshold search over the vocabulary and an inverse-CDF draw in id order. The full path runs (under
    `lax.switch`) only at steps where some row needs it, and only on those rows: they are gathered into the
    smallest of `_fallback_capacities` that holds them. Every row's token is a function of its own logits and
    key (a row inside its candidates keeps its candidate draw), never of the rest of its batch."""
    mass = integer_probs(logits)
    target = jnp.int32(nucleus_mass_units(top_p))

    def full_draw(rows_logits, rows_mass, rows_keys):
        keep = (jnp.ones(rows_logits.shape, bool) if top_p >= 1.0
                else _threshold_nucleus(rows_logits, rows_mass, target))
        return _vocabulary_draw(rows_mass, keep, rows_keys)

    if top_p >= 1.0:  # every token: the candidates never hold the nucleus
        return full_draw(logits, mass, keys).astype(jnp.int32)
    ids, cum, kept, covered = _candidates(logits, mass, target)
    candidate = _candidate_draw(ids, cum, kept, keys)
    capacities = _fallback_capacities(logits.shape[0])
    order = jnp.argsort(covered, stable=True)  # rows needing the full path first

    def gathered(capacity):
        def branch():
            if capacity == logits.shape[0]:
                return jnp.where(covered, candidate, full_draw(logits, mass, keys))
            rows = order[:capacity]
            drawn = full_draw(logits[rows], mass[rows], keys[rows])
            return candidate.at[rows].set(jnp.where(covered[rows], candidate[rows], drawn))
        return branch

    uncovered = jnp.sum(~covered, dtype=jnp.int32)
    branch = jnp.sum(uncovered > jnp.asarray([0] + capacities[:-1], jnp.int32), dtype=jnp.int32)
    token = jax.lax.switch(branch, [lambda: candidate] + [gathered(c) for c in capacities])
    return token.astype(jnp.int32)


def sampling_nucleus(logits: jax.Array, top_p: float) -> tuple[jax.Array, jax.Array]:
    """What `sample_nucleus` draws from, for tests and benchmarks: ([b, V] bool nucleus, [b] bool: the row
    took the candidate path)."""
    mass = integer_probs(logits)
    target = jnp.int32(nucleus_mass_units(top_p))
    if top_p >= 1.0:
        return jnp.ones(logits.shape, bool), jnp.zeros(logits.shape[:1], bool)
    ids, _, kept, covered = _candidates(logits, mass, target)
    rows = jnp.arange(logits.shape[0])[:, None]
    from_candidates = jnp.zeros(logits.shape, bool).at[rows, ids].set(kept)
    return jnp.where(covered[:, None], from_candidates, _threshold_nucleus(logits, mass, target)), covered


def choose_tokens(logits: jax.Array, seen: jax.Array, keys: jax.Array, settings: SamplingConfig) -> jax.Array:
    """One token per row: argmax when greedy, else a draw from the row's nucleus with its own key
    (repetition penalty, then temperature, then `sample_nucleus`)."""
    logits = apply_repetition_penalty(logits.astype(jnp.float32), seen, settings.repetition_penalty)
    if settings.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_nucleus(logits / settings.temperature, keys, settings.top_p)


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
        "seen": nn.with_logical_constraint(jnp.zeros((b, cfg.padded_vocab_size), bool), ("batch", None)),
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


def jit_decode(model: Llama, settings: SamplingConfig, cache_len: int, stop_ids: tuple[int, int],
               out_sharding: jax.sharding.Sharding, use_cache: bool = True):
    """`decode` jitted for one model, sampling setting and cache length (what `Generator` and the bench run):
    call it with (params, tokens, lengths, limits, row_ids, seed) under the mesh's `sharding.activate`."""
    fn = functools.partial(decode, model=model, settings=settings, cache_len=cache_len, stop_ids=stop_ids,
                           use_cache=use_cache)
    return jax.jit(fn, out_shardings=out_sharding)


def put_global(array: np.ndarray, target: jax.sharding.Sharding) -> jax.Array:
    """A host array (the same on every host) as a global array with sharding `target`."""
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


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
        return jit_decode(self.model, settings, cache_len, (self.tokenizer.eot_id, self.tokenizer.eos_id),
                          self._replicated, self.use_cache)

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
            self.params, put_global(tokens, self._batch_sharding), put_global(lengths, self._row_sharding),
            put_global(limits, self._row_sharding), put_global(ids, self._row_sharding), jnp.int32(seed))
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


def answer_prompts(generator: Generator, prompts: Sequence[PromptRecord], settings: SamplingConfig,
                   prompt_format: str = "chat") -> list[dict]:
    """Answers every prompt (all rounds of multi-turn questions, batched per round); output records.
    `prompt_format` (`records.prompt_ids`): "chat" (the turn format) or "completion" (plain text continued,
    one round; `records.check_prompts_fit` refuses multi-turn prompts first)."""
    tokenizer = generator.tokenizer
    conversations = [list(p.turns) for p in prompts]
    history: list[list[Completion]] = [[] for _ in prompts]
    for round_index in range(1 + max(len(p.followups) for p in prompts)):
        active = [i for i, p in enumerate(prompts) if len(p.followups) >= round_index]
        if round_index:
            for i in active:
                conversations[i] += [history[i][-1].text, prompts[i].followups[round_index - 1]]
        ids = {i: prompt_ids(tokenizer, conversations[i], prompt_format) for i in active}
        # First rounds were checked up front (check_prompts_fit); a later round that outgrew the context
        # is answered with nothing and stop reason "context" rather than failing after hours of decoding.
        fits = [i for i in active if len(ids[i]) < generator.cfg.max_seq_len]
        for i in set(active) - set(fits):
            history[i].append(Completion([], "", len(ids[i]), "context"))
        row_ids = [i + round_index * len(prompts) for i in fits]  # a fresh random stream per round
        if fits:
            for i, completion in zip(fits, generator.generate_ids([ids[i] for i in fits], settings, row_ids)):
                history[i].append(completion)
    return [answer_record(p, conv, [c.text for c in rounds], rounds[-1].prompt_tokens, rounds[-1].response_tokens,
                          rounds[-1].stop_reason) for p, conv, rounds in zip(prompts, conversations, history)]


def build_generator(config: ml_collections.ConfigDict, choice: CheckpointChoice, batch_size: int,
                    use_cache: bool = True, prompt_format: str = "chat",
                    tokenizer: Tokenizer | None = None) -> Generator:
    """Tokenizer (`config`'s, unless the caller passes it already loaded), mesh and a checkpoint's parameters
    (checked against `config`'s model) in a Generator.

    A base model (an import: its vocabulary is the tokenizer's without EOT) is sampled only with the
    "completion" format, which then takes the checkpoint's vocabulary; the chat format refuses it, naming
    the way out."""
    if tokenizer is None:
        tokenizer = load_tokenizer(config)
    stored = rundir.stored_model_config(choice)["vocab_size"]
    base_model = tokenizer.eot_is_new_row and stored == tokenizer.base_vocab_size
    if base_model:
        if prompt_format != "completion":
            raise ConfigError(f"{choice.folder}: the model's vocabulary is {stored}, the tokenizer "
                              f"{tokenizer.path} without EOT: a base model (not fine-tuned), which has no turn "
                              "format; sample it with --prompt_format=completion (plain text continued, stop at "
                              "EOS)")
        config = copy.deepcopy(config)
        with config.unlocked():
            config.model.vocab_size = stored
    rt = runtime.build(config, with_eot=not base_model, tokenizer=tokenizer)
    params = runtime.load_params(choice, rt)
    return Generator(rt.model_cfg, params, rt.tokenizer, rt.mesh, rt.rules, batch_size, use_cache)
