"""LIMA's findings at small scale: the real pretrained stories260K fine-tuned on ~1,000 story requests.

    python -m lima_jax.experiments.small_lima build-data --out DIR [--responses sampled|template] [--base CKPT]
    python -m lima_jax.experiments.small_lima run --out DIR [--sweep] [--train_size N] [--config.a.b=v ...]

`run` imports ../shared/data/llama/stories260K.bin (`lima_jax.convert from_llama2c`, into DIR/base), builds the
data (DIR/data): by default the responses are stories the base model itself wrote from templated openings,
filtered (`sample_splits`; `--responses template`: stories written from templates, `story_data.build_splits`).
It samples held-out story text and plain-completion answers to the test prompts from the base model, then
fine-tunes with `configs/stories260k.py` through `lima_jax.training.train` (dropout ramp, EOT turns, a
checkpoint per epoch, the dev report with dev perplexity) and measures after every epoch, on the held-out test
prompts (unseen subjects and names):

  eot_sampled / eot_greedy  share of answers that stop on EOT, LIMA's sampling / greedy (repetition penalty 1.2)
  mean_tokens               mean answer length (sampled)
  on_subject                share of sampled answers naming the prompt's subject (`story_data.mentions`);
                            on_subject_greedy the same for the greedy answers
  dev_on_subject            the same check on the dev report's answers: unseen requests about the subjects
                            of training (the test prompts' subjects are unseen)
  copy_chat / copy_plain    the copy probe (`copy_rate`, teacher-forced): the share of the test subjects the
                            model writes again piece by piece where the context calls for it, in an answer's
                            first sentence (chat) and in plain story text (the pretraining format)
  heldout_loss, retained    loss on held-out story text sampled from the base model, and its ratio to the
                            base model's (1.00 = all pretraining knowledge of that text kept)
  dev_perplexity            perplexity of the 50 dev reference answers
  pref_vs_base              a LENGTH/FORMAT HEURISTIC, not a judge: the share of prompts where the epoch's
                            answer scores above the base model's continuation (ties count half); see `score`

Output in DIR: metrics.jsonl (one line per epoch and run), table.md, eot_retained.png and
perplexity_vs_preference.png (matplotlib; a run given `--name NAME` writes NAME_table.md, NAME_eot_retained.png
and NAME_perplexity_vs_preference.png, so runs sharing DIR keep theirs), the run directories (runs/NAME) with
their dev_report.html.
`--sweep` also trains the variants of `SWEEP` (measured at their last epoch only) into sweep.md.
Base-model continuations are made here through `lima_jax.generation`'s API (the prompt as plain text after
BOS, cut where the model starts a new story with BOS), since `lima_jax.generate` has no plain-completion mode.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import random
import statistics
import time
from typing import Any, Sequence

import ml_collections
import numpy as np

from lima_jax import cli, convert, data, rundir, runtime, sharding
from lima_jax.config import apply_overrides, load_config_file
from lima_jax.dev_report import answer_cap_from_data, answer_lengths, dev_report_hook, mean_token_loss
from lima_jax.experiments import story_data
from lima_jax.generation import Generator, SamplingConfig, answer_prompts
from lima_jax.records import read_prompts, write_jsonl
from lima_jax.tokenizer import eot_init_row
from lima_jax.training import EpochEnd, train

REPO = pathlib.Path(__file__).resolve().parent.parent.parent
CONFIG = REPO / "configs" / "stories260k.py"
SHARED = REPO.parent / "shared" / "data" / "llama"
HELDOUT_STORIES = 32
HELDOUT_TOKENS = 200
# (name, config overrides): each changes one setting of the chosen run; measured at its last epoch.
SWEEP = (
    ("eot_init_mean", (("tokenizer.eot_init", "mean"),)),
    ("lr_1e-4", (("optimizer.learning_rate", "1e-4"), ("optimizer.end_learning_rate", "1e-5"))),
    ("lr_1e-3", (("optimizer.learning_rate", "1e-3"), ("optimizer.end_learning_rate", "1e-4"))),
    ("no_dropout", (("model.residual_dropout_max", "0.0"),)),
    ("loss_all", (("data.loss_on", "all"),)),
    ("data_250", (("data.train_path", "train_250.jsonl"),)),
    ("data_500", (("data.train_path", "train_500.jsonl"),)),
)
Overrides = Sequence[tuple[str, str]]


# --------------------------------------------------------------------------------------------------- data


def build_data(out: pathlib.Path, seed: int = 0, train_size: int = 1000, tokenizer_path: str | None = None,
               responses: str = "sampled", base: "Base | None" = None) -> dict:
    """Writes train(.jsonl, _250, _500), dev.jsonl, dev_ref.jsonl and test.jsonl into `out`; returns the stats.
    responses="sampled" (the default; needs `base`): stories the base model wrote from templated openings,
    filtered (`sample_splits`); "template": stories written from templates (`story_data.build_splits`)."""
    from lima_jax.tokenizer import Tokenizer
    tokenizer = Tokenizer(tokenizer_path or SHARED / "tok512.model")
    two_turn = round(0.03 * train_size)
    sampling: dict[str, Any] = {}
    if responses == "sampled":
        if base is None:
            raise ValueError("responses='sampled' needs the base model")
        splits, sampling = sample_splits(base, seed, train_size, two_turn)
    elif responses == "template":
        splits = story_data.build_splits(seed=seed, train_size=train_size, two_turn=two_turn)
    else:
        raise ValueError(f"responses={responses!r}: must be 'sampled' or 'template'")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", [e.record("stories") for e in splits.train])
    single = [e for e in splits.train if len(e.turns) == 2]
    multi = [e for e in splits.train if len(e.turns) > 2]
    for size in (250, 500):  # nested subsets with the same share of two-turn conversations
        subset = single[:size] + multi[:round(0.03 * size)]
        write_jsonl(out / f"train_{size}.jsonl", [e.record("stories") for e in subset])
    write_jsonl(out / "dev.jsonl", [e.prompt_record("stories_dev", f"dev{i:03d}") for i, e in enumerate(splits.dev)])
    write_jsonl(out / "dev_ref.jsonl", [e.record("stories_dev") for e in splits.dev])
    write_jsonl(out / "test.jsonl", [e.prompt_record("stories_test", f"test{i:03d}")
                                     for i, e in enumerate(splits.test)])
    requests = [len(tokenizer.encode(e.turns[0])) for e in splits.train]
    stats: dict[str, Any] = {"responses": responses, **({"sampling": sampling} if sampling else {})}
    stats.update({name: story_data.diversity(examples, tokenizer.encode)
                  for name, examples in (("train", splits.train), ("dev", splits.dev), ("test", splits.test))})
    stats["request_tokens"] = {"median": statistics.median(requests), "max": max(requests)}
    stats["unknown_pieces"] = sum(tokenizer.backend.sp.unk_id() in tokenizer.encode(e.turns[0]) for e in splits.train)
    sample = splits.train[0].turns[0]
    stats["tokenized_sample"] = f"{sample} -> {' '.join(tokenizer.id_to_piece(i) for i in tokenizer.encode(sample))}"
    stats["test_subjects_unseen"] = not ({e.subject for e in splits.test} & {e.subject for e in splits.train})
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


# Sampling the stories: close to the base model's own distribution (temperature 0.9, a light nucleus, no
# repetition penalty), with room for a whole TinyStories story inside data.max_len (at 256 new tokens only
# ~10% of samples ended; at 448, ~90%); candidates are sampled 256 rows at a time.
STORY_SAMPLING = SamplingConfig(temperature=0.9, top_p=0.95, repetition_penalty=1.0, max_new_tokens=416, seed=7)
MIN_STORY_TOKENS = 60
SAMPLE_BATCH = 256
MAX_LEN = 512  # data.max_len of configs/stories260k.py: a two-turn conversation must fit it
Accepted = tuple[story_data.Plan, str, int]  # (plan, continuation, story tokens)


def sample_stories(base: "Base", plans: Any, needed: int, first_row: int, rejected: dict) -> list[Accepted]:
    """Continues plans from the iterator `plans` with the base model, SAMPLE_BATCH at a time, until `needed`
    stories pass `story_data.accept_story`; counts refusals by reason into `rejected` (and "candidates", and
    "unused": stories that passed after `needed` were found)."""
    tok = base.rt.tokenizer
    generator = base.generator(SAMPLE_BATCH)
    accepted: list[Accepted] = []
    row = first_row
    while len(accepted) < needed:
        batch = [next(plans) for _ in range(SAMPLE_BATCH)]
        if row - first_row > max(20 * needed, SAMPLE_BATCH):
            raise RuntimeError(f"only {len(accepted)} of {needed} sampled stories passed the filter: {rejected}")
        prompts = [[tok.bos_id] + tok.encode(p.text) for p in batch]
        completions = generator.generate_ids(prompts, STORY_SAMPLING, list(range(row, row + len(batch))))
        row += len(batch)
        for plan, prompt, c in zip(batch, prompts, completions):
            ids, ended = one_story(c, tok.bos_id)
            story = tok.decode(prompt[1:] + ids)
            continuation = story[len(plan.text):].strip() if story.startswith(plan.text) else ""
            reason = story_data.accept_story(plan, continuation, ended, len(prompt) - 1 + len(ids),
                                             MIN_STORY_TOKENS)
            rejected["candidates"] = rejected.get("candidates", 0) + 1
            if reason:
                rejected[reason] = rejected.get(reason, 0) + 1
            elif len(accepted) < needed:
                accepted.append((plan, continuation, len(prompt) - 1 + len(ids)))
            else:  # passed, but the last batch found more than needed
                rejected["unused"] = rejected.get("unused", 0) + 1
    return accepted


def _plan_stream(seed: int, subjects, names):
    rng = random.Random(seed)
    while True:
        yield story_data.make_plan(rng, subjects, names, subject_first=True)


def shortest_pairs(pool: Sequence[Accepted], count: int) -> tuple[list[tuple[Accepted, Accepted]], list[Accepted]]:
    """Up to `count` pairs of the shortest stories (two subjects, together short enough for one MAX_LEN row
    with their requests), and the other stories in pool order. Most sampled stories run 250-400 tokens, so
    only the shortest pair up into a two-turn conversation."""
    by_length = sorted(range(len(pool)), key=lambda i: (pool[i][2], i))
    used: set[int] = set()
    pairs = []
    for a in by_length:
        if len(pairs) == count:
            break
        if a in used:
            continue
        b = next((b for b in by_length if b != a and b not in used and pool[b][0].subject != pool[a][0].subject
                  and pool[a][2] + pool[b][2] + 80 <= MAX_LEN), None)
        if b is not None:
            used |= {a, b}
            pairs.append((pool[a], pool[b]))
    return pairs, [s for i, s in enumerate(pool) if i not in used]


def two_turn_examples(rng: random.Random, pairs: Sequence[tuple[Accepted, Accepted]],
                      count: int) -> list[story_data.Example]:
    """A story, then a follow-up asking for another one about a different subject."""
    examples = []
    for (first, c1, _), (second, c2, _) in pairs[:count]:
        a = f"{story_data.article(second.subject)} {second.subject}"
        follow = rng.choice((f"Now tell me another story, about {a}.",
                             f"That was nice. Can you write one more about {a}?",
                             f"Thank you! Now write a story about {a}."))
        request = story_data.about_request(rng, f"{story_data.article(first.subject)} {first.subject}")
        examples.append(story_data.Example((request, f"{first.text} {c1}", follow, f"{second.text} {c2}"),
                                           first.subject, "two_turn"))
    return examples


def sample_splits(base: "Base", seed: int, train_size: int, two_turn: int,
                  dev_size: int = 50, test_size: int = 40) -> tuple[story_data.Splits, dict]:
    """The data set with responses the base model wrote (see `story_data.make_plan`, `accept_story`):
    `train_size` single-turn and `two_turn` two-turn train conversations, `dev_size` dev ones (train subjects
    and names, requests unseen in train), `test_size` test prompts (unseen subjects and names); plus the
    sampling figures (candidates, refusals by reason, seconds)."""
    tic = time.perf_counter()
    rejected: dict[str, int] = {}
    pool = sample_stories(base, _plan_stream(seed, story_data.SAMPLED_TRAIN_SUBJECTS, story_data.TRAIN_NAMES),
                          train_size + 2 * two_turn, 0, rejected)
    rng = random.Random(seed)
    pairs, single = shortest_pairs(pool, two_turn)
    train = []
    for plan, continuation, _ in single[:train_size]:
        kind = rng.choice(story_data.kinds_for(plan, continuation))
        request, answer = story_data.plan_request(rng, plan, kind, continuation)
        train.append(story_data.Example((request, answer), plan.subject, kind))
    train += two_turn_examples(rng, pairs, two_turn)
    seen = {e.turns[0] for e in train}
    dev: list[story_data.Example] = []
    dev_rng = random.Random(seed + 1)
    for plan, continuation, _ in sample_stories(base, _plan_stream(seed + 1, story_data.SAMPLED_TRAIN_SUBJECTS,
                                                                   story_data.TRAIN_NAMES),
                                                2 * dev_size, 10_000_000, rejected):
        kind = dev_rng.choice(story_data.kinds_for(plan, continuation))
        request, answer = story_data.plan_request(dev_rng, plan, kind, continuation)
        if request not in seen and len(dev) < dev_size:
            seen.add(request)
            dev.append(story_data.Example((request, answer), plan.subject, kind))
    test_rng = random.Random(seed + 2)
    test = []
    for kind in (story_data.SAMPLED_KINDS * test_size)[:test_size]:
        plan = story_data.make_plan(test_rng, story_data.TEST_SUBJECTS, story_data.TEST_NAMES,
                                    with_event=kind == "where" or None)
        test.append(story_data.Example((story_data.plan_request(test_rng, plan, kind, None)[0],), plan.subject, kind))
    accepted = len(pool) + 2 * dev_size
    figures = {"settings": dataclasses.asdict(STORY_SAMPLING), "min_story_tokens": MIN_STORY_TOKENS,
               "candidates": rejected.get("candidates", 0), "accepted": accepted,
               "unused": rejected.get("unused", 0),
               "refused": {k: v for k, v in rejected.items() if k not in ("candidates", "unused")},
               "seconds": round(time.perf_counter() - tic, 1)}
    return story_data.Splits(train, dev, test), figures


# ------------------------------------------------------------------------------------------- base model


@dataclasses.dataclass
class Base:
    """The imported base model (its vocabulary grown by the EOT row, as fine-tuning starts) on one runtime."""

    config: ml_collections.ConfigDict
    rt: runtime.Runtime
    params: Any

    @classmethod
    def load(cls, config: ml_collections.ConfigDict) -> "Base":
        rt = runtime.build(config)
        choice, stored = runtime.check_init_from(config, rt.model_cfg)
        return cls(config, rt, runtime.load_pretrained_params(choice, rt.model_cfg, stored, rt.mesh, rt.rules,
                                                              eot_init_row(config, rt.tokenizer)))

    def generator(self, batch_size: int) -> Generator:
        return Generator(self.rt.model_cfg, self.params, self.rt.tokenizer, self.rt.mesh, self.rt.rules, batch_size)

    def complete(self, texts: Sequence[str], settings: SamplingConfig, seed_rows: int = 0) -> list[tuple[str, bool]]:
        """Plain completions (BOS + text), cut where the model starts a new story: (text, ended before the cap)."""
        tok = self.rt.tokenizer
        prompts = [[tok.bos_id] + tok.encode(t) if t else [tok.bos_id] for t in texts]
        out = self.generator(len(prompts)).generate_ids(prompts, settings, [seed_rows + i for i in range(len(texts))])
        results = []
        for c in out:
            ids, ended = one_story(c, tok.bos_id)
            results.append((tok.decode(ids).strip(), ended))
        return results


def one_story(completion: Any, bos_id: int) -> tuple[list[int], bool]:
    """A plain completion's ids up to where the model starts a new story (BOS), and whether the story ended
    before the token cap: on BOS, EOS or EOT (EOT's row starts as a copy of BOS's)."""
    ids = list(completion.ids)
    if bos_id in ids:
        return ids[:ids.index(bos_id)], True
    return ids, completion.stop_reason in ("eos", "eot")


def import_base(path: pathlib.Path) -> pathlib.Path:
    """stories260K.bin imported into `path` (`lima_jax.convert from_llama2c`) unless it is there already."""
    if not path.exists():
        convert.main(["from_llama2c", "--input", str(SHARED / "stories260K.bin"), "--output", str(path)])
    return path


def base_config(checkpoint: pathlib.Path) -> ml_collections.ConfigDict:
    """configs/stories260k.py starting from `checkpoint`."""
    config = load_config_file(CONFIG)
    config.init_from = str(checkpoint)
    return config


def heldout_examples(base: Base, path: pathlib.Path, count: int = HELDOUT_STORIES) -> list[data.Example]:
    """Held-out story text: stories sampled from the base model itself (temperature 1, no nucleus, no penalty:
    its own distribution) from a bare BOS, cached in `path`; as loss-on-every-token examples."""
    if not path.exists():
        settings = SamplingConfig(temperature=1.0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=HELDOUT_TOKENS,
                                  seed=12345)
        texts = [t for t, _ in base.complete([""] * count, settings)]
        write_jsonl(path, [{"text": t} for t in texts])
    tok = base.rt.tokenizer
    examples = []
    for line in path.read_text().splitlines():
        ids = np.asarray([tok.bos_id] + tok.encode(json.loads(line)["text"]), np.int32)
        examples.append(data.Example(ids[:-1], ids[1:], np.ones(len(ids) - 1, np.float32), "heldout", str(path),
                                     False, len(ids)))
    return examples


# ---------------------------------------------------------------------------------------------- measure


def score(answer: str, ended: bool, subject: str, length_range: tuple[int, int], num_tokens: int) -> int:
    """The HEURISTIC preference score (0-4; not a judge): it stopped by itself, names the prompt's subject,
    ends on a sentence end, and is as long as the training stories (their 5th-95th percentile of tokens)."""
    lo, hi = length_range
    return (int(ended) + int(story_data.mentions(answer, subject)) + int(answer.rstrip().endswith((".", "!", "?", '"')))
            + int(lo <= num_tokens <= hi))


@dataclasses.dataclass
class Measure:
    """What every epoch is measured with: the test prompts, the base model's figures and answers."""

    prompts: list
    subjects: list[str]
    heldout: list[data.Example]
    dev_refs: list[data.Example]
    base_heldout_loss: float
    base_answers: list[tuple[str, bool]]
    length_range: tuple[int, int]
    cap: int
    max_len: int
    dev_subjects: dict[str, str]  # dev prompt id -> its subject

    def base_scores(self, tokenizer) -> list[int]:
        return [score(t, ended, s, self.length_range, len(tokenizer.encode(t)))
                for (t, ended), s in zip(self.base_answers, self.subjects)]


