"""The workdir's run lock (lima_jax.runlock): refusal, stale takeover, heartbeat, release, a takeover noticed by
the old holder, and a second `python -m lima_jax.train` that exits 5 before any work.

Most tests run on two stores: the local file store and an in-memory store with GCS's generation semantics
(what the gs:// store relies on). `GcsStore` itself is tested against a fake of the GCS JSON API that
enforces `ifGenerationMatch` like GCS, and, where gcsfs and gcp-storage-emulator are installed, against
the emulator for the wire format (the emulator ignores preconditions, so it cannot show exclusivity).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import ml_collections
import pytest

from lima_jax import runlock
from lima_jax.config import load_config_file, validate
from lima_jax.errors import ConfigError, RunLocked
from lima_jax.rundir import RunDir
from lima_jax.runlock import GcsStore, LocalStore, LockRecord, RunLock, Stored
from tests.test_multihost import _env, _free_port

from tests.conftest import worker_results

REPO = pathlib.Path(__file__).resolve().parent.parent
STALE_S = 600.0


class MemoryStore:
    """One object with GCS semantics: a generation per write, create/replace/delete conditional on it."""

    def __init__(self, where: str = "mem://run.lock"):
        self.where, self.data, self.generation, self.written_at, self._next = where, None, None, 0.0, 1

    def _write(self, data: bytes) -> int:
        self.data, self.generation, self.written_at, self._next = data, self._next, time.time(), self._next + 1
        return self.generation

    def read(self) -> Stored | None:
        return None if self.data is None else Stored(self.data, self.generation, self.written_at)

    def create(self, data: bytes):
        return None if self.data is not None else self._write(data)

    def replace(self, data: bytes, version):
        return self._write(data) if self.data is not None and version == self.generation else None

    def delete(self, version) -> bool:
        if self.data is None or version != self.generation:
            return False
        self.data = self.generation = None
        return True


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    return LocalStore(str(tmp_path / "run.lock")) if request.param == "local" else MemoryStore()


def _config(heartbeat_s: float = 60.0, stale_s: float = STALE_S) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"train": {"lock_heartbeat_s": heartbeat_s, "lock_stale_s": stale_s}})


def _holder(**changes) -> LockRecord:
    """A live-looking holder: this process, heartbeat now (a real run's lock looks like this)."""
    return dataclasses.replace(LockRecord.new(1), **changes)


def _ago(seconds: float) -> str:
    return runlock._iso(runlock._now() - runlock.datetime.timedelta(seconds=seconds))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _current(store) -> LockRecord | None:
    stored = store.read()
    return None if stored is None else LockRecord.parse(stored.data)


@pytest.fixture
def warnings(monkeypatch) -> list[str]:
    """The messages runlock logs as warnings or errors."""
    seen: list[str] = []
    for level in ("warning", "error"):
        monkeypatch.setattr(runlock.logging, level, lambda fmt, *args: seen.append(fmt % args))
    return seen


# ------------------------------------------------------------------------------------------ acquiring


def test_a_second_acquire_refuses_naming_the_lock_file_and_the_holder(store):
    holder = _holder()
    runlock.acquire(store, holder, STALE_S)
    with pytest.raises(RunLocked) as e:
        runlock.acquire(store, LockRecord.new(1), STALE_S)
    message = str(e.value)
    assert e.value.exit_status == 5
    assert message.startswith(f"{store.where}: this workdir is in use by another training run")
    for part in (f"run {holder.run_id}", f"host {socket.gethostname()}", f"pid {os.getpid()}",
                 f"started {holder.started_at}", f"last heartbeat {holder.heartbeat_at}",
                 f"remove {store.where}", "train.lock_stale_s=600s"):
        assert part in message
    assert _current(store).run_id == holder.run_id  # untouched


def test_a_stale_heartbeat_is_taken_over_with_a_warning(store, warnings):
    old = _holder(heartbeat_at=_ago(STALE_S + 5))
    runlock.acquire(store, old, STALE_S)
    new = LockRecord.new(1)
    runlock.acquire(store, new, STALE_S)
    assert _current(store).run_id == new.run_id
    assert len(warnings) == 1
    assert "removed a stale run lock to take the workdir over" in warnings[0]
    assert re.search(r"heartbeat is 60[56]s old", warnings[0])
    assert f"run {old.run_id}" in warnings[0] and f"pid {old.pid}" in warnings[0]


def test_a_dead_process_on_this_host_is_taken_over_at_once(store, warnings):
    dead = _holder(pid=_dead_pid())  # heartbeat fresh: only the pid tells
    runlock.acquire(store, dead, STALE_S)
    runlock.acquire(store, LockRecord.new(1), STALE_S)
    assert _current(store).run_id != dead.run_id
    assert f"its process {dead.pid} no longer runs on this host" in warnings[0]


def test_a_pid_on_another_host_is_not_checked(store):
    runlock.acquire(store, _holder(host="another-host", pid=_dead_pid()), STALE_S)
    with pytest.raises(RunLocked, match="host another-host"):
        runlock.acquire(store, LockRecord.new(1), STALE_S)


def test_an_unreadable_lock_is_held_while_young_and_stale_when_old(tmp_path, warnings):
    store = LocalStore(str(tmp_path / "run.lock"))
    pathlib.Path(store.where).write_bytes(b"")  # as left by an O_EXCL create not yet written
    with pytest.raises(RunLocked, match="writing the lock file right now"):
        runlock.acquire(store, LockRecord.new(1), STALE_S)
    old = time.time() - 2 * runlock.UNREADABLE_GRACE_S
    os.utime(store.where, (old, old))
    record = LockRecord.new(1)
    runlock.acquire(store, record, STALE_S)
    assert _current(store).run_id == record.run_id and "not a readable lock record" in warnings[0]


def test_two_takeovers_of_one_stale_lock_have_one_winner(store):
    """B reads the stale lock, then A takes it over before B deletes it: B's delete (conditional on the
    version it read) fails, B looks again and finds A live."""
    runlock.acquire(store, _holder(heartbeat_at=_ago(STALE_S + 5)), STALE_S)
    a, b = LockRecord.new(1), LockRecord.new(1)
    delete = store.delete

    def a_first(version) -> bool:
        store.delete = delete
        runlock.acquire(store, a, STALE_S)
        return delete(version)

    store.delete = a_first
    with pytest.raises(RunLocked, match=f"run {a.run_id}"):
        runlock.acquire(store, b, STALE_S)
    assert _current(store).run_id == a.run_id


def test_the_local_lock_is_never_half_written(tmp_path):
    """Created by linking a complete temporary file: no reader sees a partial lock, no temporary is left."""
    store = LocalStore(str(tmp_path / "run.lock"))
    record = LockRecord.new(2)
    runlock.acquire(store, record, STALE_S)
    assert LockRecord.parse(pathlib.Path(store.where).read_bytes()) == record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]


