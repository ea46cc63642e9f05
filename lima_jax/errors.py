"""The project's own errors: bad input (config, data, checkpoint, conversion, ...) and the run failing in a
way the user can act on. Entry points (`lima_jax.cli.run`) print such an error as one paragraph on stderr,
`error: <file/field>: <what> <what to do>`, and exit with its `exit_status`; any other exception is a bug
and keeps its traceback."""
from __future__ import annotations


class LimaError(Exception):
    """An error whose message names the file, line or field at fault and says what to do."""

    exit_status = 2


class ConfigError(LimaError, ValueError):
    """A config value is missing or illegal; the message names the config file and the field."""


class DataError(LimaError, ValueError):
    """A data or prompt file is malformed; the message names the file, line and field."""


class CheckpointError(LimaError, ValueError):
    """A checkpoint is missing, incomplete or does not match the config; the message names its path."""


class ConversionError(LimaError, ValueError):
    """An input to `lima_jax.convert` is malformed or unsupported; the message names the file and field."""


class DistributedError(LimaError, RuntimeError):
    """A multi-host step (connection, barrier) did not complete in time."""

    exit_status = 4


class TrainingDiverged(LimaError, RuntimeError):
    """The loss became NaN or infinite; no checkpoint of that state was written."""

    exit_status = 3


class RunLocked(LimaError, RuntimeError):
    """Another training run holds the workdir's run lock (`<workdir>/run.lock`), or took it over from this
    run; the message names the lock file and its holder."""

    exit_status = 5


class Preempted(LimaError, RuntimeError):
    """Training stopped on SIGTERM, SIGINT or a TPU maintenance notice, at a step boundary every host agreed
    on, after writing a checkpoint there; running the same command again resumes from it exactly. Exit 75
    (EX_TEMPFAIL, "temporary failure, run me again"): the status a supervisor restarts on."""

    exit_status = 75
