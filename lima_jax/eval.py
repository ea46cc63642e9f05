"""Pairwise preference evaluation of two systems' answers to the same prompts, as in LIMA (section 3).

    # a person rates, in the terminal or on a local web page (http://127.0.0.1:8765); resumable
    python -m lima_jax.eval pairwise --a lima.jsonl --b baseline.jsonl --judgments me.jsonl --mode terminal
    python -m lima_jax.eval pairwise --a lima.jsonl --b baseline.jsonl --judgments me.jsonl --mode web

    # a model judges every pair in both orders (a disagreement is a tie): a local OpenAI-compatible server
    python -m lima_jax.eval pairwise --a lima.jsonl --b baseline.jsonl --judgments judge.jsonl --mode judge \
        --judge_url http://127.0.0.1:8000/v1 --judge_model my-model [--judge_prompt my_prompt.txt]
    #   ... or a lima_jax checkpoint: --judge_config configs/x.py --judge_checkpoint WORKDIR

    # win / tie / loss with 95% confidence intervals, and the stacked bar chart of the paper's Figure 1
    python -m lima_jax.eval table judge.jsonl [more.jsonl ...] --png figure1.png
    # agreement of two raters on the same comparison (tie-discounted accuracy)
    python -m lima_jax.eval agreement me.jsonl judge.jsonl

The raters choose among the paper's three answers: Response 1 better, Response 2 better, neither. Which
system wrote which response is hidden and randomized. Each judgment is appended and synced to the
`--judgments` file the moment it is made; running the same command again resumes with the pairs left
(refused if the response files now hold other answers than those judged).
"""
from __future__ import annotations

import argparse
import pathlib
import signal
import sys
from typing import Sequence

from lima_jax.evaluation import human, judge, pairs, stats


def _pairwise(args: argparse.Namespace) -> None:
    all_pairs = pairs.make_pairs(args.a, args.b)  # bad files fail here, before any rating or judging
    a_name, b_name = args.a_name or args.a.stem, args.b_name or args.b.stem
    if a_name == b_name:
        raise SystemExit(f"both systems are named {a_name!r}; set --a_name / --b_name")
    template = judge.load_template(args.judge_prompt) if args.mode == "judge" else ""
    model_judge = _make_judge(args) if args.mode == "judge" else None
    with pairs.JudgmentStore(args.judgments, a_name, b_name) as store:
        store.check(all_pairs)  # regenerated answers are refused before anything is shown
        print(f"{len(all_pairs)} pairs, {len(store.done & {p.pair_id for p in all_pairs})} already judged in "
              f"{args.judgments}")
        if args.mode == "judge":
            judge.judge_pairs(all_pairs, store, model_judge, template, chunk=args.chunk)
        else:
            session = human.RatingSession(all_pairs, store, args.seed, args.rater)
            if args.mode == "terminal":
                human.run_terminal(session)
            else:
                server = human.serve_web(session, args.port)
                signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # `kill` stops it like Ctrl-C
                print(f"rating page: http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C to stop; resumable)")
                try:
                    server.serve_forever()
                except KeyboardInterrupt:
                    print(f"\nstopped: {session.num_done} of {session.total} judged and saved")
                finally:
                    server.server_close()
        judged = [r for r in store.records if r["pair_id"] in {p.pair_id for p in all_pairs}]
    if judged:
        print(stats.table_markdown([stats.outcome(judged)]))


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _make_judge(args: argparse.Namespace) -> judge.Judge:
    if args.judge_url:
        if not args.judge_model:
            raise SystemExit("--judge_model is required with --judge_url (the model name the server serves)")
        return judge.HttpJudge(args.judge_url, args.judge_model, args.judge_max_tokens, args.judge_timeout_s)
    if args.judge_config and args.judge_checkpoint:
        from lima_jax.config import load_config_file
        from lima_jax.generate import build_generator
        generator = build_generator(load_config_file(args.judge_config), args.judge_checkpoint, args.chunk * 2)
        return judge.LimaJaxJudge(generator, args.judge_max_tokens, name=f"lima_jax:{args.judge_checkpoint}")
    raise SystemExit("--mode judge needs --judge_url and --judge_model, or --judge_config and --judge_checkpoint")


def _table(args: argparse.Namespace) -> None:
    outcomes = [stats.outcome(pairs.read_judgments(path)) for path in args.judgments]
    text = stats.table_markdown(outcomes)
    print(text, end="")
    if args.md:
        args.md.write_text(text, encoding="utf-8")
    if args.png:
        print(f"wrote {stats.plot_outcomes(outcomes, args.png, args.title)}")


def _agreement(args: argparse.Namespace) -> None:
    result = stats.agreement(pairs.read_judgments(args.first), pairs.read_judgments(args.second))
    print(f"pairs judged by both: {result.n}\ntie-discounted accuracy: {100 * result.tie_discounted_accuracy:.1f}%\n"
          f"exact agreement: {100 * result.exact_agreement:.1f}%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lima_jax.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pairwise", help="judge two response files pair by pair (human or model)")
    p.add_argument("--a", required=True, type=pathlib.Path, help="system A's responses (JSONL)")
    p.add_argument("--b", required=True, type=pathlib.Path, help="system B's responses (JSONL)")
    p.add_argument("--a_name", default="", help="name of system A (default: file name)")
    p.add_argument("--b_name", default="", help="name of system B (default: file name)")
    p.add_argument("--judgments", required=True, type=pathlib.Path, help="judgments JSONL (appended; resumable)")
    p.add_argument("--mode", choices=("terminal", "web", "judge"), default="terminal")
    p.add_argument("--rater", default="rater", help="the human rater's name, kept with each judgment")
    p.add_argument("--seed", type=int, default=0, help="order of pairs and of responses within a pair")
    p.add_argument("--port", type=int, default=8765, help="web mode: port on 127.0.0.1")
    p.add_argument("--judge_url", default="", help="OpenAI-compatible base URL on localhost, e.g. "
                                                   "http://127.0.0.1:8000/v1")
    p.add_argument("--judge_model", default="", help="model name sent to the endpoint")
    p.add_argument("--judge_config", default="", help="lima_jax config of a model judge")
    p.add_argument("--judge_checkpoint", default="", help="lima_jax checkpoint of a model judge")
    p.add_argument("--judge_prompt", type=pathlib.Path, default=judge.DEFAULT_PROMPT,
                   help="judge prompt template with {question}, {response_1}, {response_2}")
    p.add_argument("--judge_max_tokens", type=int, default=1024)
    p.add_argument("--judge_timeout_s", type=float, default=300.0, help="per request")
    p.add_argument("--chunk", type=int, default=8, help="pairs sent to the judge at a time")
    p.set_defaults(run=_pairwise)
    t = sub.add_parser("table", help="win/tie/loss table with 95%% CIs (and the Figure 1 bar chart)")
    t.add_argument("judgments", nargs="+", type=pathlib.Path, help="judgment files, one comparison each")
    t.add_argument("--png", type=pathlib.Path, help="write the stacked bar chart here")
    t.add_argument("--md", type=pathlib.Path, help="also write the table here")
    t.add_argument("--title", default="")
    t.set_defaults(run=_table)
    g = sub.add_parser("agreement", help="agreement between two raters (tie-discounted accuracy)")
    g.add_argument("first", type=pathlib.Path)
    g.add_argument("second", type=pathlib.Path)
    g.set_defaults(run=_agreement)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, judge.JudgeError) as e:  # the message says file and line or URL
        raise SystemExit(f"error: {e}") from None