def on_subject(answers: Sequence[dict], subjects: Sequence[str]) -> float:
    return statistics.fmean(story_data.mentions(r["response"], s) for r, s in zip(answers, subjects))


def dev_on_subject(workdir: str, epoch: int, dev_subjects: dict[str, str]) -> dict:
    """The overlap check on the dev report's answers of `epoch` ({} when it wrote none that epoch)."""
    path = rundir.RunDir.at(workdir).epoch_answers(epoch)
    if not path.exists():
        return {}
    answers = [json.loads(line) for line in path.read_text().splitlines()]
    return {"dev_on_subject": on_subject(answers, [dev_subjects[r["id"]] for r in answers])}


def copy_probe_rows(tokenizer, subjects: Sequence[str], chat: bool) -> list[tuple[list[int], list[int]]]:
    """(context ids, the subject's ids) for every subject and context of `story_data.copy_contexts`."""
    rows = []
    for subject in subjects:
        chats, plains = story_data.copy_contexts(subject)
        for context in chats if chat else plains:
            request, opening = context if chat else ("", context)
            head = [tokenizer.bos_id] + (tokenizer.encode(request) + [tokenizer.eot_id] if chat else [])
            before, after = tokenizer.encode(opening), tokenizer.encode(f"{opening} {subject}")
            if after[:len(before)] != before:
                raise ValueError(f"the copy probe's context {opening!r} tokenizes differently before {subject!r}")
            rows.append((head + before, after[len(before):]))
    return rows


