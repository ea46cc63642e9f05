"""Pairwise preference evaluation of two systems' answers to the same prompts, as in LIMA (section 3).

    # a person rates, in the terminal or on a local web page (http://127.0.0.1:8765); resumable
    python -m lima_jax.eval pairwise --a lima.jsonl --b baseline.jsonl --judgments me.jsonl --mode terminal
    python -m lima_jax.eval pairwise --a lima.jsonl --b baseline.jsonl --judgments me.jsonl --mode web

    # a model judges every pair in both orders (a disagreement is a tie): a local OpenAI-compatible server
    python -m lima_jax.eval pairwise --a lima.jsonl --b baseline.jsonl --judgments judge.jsonl --mode judge \
        --judge_url http://127.0.0.1:8000/v1 --judge_model my-model [--judge_prompt my_prompt.txt]
    #   ... or a lima_jax model, greedy: --judge_checkpoint WORKDIR (its config.json) or
    #   --judge_config configs/x.py --judge_checkpoint CKPT [--judge_config.mesh.fsdp=8 ...]

    # win / tie / loss with 95% confidence intervals, and the stacked bar chart of the paper's Figure 1
    python -m lima_jax.eval table judge.jsonl [more.jsonl ...] --png figure1.png
    # agreement of two raters on the same comparison (tie-discounted accuracy)
    python -m lima_jax.eval agreement me.jsonl judge.jsonl

The raters choose among the paper's three answers: Response 1 better, Response 2 better, neither. Which
system wrote which response is hidden and randomized (a new secret seed per judgments file, stored in it).
Each judgment is appended and synced to the `--judgments` file the moment it is made; running the same
command again resumes with the pairs left, in the same order (refused if the response files now hold other
answers than those judged, or if `--judgments` is not a judgments file). The web page answers only
localhost requests of its own page (Host, Origin and a per-session token are checked).

Response files are lima_jax answer files (`python -m lima_jax.generate --out`) or any JSONL with `input` or
`prompt` and `response` per line (see `lima_jax.evaluation.pairs`). Every file may be local or a gs:// URL.
The lima_jax judge follows the config convention of the other tools: `--judge_config FILE` (default: the
`config.json` of the run `--judge_checkpoint` belongs to) and any number of `--judge_config.a.b=VALUE`
overrides. Bad input (a missing or malformed file, a bad flag value, a failing judge endpoint) prints one
`error: ...` paragraph and exits with status 2.
"""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Sequence

from lima_jax import cli
from lima_jax.errors import ConfigError, DataError
from lima_jax.evaluation import human, judge, pairs, stats
from lima_jax.paths import as_path



def _pairwise(args: argparse.Namespace) -> None:
    a_path, b_path, judgments = as_path(args.a), as_path(args.b), as_path(args.judgments)
    all_pairs = pairs.make_pairs(a_path, b_path)  # bad files fail here, before any rating or judging
    a_name, b_name = args.a_name or a_path.stem, args.b_name or b_path.stem
    if a_name == b_name:
        raise ConfigError(f"--a {args.a} and --b {args.b}: both systems are named {a_name!r}; set --a_name / "
                          "--b_name")
    template = judge.load_template(as_path(args.judge_prompt)) if args.mode == "judge" else ""
    model_judge = _make_judge(args) if args.mode == "judge" else None
    with pairs.JudgmentStore(judgments, a_name, b_name) as store:
        store.check(all_pairs)  # regenerated answers are refused before anything is shown
        print(f"{len(all_pairs)} pairs, {len(store.done & {p.pair_id for p in all_pairs})} already judged in "
              f"{args.judgments}")
        if args.mode == "judge":
            judge.judge_pairs(all_pairs, store, model_judge, template, chunk=args.chunk)
        else:
            session = human.RatingSession(all_pairs, store, args.seed, args.rater)
            print(f"display order: seed {session.seed_source}")
            if args.mode == "terminal":
                human.run_terminal(session)
            else:
                _serve(session, args.port)
        judged = [r for r in store.records if r["pair_id"] in {p.pair_id for p in all_pairs}]
    if judged:
        print(stats.table_markdown([stats.outcome(judged)]))


