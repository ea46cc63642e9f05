"""What every entry point shares: the `--config FILE --config.a.b=v` convention, the multi-host flags, logging,
and one wrapper that turns the project's own errors into one paragraph and an exit status.

An entry point (`python -m lima_jax.<tool>`) builds an argparse parser, adds `add_config_flags` when the tool
takes a model config, and ends with `cli.run(main)`. `main(argv)` calls `parse(parser, argv)`, which returns
the parsed arguments and, for tools with a config, the loaded ConfigDict with every `--config.a.b=v` applied.
Tools that start from a run (`generate`, `report`, `convert to_hf`) fall back to the run's own `config.json`
when `--config` is not given, so no training override has to be repeated.

Errors: a `lima_jax.errors.LimaError` (config, data, checkpoint, conversion, ...) prints
`error: <file/field>: <what> <what to do>` on stderr and exits with its status (2 for bad input); with
`--verbose` or LIMA_VERBOSE=1 the traceback is printed too. Any other exception is a bug and keeps its
traceback. Ctrl-C exits 130 without one (while `train` trains it is a preemption instead: a checkpoint, then the
`Preempted` error's status 75).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from typing import Callable, Sequence

import ml_collections
from absl import logging

from lima_jax import distributed
from lima_jax.config import apply_overrides, load_config_file
from lima_jax.errors import ConfigError, LimaError
from lima_jax.paths import PathLike

VERBOSE_ENV = "LIMA_VERBOSE"


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An argparse parser whose --help shows the tool's module docstring."""
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(p)
    return p


def positive_int(text: str) -> int:
    """An argparse `type` for a positive integer flag."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_common_flags(p: argparse.ArgumentParser, default: object = False) -> None:
    p.add_argument("--verbose", action="store_true", default=default,
                   help=f"print tracebacks of errors too (env {VERBOSE_ENV}=1)")


def subcommand(sub: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    """A subcommand's parser; its --verbose leaves one given before the subcommand in place."""
    p = sub.add_parser(name, help=text, description=text)
    add_common_flags(p, default=argparse.SUPPRESS)
    return p


def add_config_flags(p: argparse.ArgumentParser, required: bool = True) -> None:
    """`--config FILE` (a configs/*.py file or a run's config.json) and any number of `--config.a.b=VALUE`."""
    p.add_argument("--config", required=required, metavar="FILE",
                   help="config file: configs/*.py, or a run's config.json" +
                        ("" if required else " (default: the run's own config.json)"))
    p.add_argument("--config.FIELD", dest="_config_override_help", metavar="VALUE", action="append", default=[],
                   help="override any config field, e.g. --config.train.num_epochs=10 --config.mesh.fsdp=8")


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
    """Flags of `lima_jax.distributed.initialize` for multi-host runs outside Cloud TPU / SLURM."""
    g = p.add_argument_group("multi-host (Cloud TPU, SLURM and Open MPI are detected by themselves)")
    g.add_argument("--coordinator_address", default=None, help="host:port of process 0 (env LIMA_COORDINATOR_ADDRESS)")
    g.add_argument("--num_processes", type=int, default=None, help="number of processes (env LIMA_NUM_PROCESSES)")
    g.add_argument("--process_id", type=int, default=None, help="this process's 0-based id (env LIMA_PROCESS_ID)")
    g.add_argument("--distributed_timeout_s", type=int, default=300,
                   help="seconds to wait for all processes to connect, and at each barrier")
    g.add_argument("--cpu_collectives", default=None,
                   help="CPU collectives for multi-process CPU runs, e.g. gloo (env LIMA_CPU_COLLECTIVES)")


def initialize_distributed(args: argparse.Namespace) -> None:
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                           args.distributed_timeout_s, args.cpu_collectives)


def split_overrides(argv: Sequence[str], flag: str = "config") -> tuple[list[str], list[tuple[str, str]]]:
    """(the other arguments, [(field, value)] of every `--<flag>.field=value` / `--<flag>.field value`)."""
    pattern = re.compile(rf"--{re.escape(flag)}\.([A-Za-z_][\w.]*)(?:=(.*))?$", re.S)
    rest, overrides = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        match = pattern.match(args[i])
        if match and match.group(1) != "FIELD":
            value = match.group(2)
            if value is None:
                if i + 1 >= len(args):
                    raise ConfigError(f"{args[i]}: expected a value (--{flag}.{match.group(1)}=VALUE)")
                value = args[i + 1]
                i += 1
            overrides.append((match.group(1), value))
        else:
            rest.append(args[i])
        i += 1
    return rest, overrides


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None = None,
          default_config: Callable[[argparse.Namespace], PathLike | None] | None = None,
          ) -> tuple[argparse.Namespace, ml_collections.ConfigDict | None]:
    """Parses `argv`; loads `--config` (else the file `default_config(args)` names, e.g. the run's own
    config.json) and applies every `--config.a.b=v`."""
    rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(rest)
    if getattr(args, "verbose", False):
        os.environ[VERBOSE_ENV] = "1"
    if not hasattr(args, "config"):
        if overrides:
            p.error(f"--config.{overrides[0][0]}: this command takes no config")
        return args, None
    path = args.config
    if path is None and default_config is not None:
        path = default_config(args)
        if path is not None:
            print(f"config: {path} (the run's own; --config FILE to use another)", file=sys.stderr)
    if path is None:
        if overrides:
            p.error(f"--config.{overrides[0][0]} needs --config FILE")
        return args, None
    config = load_config_file(path)
    apply_overrides(config, overrides)
    return args, config


def setup_logging(quiet: bool = False) -> None:
    """absl logging to stderr at INFO (WARNING on hosts other than 0, or with `quiet`)."""
    logging.use_absl_handler()
    logging.set_verbosity(logging.WARNING if quiet or not distributed.is_main_process() else logging.INFO)
    _quiet_library_logs()


def _quiet_library_logs() -> None:
    """Keeps orbax's per-save INFO chatter out of the console (its warnings and errors still show)."""
    import logging as std_logging

    class _DropLibraryInfo(std_logging.Filter):
        def filter(self, record: std_logging.LogRecord) -> bool:
            return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname

    logging.get_absl_handler().addFilter(_DropLibraryInfo())


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> None:
    """Runs `main(argv)` and exits: 0, main's return value, a LimaError's status, or 130 on Ctrl-C."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        status = main(argv)
    except LimaError as e:
        if os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_status)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(status or 0)
