"""Preemption that loses nothing: SIGTERM / SIGINT stop training at a step every host agrees on, a checkpoint is
written there, the job exits 75, and running the same command again ends bit-identical to an uninterrupted
run. Also: a second signal during that save, time-based checkpoints, the handlers themselves.

The toy config trains 6 steps per epoch (2 epochs here, no dev report). Every subprocess has a timeout.
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lima_jax import checkpoint, manifest, preemption
from lima_jax.errors import Preempted
from tests.conftest import SUBPROCESS_TIMEOUT_S

REPO = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = SUBPROCESS_TIMEOUT_S
STEPS_PER_EPOCH, EPOCHS = 6, 2
MESSAGE = re.compile(r"preempted at epoch (\d+) step (\d+): checkpoint (\S+) written; run the same command again "
                     r"to resume")

# `python -m lima_jax.train` with checkpoint.seal slowed down, announced on stdout: a window for a second signal.
_SLOW_SEAL = r"""
import sys, time, runpy
from lima_jax import checkpoint
original = checkpoint.seal
def slow_seal(folder):
    print(f"TEST sealing {folder}", flush=True)
    time.sleep(2.0)
    original(folder)
checkpoint.seal = slow_seal
sys.argv = ["lima_jax.train", *sys.argv[1:]]
runpy.run_module("lima_jax.train", run_name="__main__")
"""

# `python -m lima_jax.train` with orbax's background finalization of one step's save (LIMA_TEST_SLOW_STEP) held
# back LIMA_TEST_SLOW_S seconds, announced on stdout: an async save that stays in flight while the loop goes on.
_SLOW_ASYNC_SAVE = r"""
import os, sys, time, runpy
import orbax.checkpoint as ocp
original = ocp.CheckpointManager._finalize
def slow_finalize(self, step, *args):
    if step == int(os.environ["LIMA_TEST_SLOW_STEP"]):
        print(f"TEST writing {step} in the background", flush=True)
        time.sleep(float(os.environ["LIMA_TEST_SLOW_S"]))
    original(self, step, *args)
