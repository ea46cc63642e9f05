"""Training metrics to three places at once, from host 0 only: the console (with progress), TensorBoard
event files (`workdir/tensorboard`, via tensorboardX: no TensorFlow needed) and `workdir/metrics.jsonl`
(one JSON object per logged step, easy to load with pandas).

A gs:// workdir: tensorboardX writes its event files there itself (google-cloud-storage, a dependency of
gcsfs), re-uploading the file at each flush; metrics.jsonl, as object stores cannot append, is kept in
memory and re-uploaded whole at each logged step (one object write per step, never half a file).

Goodput (`Goodput`, `workdir/goodput.json`): where each run's wall time went (productive steps, start-up and
compile, checkpoint saves, end-of-epoch hooks) and the step time an interrupted run spent after its last
checkpoint, which the next run redoes; per run and summed over every restart of the workdir.

The writing (file appends, uploads, TensorBoard flushes, the console line) happens in order on one background
thread, so a training step never waits for it; `flush` waits until everything logged so far is written (the
training loop calls it before a checkpoint is saved, so no line of a saved step is lost with a kill)."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import queue
import threading
import time
from typing import Callable

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
        self.redone_steps, self.redone_s = 0, 0.0
        if not self.enabled:
            return
        run.root.mkdir(parents=True, exist_ok=True)
        path = run.metrics
        dropped = _drop_records_after(path, resumed_at)
        self.redone_steps, self.redone_s = len(dropped), sum(_step_seconds(r) for r in dropped)
        if dropped:
            logging.info("%s: dropped %d records after step %d, logged by the interrupted run (%.1f s of steps to "
                         "redo)", path, len(dropped), resumed_at, self.redone_s)
        self._tensorboard = _InBackground(_summary_writer, str(run.tensorboard), resumed_at + 1)
        self.jsonl = _ObjectJsonl(path) if is_remote(path) else path.open("a", encoding="utf-8")
        self._writes = _InOrder("lima-metrics")

    @property
    def tensorboard(self):
        """The tensorboardX SummaryWriter (waits for its creation in the background, if still under way)."""
        return self._tensorboard.result()

    def write(self, step: int, metrics: dict[str, float]) -> None:
        """Logs `metrics` of the 1-based global `step` (written on the background thread)."""
        if not self.enabled:
            return
        if self.start_step is None:
            self.start_step = step - 1
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._writes.submit(functools.partial(self._write_now, step, record, dict(metrics),
                                              self._progress_line(step, metrics)))

    def _write_now(self, step: int, record: dict, metrics: dict, progress: str) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "epoch":
                self.tensorboard.add_scalar(f"train/{key}", value, step)
        self.tensorboard.flush()
        logging.info("%s", progress)

    def scalar(self, tag: str, value: float, step: int) -> None:
        """One TensorBoard scalar (e.g. a dev-report figure), written in order with the metrics."""
        if self.enabled:
            self._writes.submit(lambda: self.tensorboard.add_scalar(tag, value, step))

    def flush(self) -> None:
        """Waits until everything logged so far is written; raises the first error in writing it."""
        if self.enabled:
            self._writes.wait()

    def _progress_line(self, step: int, m: dict) -> str:
        elapsed = time.time() - self.start_time
        done = step - (self.start_step or 0)
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        return (f"epoch {m.get('epoch', 0)} step {step}/{self.total_steps} [{100 * step / self.total_steps:5.1f}%] "
                f"loss {m['loss']:.4f} lr {m['learning_rate']:.2e} grad_norm {m['grad_norm']:.3f} "
                f"tokens/s {m.get('tokens_per_s', 0):,.0f} eta {eta:,.0f}s")

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self._writes.submit(lambda: self.tensorboard.add_text(tag, text, step))

    def close(self, raise_error: bool = True) -> None:
        """Writes what is still queued and closes the files. A failure in writing is raised (once: a `write` or
        `flush` may have raised it already), or with `raise_error=False` (an error of the caller's is already
        propagating) logged."""
        if not self.enabled:
            return
        self._writes.stop()
        try:
            self.tensorboard.close()
            self.jsonl.close()
        except Exception as e:  # noqa: BLE001 (reported below like a failed write)
            self._writes.error = self._writes.error or e
        if raise_error:
            self._writes.wait()
        elif self._writes.error is not None:
            logging.error("writing the metrics failed: %s", self._writes.error)


def _summary_writer(logdir: str, purge_step: int):
    from tensorboardX import SummaryWriter  # imports torch when it is installed: seconds
    return SummaryWriter(logdir=logdir, purge_step=purge_step)


class _InBackground:
    """`fn(*args)` run in a daemon thread from now on; `result()` waits for it and returns it (or raises its
    error). The TensorBoard writer is made this way so that importing tensorboardX (and torch, when present:
    ~1.2 s on an idle CPU) overlaps the compilation of the first step instead of delaying it."""

    def __init__(self, fn, *args):
        self._outcome: dict = {}
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True, name=f"lima-{fn.__name__}")
        self._thread.start()

    def _run(self, fn, args) -> None:
        try:
            self._outcome["value"] = fn(*args)
        except BaseException as e:  # re-raised in the caller's thread by result()
            self._outcome["error"] = e

    def result(self):
        self._thread.join()
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["value"]


class _InOrder:
    """Runs submitted calls one after another on a daemon thread. The first call that fails stops the writing:
    its error is raised once, by the next `submit` or `wait` in the caller's thread, and later calls are not
    queued (the caller has been told)."""

    def __init__(self, name: str):
        self._calls: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self._raised = False
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def _run(self) -> None:
        while True:
            call = self._calls.get()
            try:
                if call is None:
                    return
                if self.error is None:
                    call()
            except BaseException as e:  # noqa: BLE001 (raised in the caller's thread)
                self.error = e
            finally:
                self._calls.task_done()

    def _raise_error(self) -> None:
        if self.error is not None and not self._raised:
            self._raised = True
            raise self.error

    def submit(self, call: Callable[[], None]) -> None:
        self._raise_error()
        if self.error is None:
            self._calls.put(call)

    def wait(self) -> None:
        self._calls.join()
        self._raise_error()

    def stop(self) -> None:
        """Runs what is queued, then ends the thread."""
        self._calls.put(None)
        self._thread.join()


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


def _drop_records_after(path: epath.Path, step: int) -> list[dict]:
    """Rewrites `path` (atomically) without the records whose step is after `step`; the records that went."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    kept, dropped = [], []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                break  # a last line cut short by the crash
            raise ValueError(f"{path}:{number}: not a JSON metrics record ({e})") from e
        if record.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
        else:
            dropped.append(record)
    if "".join(kept) != text:
        atomic_write_text(path, "".join(kept))
    return dropped


