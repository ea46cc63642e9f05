"""Cloud storage end to end, for real against a GCS emulator (gcp-storage-emulator) on 127.0.0.1 in this process:
the toy run with its workdir, data and tokenizer in gs://bkt trains, is SIGKILLed between its two checkpoints,
resumes, writes its dev report, and `convert to_hf` and `verify` read it back from the bucket.

Every reader is pointed at the emulator by environment variables alone (`emulator_env`): gcsfs (what
etils.epath uses for gs:// without TensorFlow: config.json, metrics, manifests, data, tokenizer, dev report,
run lock), tensorstore (orbax's array writes and reads) and google-cloud-storage (tensorboardX's event files).

The emulator lacks one thing tensorstore needs: it sends no `x-goog-generation` header with an object's bytes,
and tensorstore fails every read of an existing object with "Malformed StorageGeneration" without it (orbax's
second array write into a checkpoint's OCDBT database, and every restore). The fixture adds that header
(`_with_generation_headers`); the real GCS always sends it.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO
from tests.test_multihost import _env, _free_port

BUCKET = "bkt"
FIRST_CHECKPOINT = "run/checkpoints/6/lima_manifest.json"  # the last object of epoch 1's checkpoint


def emulator_env(url: str) -> dict[str, str]:
    """What each gs:// reader needs to use the emulator at `url` with no credentials and no network."""
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage (tensorboardX)
        "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: anonymous, no credential lookup (fsspec config FSSPEC_<proto>_<kwarg>)
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no gRPC bucket-type probe (60 s timeout per bucket)
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs driver (orbax arrays)
        "GCE_METADATA_ROOT": "127.0.0.1:1",  # tensorstore: no GCE metadata server; it goes on unauthenticated
        "NO_GCE_CHECK": "true",  # gcsfs: no GCE metadata probe should anything ask for default credentials
    }


class Emulator:
    """The running emulator: its env, a gcsfs filesystem on it, and a gate that freezes every request."""

    def __init__(self, url: str, storage):
        self.url, self.storage = url, storage
        self.env = emulator_env(url)
        self.freeze_after: str | None = None  # once this object exists, each request waits for `thaw`
        self.frozen = threading.Event()
        self.thaw = threading.Event()

    def fs(self):
        from gcsfs.core import GCSFileSystem  # not gcsfs's "extended" class: its gRPC probe of the bucket
        return GCSFileSystem(token="anon", skip_instance_cache=True, retries=1)

    def exists(self, name: str) -> bool:
        from gcp_storage_emulator.exceptions import NotFound
        try:
            self.storage.get_file_obj(BUCKET, name)
            return True
        except NotFound:
            return False


