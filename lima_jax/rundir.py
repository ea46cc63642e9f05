"""The run directory (`config.workdir`): the one place that names its files and folders, and that decides which
checkpoint a tool uses.

  WORKDIR/
    config.json            the run's full config (what `generate`, `report` and `convert to_hf` read)
    run.lock               held by the training run that writes here (lima_jax.runlock); gone when it ends
    checkpoints/<step>/    training checkpoints: state/ + meta/ + lima_manifest.json (lima_jax.checkpoint)
    checkpoints/set_aside/ step folders training did not resume from (unfinished, or after train.resume_step)
    snapshots/epoch_NNN/   with train.snapshots="params": each epoch's parameters (model.json + params/), for
                           choosing by hand; the full state is then kept only in the newest checkpoints/<step>
    metrics.jsonl          one JSON object per logged step
    goodput.json           where each run's time went (productive steps vs start-up, saves, hooks, redone)
    tensorboard/           TensorBoard event files
    dev_reports/epoch_NNN.jsonl   dev-set answers per epoch
    dev_report.html / .md  the answers of all epochs side by side
    chosen_epoch.json      the epoch a person chose (`python -m lima_jax.report choose`)
    layouts/               `python -m lima_jax.layouts` output

Paths are `etils.epath` paths: a local folder or a `gs://` URL.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any

from absl import logging
from etils import epath

from lima_jax.checkpoint import (SET_ASIDE, TrainCheckpoints, is_params_checkpoint, is_train_step_folder,
                                 read_params_meta, read_train_meta, restore_params, restore_train_params)
from lima_jax.config import ModelConfig
from lima_jax.errors import CheckpointError
from lima_jax.manifest import has_manifest
from lima_jax.paths import PathLike, as_path, atomic_write_text

CONFIG = "config.json"
LOCK = "run.lock"
CHECKPOINTS = "checkpoints"
SNAPSHOTS = "snapshots"
METRICS = "metrics.jsonl"
GOODPUT = "goodput.json"
TENSORBOARD = "tensorboard"
DEV_REPORTS = "dev_reports"
DEV_REPORT_HTML = "dev_report.html"
DEV_REPORT_MD = "dev_report.md"
CHOSEN_EPOCH = "chosen_epoch.json"
LAYOUTS = "layouts"


def _entry(name: str) -> property:
    return property(lambda self: self.root / name, doc=f"`<workdir>/{name}`")


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The paths of one run directory."""

    root: epath.Path

    @classmethod
    def at(cls, workdir: PathLike) -> "RunDir":
        return cls(as_path(workdir))

    config = _entry(CONFIG)
    lock = _entry(LOCK)
    checkpoints = _entry(CHECKPOINTS)
    snapshots = _entry(SNAPSHOTS)
    metrics = _entry(METRICS)
    goodput = _entry(GOODPUT)
    tensorboard = _entry(TENSORBOARD)
    dev_reports = _entry(DEV_REPORTS)
    dev_report_html = _entry(DEV_REPORT_HTML)
    dev_report_md = _entry(DEV_REPORT_MD)
    chosen_epoch = _entry(CHOSEN_EPOCH)
    layouts = _entry(LAYOUTS)

    def epoch_answers(self, epoch: int) -> epath.Path:
        return self.dev_reports / f"epoch_{epoch:03d}.jsonl"

    def step_folder(self, step: int) -> epath.Path:
        return self.checkpoints / str(step)

    def snapshot(self, epoch: int) -> epath.Path:
        return self.snapshots / f"{SNAPSHOT_PREFIX}{epoch:03d}"

    def is_run(self) -> bool:
        return self.checkpoints.is_dir()


# ------------------------------------------------------------------------------------ epochs and the marker


@dataclasses.dataclass(frozen=True)
class EpochCheckpoint:
    """The checkpoint that holds an epoch's end: `folder` relative to the workdir, and its step."""

    step: int
    folder: str


