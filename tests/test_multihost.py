"""Two processes on this host, 4 CPU devices each, gloo collectives: a real multi-host run in miniature.

Each process runs `lima_jax.training.train` on the toy config (data parallel over all 8 devices, so each
host loads its own half of every global batch), writes the per-epoch checkpoint together with the other,
and on a second launch both restore it and train on. The processes must agree on every loss, and the
losses must equal those of one process with 8 devices (rtol 1e-4, as in test_sharding): a host that
loaded the wrong rows would still agree with its peer but not with the single-process run.
Every subprocess has a timeout, so a hang fails the test instead of stalling CI.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import SUBPROCESS_TIMEOUT_S, worker_results

REPO = pathlib.Path(__file__).resolve().parent.parent

TIMEOUT_S = SUBPROCESS_TIMEOUT_S
RTOL = 1e-4

_WORKER = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 4)
from lima_jax import distributed
pid, port, workdir, stop_after = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
resume_step = int(sys.argv[5]) if len(sys.argv) > 5 else 0
distributed.initialize(f"127.0.0.1:{port}", 2, pid, timeout_s=60, cpu_collectives="gloo")
assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
from lima_jax import metrics, training
from lima_jax.config import load_config_file
config = load_config_file("configs/toy.py")
config.workdir = workdir
config.train.num_epochs = 2
config.train.batch_size = 8
config.mesh.update(data=-1, fsdp=1, tensor=1, layout="data")
config.train.resume_step = resume_step
losses = []
original = metrics.MetricsWriter.write
def record(self, step, values):
    losses.append(values["loss"])
    original(self, step, values)
metrics.MetricsWriter.write = record

class Preempted(Exception):
    pass

def after_epoch(end):
    if end.epoch == stop_after:  # as if the job were preempted right after this epoch's checkpoint
        raise Preempted

try:
    training.train(config, after_epoch=after_epoch)
except Preempted:
    pass
print("RESULT " + json.dumps({"process": jax.process_index(), "losses": losses}), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # conftest's 8 devices are for this process; workers get 4 each
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return env


def _run_two(workdir, stop_after_epoch: int, resume_step: int = 0) -> list[list[float]]:
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(i), str(port), str(workdir), str(stop_after_epoch),
                               str(resume_step)],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    results = worker_results(procs, TIMEOUT_S)
    return [results[0]["losses"], results[1]["losses"]]


def _single_process_losses(toy_config, epochs: int, mesh: dict | None = None) -> list[float]:
    """The same training in this process (8 devices; data parallel unless `mesh`), recording the loss of every
    step it runs."""
    from lima_jax import training
    from lima_jax.metrics import MetricsWriter
    toy_config.train.num_epochs = epochs
    toy_config.mesh.update(**(mesh or dict(data=-1, fsdp=1, tensor=1, layout="data")))
    losses = []
    original = MetricsWriter.write

    def record(self, step, metrics):
        losses.append(metrics["loss"])
        original(self, step, metrics)

    MetricsWriter.write = record
    try:
        training.train(toy_config)
    finally:
        MetricsWriter.write = original
    return losses


def _toy_config(workdir: pathlib.Path):
    from lima_jax.config import load_config_file
    config = load_config_file(REPO / "configs" / "toy.py")
    config.workdir = str(workdir)
    return config


@pytest.fixture(scope="module")
def saved_on_two(tmp_path_factory) -> tuple[pathlib.Path, list[float]]:
    """Two processes, 2 epochs planned, stopped right after the first epoch's checkpoint: the workdir (each
    test resumes a copy) and the first epoch's losses, the same on both processes."""
    workdir = tmp_path_factory.mktemp("two") / "run"
    first = _run_two(workdir, stop_after_epoch=1)
    assert first[0] == first[1] and len(first[0]) == 6  # 48 toy examples / batch 8, every step logged
    assert (workdir / "metrics.jsonl").is_file()
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [6]
    return workdir, first[0]


@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory) -> list[float]:
    """The losses of the same 2 epochs in one uninterrupted process (8 devices, data parallel)."""
    return _single_process_losses(_toy_config(tmp_path_factory.mktemp("one") / "run"), epochs=2)


def _copy_of(workdir: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
    copy = tmp_path / workdir.name
    shutil.copytree(workdir, copy)
    return copy


@pytest.mark.slow
def test_two_processes_train_checkpoint_restore_and_agree(saved_on_two, one_process_reference, tmp_path):
    """Both processes restore step 6 and train epoch 2. They are told to (--config.train.resume_step=6) past two
    newer checkpoints (copies of step 6, as if written later), so they also roll back together: host 0 moves
    each one aside, and every host reloads before the next move."""
    saved, first = saved_on_two
    workdir = _copy_of(saved, tmp_path)
    for later in (12, 18):
        shutil.copytree(workdir / "checkpoints" / "6", workdir / "checkpoints" / str(later))
    second = _run_two(workdir, stop_after_epoch=0, resume_step=6)
    assert second[0] == second[1] and len(second[0]) == 6
    assert sorted(p.name for p in (workdir / "checkpoints" / "set_aside").iterdir()) == ["12", "18"]
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [6, 12]
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))  # host 0 alone wrote them, once each
    print(f"two processes: {first + second[0]}\none process: {one_process_reference}")
    np.testing.assert_allclose(first + second[0], one_process_reference, rtol=RTOL)


