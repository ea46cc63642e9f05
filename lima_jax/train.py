"""Fine-tune LLaMA with the LIMA recipe.

    python -m lima_jax.train --config configs/toy.py --config.workdir=/tmp/lima_toy
    python -m lima_jax.train --config configs/lima_65b.py --config.workdir=gs://bucket/run \
        --config.init_from=/ckpt/llama-65b --config.data.train_path=... --config.tokenizer.path=...

Any config field can be overridden with `--config.a.b=v`. Runs `train.num_epochs` epochs, writes a checkpoint
at the end of every epoch (every epoch kept: see train.snapshots) and, with `config.data.dev_path` set, the dev-set answers of the epochs in
`config.dev_report.epochs`; restarted on the same workdir it resumes from the latest checkpoint. Every host of a
pod slice runs the same command. SIGTERM / Ctrl-C while training writes a checkpoint at the next step every
host agrees on and exits 75 (run the same command again to resume). The loop: `lima_jax.training`.
"""
from __future__ import annotations

from lima_jax import cli
from lima_jax.dev_report import dev_report_hook
from lima_jax.training import train


def main(argv: list[str]) -> None:
    p = cli.parser("lima_jax.train", __doc__)
    cli.add_config_flags(p)
    cli.add_distributed_flags(p)
    args, config = cli.parse(p, argv)
    cli.initialize_distributed(args)
    cli.setup_logging()
    train(config, after_epoch=dev_report_hook(config))


if __name__ == "__main__":
    cli.run(main)