# ------------------------------------------------------------------------------------------ holding


def _held(store, heartbeat_s: float = 60.0) -> RunLock:
    record = LockRecord.new(1)
    return RunLock(store, record, runlock.acquire(store, record, STALE_S), heartbeat_s)


def test_the_heartbeat_rewrites_the_lock_in_place(store):
    lock = _held(store)
    before = store.read().version
    lock.beat()
    assert store.read().version != before and _current(store).run_id == lock.record.run_id
    assert lock.lost is None


def test_a_taken_over_lock_makes_the_old_holder_stop(store, warnings):
    lock = _held(store, heartbeat_s=0.05)
    lock.start_heartbeat()
    try:
        store.delete(store.read().version)  # as a job that judged this run's lock stale does
        thief = _holder(pid=4242, host="other-host")
        runlock.acquire(store, thief, STALE_S)
        deadline = time.monotonic() + 10
        while lock.lost is None and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(RunLocked) as e:
            lock.check()
        assert f"another job took over this run's workdir: run {thief.run_id} on host other-host, pid 4242" in \
            str(e.value)
        assert warnings[-1] == lock.lost  # logged as an error when noticed
    finally:
        lock.release()
    assert _current(store).run_id == thief.run_id  # the release left the new holder's lock alone


def test_release_removes_the_lock_only_while_it_is_ours(store):
    lock = _held(store)
    lock.release()
    assert store.read() is None
    lock = _held(store)
    store.replace(_holder().to_bytes(), store.read().version)  # someone else's now
    lock.release()
    assert _current(store).run_id != lock.record.run_id


def test_a_lock_removed_by_hand_is_written_again_by_the_next_heartbeat(store, warnings):
    lock = _held(store)
    store.delete(store.read().version)
    lock.beat()
    assert _current(store).run_id == lock.record.run_id and "wrote it again" in warnings[0]
    lock.release()
    assert store.read() is None