def epoch_checkpoints(workdir: PathLike) -> dict[int, EpochCheckpoint]:
    """{epoch: its checkpoint} of a run: the parameter snapshot (`snapshots/epoch_NNN`, which outlives the full
    state) where one was written, else the end-of-epoch training checkpoint."""
    run = RunDir.at(workdir)
    if not run.checkpoints.is_dir():
        raise CheckpointError(f"{run.checkpoints}: no training checkpoints here")
    found = {}
    checkpoints = TrainCheckpoints(run.checkpoints)
    try:
        for step in checkpoints.all_steps():
            try:
                meta = checkpoints.read_meta(step)
            except Exception as e:  # a damaged step is no epoch's checkpoint; `verify` names what is wrong
                logging.warning("%s: unreadable meta, skipped (%s)", run.step_folder(step), type(e).__name__)
                continue
            if meta.get("end_of_epoch"):
                found[int(meta["epoch"])] = EpochCheckpoint(step, f"{CHECKPOINTS}/{step}")
    finally:
        checkpoints.close()
    for folder, _ in snapshot_folders(run):
        if is_params_checkpoint(folder) and has_manifest(folder):  # sealed: the snapshot is complete
            meta = read_params_meta(folder)
            found[int(meta["epoch"])] = EpochCheckpoint(int(meta["step"]), f"{SNAPSHOTS}/{folder.name}")
    return dict(sorted(found.items()))


