"""Dev-set reports and choosing the epoch whose checkpoint the other tools use.

    python -m lima_jax.report choose --workdir W --epoch 7 [--note "most helpful, least rambling"]
    python -m lima_jax.report build --workdir W
    python -m lima_jax.report show --workdir W

`choose` writes `W/chosen_epoch.json` = {"epoch": 7, "step": <its end-of-epoch step>, "checkpoint":
"checkpoints/<step>", "note": ..., "chosen_at": ...}; `generate`, `convert to_hf`, `eval`'s model judge and
`init_from` then use that checkpoint when given the workdir (else the latest, and they say so). `build`
re-renders `dev_report.html` / `.md` from `dev_reports/epoch_*.jsonl`; `show` prints the chosen epoch and its
checkpoint. (The reports themselves are written during training: see `lima_jax.dev_report`.)
"""
from __future__ import annotations

from lima_jax import cli, rundir
from lima_jax.dev_report import load_epoch_answers, write_report


def build_parser():
    p = cli.parser("lima_jax.report", __doc__)
    sub = p.add_subparsers(dest="command", required=True)
    choose = cli.subcommand(sub, "choose", "mark the epoch whose checkpoint export and evaluation use")
    choose.add_argument("--epoch", required=True, type=int)
    choose.add_argument("--note", default="", help="why this epoch (kept in the marker)")
    build = cli.subcommand(sub, "build", "re-render dev_report.html / .md from dev_reports/epoch_*.jsonl")
    show = cli.subcommand(sub, "show", "print the chosen epoch and its checkpoint")
    for command in (choose, build, show):
        command.add_argument("--workdir", required=True, help="the training run directory (local or gs://)")
    return p


def main(argv: list[str]) -> None:
    args, _ = cli.parse(build_parser(), argv)
    if args.command == "choose":
        marker = rundir.mark_chosen_epoch(args.workdir, args.epoch, args.note)
        print(f"chose epoch {marker['epoch']}: {rundir.RunDir.at(args.workdir).root / marker['checkpoint']}")
        if load_epoch_answers(args.workdir):
            write_report(args.workdir)
    elif args.command == "build":
        for path in write_report(args.workdir):
            print(f"wrote {path}")
    else:
        print(f"checkpoint: {rundir.resolve_checkpoint(args.workdir).describe()}")


if __name__ == "__main__":
    cli.run(main)