def test_hold_takes_and_releases_the_workdir_lock(tmp_path):
    run = RunDir.at(tmp_path / "new" / "run")  # created by the lock
    with runlock.hold(run, _config()) as lock:
        assert LockRecord.parse(run.lock.read_bytes()).run_id == lock.record.run_id
        with pytest.raises(RunLocked):
            with runlock.hold(run, _config()):
                pass
        lock.check()
    assert not run.lock.exists()
    with pytest.raises(ValueError, match="boom"):
        with runlock.hold(run, _config()):
            raise ValueError("boom")
    assert not run.lock.exists()  # released on an exception too


# ------------------------------------------------------------------------------------------ config


def test_the_lock_timing_is_validated_and_may_be_absent_in_an_older_config_json(tmp_path):
    config = load_config_file(REPO / "configs" / "toy.py")
    config.workdir = str(tmp_path)
    assert (config.train.lock_heartbeat_s, config.train.lock_stale_s) == (60.0, 600.0)
    config.train.lock_stale_s = 100.0
    with pytest.raises(ConfigError, match=r"config.train.lock_stale_s=100.0: must be at least twice"):
        validate(config)
    config.train.lock_heartbeat_s = 0.0
    with pytest.raises(ConfigError, match="config.train.lock_heartbeat_s=0.0: must be a positive number"):
        validate(config)
    del config.train["lock_heartbeat_s"], config.train["lock_stale_s"]  # a config.json from before the lock
    validate(config)
    assert runlock.lock_timing(config) == (60.0, 600.0)


# ------------------------------------------------------------------------------------------ gs://


class FakeGcsApi:
    """The GCS JSON API calls GcsStore makes, through gcsfs's `call`, with GCS's preconditions: a failed
    `ifGenerationMatch` is 412, which gcsfs raises as FileExistsError; a missing object is FileNotFoundError."""

    def __init__(self):
        self._location = "https://storage.example"
        self.objects: dict[str, tuple[bytes, int]] = {}
        self._generation = 1000

    def _check(self, key: str, if_generation_match: str | None) -> None:
        if if_generation_match is not None and str(self.objects.get(key, (b"", 0))[1]) != if_generation_match:
            raise FileExistsError(key)

    def call(self, method: str, path: str, *args, json_out=False, **params):
        if method == "POST":
            assert path == "https://storage.example/upload/storage/v1/b/bkt/o" and params["uploadType"] == "media"
            self._check(params["name"], params["ifGenerationMatch"])
            self._generation += 1
            self.objects[params["name"]] = (params["data"], self._generation)
            return {"name": params["name"], "generation": str(self._generation)}
        bucket, key = args
        assert path == "b/{}/o/{}" and bucket == "bkt"
        if key not in self.objects:
            raise FileNotFoundError(key)
        if method == "DELETE":
            self._check(key, params["ifGenerationMatch"])
            del self.objects[key]
            return {}, b""
        data, generation = self.objects[key]
        if params.get("alt") == "media":
            assert params["generation"] == str(generation)
            return {}, data
        return {}, json.dumps({"generation": str(generation), "updated": "2026-01-01T00:00:00.000Z"}).encode()


def test_the_gcs_store_changes_the_object_only_under_generation_preconditions():
    api = FakeGcsApi()
    store = GcsStore("gs://bkt/runs/a/run.lock", fs=api)
    first = store.create(b"one")
    assert first is not None and store.create(b"two") is None  # ifGenerationMatch=0: exists
    assert store.read().data == b"one" and store.read().version == first
    second = store.replace(b"beat", first)
    assert second not in (None, first) and store.replace(b"late", first) is None  # not the version we wrote
    assert not store.delete(first) and store.delete(second) and store.read() is None
    assert store.replace(b"gone", second) is None and not store.delete(second)


def test_the_gcs_store_runs_the_whole_lock_protocol():
    store = GcsStore("gs://bkt/runs/a/run.lock", fs=FakeGcsApi())
    lock = _held(store)
    with pytest.raises(RunLocked, match="gs://bkt/runs/a/run.lock: this workdir is in use"):
        runlock.acquire(store, LockRecord.new(1), STALE_S)
    lock.beat()
    lock.release()
    assert store.read() is None


