"""The workdir's run lock: one training run at a time writes into a workdir.

`<workdir>/run.lock` (`lima_jax.rundir.LOCK`) is a small JSON object: the run id (a uuid), the host and pid
of process 0, the number of processes, the start time and the time of the last heartbeat. Training creates
it before doing any work, rewrites its heartbeat every `train.lock_heartbeat_s` from a daemon thread, and
removes it when it ends, if it is still its own. A second job finds it and stops with `RunLocked` (exit
status 5) naming the holder. A lock is stale, and taken over with a warning, when its heartbeat is older
than `train.lock_stale_s`, when it names a process on this host that no longer exists, or when it is not
readable and older than a few seconds.

The lock is made for object stores: every change is conditional on what was read, like a GCS generation.
A store (`LockStore`) creates the object only if absent, and replaces or deletes it only if it is still the
version the caller saw; so of two jobs that take over the same stale lock at once, exactly one wins.

* Local paths: the content goes to a temporary sibling, fsynced, and is hard-linked to `run.lock`
  (atomic create-if-absent of complete content; where links are unsupported, `O_CREAT | O_EXCL`, then
  write and fsync). Replace and delete compare (device, inode, mtime) under an `flock` of the workdir.
* `gs://` paths: the GCS JSON API through gcsfs (the fsspec filesystem `etils.epath` uses for gs:// when
  TensorFlow is absent): uploads with `ifGenerationMatch=0` (create) or `=<generation we wrote>`
  (heartbeat), deletes with `ifGenerationMatch=<generation>`; GCS answers 412 when the condition fails.

Multi-host: one lock per run. Process 0 takes it, heartbeats and releases it; the outcome reaches every
process through `distributed.main_process_text`, so all processes refuse (or go on) together.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Hashable, Iterator, Protocol
from urllib.parse import quote

import jax
import ml_collections
from absl import logging

from lima_jax import distributed
from lima_jax.config import lock_timing
from lima_jax.errors import ConfigError, DistributedError, RunLocked
from lima_jax.paths import is_remote
from lima_jax.rundir import RunDir

UNREADABLE_GRACE_S = 10.0  # an unreadable lock younger than this is being written by its holder: held
TAKEOVER_ATTEMPTS = 5


# ------------------------------------------------------------------------------------------ the record


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _iso(t: datetime.datetime) -> str:
    return t.isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class LockRecord:
    """What `run.lock` holds."""

    run_id: str
    host: str
    pid: int
    num_processes: int
    started_at: str
    heartbeat_at: str

    @classmethod
    def new(cls, num_processes: int) -> "LockRecord":
        now = _iso(_now())
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid(), num_processes, now, now)

    @classmethod
    def parse(cls, data: bytes) -> "LockRecord | None":
        """The record in `data`, or None when it is not a complete lock record."""
        try:
            values = json.loads(data.decode("utf-8"))
            record = cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})
            record.heartbeat_time()
            return record
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def to_bytes(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self), indent=2) + "\n").encode("utf-8")

    def beating(self) -> "LockRecord":
        return dataclasses.replace(self, heartbeat_at=_iso(_now()))

    def heartbeat_time(self) -> float:
        return datetime.datetime.fromisoformat(self.heartbeat_at).timestamp()

    def heartbeat_age_s(self) -> float:
        return time.time() - self.heartbeat_time()

    def describe(self) -> str:
        processes = f"{self.num_processes} process{'es' if self.num_processes != 1 else ''}"
        return (f"run {self.run_id} on host {self.host}, pid {self.pid} ({processes}), started {self.started_at}, "
                f"last heartbeat {self.heartbeat_at} ({max(self.heartbeat_age_s(), 0):.0f}s ago)")


# ------------------------------------------------------------------------------------------ the stores


@dataclasses.dataclass(frozen=True)
class Stored:
    """The lock object as read: its bytes, its version (for conditional changes) and its age."""

    data: bytes
    version: Hashable
    written_at: float  # unix time of its last write


class LockStore(Protocol):
    """One lock object with create-if-absent and compare-and-swap semantics (a GCS object's, on any store)."""

    where: str  # the lock's path or URL, for messages

    def read(self) -> Stored | None:
        """The object, or None when there is none."""

    def create(self, data: bytes) -> Hashable | None:
        """Writes `data` if there is no object; its version, or None when one exists."""

    def replace(self, data: bytes, version: Hashable) -> Hashable | None:
        """Overwrites the object if it is still `version`; the new version, or None (changed or gone)."""

    def delete(self, version: Hashable) -> bool:
        """Removes the object if it is still `version`; whether it did."""


class LocalStore:
    """A lock file on a local (or NFS) file system."""

    def __init__(self, path: str):
        self.where = path
        self._dir = os.path.dirname(path)

    def _temp(self, data: bytes) -> str:
        """A complete, fsynced sibling holding `data`."""
        tmp = f"{self.where}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    @staticmethod
    def _version(st: os.stat_result) -> Hashable:
        return st.st_dev, st.st_ino, st.st_mtime_ns

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Serializes the compare-and-change steps of all processes on this file system (where flock works)."""
        fd = os.open(self._dir, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # also drops the flock

    def _current_version(self) -> Hashable | None:
        try:
            return self._version(os.stat(self.where))
        except FileNotFoundError:
            return None

    def read(self) -> Stored | None:
        try:
            with open(self.where, "rb") as f:
                st = os.fstat(f.fileno())
                return Stored(f.read(), self._version(st), st.st_mtime)
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> Hashable | None:
        tmp = self._temp(data)
        try:
            os.link(tmp, self.where)
            return self._version(os.stat(tmp))  # the same inode, without a second look at the lock's path
        except FileExistsError:
            return None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            return self._create_exclusive(data)  # a file system without hard links
        finally:
            os.unlink(tmp)

    def _create_exclusive(self, data: bytes) -> Hashable | None:
        """Create-if-absent without links: a reader may briefly see it empty (an unreadable, young lock: held)."""
        try:
            fd = os.open(self.where, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            return self._version(os.fstat(f.fileno()))

    def replace(self, data: bytes, version: Hashable) -> Hashable | None:
        tmp = self._temp(data)
        try:
            with self._guard():
                if self._current_version() != version:
                    return None
                new_version = self._version(os.stat(tmp))
                os.replace(tmp, self.where)
                return new_version
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def delete(self, version: Hashable) -> bool:
        with self._guard():
            if self._current_version() != version:
                return False
            os.unlink(self.where)
            return True


class GcsStore:
    """A lock object on Google Cloud Storage, changed only under generation preconditions."""

    CONTENT_TYPE = "application/octet-stream"  # JSON, but gcp-storage-emulator parses a JSON body as metadata

    def __init__(self, url: str, fs: object | None = None):
        """`fs`: a gcsfs.GCSFileSystem (default: fsspec's "gcs" filesystem, default credentials)."""
        self.where = url
        self.bucket, _, self.key = url[len("gs://"):].partition("/")
        if fs is None:
            try:
                import fsspec
                fs = fsspec.filesystem("gcs")
            except (ImportError, ValueError) as e:
                raise ConfigError(f"{url}: a gs:// workdir needs gcsfs (pip install gcsfs) for its run lock "
                                  f"({e})") from e
        self._fs = fs

    def _object(self, **params: str) -> tuple[dict, bytes]:
        return self._fs.call("GET", "b/{}/o/{}", self.bucket, self.key, **params)

    def read(self) -> Stored | None:
        try:
            _, meta = self._object()
            meta = json.loads(meta)
            _, data = self._object(alt="media", generation=meta["generation"])
        except FileNotFoundError:  # none, or replaced between the two requests (the caller looks again)
            return None
        updated = datetime.datetime.fromisoformat(meta["updated"].replace("Z", "+00:00")).timestamp()
        return Stored(data, str(meta["generation"]), updated)

    def _upload(self, data: bytes, if_generation_match: str) -> Hashable | None:
        url = f"{getattr(self._fs, '_location', 'https://storage.googleapis.com')}/upload/storage/v1/b/" \
              f"{quote(self.bucket, safe='')}/o"
        try:
            obj = self._fs.call("POST", url, uploadType="media", name=self.key, ifGenerationMatch=if_generation_match,
                                data=data, headers={"Content-Type": self.CONTENT_TYPE}, json_out=True)
        except FileExistsError:  # gcsfs's name for 412 Precondition Failed
            return None
        return str(obj["generation"])

    def create(self, data: bytes) -> Hashable | None:
        return self._upload(data, "0")

    def replace(self, data: bytes, version: Hashable) -> Hashable | None:
        try:
            return self._upload(data, str(version))
        except FileNotFoundError:
            return None

    def delete(self, version: Hashable) -> bool:
        try:
            self._fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=str(version))
            return True
        except (FileExistsError, FileNotFoundError):
            return False


def store_for(run: RunDir) -> LockStore:
    """The store of `run`'s lock: a local file or a gs:// object (the workdir is created if local)."""
    where = os.fspath(run.lock)
    if where.startswith("gs://"):
        return GcsStore(where)
    if is_remote(where):
        raise ConfigError(f"{run.root}: the run lock supports local folders and gs:// workdirs only")
    run.root.mkdir(parents=True, exist_ok=True)
    return LocalStore(where)


# ------------------------------------------------------------------------------------------ staleness


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def stale_reason(holder: LockRecord | None, stored: Stored, stale_s: float) -> str | None:
    """Why the lock in `stored` (parsed: `holder`) may be taken over, or None while its holder counts as live."""
    if holder is None:
        age = time.time() - stored.written_at
        return None if age < UNREADABLE_GRACE_S else f"it is not a readable lock record (last written {age:.0f}s ago)"
    if holder.host == socket.gethostname() and not pid_alive(holder.pid):
        return f"its process {holder.pid} no longer runs on this host"
    if holder.heartbeat_age_s() > stale_s:
        return f"its last heartbeat is {holder.heartbeat_age_s():.0f}s old (train.lock_stale_s={stale_s:g})"
    return None


def refusal(where: str, holder: LockRecord | None, stale_s: float) -> str:
    """The paragraph a job prints when a live run holds the workdir."""
    who = holder.describe() if holder is not None else "a job that is writing the lock file right now"
    return (f"{where}: this workdir is in use by another training run: {who}. Two runs on one workdir overwrite "
            f"each other's checkpoints and metrics, so this one stops before doing any work. Wait for that run "
            f"to end, or use another --config.workdir; if you are sure it is dead, remove {where} and start "
            f"again (a lock whose heartbeat is older than train.lock_stale_s={stale_s:g}s, or whose process is "
            f"gone from this host, is taken over by itself).")


def acquire(store: LockStore, record: LockRecord, stale_s: float) -> Hashable:
    """Creates the lock for `record`, taking over a stale one; its version. RunLocked while a live run holds
    it. Race-safe: a stale lock is deleted only if unchanged since it was read, and only a create wins."""
    for _ in range(TAKEOVER_ATTEMPTS):
        version = store.create(record.to_bytes())
        if version is not None:
            return version
        current = store.read()
        if current is None:
            continue  # released meanwhile
        holder = LockRecord.parse(current.data)
        if holder is not None and holder.run_id == record.run_id:
            return current.version  # our own create, retried after its answer was lost
        reason = stale_reason(holder, current, stale_s)
        if reason is None:
            raise RunLocked(refusal(store.where, holder, stale_s))
        if store.delete(current.version):  # False: it changed since we read it; look again
            logging.warning("%s: removed a stale run lock to take the workdir over (%s): %s", store.where, reason,
                            holder.describe() if holder is not None else "unreadable")
    raise RunLocked(f"{store.where}: could not take the run lock in {TAKEOVER_ATTEMPTS} attempts: other jobs "
                    "keep taking it. Make sure only one job runs on this workdir, then start again.")


# ------------------------------------------------------------------------------------------ holding it


class RunLock:
    """A held run lock: heartbeats from a daemon thread (process 0), notices a takeover, releases if ours.
    On processes other than 0 it holds nothing and only shares process 0's verdicts."""

    def __init__(self, store: LockStore | None, record: LockRecord, version: Hashable | None,
                 heartbeat_s: float):
        self.store, self.record, self.heartbeat_s = store, record, heartbeat_s
        self._version = version
        self._lost: str | None = None
        self._released = False
        self._mutex = threading.Lock()  # one heartbeat or the release at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lost(self) -> str | None:
        """Why this run no longer holds the lock (another run took it over), or None."""
        return self._lost

    def start_heartbeat(self) -> None:
        if self.store is not None:
            self._thread = threading.Thread(target=self._beat_until_stopped, name="lima-run-lock", daemon=True)
            self._thread.start()

    def _beat_until_stopped(self) -> None:
        while not self._stop.wait(self.heartbeat_s) and self._lost is None:
            try:
                self.beat()
            except Exception as e:  # a passing storage error: the next heartbeat tries again
                logging.warning("%s: run lock heartbeat failed (%s: %s); trying again in %gs", self.store.where,
                                type(e).__name__, e, self.heartbeat_s)

    def beat(self) -> None:
        """One heartbeat: rewrites the lock if it is still the version we wrote, else finds out who has it."""
        with self._mutex:
            if self._released or self._lost is not None:
                return
            record = self.record.beating()
            version = self.store.replace(record.to_bytes(), self._version)
            if version is not None:
                self.record, self._version = record, version
                return
            current = self.store.read()
            if current is None:  # removed by hand while this run lives: put it back
                version = self.store.create(record.to_bytes())
                if version is not None:
                    logging.warning("%s: the run lock was removed while this run holds it; wrote it again",
                                    self.store.where)
                    self.record, self._version = record, version
                return
            holder = LockRecord.parse(current.data)
            if holder is not None and holder.run_id == self.record.run_id:
                self._version = current.version  # our own write, retried after its answer was lost
                return
            self._lose(holder)

    def _lose(self, holder: LockRecord | None) -> None:
        who = holder.describe() if holder is not None else "an unreadable lock record"
        self._lost = (f"{self.store.where}: another job took over this run's workdir: {who}. This run "
                      f"(run {self.record.run_id}) stopped before its next checkpoint so that the two do not "
                      "overwrite each other's checkpoints; its heartbeat had probably stalled for longer than "
                      "train.lock_stale_s. Let the other run finish, or stop it and restart this one.")
        logging.error("%s", self._lost)

    def check(self) -> None:
        """RunLocked if another run took the lock over (on every process alike). Cheap: call before each
        checkpoint save."""
        lost = distributed.main_process_text("run_lock_check", self._lost or "")
        if lost:
            raise RunLocked(lost)

    def release(self) -> None:
        """Stops the heartbeat; removes the lock if it is still this run's."""
        self._stop.set()
        with self._mutex:
            self._released = True
            if self.store is None or self._lost is not None:
                return
            if not self.store.delete(self._version):
                current = self.store.read()
                holder = LockRecord.parse(current.data) if current is not None else None
                if holder is not None and holder.run_id == self.record.run_id:
                    self.store.delete(current.version)
                elif current is not None:
                    logging.warning("%s: left in place: the run lock is no longer this run's", self.store.where)
        if self._thread is not None:
            self._thread.join(timeout=5)


def _acquire_on_main(run: RunDir, heartbeat_s: float, stale_s: float) -> RunLock:
    """Process 0 takes the lock; every process gets a RunLock, or RunLocked with process 0's message."""
    record, lock, error = LockRecord.new(jax.process_count()), None, None
    if distributed.is_main_process():
        try:
            store = store_for(run)
            lock = RunLock(store, record, acquire(store, record, stale_s), heartbeat_s)
        except Exception as e:  # shared with the other processes first, so that none waits for nothing
            error = e
    outcome = {"status": "ok"} if error is None else {
        "status": "locked" if isinstance(error, RunLocked) else "error",
        "message": str(error) if isinstance(error, RunLocked) else f"{type(error).__name__}: {error}"}
    outcome = json.loads(distributed.main_process_text("run_lock", json.dumps(outcome)))
    if error is not None:
        raise error
    if outcome["status"] == "locked":
        raise RunLocked(outcome["message"])
    if outcome["status"] == "error":
        raise DistributedError(f"process 0 could not take the run lock of {run.root}: {outcome['message']}")
    return lock or RunLock(None, record, None, heartbeat_s)


@contextlib.contextmanager
def hold(run: RunDir, config: ml_collections.ConfigDict) -> Iterator[RunLock]:
    """Holds `run`'s lock around the block (see the module docstring): RunLocked at once while another live
    run holds it; heartbeats while the block runs; released when it ends, normally or by an exception."""
    heartbeat_s, stale_s = lock_timing(config)
    lock = _acquire_on_main(run, float(heartbeat_s), float(stale_s))
    lock.start_heartbeat()
    try:
        yield lock
    finally:
        lock.release()