def _serve(session: human.RatingSession, port: int) -> None:
    try:
        server = human.serve_web(session, port)
    except OSError as e:  # e.g. the port is taken
        raise ConfigError(f"--port {port}: cannot serve on 127.0.0.1:{port} ({e.strerror or e}); "
                          "choose another port (0: any free one)") from None
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # `kill` stops it like Ctrl-C
    print(f"rating page: http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C to stop; resumable)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"\nstopped: {session.num_done} of {session.total} judged and saved")
    finally:
        server.server_close()


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _judge_config(args: argparse.Namespace):
    """The judge model's config: --judge_config, else the config.json of --judge_checkpoint's run, with
    every --judge_config.a.b=VALUE applied."""
    from lima_jax import rundir
    from lima_jax.config import apply_overrides, load_config_file

    path = args.judge_config
    if not path:
        path = rundir.run_config_of(args.judge_checkpoint)
        if path is None:
            raise ConfigError(f"--judge_checkpoint {args.judge_checkpoint}: not in a run directory with a "
                              "config.json; pass the model's config as --judge_config FILE")
        print(f"judge config: {path} (the run's own; --judge_config FILE to use another)", file=sys.stderr)
    config = load_config_file(path)
    apply_overrides(config, args.judge_overrides, flag="judge_config")
    return config


def _make_judge(args: argparse.Namespace) -> judge.Judge:
    if args.judge_url:
        if not args.judge_model:
            raise ConfigError("--judge_url: --judge_model is required too (the model name the server serves)")
        if args.judge_checkpoint or args.judge_config or args.judge_overrides:
            raise ConfigError("--judge_url and --judge_config/--judge_checkpoint: choose one judge")
        return judge.HttpJudge(args.judge_url, args.judge_model, args.judge_max_tokens, args.judge_timeout_s)
    if args.judge_checkpoint:
        # The model code lives in the generation workflow; the evaluation package only receives the result.
        from lima_jax import rundir
        from lima_jax.generation import SamplingConfig, build_generator

        config = _judge_config(args)
        choice = rundir.resolve_checkpoint(args.judge_checkpoint)
        print(f"judge checkpoint: {choice.describe()}", flush=True)
        generator = build_generator(config, choice, args.chunk * 2)
        settings = SamplingConfig(greedy=True, repetition_penalty=1.0, max_new_tokens=args.judge_max_tokens)
        return judge.LimaJaxJudge(generator, settings, name=f"lima_jax:{args.judge_checkpoint}")
    raise ConfigError("--mode judge needs --judge_url and --judge_model, or --judge_checkpoint (and "
                      "--judge_config unless the checkpoint is in a run directory)")


def _table(args: argparse.Namespace) -> None:
    outcomes = [stats.outcome(pairs.read_judgments(as_path(path))) for path in args.judgments]
    text = stats.table_markdown(outcomes)
    print(text, end="")
    if args.md:
        md = as_path(args.md)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(text, encoding="utf-8")
    if args.png:
        print(f"wrote {stats.plot_outcomes(outcomes, as_path(args.png), args.title)}")


def _agreement(args: argparse.Namespace) -> None:
    first, second = pairs.read_judgments(as_path(args.first)), pairs.read_judgments(as_path(args.second))
    try:
        result = stats.agreement(first, second)
    except DataError as e:
        raise DataError(f"{args.first} and {args.second}: {e}") from None
    print(f"pairs judged by both: {result.n}\ntie-discounted accuracy: {100 * result.tie_discounted_accuracy:.1f}%\n"
          f"exact agreement: {100 * result.exact_agreement:.1f}%")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser("lima_jax.eval", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pairwise", help="judge two response files pair by pair (human or model)")
    p.add_argument("--a", required=True, metavar="FILE", help="system A's responses (JSONL)")
    p.add_argument("--b", required=True, metavar="FILE", help="system B's responses (JSONL)")
    p.add_argument("--a_name", default="", help="name of system A (default: file name)")
    p.add_argument("--b_name", default="", help="name of system B (default: file name)")
    p.add_argument("--judgments", required=True, metavar="FILE", help="judgments JSONL (appended; resumable)")
    p.add_argument("--mode", choices=("terminal", "web", "judge"), default="terminal")
    p.add_argument("--rater", default="rater", help="the human rater's name, kept with each judgment")
    p.add_argument("--seed", type=int, default=None,
                   help="order of pairs and of responses within a pair (default: the seed stored in --judgments, "
                        "else a new random one; give one only for a reproducible session)")
    p.add_argument("--port", type=int, default=8765, help="web mode: port on 127.0.0.1")
    p.add_argument("--judge_url", default="", help="OpenAI-compatible base URL on localhost, e.g. "
                                                   "http://127.0.0.1:8000/v1")
    p.add_argument("--judge_model", default="", help="model name sent to the endpoint")
    p.add_argument("--judge_checkpoint", default="", metavar="CKPT",
                   help="lima_jax model judge: a run directory, a step folder or a parameter checkpoint")
    p.add_argument("--judge_config", default="", metavar="FILE",
                   help="config file of the lima_jax judge (default: the config.json of the checkpoint's run)")
    p.add_argument("--judge_config.FIELD", dest="_judge_override_help", metavar="VALUE", action="append",
                   default=[], help="override a field of the judge's config, e.g. --judge_config.mesh.fsdp=8")
    p.add_argument("--judge_prompt", default=str(judge.DEFAULT_PROMPT), metavar="FILE",
                   help="judge prompt template with {question}, {response_1}, {response_2}")
    p.add_argument("--judge_max_tokens", type=int, default=1024)
    p.add_argument("--judge_timeout_s", type=float, default=300.0, help="per request")
    p.add_argument("--chunk", type=int, default=8, help="pairs sent to the judge at a time")
    p.set_defaults(run=_pairwise)
    t = sub.add_parser("table", help="win/tie/loss table with 95%% CIs (and the Figure 1 bar chart)")
    t.add_argument("judgments", nargs="+", metavar="FILE", help="judgment files, one comparison each")
    t.add_argument("--png", metavar="FILE", help="write the stacked bar chart here")
    t.add_argument("--md", metavar="FILE", help="also write the table here")
    t.add_argument("--title", default="")
    t.set_defaults(run=_table)
    g = sub.add_parser("agreement", help="agreement between two raters (tie-discounted accuracy)")
    g.add_argument("first", metavar="FILE")
    g.add_argument("second", metavar="FILE")
    g.set_defaults(run=_agreement)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    rest, overrides = cli.split_overrides(list(sys.argv[1:] if argv is None else argv), flag="judge_config")
    args, _ = cli.parse(build_parser(), rest)
    args.judge_overrides = overrides
    if overrides and not (args.command == "pairwise" and args.judge_checkpoint):
        raise ConfigError(f"--judge_config.{overrides[0][0]}: only for `pairwise --mode judge --judge_checkpoint`")
    args.run(args)


if __name__ == "__main__":
    cli.run(main)