ocp.CheckpointManager._finalize = slow_finalize
sys.argv = ["lima_jax.train", *sys.argv[1:]]
runpy.run_module("lima_jax.train", run_name="__main__")
"""


def train_args(workdir, *extra) -> list[str]:
    return ["--config", str(REPO / "configs" / "toy.py"), f"--config.workdir={workdir}",
            f"--config.train.num_epochs={EPOCHS}", "--config.dev_report.epochs=()", *extra]


def env(**extra) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu", **extra}


def start(args: list[str], log: pathlib.Path, code: str | None = None, **env_extra) -> subprocess.Popen:
    """`python -m lima_jax.train ARGS` (or `python -c CODE ARGS`), stdout and stderr into `log`."""
    program = ["-c", code] if code else ["-m", "lima_jax.train"]
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, *program, *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env=env(**env_extra))


def finish(proc: subprocess.Popen, log: pathlib.Path) -> str:
    try:
        proc.wait(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log.read_text()


def logged_steps(workdir) -> list[int]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def wait_until(condition, procs: list[subprocess.Popen], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert all(p.poll() is None for p in procs), f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def wait_for_a_step(workdir, procs: list[subprocess.Popen]) -> None:
    """Until metrics.jsonl shows a step of epoch 1 (the toy steps take about 0.1-0.2 s each)."""
    wait_until(lambda: any(s % STEPS_PER_EPOCH for s in logged_steps(workdir)), procs, "the first step")


def checkpoint_steps(workdir) -> list[int]:
    folder = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def final_params(workdir) -> list[np.ndarray]:
    params, _ = checkpoint.restore_train_params(pathlib.Path(workdir) / "checkpoints" / str(STEPS_PER_EPOCH * EPOCHS))
    return jax.tree.leaves(params)


def assert_bit_identical(workdir, reference: list[np.ndarray]) -> None:
    leaves = final_params(workdir)
    assert len(leaves) == len(reference)
    assert all(np.array_equal(a, b) for a, b in zip(leaves, reference))


def check_preempted(output: str, workdir) -> int:
    """The step the run stopped at: named in the message, mid-epoch, its checkpoint the only one, intact."""
    match = MESSAGE.search(output)
    assert match, output[-3000:]
    epoch, step, folder = int(match.group(1)), int(match.group(2)), pathlib.Path(match.group(3))
    assert epoch == 1 and 0 < step < STEPS_PER_EPOCH, "expected a mid-epoch stop: " + match.group(0)
    assert folder == pathlib.Path(workdir) / "checkpoints" / str(step)
    assert checkpoint_steps(workdir) == [step]
    assert checkpoint.verify_folder(folder) == []
    meta = checkpoint.read_train_meta(folder)
    assert (meta["epoch"], meta["batches_done"], meta["step"], meta["end_of_epoch"]) == (1, step, step, False)
    assert logged_steps(workdir) == list(range(1, step + 1))
    return step


def resume_and_check(workdir, log: pathlib.Path, stopped_at: int, reference: list[np.ndarray]) -> None:
    """Runs the same command again: it resumes at `stopped_at`, every step is logged once (none lost or
    repeated), and the final parameters equal the uninterrupted run's bit for bit."""
    output = finish(start(train_args(workdir), log), log)
    assert f"resumed from {pathlib.Path(workdir) / 'checkpoints' / str(stopped_at)}" in output, output[-3000:]
    assert logged_steps(workdir) == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
    assert checkpoint_steps(workdir) == [stopped_at, STEPS_PER_EPOCH, STEPS_PER_EPOCH * EPOCHS]
    assert_bit_identical(workdir, reference)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[np.ndarray]:
    """The final parameters of an uninterrupted run of the same command."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    log = workdir.parent / "uninterrupted.log"
    output = finish(start(train_args(workdir), log), log)
    assert "step 12/12" in output, output[-3000:]
    return final_params(workdir)


def preempt_mid_epoch(workdir, log: pathlib.Path, sig: signal.Signals) -> int:
    """Starts the command, sends `sig` once a step of epoch 1 is logged; checks exit 75 and the checkpoint."""
    proc = start(train_args(workdir), log)
    wait_for_a_step(workdir, [proc])
    proc.send_signal(sig)
    output = finish(proc, log)
    assert proc.returncode == Preempted.exit_status == 75, output[-3000:]
    assert f"{sig.name} received: stopping at the next step boundary" in output
    assert "interrupted" not in output and "Traceback" not in output
    return check_preempted(output, workdir)


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_exits_75_and_the_rerun_matches_an_uninterrupted_run(reference, tmp_path):
    stopped_at = preempt_mid_epoch(tmp_path / "run", tmp_path / "first.log", signal.SIGTERM)
    resume_and_check(tmp_path / "run", tmp_path / "second.log", stopped_at, reference)


@pytest.mark.slow
def test_ctrl_c_while_training_saves_and_exits_75_too(tmp_path):
    preempt_mid_epoch(tmp_path / "run", tmp_path / "first.log", signal.SIGINT)  # not 130: the checkpoint is written


@pytest.mark.slow
def test_a_second_signal_during_the_save_is_ignored_and_the_checkpoint_verifies(tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "first.log"
    proc = start(train_args(workdir), log, code=_SLOW_SEAL)
    wait_for_a_step(workdir, [proc])
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "TEST sealing" in log.read_text(), [proc], "the preemption save")
    proc.send_signal(signal.SIGTERM)  # while the manifest is being written
    proc.send_signal(signal.SIGINT)
    output = finish(proc, log)
    assert proc.returncode == 75, output[-3000:]
    assert output.count("saving, please wait") == 2, output[-3000:]
    check_preempted(output, workdir)


# --- asynchronous mid-epoch saves (train.async_checkpointing) ---

def sealed_steps(workdir) -> list[int]:
    """The step folders whose manifest is written, each verified against it."""
    steps = [s for s in checkpoint_steps(workdir)
             if (pathlib.Path(workdir) / "checkpoints" / str(s) / manifest.MANIFEST).is_file()]
    for s in steps:
        assert checkpoint.verify_folder(pathlib.Path(workdir) / "checkpoints" / str(s)) == [], s
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("async_saves", [True, False])
def test_periodic_saves_async_or_not_are_sealed_and_leave_training_bit_identical(reference, tmp_path, async_saves):
    workdir, log = tmp_path / "run", tmp_path / "run.log"
    proc = start(train_args(workdir, "--config.train.checkpoint_every_steps=2",
                            f"--config.train.async_checkpointing={async_saves}"), log)
    output = finish(proc, log)
    assert proc.returncode == 0, output[-3000:]
    assert sealed_steps(workdir) == checkpoint_steps(workdir) == [2, 4, 6, 8, 10, 12]
    blocking = re.findall(r"checkpoint \S+/(\d+): written in [\d.]+ s \(([\d.]+) s of it blocking", output)
    assert len(blocking) == 6, output[-3000:]
    if async_saves:  # written in the background, sealed after at least one more step
        assert re.search(r"checkpoint \S+/2: written in", output).start() > output.index("step 3/12")
    assert_bit_identical(workdir, reference)


@pytest.mark.slow
def test_a_kill_during_an_async_save_resumes_from_the_last_sealed_one_and_matches(reference, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "first.log"
    proc = start(train_args(workdir, "--config.train.checkpoint_every_steps=2"), log, code=_SLOW_ASYNC_SAVE,
                 LIMA_TEST_SLOW_STEP="4", LIMA_TEST_SLOW_S="120")
    wait_until(lambda: "TEST writing 4" in log.read_text(), [proc], "the async save of step 4")
    proc.send_signal(signal.SIGKILL)
    output = finish(proc, log)
    assert proc.returncode == -signal.SIGKILL
    assert sealed_steps(workdir) == [2], output[-3000:]  # step 4's folder, if orbax renamed it, has no manifest

    output = finish(start(train_args(workdir, "--config.train.checkpoint_every_steps=2"), log), log)
    assert f"resumed from {workdir / 'checkpoints' / '2'}" in output, output[-3000:]
    assert sealed_steps(workdir) == [2, 4, 6, 8, 10, 12]
    assert_bit_identical(workdir, reference)


@pytest.mark.slow
def test_sigterm_while_an_async_save_is_in_flight_seals_it_then_saves_the_stop(reference, tmp_path):
    """The stop comes a step or two after the async save of step 3 started; the preemption checkpoint waits for
    that save, seals it, then writes its own: both verify, exit 75, and the rerun matches."""
    workdir, log = tmp_path / "run", tmp_path / "first.log"
    args = train_args(workdir, "--config.train.checkpoint_every_steps=3")
    proc = start(args, log, code=_SLOW_ASYNC_SAVE, LIMA_TEST_SLOW_STEP="3", LIMA_TEST_SLOW_S="8")
    wait_until(lambda: "TEST writing 3" in log.read_text() and 4 in logged_steps(workdir), [proc],
               "step 4 with the save of step 3 in flight")
    proc.send_signal(signal.SIGTERM)
    output = finish(proc, log)
    assert proc.returncode == 75, output[-3000:]
    stopped_at = int(MESSAGE.search(output).group(2))
    # step 4 is logged once step 5 is dispatched (metrics are read a step late): the stop is at 5 or 6
    assert stopped_at in (5, 6), output[-3000:]
    assert sealed_steps(workdir) == checkpoint_steps(workdir) == [3, stopped_at]
    assert output.index(f"checkpoint {workdir}/checkpoints/3: written") < output.index("preempted at")

    output = finish(start(args, log), log)
    assert f"resumed from {workdir / 'checkpoints' / str(stopped_at)}" in output, output[-3000:]
    assert sealed_steps(workdir) == sorted({3, stopped_at, 6, 9, 12})  # a stop at 6 is also the periodic save
    assert_bit_identical(workdir, reference)


# --- two processes (tests/test_multihost.py's set-up, through the command line) ---

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two(workdir, logs: list[pathlib.Path]) -> list[subprocess.Popen]:
    """Two processes of 4 CPU devices each, gloo collectives, data parallel over all 8."""
    port = _free_port()
    return [start([*train_args(workdir), f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                   f"--process_id={i}", "--cpu_collectives=gloo", "--distributed_timeout_s=120"], logs[i],
                  XLA_FLAGS="--xla_force_host_platform_device_count=4")
            for i in range(2)]


def finish_two(procs: list[subprocess.Popen], logs: list[pathlib.Path]) -> list[str]:
    try:
        return [finish(p, log) for p, log in zip(procs, logs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.slow
def test_two_processes_agree_on_the_step_when_only_one_is_signalled(tmp_path):
    reference_dir = tmp_path / "uninterrupted"
    logs = [tmp_path / f"ref{i}.log" for i in range(2)]
    procs = start_two(reference_dir, logs)
    outputs = finish_two(procs, logs)
    assert [p.returncode for p in procs] == [0, 0] and "step 12/12" in outputs[0], outputs[0][-3000:]
    reference = final_params(reference_dir)

    workdir = tmp_path / "run"
    logs = [tmp_path / f"first{i}.log" for i in range(2)]
    procs = start_two(workdir, logs)
    wait_for_a_step(workdir, procs)  # host 0 writes metrics.jsonl
    procs[1].send_signal(signal.SIGTERM)  # the other host never sees a signal
    outputs = finish_two(procs, logs)
    assert [p.returncode for p in procs] == [75, 75], outputs[0][-2000:] + outputs[1][-2000:]
    assert "SIGTERM received" in outputs[1] and "SIGTERM received" not in outputs[0]
    messages = [MESSAGE.search(out).group(0) for out in outputs]
    assert messages[0] == messages[1]  # the same step, the same checkpoint
    stopped_at = check_preempted(outputs[0], workdir)

    logs = [tmp_path / f"second{i}.log" for i in range(2)]
    procs = start_two(workdir, logs)
    outputs = finish_two(procs, logs)
    assert [p.returncode for p in procs] == [0, 0]
    assert f"resumed from {workdir / 'checkpoints' / str(stopped_at)}" in outputs[0], outputs[0][-3000:]
    assert logged_steps(workdir) == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
    assert checkpoint_steps(workdir) == [stopped_at, STEPS_PER_EPOCH, STEPS_PER_EPOCH * EPOCHS]
    assert_bit_identical(workdir, reference)


# --- in-process: handlers, agreement, time-based checkpoints ---

def test_signal_handlers_only_record_the_request_and_are_restored_afterwards(capfd):
    before = signal.getsignal(signal.SIGINT)
    with preemption.catch_stop_signals() as stops:
        assert not stops.requested
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt
        time.sleep(0.01)
        assert stops.signal_name == "SIGINT"
        with stops.saving():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        assert stops.signal_name == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is before
    assert "saving, please wait" in capfd.readouterr().err
    during_a_regular_save = preemption.StopRequests()
    with during_a_regular_save.saving():
        during_a_regular_save.handle(signal.SIGTERM)
    assert during_a_regular_save.requested and "stopping once it is complete" in capfd.readouterr().err
    agreement = preemption.StepAgreement(stops)
    assert agreement.after_step(1).stop and agreement.stop_agreed()


def test_checkpoint_every_minutes_is_due_by_the_clock_and_restarts_at_each_save():
    now = [0.0]
    agreement = preemption.StepAgreement(preemption.StopRequests(), 0.5, clock=lambda: now[0])
    now[0] = 29.0
    assert agreement.after_step(1) == preemption.Decision(stop=False, checkpoint_due=False)
    now[0] = 30.0
    assert agreement.after_step(2).checkpoint_due
    agreement.saved()
    now[0] = 59.0
    assert not agreement.after_step(3).checkpoint_due
    off = preemption.StepAgreement(preemption.StopRequests(), 0.0, clock=lambda: 1e9)
    assert not off.after_step(1).checkpoint_due


@pytest.mark.slow
def test_time_based_checkpoints_and_a_signal_during_the_end_of_epoch_hook(toy_config):
    """In-process: a checkpoint after every step (a tiny checkpoint_every_minutes); a SIGTERM that comes during
    epoch 1's hook lets the hook finish, then stops with the epoch's checkpoint."""
    from lima_jax.training import train
    toy_config.dev_report.epochs = ()
    toy_config.train.num_epochs = 2
    toy_config.train.checkpoint_every_minutes = 1e-9  # due after every step
    hooks, before = [], signal.getsignal(signal.SIGTERM)

    def hook(end):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        hooks.append(end.epoch)

    with pytest.raises(Preempted, match=f"preempted at epoch 1 step {STEPS_PER_EPOCH}: checkpoint "):
        train(toy_config, after_epoch=hook)
    assert hooks == [1]
    assert checkpoint_steps(toy_config.workdir) == list(range(1, STEPS_PER_EPOCH + 1))
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def test_sigterm_during_setup_stops_after_the_first_step_and_releases_the_run_lock(tmp_path):
    """Before the loop (data, model, restore, compile) a SIGTERM is recorded instead of killing the process at
    once (which would leave the run lock behind): the loop stops after its first step, with a checkpoint there
    and exit 75, and the lock is released, so a restart on another host need not wait for it to go stale."""
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lima_jax.train", "--config", "configs/toy.py",
                             f"--config.workdir={workdir}", "--config.train.num_epochs=1",
                             "--config.dev_report.epochs=()"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + TIMEOUT_S
    while not (workdir / "run.lock").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None and not (workdir / "metrics.jsonl").exists()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 75, output[-3000:]
    assert "SIGTERM received: stopping at the next step boundary" in output
    assert f"error: preempted at epoch 1 step 1: checkpoint {workdir}/checkpoints/1 written" in output
    assert not (workdir / "run.lock").exists()
    assert checkpoint.verify_folder(workdir / "checkpoints" / "1") == []