def _step_seconds(record: dict) -> float:
    """A logged step's duration: `step_s`, or (records of older runs) tokens / tokens_per_s."""
    if isinstance(record.get("step_s"), (int, float)):
        return float(record["step_s"])
    rate = record.get("tokens_per_s")
    return float(record.get("tokens", 0)) / rate if isinstance(rate, (int, float)) and rate > 0 else 0.0


@dataclasses.dataclass
class Goodput:
    """Where one run's wall time goes. Productive: the optimizer steps after the run's first (whose time, with
    the compilation in it, counts as start-up, like loading, restoring and compiling before it). Lost: start-up,
    checkpoint saves, end-of-epoch hooks (dev reports), and `redone_s`, the step time an interrupted earlier run
    spent after its last checkpoint. `earlier` holds the records of the workdir's earlier runs."""

    started: float = dataclasses.field(default_factory=time.time)
    steps: int = 0
    steps_s: float = 0.0
    checkpoint_s: float = 0.0
    hooks_s: float = 0.0
    redone_steps: int = 0
    redone_s: float = 0.0
    earlier: list = dataclasses.field(default_factory=list)

    def step(self, seconds: float) -> None:
        self.steps += 1
        if self.steps > 1:
            self.steps_s += seconds

    def record(self) -> dict:
        """This run so far, as stored in goodput.json."""
        wall = time.time() - self.started
        return {"started": self.started, "wall_s": wall, "productive_s": self.steps_s,
                "startup_and_compile_s": max(wall - self.steps_s - self.checkpoint_s - self.hooks_s, 0.0),
                "checkpoint_s": self.checkpoint_s, "hooks_s": self.hooks_s, "steps": self.steps,
                "redone_steps": self.redone_steps, "redone_s": self.redone_s}

    def totals(self) -> dict:
        """Every run of the workdir so far, summed; `goodput` = productive / (wall + redone)."""
        runs = [*self.earlier, self.record()]
        total = {key: sum(r.get(key, 0) for r in runs) for key in
                 ("wall_s", "productive_s", "startup_and_compile_s", "checkpoint_s", "hooks_s", "redone_s")}
        total["runs"] = len(runs)
        total["goodput"] = total["productive_s"] / max(total["wall_s"] + total["redone_s"], 1e-9)
        return total

    def save(self, path: epath.Path) -> None:
        """Host 0: goodput.json = the earlier runs, this one, and the totals."""
        if jax.process_index() == 0:
            atomic_write_text(path, json.dumps({"runs": [*self.earlier, self.record()], "total": self.totals()},
                                               indent=1) + "\n")

    def after_earlier_runs(self, path: epath.Path, redone_steps: int, redone_s: float) -> None:
        """Continues the accounting of the runs `path` records (none if absent or unreadable); this run redoes
        `redone_steps` steps that took `redone_s` in the interrupted run."""
        self.redone_steps, self.redone_s = redone_steps, redone_s
        if not path.exists():
            return
        try:
            self.earlier = list(json.loads(path.read_text(encoding="utf-8"))["runs"])
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            logging.warning("%s: unreadable (%s): goodput counts from this run on", path, e)

    def summary(self) -> str:
        run, total = self.record(), self.totals()
        lost = (f"start-up and compile {run['startup_and_compile_s']:.1f} s, checkpoints {run['checkpoint_s']:.1f} "
                f"s, dev reports {run['hooks_s']:.1f} s, redone {run['redone_s']:.1f} s ({run['redone_steps']} steps)")
        return (f"goodput: this run {run['productive_s'] / max(run['wall_s'] + run['redone_s'], 1e-9):.1%} "
                f"({run['productive_s']:.1f} s of steps in {run['wall_s']:.1f} s; lost: {lost}); all "
                f"{total['runs']} run(s) of this workdir {total['goodput']:.1%} ({total['productive_s']:.1f} s of "
                f"{total['wall_s'] + total['redone_s']:.1f} s)")


def _plain(value):
    value = float(value) if hasattr(value, "__float__") and not isinstance(value, (int, str)) else value
    return value if not isinstance(value, float) or math.isfinite(value) else str(value)