def test_the_gcs_store_against_gcp_storage_emulator(monkeypatch):
    """gcsfs's real requests against the emulator on 127.0.0.1: create, read, heartbeat, release. The emulator
    does not enforce ifGenerationMatch, so exclusivity itself is covered by the fake above only."""
    gcsfs = pytest.importorskip("gcsfs")
    emulator = pytest.importorskip("gcp_storage_emulator.server")
    port = _free_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket="bkt")
    server.start()
    try:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        fs = gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True, retries=1)
        store = GcsStore("gs://bkt/runs/a/run.lock", fs=fs)
        lock = _held(store)
        assert _current(store).run_id == lock.record.run_id
        lock.beat()
        assert _current(store).run_id == lock.record.run_id and lock.lost is None
        lock.release()
        assert store.read() is None
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------ end to end


def test_training_stops_before_the_next_checkpoint_once_another_run_took_over(toy_config):
    from lima_jax import training
    workdir = pathlib.Path(toy_config.workdir)
    toy_config.train.num_epochs = 2
    toy_config.train.lock_heartbeat_s, toy_config.train.lock_stale_s = 0.1, 0.2
    thief = _holder(host="other-host", pid=4242)

    def after_epoch(end) -> None:
        if end.epoch == 1:  # another job takes the workdir over while this run is between checkpoints
            (workdir / "run.lock").write_bytes(thief.to_bytes())
            time.sleep(3.0)  # 30 heartbeats: time for the heartbeat thread to notice, even on a loaded machine

    with pytest.raises(RunLocked, match=f"took over this run's workdir: run {thief.run_id} on host other-host"):
        training.train(toy_config, after_epoch=after_epoch)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["6"]  # epoch 1's only
    assert LockRecord.parse((workdir / "run.lock").read_bytes()) == thief  # not removed: not ours


def _fake_live_holder(workdir: pathlib.Path) -> LockRecord:
    """A lock as a live run on this host writes it: this test process's pid, a fresh heartbeat."""
    workdir.mkdir(parents=True, exist_ok=True)
    holder = LockRecord.new(1)
    (workdir / "run.lock").write_bytes(holder.to_bytes())
    return holder


def test_a_second_train_on_a_held_workdir_exits_5_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    holder = _fake_live_holder(workdir)
    tic = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lima_jax.train", "--config", "configs/toy.py",
                           f"--config.workdir={workdir}"], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert f"error: {workdir}/run.lock: this workdir is in use by another training run: run {holder.run_id} " \
           f"on host {holder.host}, pid {holder.pid}" in proc.stderr
    assert sorted(p.name for p in workdir.iterdir()) == ["run.lock"]  # no config.json, checkpoints/, metrics
    assert LockRecord.parse((workdir / "run.lock").read_bytes()) == holder
    assert "parameters:" not in proc.stderr and time.monotonic() - tic < 60


_WORKER = r"""
import json, sys
import jax
from lima_jax import distributed, runlock, training
from lima_jax.config import load_config_file
from lima_jax.errors import RunLocked
from lima_jax.rundir import RunDir
pid, port, free, held = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
distributed.initialize(f"127.0.0.1:{port}", 2, pid, timeout_s=60, cpu_collectives="gloo")
config = load_config_file("configs/toy.py")
with runlock.hold(RunDir.at(free), config) as lock:
    lock.check()
    distributed.barrier("held")
    record = json.loads(RunDir.at(free).lock.read_text()) if pid == 0 else None
distributed.barrier("released")
config.workdir = held
try:
    training.train(config)
    refused = None
except RunLocked as e:
    refused = str(e)
print("RESULT " + json.dumps({"process": pid, "record": record, "released": not RunDir.at(free).lock.exists(),
                              "refused": refused}), flush=True)
"""


def test_two_processes_share_one_lock_and_refuse_together(tmp_path):
    holder = _fake_live_holder(tmp_path / "held")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(i), str(port), str(tmp_path / "free"),
                               str(tmp_path / "held")], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    results = worker_results(procs, timeout_s=180)
    assert results[0]["record"]["num_processes"] == 2 and results[0]["record"]["pid"] != holder.pid
    assert results[0]["released"] and results[1]["released"]
    assert results[0]["refused"] == results[1]["refused"]  # process 0's message, on both
    assert f"run {holder.run_id} on host {holder.host}, pid {holder.pid}" in results[1]["refused"]
    assert sorted(p.name for p in (tmp_path / "held").iterdir()) == ["run.lock"]
