"""Test setup: 8 fake CPU devices (set before jax is imported) and shared fixtures."""
import atexit
import os
import pathlib
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole session: the many `python -m lima_jax.train` subprocesses
# (preemption, multi-host, CLI tests) compile the same toy programs; a cache hit replaces XLA's compile (a toy
# run: ~50 s -> ~20 s on the loaded 2-core machine). Created by the first process that imports this file, and
# removed by it at exit; the subprocesses a test starts inherit it (a user's own JAX_COMPILATION_CACHE_DIR wins).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lima_jax_tests_jit_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
# How long a test waits on the training processes it starts. Generous: on a crowded 2-core machine (the other
# xdist worker in a long test) two processes that each compile a train step took over 300 s to their first one.
SUBPROCESS_TIMEOUT_S = int(os.environ.get("LIMA_TEST_TIMEOUT_S", "600"))


@pytest.fixture(scope="session")
def repo() -> pathlib.Path:
    return REPO


@pytest.fixture(scope="session")
def toy_tokenizer():
    from lima_jax.tokenizer import Tokenizer
    return Tokenizer(REPO / "data" / "toy_tokenizer.model")


@pytest.fixture
def toy_config(tmp_path):
    """configs/toy.py with a fresh workdir under tmp_path."""
    from lima_jax.config import load_config_file
    config = load_config_file(REPO / "configs" / "toy.py")
    config.workdir = str(tmp_path / "run")
    return config


def shared_file(relative: str) -> pathlib.Path:
    """A file of ../shared/data, or skip the test with the reason when the folder is absent."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared/data beside the checkout holds the real test material)")
    return path


class StoppedAfterEpoch(Exception):
    """Raised by `train_stopping_after`'s hook: the run ends there as if killed after that epoch's hooks."""


def train_stopping_after(config, epoch: int) -> None:
    """Trains `config` and stops right after `epoch` (its checkpoint written), like a job killed there."""
    from lima_jax.training import train

    def stop(end):
        if end.epoch == epoch:
            raise StoppedAfterEpoch

    with pytest.raises(StoppedAfterEpoch):
        train(config, after_epoch=stop)


def worker_results(procs, timeout_s: float) -> dict[int, dict]:
    """Waits for worker subprocesses (killing any left when one times out), asserts each exited 0, and returns
    {process index: the JSON of its last `RESULT {...}` line}."""
    import json
    outputs = []
    try:
        outputs = [proc.communicate(timeout=timeout_s)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    results = {}
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
        result = json.loads([x for x in out.splitlines() if x.startswith("RESULT ")][-1][len("RESULT "):])
        results[result["process"]] = result
    return results
