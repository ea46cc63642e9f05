"""Stopping training at a step boundary every host agrees on, and time-based checkpoints.

`catch_stop_signals()` replaces the handlers of SIGTERM (a spot/preemptible slice being reclaimed, a TPU
maintenance event, `kill`) and SIGINT (Ctrl-C) while training runs: the handler only records the request; the
loop asks `StepAgreement.after_step(step)` after every step whether to stop there, writes a checkpoint and
raises `Preempted` (exit 75). A second signal while that checkpoint is written is logged ("saving, please
wait") and ignored. SIGKILL cannot be caught: orbax's temporary folder and the manifest, written last, make a
killed save one that resuming sets aside.

Agreement across hosts: a signal may reach only some hosts, and all of them must save at the same step (the
save is collective). With several processes `after_step` all-gathers one tiny row per process, [stop
requested here, checkpoint due by host 0's clock], so every host reads the same rows and takes the same
decision at the same step; host 0's clock decides `train.checkpoint_every_minutes`. The row also carries JAX's
own preemption notice (`distributed.reached_preemption_sync_point`: jax.distributed's preemption service
catches SIGTERM until these handlers are installed, e.g. during compilation), so a host on which JAX saw the
notice stops the others too even if JAX's sync point came a step late on it. The cost is one all-gather of a
few int32 per step and process (not benchmarked; small next to a LIMA step of seconds); a single process
reads its own flag and clock and gathers nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from typing import Callable, Iterator

from absl import logging

from lima_jax import distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """What the signal handlers record: the first stop signal's name, and whether a checkpoint is being
    written (further signals are then only logged)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._saving = False

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def handle(self, signum: int, frame: object = None) -> None:
        """The signal handler: records the request; never raises, so it cannot interrupt a save."""
        name = signal.Signals(signum).name
        if self._saving and self.requested:
            _say(f"{name} received: a checkpoint is being written, saving, please wait (the signal is ignored)")
        elif self.requested:
            _say(f"{name} received: already stopping at the next step boundary to write a checkpoint, please wait")
        elif self._saving:
            self.signal_name = name
            _say(f"{name} received: a checkpoint is being written; stopping once it is complete")
        else:
            self.signal_name = name
            _say(f"{name} received: stopping at the next step boundary to write a checkpoint (once every host "
                 "agrees); further signals are ignored until it is written")

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Marks a checkpoint save in progress, for the handler's messages."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False


def _say(text: str) -> None:
    """A line on stderr straight through the file descriptor (safe in a signal handler, unlike logging)."""
    os.write(2, f"lima_jax: {text}\n".encode())


@contextlib.contextmanager
def catch_stop_signals(requests: StopRequests | None = None) -> Iterator[StopRequests]:
    """Installs `StopRequests.handle` for SIGTERM and SIGINT while the block runs, then restores the previous
    handlers (a handler installed outside Python, such as jax.distributed's SIGTERM notifier, which Python
    reports as the default, comes back as the default). `requests`: go on from those recorded before the loop
    (`record_sigterm_early`). Outside the main thread (where Python cannot install handlers) nothing is
    installed and the requests never fire."""
    requests = StopRequests() if requests is None else requests
    if threading.current_thread() is not threading.main_thread():
        logging.warning("not the main thread: SIGTERM / SIGINT stop training without a checkpoint")
        yield requests
        return
    previous = {s: signal.signal(s, requests.handle) for s in STOP_SIGNALS}
    try:
        yield requests
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def record_sigterm_early() -> Iterator[StopRequests]:
    """Before the loop (setup, restore, compile), a SIGTERM that would kill the process at once (leaving the run
    lock behind) is recorded instead; hand the requests to `catch_stop_signals`, and the loop stops after its
    first step with a checkpoint and exit 75. Only where Python's handler is the default: with
    jax.distributed, JAX's own notifier catches SIGTERM and reaches the loop as its preemption notice. SIGINT
    keeps its default (Ctrl-C during setup stops at once: nothing to save yet)."""
    requests = StopRequests()
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield requests
        return
    signal.signal(signal.SIGTERM, requests.handle)
    try:
        yield requests
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@dataclasses.dataclass(frozen=True)
class Decision:
    """What every host does after a step: `stop` (write a checkpoint here, then exit) and `checkpoint_due`
    (`train.checkpoint_every_minutes` have passed since the last save, by host 0's clock)."""

    stop: bool
    checkpoint_due: bool = False


class StepAgreement:
    """The per-step decisions, identical on every host (see the module docstring)."""

    def __init__(self, requests: StopRequests, checkpoint_every_minutes: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.requests = requests
        self.every_s = float(checkpoint_every_minutes) * 60
        self.clock = clock
        self.last_save = clock()

    def after_step(self, step: int) -> Decision:
        """Every host calls it after every step, with the same step."""
        notice = distributed.reached_preemption_sync_point(step)  # False without jax.distributed
        due = bool(self.every_s) and self.clock() - self.last_save >= self.every_s
        rows = distributed.process_rows([self.requests.requested or notice, due])
        return Decision(stop=bool(rows[:, 0].any()), checkpoint_due=bool(rows[0, 1]))

    def stop_agreed(self) -> bool:
        """Whether any host was asked to stop: every host calls it at the same point, after a save or an
        end-of-epoch hook (a signal that came during it)."""
        return bool(distributed.process_rows([self.requests.requested])[:, 0].any())

    def saved(self) -> None:
        """A checkpoint was just written: the time-based interval starts again."""
        self.last_save = self.clock()