@contextlib.contextmanager
def _with_generation_headers():
    """The emulator's downloads with the `x-goog-generation` / `x-goog-metageneration` headers GCS sends."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects
    plain = objects.download

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            pass
        else:
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])
        return plain(request, response, storage, *args, **kwargs)

    routes = [(handlers, method) for _, handlers in server.HANDLERS for method, f in handlers.items() if f is plain]
    objects.download = download  # `objects.get` (?alt=media) calls it by name
    for handlers, method in routes:
        handlers[method] = download
    try:
        yield
    finally:
        objects.download = plain
        for handlers, method in routes:
            handlers[method] = plain


@contextlib.contextmanager
def _gated(emulator: Emulator):
    """Every request, once `emulator.freeze_after` exists, waits until `emulator.thaw` is set, then is dropped
    unanswered (its client was killed meanwhile): nothing the killed run sent after that point is stored."""
    from gcp_storage_emulator import server
    handle = server.Router.handle

    def gated(self, method):
        if emulator.freeze_after and not emulator.thaw.is_set() and emulator.exists(emulator.freeze_after):
            emulator.frozen.set()
            emulator.thaw.wait(timeout=300)
            return None
        return handle(self, method)

    server.Router.handle = gated
    try:
        yield
    finally:
        server.Router.handle = handle


@pytest.fixture
def gcs_emulator(monkeypatch):
    """gcp-storage-emulator on a free 127.0.0.1 port with bucket `bkt`, in memory; this process's env (and so
    its subprocesses') points gcsfs, tensorstore and google-cloud-storage at it."""
    pytest.importorskip("gcsfs")
    emulator_server = pytest.importorskip("gcp_storage_emulator.server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with _with_generation_headers():
        server = emulator_server.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
        emulator = Emulator(url, server._storage)
        with _gated(emulator):
            server.start()
            try:
                for key, value in emulator.env.items():
                    monkeypatch.setenv(key, value)
                import gcsfs
                gcsfs.GCSFileSystem.clear_instance_cache()
                yield emulator
            finally:
                emulator.thaw.set()
                server.stop()
                import gcsfs
                gcsfs.GCSFileSystem.clear_instance_cache()


def _run(name: str, args: list[str], timings: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    tic = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    timings[name] = time.monotonic() - tic
    print(f"{name}: rc {proc.returncode} in {timings[name]:.1f} s", flush=True)
    return proc


TRAIN = ["lima_jax.train", "--config", "configs/toy.py", "--config.workdir=gs://bkt/run",
         "--config.data.train_path=gs://bkt/data/toy_lima.jsonl", "--config.data.dev_path=gs://bkt/data/toy_dev.jsonl",
         "--config.tokenizer.path=gs://bkt/tok.model", "--config.train.num_epochs=2", "--config.dev_report.epochs=(2,)"]


def test_the_toy_run_trains_resumes_reports_and_converts_from_a_gcs_bucket(gcs_emulator, tmp_path):
    timings: dict[str, float] = {}
    fs = gcs_emulator.fs()
    for local, remote in [("toy_lima.jsonl", "data/toy_lima.jsonl"), ("toy_dev.jsonl", "data/toy_dev.jsonl"),
                          ("toy_tokenizer.model", "tok.model")]:
        fs.put(str(REPO / "data" / local), f"{BUCKET}/{remote}")

    # 1. Train; once epoch 1's checkpoint is complete in the bucket, the emulator holds the run's next request
    #    (so it cannot finish epoch 2's checkpoint), and the run is SIGKILLed there.
    gcs_emulator.freeze_after = FIRST_CHECKPOINT
    tic = time.monotonic()
    first = subprocess.Popen([sys.executable, "-m", *TRAIN], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not gcs_emulator.frozen.wait(timeout=0.5):
            assert first.poll() is None, "the run ended before its first checkpoint:\n" + first.communicate()[0][-5000:]
            assert time.monotonic() < deadline, "no checkpoint gs://bkt/run/checkpoints/6 within 300 s"
        first.send_signal(signal.SIGKILL)
        first_log = first.communicate(timeout=60)[0]
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    timings["train (killed after checkpoint 6)"] = time.monotonic() - tic
    print(f"train, killed after checkpoint 6: rc {first.returncode} in {timings['train (killed after checkpoint 6)']:.1f} s")
    gcs_emulator.thaw.set()
    assert first.returncode == -signal.SIGKILL, first_log[-5000:]
    assert "checkpoint gs://bkt/run/checkpoints/6: written" in first_log, first_log[-5000:]
    fs.invalidate_cache()
    assert fs.exists(f"{BUCKET}/{FIRST_CHECKPOINT}")
    assert not fs.exists(f"{BUCKET}/run/checkpoints/12/lima_manifest.json")

    # 2. The rerun resumes from it and finishes, dev report included.
    second = _run("train (resumed)", TRAIN, timings)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-8000:]
    assert "resumed from gs://bkt/run/checkpoints/6" in log, log[-8000:]
    assert "checkpoint gs://bkt/run/checkpoints/12: written" in log
    assert "report gs://bkt/run/dev_report.html" in log

    fs.invalidate_cache()
    for step in (6, 12):
        assert fs.exists(f"{BUCKET}/run/checkpoints/{step}/lima_manifest.json"), fs.find(f"{BUCKET}/run")
    config = json.loads(fs.cat(f"{BUCKET}/run/config.json"))
    assert config["workdir"] == "gs://bkt/run" and config["tokenizer"]["path"] == "gs://bkt/tok.model"
    steps = [json.loads(line)["step"] for line in fs.cat(f"{BUCKET}/run/metrics.jsonl").decode().splitlines()]
    assert steps == list(range(1, 13)), steps  # each step once: epoch 1's kept, the killed run's later ones dropped
    answers = fs.cat(f"{BUCKET}/run/dev_reports/epoch_002.jsonl").decode().splitlines()
    assert len(answers) == 6 and all(json.loads(a) for a in answers)
    assert b"<html" in fs.cat(f"{BUCKET}/run/dev_report.html").lower()
    assert fs.find(f"{BUCKET}/run/tensorboard"), "no TensorBoard event file in the bucket"
    assert not fs.exists(f"{BUCKET}/run/run.lock")  # released at the end
    assert not any(p.startswith("gs:") for p in os.listdir(REPO)), "a gs:// path became a local folder"

    # 3. Read back from the bucket: export to Hugging Face (local output) and verify the run.
    out = tmp_path / "hf"
    convert = _run("convert to_hf", ["lima_jax.convert", "to_hf", "--input", "gs://bkt/run", "--output", str(out)],
                   timings)
    assert convert.returncode == 0, (convert.stdout + convert.stderr)[-8000:]
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors")), sorted(os.listdir(out))
    verify = _run("verify", ["lima_jax.verify", "gs://bkt/run"], timings)
    assert verify.returncode == 0, (verify.stdout + verify.stderr)[-8000:]
    print("timings (s):", json.dumps({k: round(v, 1) for k, v in timings.items()}))