def mark_chosen_epoch(workdir: PathLike, epoch: int, note: str = "") -> dict:
    """Writes `chosen_epoch.json` for `epoch`'s checkpoint (which must exist)."""
    run = RunDir.at(workdir)
    epochs = epoch_checkpoints(run.root)
    if epoch not in epochs:
        raise CheckpointError(f"{run.root}: no end-of-epoch checkpoint for epoch {epoch}; have epochs {sorted(epochs)}")
    marker = {"epoch": epoch, "step": epochs[epoch].step, "checkpoint": epochs[epoch].folder, "note": note,
              "chosen_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    atomic_write_text(run.chosen_epoch, json.dumps(marker, indent=2) + "\n")
    return marker


def read_chosen_epoch(workdir: PathLike) -> dict | None:
    """The marker written by `mark_chosen_epoch`, or None when no epoch was chosen."""
    path = RunDir.at(workdir).chosen_epoch
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        int(marker["epoch"]), str(marker["checkpoint"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed chosen-epoch marker ({e}); rewrite it with "
                              "`python -m lima_jax.report choose`") from None
    return marker


def chosen_checkpoint(workdir: PathLike) -> epath.Path | None:
    """The checkpoint folder of the chosen epoch, or None if none was chosen; CheckpointError if it is gone."""
    marker = read_chosen_epoch(workdir)
    if marker is None:
        return None
    run = RunDir.at(workdir)
    folder = run.root / marker["checkpoint"]
    if not folder.is_dir():
        raise CheckpointError(f"{run.chosen_epoch}: epoch {marker['epoch']} points at {folder}, which does not exist")
    return folder


# ------------------------------------------------------------------------------------- which checkpoint


def run_config_of(path: PathLike) -> epath.Path | None:
    """The `config.json` of the run that `path` (a run directory, one of its step folders or snapshots) belongs
    to, or None."""
    path = as_path(path)
    roots = (path, path.parent.parent) if path.parent.name in (CHECKPOINTS, SNAPSHOTS) else (path,)
    for root in roots:
        if RunDir(root).config.is_file():
            return RunDir(root).config
    return None


@dataclasses.dataclass(frozen=True)
class CheckpointChoice:
    """The checkpoint a tool uses and why: `kind` "train" (a step folder) or "params" (a parameter folder);
    `reason` "chosen" (the run's chosen epoch), "latest" (no epoch chosen) or "given" (named directly)."""

    kind: str
    folder: epath.Path
    reason: str
    step: int | None = None
    epoch: int | None = None

    def describe(self) -> str:
        where = ", ".join(f"{k} {v}" for k, v in (("step", self.step), ("epoch", self.epoch)) if v is not None)
        why = {"chosen": "the run's chosen epoch (chosen_epoch.json)",
               "latest": "the latest checkpoint: no epoch chosen (python -m lima_jax.report choose)",
               "given": "named directly"}[self.reason]
        kind = "training checkpoint" if self.kind == "train" else "parameter checkpoint"
        return f"{kind} {self.folder}{f' ({where})' if where else ''}: {why}"


def resolve_checkpoint(path: PathLike) -> CheckpointChoice:
    """The checkpoint `path` stands for: a parameter checkpoint (model.json + params/), a training step folder
    (state/ + meta/), or a run directory: its chosen epoch, else its latest checkpoint."""
    path = as_path(path)
    if is_params_checkpoint(path):
        return CheckpointChoice("params", path, "given")
    if is_train_step_folder(path):
        return _with_meta(CheckpointChoice("train", path, "given", step=_step_of(path)))
    run = RunDir(path)
    if run.is_run():
        marker = read_chosen_epoch(path)
        chosen = chosen_checkpoint(path)
        if chosen is not None:
            kind = "params" if is_params_checkpoint(chosen) else "train"
            return CheckpointChoice(kind, chosen, "chosen", step=int(marker["step"]), epoch=int(marker["epoch"]))
        manager = TrainCheckpoints(run.checkpoints)
        try:
            latest = manager.latest_step()
        finally:
            manager.close()
        if latest is not None:
            return _with_meta(CheckpointChoice("train", run.step_folder(latest), "latest", step=latest))
    raise CheckpointError(f"{path}: not a training workdir (checkpoints/), a training checkpoint step folder "
                          "(state/ + meta/) or a parameter checkpoint (model.json + params/)")


def _step_of(folder: epath.Path) -> int | None:
    return int(folder.name) if folder.name.isdigit() else None


def _with_meta(choice: CheckpointChoice) -> CheckpointChoice:
    """`choice` with the epoch its meta item records."""
    try:
        meta = read_train_meta(choice.folder)
    except CheckpointError as e:
        logging.warning("%s", e)
        return choice
    return dataclasses.replace(choice, epoch=meta.get("epoch"), step=meta.get("step", choice.step))


def stored_model_config(choice: CheckpointChoice) -> dict:
    """The model config saved with a checkpoint, read without loading weights."""
    if choice.kind == "params":
        return read_params_meta(choice.folder)["model"]
    return read_train_meta(choice.folder)["model"]


def load_checkpoint_params(choice: CheckpointChoice, abstract_params: Any = None) -> tuple[Any, ModelConfig]:
    """(params, ModelConfig) of a checkpoint; with `abstract_params` (ShapeDtypeStructs with shardings)
    straight onto the mesh, cast to their dtypes; without, as numpy arrays. Never reads optimizer state."""
    if choice.kind == "train":
        return restore_train_params(choice.folder, abstract_params)
    return restore_params(choice.folder, abstract_params), ModelConfig(**read_params_meta(choice.folder)["model"])


def checkpoint_folders(path: PathLike) -> list[epath.Path]:
    """Every checkpoint `path` holds: a run directory's step folders (in step order), its snapshots, the set-aside
    step folders, or
    `path` itself when it is one step folder or a parameter checkpoint."""
    path = as_path(path)
    if is_params_checkpoint(path) or is_train_step_folder(path):
        return [path]
    run = RunDir(path)
    if not run.is_run():
        raise CheckpointError(f"{path}: not a training workdir (checkpoints/), a training checkpoint step folder "
                              "(state/ + meta/) or a parameter checkpoint (model.json + params/)")
    steps = sorted((p for p in run.checkpoints.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    set_aside = run.checkpoints / SET_ASIDE
    aside = sorted(p for p in set_aside.iterdir() if is_train_step_folder(p)) if set_aside.is_dir() else []
    snapshots = [folder for folder, _ in snapshot_folders(run)]
    return steps + snapshots + aside


SNAPSHOT_PREFIX = "epoch_"


def snapshot_folders(run: RunDir) -> list[tuple[epath.Path, int]]:
    """(folder, epoch) of every `snapshots/epoch_NNN` of a run, complete or not, in epoch order."""
    if not run.snapshots.is_dir():
        return []
    found = [(p, int(p.name[len(SNAPSHOT_PREFIX):])) for p in run.snapshots.iterdir()
             if p.name.startswith(SNAPSHOT_PREFIX) and p.name[len(SNAPSHOT_PREFIX):].isdigit()]
    return sorted(found, key=lambda item: item[1])