def copy_rate(rt: runtime.Runtime, params: Any, subjects: Sequence[str], chat: bool) -> float:
    """The copy probe: the share of (subject, context) pairs of `copy_probe_rows` where every piece of the
    subject is the model's most likely next token, teacher-forced. chat=True: the answer to a request about
    the subject; chat=False: plain story text that calls for the subject again (what pretraining taught)."""
    examples = []
    for context, pieces in copy_probe_rows(rt.tokenizer, subjects, chat):
        ids = np.asarray(context + pieces, np.int32)
        weights = np.zeros(len(ids) - 1, np.float32)
        weights[len(context) - 1:] = 1.0  # the targets that are the subject's pieces
        examples.append(data.Example(ids[:-1], ids[1:], weights, "copy_probe", "copy_probe", False, len(ids)))
    shards = sharding.batch_shards(sharding.batch_sharding(rt.mesh, rt.rules))
    batch = data.pad_rows(examples + [None] * (-len(examples) % shards), -(-max(map(len, examples)) // 8) * 8)
    logits, _ = rt.model.apply({"params": params}, batch["tokens"], batch["segment_ids"], batch["positions"],
                               deterministic=True)
    copied = (np.asarray(logits).argmax(axis=-1) == batch["targets"]) | (batch["weights"] == 0)
    return float(copied[:len(examples)].all(axis=1).mean())


def copy_rates(m: "Measure", rt: runtime.Runtime, params: Any) -> dict[str, float]:
    subjects = sorted(set(m.subjects))
    return {"copy_chat": copy_rate(rt, params, subjects, True), "copy_plain": copy_rate(rt, params, subjects, False)}


def measure_epoch(m: Measure, model: Any, params: Any, generator: Generator, tokenizer, greedy: bool = True) -> dict:
    generator.params = params
    sampled = answer_prompts(generator, m.prompts, SamplingConfig(max_new_tokens=m.cap, seed=0))
    row: dict[str, Any] = {}
    if greedy:
        greedy_answers = answer_prompts(generator, m.prompts, SamplingConfig(max_new_tokens=m.cap, greedy=True))
        row["eot_greedy"] = statistics.fmean(r["stop_reason"] == "eot" for r in greedy_answers)
        row["on_subject_greedy"] = on_subject(greedy_answers, m.subjects)
    row["eot_sampled"] = statistics.fmean(r["stop_reason"] == "eot" for r in sampled)
    row["mean_tokens"] = statistics.fmean(r["response_tokens"] for r in sampled)
    row["on_subject"] = on_subject(sampled, m.subjects)
    loss = mean_token_loss(model, params, m.heldout, m.max_len)
    row.update(heldout_loss=loss, retained=loss / m.base_heldout_loss,
               dev_perplexity=math.exp(mean_token_loss(model, params, m.dev_refs, m.max_len)))
    ours = [score(r["response"], r["stop_reason"] == "eot", s, m.length_range, r["response_tokens"])
            for r, s in zip(sampled, m.subjects)]
    theirs = m.base_scores(tokenizer)
    row["pref_vs_base"] = statistics.fmean(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs))
    row["answers"] = [{"id": r["id"], "prompt": r["prompt"][-1], "response": r["response"],
                       "stop": r["stop_reason"]} for r in sampled]
    return row


# ------------------------------------------------------------------------------------------------ runs


def experiment_config(out: pathlib.Path, name: str, overrides: Overrides) -> ml_collections.ConfigDict:
    """configs/stories260k.py on the experiment's data and base model; data.train_path overrides are file
    names inside OUT/data."""
    config = base_config(out / "base")
    data_dir = out / "data"
    config.workdir = str(out / "runs" / name)
    config.data.train_path = str(data_dir / "train.jsonl")
    config.data.dev_path = str(data_dir / "dev.jsonl")
    config.dev_report.reference_path = str(data_dir / "dev_ref.jsonl")
    apply_overrides(config, [(k, str(data_dir / v) if k == "data.train_path" else v) for k, v in overrides])
    return config


def train_and_measure(config: ml_collections.ConfigDict, m: Measure, name: str, every_epoch: bool,
                      metrics_path: pathlib.Path) -> list[dict]:
    """Trains `config` with the dev report hook and measures after every epoch (or the last only)."""
    rows: list[dict] = []
    report = dev_report_hook(config)
    generators: dict[str, Generator] = {}
    tic = time.perf_counter()

    def after_epoch(end: EpochEnd) -> None:
        if report is not None:
            report(end)
        if not every_epoch and end.epoch != config.train.num_epochs:
            return
        rt = end.rt
        gen = generators.get("g") or generators.setdefault("g", Generator(rt.model_cfg, end.state.params,
                                                                           rt.tokenizer, rt.mesh, rt.rules,
                                                                           len(m.prompts)))
        t0 = time.perf_counter()
        row = {"run": name, "epoch": end.epoch, "step": end.step,
               **measure_epoch(m, rt.model, end.state.params, gen, rt.tokenizer), **copy_rates(m, rt, end.state.params),
               **dev_on_subject(config.workdir, end.epoch, m.dev_subjects),
               "elapsed_s": time.perf_counter() - tic, "measure_s": time.perf_counter() - t0}
        rows.append(row)
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(format_row(row), flush=True)

    train(config, after_epoch=after_epoch)
    return rows


COLUMNS = (("epoch", "epoch", "{}"), ("EOT stop (sampled)", "eot_sampled", "{:.0%}"),
           ("EOT stop (greedy)", "eot_greedy", "{:.0%}"), ("mean tokens", "mean_tokens", "{:.1f}"),
           ("on subject", "on_subject", "{:.0%}"), ("on subject (greedy)", "on_subject_greedy", "{:.0%}"),
           ("dev on subject", "dev_on_subject", "{:.0%}"), ("copies subject (chat)", "copy_chat", "{:.0%}"),
           ("copies subject (plain text)", "copy_plain", "{:.0%}"), ("held-out loss", "heldout_loss", "{:.3f}"),
           ("vs base", "retained", "{:.3f}"), ("dev ppl", "dev_perplexity", "{:.3f}"),
           ("pref vs base (heuristic)", "pref_vs_base", "{:.0%}"))


def format_row(row: dict, columns=COLUMNS) -> str:
    return "| " + " | ".join(fmt.format(row[key]) if key in row else "-" for _, key, fmt in columns) + " |"


def table(rows: Sequence[dict], columns=COLUMNS, first: tuple[str, str] | None = None) -> str:
    cols = ((first[0], first[1], "{}"),) + columns if first else columns
    head = "| " + " | ".join(c[0] for c in cols) + " |\n|" + " --- |" * len(cols) + "\n"
    return head + "\n".join(format_row(r, cols) for r in rows) + "\n"


def plot(rows: Sequence[dict], base_loss: float, out: pathlib.Path, prefix: str = "") -> list[pathlib.Path]:
    """PREFIXeot_retained.png (EOT stop and retained knowledge per epoch), PREFIXperplexity_vs_preference.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [r["eot_sampled"] for r in rows], "o-", label="LIMA sampling")
    a.plot(epochs, [r["eot_greedy"] for r in rows], "s--", label="greedy")
    a.set(xlabel="epoch", ylabel="share stopping on EOT", ylim=(0, 1.05), title="EOT stop, unseen prompts")
    a.legend()
    b.plot(epochs, [r["retained"] for r in rows], "o-")
    b.axhline(1.0, color="grey", lw=0.8)
    b.axhline(1.1, color="red", lw=0.8, ls=":", label="goal: within 10%")
    b.set(xlabel="epoch", ylabel="held-out story loss / base", title=f"knowledge retained (base {base_loss:.3f})")
    b.legend()
    fig.tight_layout()
    first = out / f"{prefix}eot_retained.png"
    fig.savefig(first, dpi=100)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([r["dev_perplexity"] for r in rows], [r["pref_vs_base"] for r in rows], "o-")
    for r in rows:
        ax.annotate(str(r["epoch"]), (r["dev_perplexity"], r["pref_vs_base"]))
    ax.set(xlabel="dev perplexity", ylabel="preferred over base (heuristic)", title="perplexity vs preference")
    fig.tight_layout()
    second = out / f"{prefix}perplexity_vs_preference.png"
    fig.savefig(second, dpi=100)
    return [first, second]


def prepare(out: pathlib.Path, config: ml_collections.ConfigDict, test_prompts: int = 0,
            heldout_stories: int = HELDOUT_STORIES, responses: str = "sampled",
            train_size: int = 1000) -> tuple[Measure, float]:
    """Imports the base model and builds the data if absent; the base model's figures. Returns (Measure, s)."""
    tic = time.perf_counter()
    import_base(out / "base")
    base = Base.load(config)
    if not (out / "data" / "test.jsonl").exists():
        print(json.dumps(build_data(out / "data", train_size=train_size, responses=responses, base=base), indent=1))
    tok = base.rt.tokenizer
    heldout = heldout_examples(base, out / "data" / "heldout_stories.jsonl", heldout_stories)
    dev_refs = data.load_examples(config.dev_report.reference_path, tok, config.data.max_len).examples
    train_examples = data.load_examples(config.data.train_path, tok, config.data.max_len).examples
    lengths = answer_lengths(train_examples)
    cap = int(config.dev_report.max_new_tokens) or answer_cap_from_data(train_examples)
    prompts = read_prompts(out / "data" / "test.jsonl")
    subjects = [json.loads(line)["subject"] for line in (out / "data" / "test.jsonl").read_text().splitlines()]
    dev_lines = (out / "data" / "dev.jsonl").read_text().splitlines()
    dev_subjects = {r["id"]: r["subject"] for r in map(json.loads, dev_lines)}
    if test_prompts:  # a reduced run (the slow test): the first N, every request kind among them
        prompts, subjects = prompts[:test_prompts], subjects[:test_prompts]
    base_path = out / "data" / "base_answers.jsonl"
    if not base_path.exists():
        answers = base.complete([p.turns[0] for p in prompts], SamplingConfig(max_new_tokens=cap, seed=0))
        write_jsonl(base_path, [{"id": p.id, "prompt": p.turns[0], "response": t, "ended": e}
                                for p, (t, e) in zip(prompts, answers)])
    base_answers = [(r["response"], r["ended"]) for r in map(json.loads, base_path.read_text().splitlines())]
    m = Measure(prompts, subjects, heldout, dev_refs, mean_token_loss(base.rt.model, base.params, heldout,
                                                                      config.data.max_len),
                base_answers, (int(np.percentile(lengths, 5)), int(np.percentile(lengths, 95))), cap,
                config.data.max_len, dev_subjects)
    return m, time.perf_counter() - tic


def base_row(m: Measure, config: ml_collections.ConfigDict) -> dict:
    """Epoch 0: the base model itself (its continuations for the answers)."""
    base = Base.load(config)
    tok = base.rt.tokenizer
    return {"run": "base", "epoch": 0, "eot_sampled": 0.0, "mean_tokens": statistics.fmean(
        len(tok.encode(t)) for t, _ in m.base_answers),
        "on_subject": statistics.fmean(story_data.mentions(t, s) for (t, _), s in zip(m.base_answers, m.subjects)),
        "base_ended": statistics.fmean(e for _, e in m.base_answers),
        "heldout_loss": m.base_heldout_loss, "retained": 1.0,
        "dev_perplexity": math.exp(mean_token_loss(base.rt.model, base.params, m.dev_refs, m.max_len)),
        "pref_vs_base": 0.5, **copy_rates(m, base.rt, base.params)}


def output_prefix(name: str) -> str:
    """What a run's table and plots in OUT start with: nothing for the main run ("chosen"), else "NAME_"."""
    return "" if name == "chosen" else f"{name}_"


def run(out: pathlib.Path, overrides: Overrides, sweep: bool, name: str = "chosen", test_prompts: int = 0,
        heldout_stories: int = HELDOUT_STORIES, last_epoch_only: bool = False, responses: str = "sampled",
        train_size: int = 1000) -> dict:
    """The whole experiment (see the module docstring); returns {"rows", "sweep", "wall_s", "plots"}.
    `test_prompts` > 0 measures only the first N test prompts (a reduced run)."""
    tic = time.perf_counter()
    config = experiment_config(out, name, overrides)  # bad overrides fail before OUT is made
    out.mkdir(parents=True, exist_ok=True)
    m, prep_s = prepare(out, config, test_prompts, heldout_stories, responses, train_size)
    print(f"prepared in {prep_s:.0f} s: {len(m.prompts)} test prompts, {len(m.heldout)} held-out stories, base "
          f"held-out loss {m.base_heldout_loss:.3f}, answer cap {m.cap} tokens", flush=True)
    metrics = out / "metrics.jsonl"
    rows = [base_row(m, config)]
    with metrics.open("a") as f:
        f.write(json.dumps(rows[0]) + "\n")
    rows += train_and_measure(config, m, name, not last_epoch_only, metrics)
    lines = ["# stories260K fine-tuned on the story requests, per epoch (held-out test prompts)", "",
             f"epoch 0 is the base model (its plain continuations; {rows[0]['base_ended']:.0%} ended by "
             "starting a new story); `pref vs base` is a length/format heuristic, not a judge.", "",
             table(rows)]
    result: dict[str, Any] = {"rows": rows}
    if sweep:
        sweep_rows = [dict(rows[-1], run=name)]
        for variant, changes in SWEEP:
            variant_config = experiment_config(out, variant, list(overrides) + list(changes))
            variant_config.dev_report.epochs = ()
            sweep_rows += train_and_measure(variant_config, m, variant, False, metrics)
        lines += ["", "## Sweep (last epoch of each run)", "", table(sweep_rows, COLUMNS[1:], ("run", "run"))]
        result["sweep"] = sweep_rows
    result["wall_s"] = time.perf_counter() - tic
    lines += ["", f"wall time {result['wall_s']:.0f} s"]
    prefix = output_prefix(name)
    (out / f"{prefix}table.md").write_text("\n".join(lines) + "\n")
    try:
        result["plots"] = [str(p) for p in plot(rows[1:], m.base_heldout_loss, out, prefix)]
    except ImportError as e:
        print(f"no plots: matplotlib is not installed ({e})")
    print("\n".join(lines))
    return result


# ------------------------------------------------------------------------------------------ entry point


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser("lima_jax.experiments.small_lima", __doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = cli.subcommand(sub, "build-data", "write the story-request data set and print its size and diversity")
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--train_size", type=cli.positive_int, default=1000)
    responses = dict(choices=("sampled", "template"), default="sampled",
                     help="sampled: stories the base model wrote from templated openings, filtered (default); "
                          "template: stories written from templates")
    b.add_argument("--responses", **responses)
    b.add_argument("--base", help="responses=sampled: a `lima_jax.convert from_llama2c` folder of stories260K "
                                  "(default: import ../shared/data/llama/stories260K.bin into OUT/base)")
    r = cli.subcommand(sub, "run", "import stories260K, fine-tune, measure every epoch")
    r.add_argument("--out", required=True)
    r.add_argument("--sweep", action="store_true", help="also train the variants of SWEEP (last epoch measured)")
    r.add_argument("--name", default="chosen", help="the main run's name (its folder under OUT/runs)")
    r.add_argument("--last_epoch_only", action="store_true", help="measure the main run at its last epoch only")
    r.add_argument("--test_prompts", type=int, default=0, help="measure only the first N test prompts (0: all)")
    r.add_argument("--responses", **responses)
    r.add_argument("--train_size", type=cli.positive_int, default=1000,
                   help="single-turn train conversations (when OUT/data has none yet)")
    r.add_argument("--heldout_stories", type=cli.positive_int, default=HELDOUT_STORIES,
                   help="held-out stories sampled from the base model (when OUT/data has none yet)")
    return p


def main(argv: list[str]) -> None:
    args, overrides = cli.split_overrides(argv)
    args = build_parser().parse_args(args)
    cli.setup_logging()
    if args.command == "build-data":
        out = pathlib.Path(args.out)
        base = None
        if args.responses == "sampled":
            base = Base.load(base_config(pathlib.Path(args.base) if args.base else import_base(out / "base")))
        print(json.dumps(build_data(out, args.seed, args.train_size, responses=args.responses, base=base), indent=1))
        return
    run(pathlib.Path(args.out), overrides, args.sweep, args.name, args.test_prompts, args.heldout_stories,
        args.last_epoch_only, args.responses, args.train_size)


if __name__ == "__main__":
    cli.run(main)
