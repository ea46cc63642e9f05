"""Training metrics to three places at once, from host 0 only: the console (with progress), TensorBoard
event files (`workdir/tensorboard`, via tensorboardX: no TensorFlow needed) and `workdir/metrics.jsonl`
(one JSON object per logged step, easy to load with pandas).

A gs:// workdir: tensorboardX writes its event files there itself (google-cloud-storage, a dependency of
gcsfs), re-uploading the file at each flush; metrics.jsonl, as object stores cannot append, is kept in
memory and re-uploaded whole at each logged step (one object write per step, never half a file)."""
from __future__ import annotations

import json
import math
import time

import jax
from absl import logging
from etils import epath

from lima_jax.paths import PathLike, atomic_write_text, is_remote
from lima_jax.rundir import RunDir


class MetricsWriter:
    """Writes a run's metrics; `resumed_at` is the step of the state training goes on from.

    Metrics logged after that step by an interrupted run are dropped: its lines in metrics.jsonl are
    removed and TensorBoard is told to purge them, so both show one curve, the one that led to the
    current state, with no step twice.
    """

    def __init__(self, run: RunDir | PathLike, total_steps: int, resumed_at: int = 0):
        run = run if isinstance(run, RunDir) else RunDir.at(run)
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self.start_time = time.time()
        self.start_step: int | None = None
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter
        run.root.mkdir(parents=True, exist_ok=True)
        path = run.metrics
        dropped = _drop_records_after(path, resumed_at)
        if dropped:
            logging.info("%s: dropped %d records after step %d, logged by the interrupted run", path, dropped,
                         resumed_at)
        self.tensorboard = SummaryWriter(logdir=str(run.tensorboard), purge_step=resumed_at + 1)
        self.jsonl = _ObjectJsonl(path) if is_remote(path) else path.open("a", encoding="utf-8")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Logs `metrics` of the 1-based global `step`."""
        if not self.enabled:
            return
        if self.start_step is None:
            self.start_step = step - 1
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "epoch":
                self.tensorboard.add_scalar(f"train/{key}", value, step)
        self.tensorboard.flush()
        logging.info("%s", self._progress_line(step, metrics))

    def _progress_line(self, step: int, m: dict) -> str:
        elapsed = time.time() - self.start_time
        done = step - (self.start_step or 0)
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        return (f"epoch {m.get('epoch', 0)} step {step}/{self.total_steps} [{100 * step / self.total_steps:5.1f}%] "
                f"loss {m['loss']:.4f} lr {m['learning_rate']:.2e} grad_norm {m['grad_norm']:.3f} "
                f"tokens/s {m.get('tokens_per_s', 0):,.0f} eta {eta:,.0f}s")

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self.tensorboard.add_text(tag, text, step)

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()
            self.jsonl.close()


class _ObjectJsonl:
    """metrics.jsonl in an object store (gs://), which has no append (gcsfs would silently overwrite): the
    whole text in memory, uploaded in one piece at each flush, so a killed run leaves its last flushed line."""

    def __init__(self, path: epath.Path):
        self.path = path
        self.parts = [path.read_text(encoding="utf-8")] if path.exists() else []

    def write(self, text: str) -> None:
        self.parts.append(text)

    def flush(self) -> None:
        atomic_write_text(self.path, "".join(self.parts))

    def close(self) -> None:
        pass


def _drop_records_after(path: epath.Path, step: int) -> int:
    """Rewrites `path` (atomically) without the records whose step is after `step`; how many went."""
    if not path.exists():
        return 0
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                break  # a last line cut short by the crash
            raise ValueError(f"{path}:{number}: not a JSON metrics record ({e})") from e
        if record.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if "".join(kept) != text:
        atomic_write_text(path, "".join(kept))
    return len(lines) - len(kept)


def _plain(value):
    value = float(value) if hasattr(value, "__float__") and not isinstance(value, (int, str)) else value
    return value if not isinstance(value, float) or math.isfinite(value) else str(value)