@pytest.mark.slow
def test_a_run_saved_on_two_processes_resumes_on_one_with_another_mesh(saved_on_two, one_process_reference,
                                                                       tmp_path):
    """Saved by 2 processes (data parallel over 8 devices, 8 rows per step), resumed by 1 process on a 2x2x2
    fsdp_tp mesh (4 batch shards, so packing plans 4 rows per step): the data position carries over exactly
    (the global batch order does not depend on hosts or rows) and the losses equal one uninterrupted process."""
    saved, first = saved_on_two
    workdir = _copy_of(saved, tmp_path)
    resumed = _single_process_losses(_toy_config(workdir), epochs=2,
                                     mesh=dict(data=2, fsdp=2, tensor=2, layout="fsdp_tp"))
    assert len(resumed) == 6
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    np.testing.assert_allclose(first + resumed, one_process_reference, rtol=RTOL)


def test_unreachable_coordinator_fails_with_a_clear_error(tmp_path):
    code = ("from lima_jax import distributed\n"
            f"distributed.initialize('127.0.0.1:{_free_port()}', 2, 1, timeout_s=3)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "DistributedError: process 1 of 2 could not reach the coordinator at 127.0.0.1" in proc.stderr
    assert "within 3s" in proc.stderr


def test_incomplete_distributed_flags_are_rejected():
    from lima_jax import distributed
    with pytest.raises(distributed.DistributedError, match="needs all of --coordinator_address"):
        distributed.initialize("127.0.0.1:1234", num_processes=2, process_id=None)
    with pytest.raises(distributed.DistributedError, match=r"--process_id=2 is not in \[0, --num_processes=2\)"):
        distributed.initialize("127.0.0.1:1234", num_processes=2, process_id=2)
    distributed.initialize()  # one process, nothing in the environment: a no-op
    distributed.barrier("single")  # and barriers return at once


@pytest.mark.slow
def test_local_launcher_runs_two_processes_that_agree(tmp_path):
    """launch/local.sh 2 -- toy training, 1 epoch: both processes exit 0, each has its log, host 0's metrics
    have every step once, and the epoch's checkpoint (written by both processes together) is complete; its dev
    report and `generate` on 2 processes answer as 1 process does."""
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    env = _env()
    env["PYTHON"] = sys.executable
    proc = subprocess.run([str(REPO / "launch" / "local.sh"), "--logs", str(logs), "--devices-per-process", "2",
                           "2", "--", "--config", "configs/toy.py", f"--config.workdir={workdir}",
                           "--config.train.num_epochs=1", "--config.dev_report.epochs=(1,)"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    logs_text = {i: (logs / f"process-{i}.log").read_text() for i in (0, 1)}
    assert proc.returncode == 0, proc.stderr + logs_text[0][-2000:] + logs_text[1][-2000:]
    assert "process 0 exited with status 0" in proc.stderr and "process 1 exited with status 0" in proc.stderr
    for i in (0, 1):
        assert f"lima_jax.distributed: process {i} of 2 joining the job at 127.0.0.1:" in logs_text[i]
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))  # 48 examples / batch 8, from host 0 only
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [6]

    # The dev report of epoch 1 (LIMA sampling, decoded by both processes) and `generate` on 2 processes give
    # the answers of 1 process; only host 0 writes them.
    one = tmp_path / "one"
    single = subprocess.run([sys.executable, "-m", "lima_jax.train", "--config", "configs/toy.py",
                             f"--config.workdir={one}", "--config.train.num_epochs=1",
                             "--config.dev_report.epochs=(1,)"],
                            cwd=REPO, env={**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert single.returncode == 0, single.stderr[-3000:]
    answers = [(workdir if run == "two" else one) / "dev_reports" / "epoch_001.jsonl" for run in ("two", "one")]
    assert answers[0].read_text() == answers[1].read_text() and answers[0].read_text().count("\n") == 6
    sampling = ["--temperature", "1.0", "--top_p", "1.0", "--seed", "3", "--max_new_tokens", "24"]
    two_out, one_out = tmp_path / "two.jsonl", tmp_path / "one.jsonl"
    port = _free_port()
    generators = [subprocess.Popen(
        [sys.executable, "-m", "lima_jax.generate", "--checkpoint", str(workdir), "--prompts", "data/toy_dev.jsonl",
         "--out", str(two_out), *sampling, "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
         "--process_id", str(i), "--cpu_collectives", "gloo"],
        cwd=REPO, env={**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    outputs = [g.communicate(timeout=TIMEOUT_S)[0] for g in generators]
    assert [g.returncode for g in generators] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert f"wrote 6 answers to {two_out}" in outputs[0] and "wrote" not in outputs[1]
    single = subprocess.run([sys.executable, "-m", "lima_jax.generate", "--checkpoint", str(workdir), "--prompts",
                             "data/toy_dev.jsonl", "--out", str(one_out), *sampling], cwd=REPO,
                            env={**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"},
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert single.returncode == 0, single.stderr[-3000:]
    assert two_out.read_text() == one_out.read_text()
