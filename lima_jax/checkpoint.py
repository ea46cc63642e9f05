"""Checkpoints with orbax.

Training checkpoints (`TrainCheckpoints`): `workdir/checkpoints/<step>/` with the train state and a JSON
`meta` item (epoch, position in the epoch, the model config). One is written at the end of every epoch;
with `train.snapshots="full"` all are kept (LIMA picks the epoch by reading dev-set answers), with "params"
the training loop keeps each epoch as a parameter snapshot and removes older full states. Orbax finalizes a
save only when it is complete (a renamed temporary folder locally, a commit marker on object stores), so a
crash never leaves a checkpoint that looks finished. All hosts
call save/restore together; each writes and reads only its own shards. `start_save` writes in the background
(orbax async: the loop goes on once the arrays are copied off the devices); `finish_save` waits and seals.

Parameter checkpoints (`save_params` / `restore_params`): a folder with `params/` (orbax) and
`model.json` (the ModelConfig): what `lima_jax.convert` writes and `config.init_from` reads.
`save_params_incrementally` writes the same kind of folder from parts of the tree (orbax partial saving),
so a converter never holds the whole model; such a `params/` keeps its tree in `params/state/`.

Every checkpoint ends with `lima_manifest.json` (`lima_jax.manifest`: size and CRC-32 of each file), written
once the checkpoint is complete, and every read verifies it first (`check_intact`). A training step folder
without one is a save that did not finish (or predates checksums); training never resumes from it.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import time
from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from lima_jax import distributed, manifest
from lima_jax.config import LLAMA3_ROPE_FIELDS, ModelConfig
from lima_jax.errors import CheckpointError, ConfigError
from lima_jax.paths import PathLike, as_path

PARAMS_DIR = "params"
MODEL_FILE = "model.json"
SET_ASIDE = "set_aside"  # under the checkpoints folder: step folders training will not resume from, kept


def aside_target(folder: epath.Path, name: str) -> epath.Path:
    """`folder/name`, or `folder/name.N` with the first N not taken: where a set-aside folder goes, never
    replacing one set aside before."""
    target, suffix = folder / name, 1
    while target.exists():
        suffix += 1
        target = folder / f"{name}.{suffix}"
    return target


def _this_shard() -> manifest.Shard:
    return manifest.Shard(jax.process_index(), jax.process_count())


def seal(folder: PathLike) -> None:
    """Writes the manifest of a complete checkpoint folder; every process calls it together (each checksums its
    share of the files, host 0 merges)."""
    folder = as_path(folder)
    distributed.barrier("seal_start")  # every host's files are in place
    manifest.write_manifest(folder, _this_shard())
    if jax.process_count() > 1:
        distributed.barrier("seal_parts")
        if jax.process_index() == 0:
            manifest.merge_parts(folder, jax.process_count())
        distributed.barrier("seal_done")


def verify_folder(folder: PathLike) -> list[str]:
    """The problems of a checkpoint folder ("<file>: <what>"), found by all processes together, each reading
    its share of the files; every process gets a non-empty list when any found one."""
    problems = manifest.verify(folder, _this_shard())
    if not distributed.all_processes_ok(not problems) and not problems:
        problems = ["another process found corrupt files (see its log)"]
    return problems


def describe_problems(folder: PathLike, problems: list[str], limit: int = 5) -> str:
    shown = "; ".join(f"{as_path(folder)}/{p}" for p in problems[:limit])
    return shown + (f"; and {len(problems) - limit} more" if len(problems) > limit else "")


def check_intact(folder: PathLike) -> None:
    """Raises CheckpointError naming the folder and the files when a checkpoint does not match its manifest;
    a checkpoint without a manifest (written before checksums) is read with a warning."""
    folder = as_path(folder)
    if not manifest.has_manifest(folder):
        logging.warning("%s: no %s, so it cannot be verified (written before lima_jax recorded checksums, or "
                        "its save did not finish); reading it anyway. `python -m lima_jax.verify --adopt %s` "
                        "records checksums for it.", folder, manifest.MANIFEST, folder)
        return
    problems = verify_folder(folder)
    if problems:
        raise CheckpointError(f"{folder}: corrupt checkpoint, not used: {describe_problems(folder, problems)}")


def has_train_checkpoints(directory: PathLike) -> bool:
    """Whether `directory` holds a finished training checkpoint (orbax's temporary folders don't count)."""
    directory = as_path(directory)
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def is_params_checkpoint(folder: PathLike) -> bool:
    """A parameter checkpoint: `model.json` + `params/` (what `lima_jax.convert` writes)."""
    return (as_path(folder) / MODEL_FILE).is_file()


def is_train_step_folder(folder: PathLike) -> bool:
    """One training checkpoint: `state/` + `meta/`."""
    folder = as_path(folder)
    return (folder / "state").is_dir() and (folder / "meta").is_dir()


class TrainCheckpoints:
    """Per-epoch (and optionally periodic) training checkpoints under `directory`; only `delete` removes one.

    `save` writes and seals one checkpoint before it returns. `start_save` returns once orbax holds a host copy
    of the arrays (so the caller may update or donate them) and writes them in the background; `finish_save`
    waits for that write and seals it. At most one save is in flight (`pending_step`); a folder whose save is in
    flight has no manifest, so nothing takes it for complete until `finish_save` sealed it."""

    def __init__(self, directory: PathLike):
        self.directory = as_path(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True,
                                                                 enable_async_checkpointing=True),
            item_names=("state", "meta"))
        self.pending_step: int | None = None
        self._pending_since = 0.0
        self.last_blocking_s = self.last_save_s = self.last_seal_s = 0.0

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Writes and seals the checkpoint of `step` (an in-flight save is finished first)."""
        self.start_save(step, state, meta)
        self.finish_save()

    def start_save(self, step: int, state: Any, meta: dict) -> None:
        """Starts writing the checkpoint of `step`; returns once the arrays are copied off the devices (every
        host calls it together). An earlier save still in flight is finished and sealed first."""
        self.finish_save()
        tic = time.perf_counter()
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))
        self.pending_step, self._pending_since = step, tic
        self.last_blocking_s = time.perf_counter() - tic

    def written_here(self) -> bool:
        """Whether this host's part of the save in flight is written (True when none is): a local view, to be
        agreed on by all hosts before anyone calls `finish_save` on its strength."""
        return self.pending_step is None or not self.manager.is_saving_in_progress()

    def finish_save(self) -> int | None:
        """Waits for the save in flight, then seals it (every host calls it together); its step, or None when no
        save was in flight. A save that failed raises here, unsealed."""
        step = self.pending_step
        if step is None:
            return None
        self.pending_step = None  # a failed write stays unsealed: resuming sets it aside
        self.manager.wait_until_finished()
        self.manager.check_for_errors()
        saved = time.perf_counter()
        seal(self.step_folder(step))
        self.last_save_s, self.last_seal_s = saved - self._pending_since, time.perf_counter() - saved
        logging.info("checkpoint %s: written in %.2f s (%.2f s of it blocking the loop), checksums in %.2f s",
                     self.step_folder(step), self.last_save_s, self.last_blocking_s, self.last_seal_s)
        return step

    def step_folder(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def delete(self, step: int) -> None:
        """Removes one step folder (orbax's delete; every host calls it)."""
        self.manager.delete(step)

    def is_sealed(self, step: int) -> bool:
        """Whether the step's save finished: its manifest, written last, exists."""
        return manifest.has_manifest(self.step_folder(step))

    def set_aside(self, step: int) -> epath.Path:
        """Moves a step folder to `<checkpoints>/set_aside/<step>[.N]`, out of training's way but kept (host 0;
        every host calls it). The manager is reloaded so it no longer lists the step.

        Host 0 names the target (another host's view may already hold the moved folder), and no host returns
        before every host has reloaded: the next set-aside's rename must not change the folder under a listing."""
        target = as_path(distributed.main_process_text(
            f"set_aside_target_{step}", str(aside_target(self.directory / SET_ASIDE, str(step)))))
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.step_folder(step).rename(target)
        distributed.barrier(f"set_aside_{step}")
        self.manager.reload()
        distributed.barrier(f"set_aside_reloaded_{step}")
        return target

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores onto the shardings of `abstract_state` (jax.ShapeDtypeStruct leaves with .sharding).
        Verify the step first (`verify_folder`): orbax reads whatever bytes it finds."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def close(self) -> None:
        """Closes the manager; a save still in flight (the loop ended by an error) is written but not sealed."""
        if self.pending_step is not None:
            logging.warning("checkpoint %s: the run ended while it was being written; it is left without a "
                            "manifest, so resuming sets it aside", self.step_folder(self.pending_step))
        self.manager.close()


def save_params(directory: PathLike, params: Any, model: ModelConfig, extra: dict | None = None) -> None:
    """Writes `params/` and `model.json` (plus `extra` metadata) into `directory`."""
    directory = as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:  # an earlier, interrupted save here must not look complete
        for marker in (directory / manifest.MANIFEST, directory / MODEL_FILE):
            marker.unlink(missing_ok=True)
        manifest.remove_parts(directory)
    distributed.barrier("save_params_start")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / PARAMS_DIR, params, force=True)
    meta = {"model": dataclasses.asdict(model), **(extra or {})}
    if jax.process_index() == 0:
        (directory / MODEL_FILE).write_text(json.dumps(meta, indent=2))
    seal(directory)


def read_params_meta(directory: PathLike) -> dict:
    path = as_path(directory) / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not a lima_jax parameter checkpoint (no model.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_train_meta(step_dir: PathLike) -> dict:
    """The JSON `meta` item of one training checkpoint (epoch, position, model config)."""
    step_dir = as_path(step_dir)
    try:
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
            return ckptr.restore(step_dir / "meta")
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{step_dir}/meta: unreadable training checkpoint metadata ({e})") from None


def save_params_incrementally(directory: PathLike, parts: Iterable[dict], model: ModelConfig,
                              extra: dict | None = None) -> None:
    """Like `save_params`, but from disjoint sub-trees written one after another (each can be freed once
    written): peak memory is the largest part. Single-process (conversion) use."""
    from orbax.checkpoint.experimental.v1 import partial
    directory = as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / PARAMS_DIR
    (directory / MODEL_FILE).unlink(missing_ok=True)  # written last: its presence means complete
    (directory / manifest.MANIFEST).unlink(missing_ok=True)
    for stale in (target, *directory.glob("params.partial_save*")):  # incl. an interrupted earlier session
        if stale.exists():
            stale.rmtree()
    for part in parts:
        partial.save(target, part)
        del part  # before the next part is built
        _return_freed_memory()
    partial.finalize(target)
    meta = {"model": dataclasses.asdict(model), **(extra or {})}
    (directory / MODEL_FILE).write_text(json.dumps(meta, indent=2))
    manifest.write_manifest(directory)


def _return_freed_memory() -> None:
    """Hands freed heap back to the OS (glibc's malloc_trim; a no-op elsewhere). Tensorstore's writer
    threads leave freed buffers in per-thread arenas: without this the RSS of a conversion creeps up by
    about one parameter kind per save instead of staying flat."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tree_dir(directory: PathLike) -> epath.Path:
    """`params/`, or `params/state/` when it was written by `save_params_incrementally`."""
    path = as_path(directory) / PARAMS_DIR
    return path / "state" if (path / "state" / "_METADATA").is_file() else path


def check_readable(folder: PathLike) -> None:
    """Raises CheckpointError unless orbax reads the checkpoint's metadata (tree, shapes) and its JSON meta; the
    arrays themselves are not loaded."""
    folder = as_path(folder)
    params = is_params_checkpoint(folder)
    try:
        read_params_meta(folder) if params else read_train_meta(folder)
        with ocp.PyTreeCheckpointer() as ckptr:
            ckptr.metadata(_tree_dir(folder) if params else folder / "state")
    except CheckpointError:
        raise
    except Exception as e:  # orbax/tensorstore raise many types for a damaged folder
        raise CheckpointError(f"{folder}: unreadable checkpoint ({type(e).__name__}: {e})") from None


def restore_params(directory: PathLike, abstract_params: Any = None) -> Any:
    """Reads `params/`; with `abstract_params` (ShapeDtypeStructs with shardings) straight onto the mesh,
    cast to their dtypes. Without, as stored (numpy arrays). Verified against its manifest first."""
    check_intact(directory)
    with ocp.StandardCheckpointer() as ckptr:
        path = _tree_dir(directory)
        return ckptr.restore(path, abstract_params) if abstract_params is not None else ckptr.restore(path)


def restore_train_params(step_dir: PathLike, abstract_params: Any = None) -> tuple[Any, ModelConfig]:
    """(params, ModelConfig) of one `TrainCheckpoints` step folder; the optimizer state is never read.

    With `abstract_params` (ShapeDtypeStructs with shardings) the parameters go straight onto the mesh,
    cast to their dtypes; without, they come back as numpy arrays."""
    step_dir = as_path(step_dir)
    check_intact(step_dir)
    meta = read_train_meta(step_dir)
    with ocp.PyTreeCheckpointer() as ckptr:
        if abstract_params is None:
            tree = ckptr.metadata(step_dir / "state").item_metadata.tree["params"]
            item = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
            restore_args = item
        else:
            item = abstract_params
            restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype),
                                        abstract_params)
        restored = ckptr.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
            item={"params": item}, restore_args={"params": restore_args}, partial_restore=True))
    return restored["params"], ModelConfig(**meta["model"])


# Fields that change what the network computes; a mismatch would load fine and silently compute another
# function (vocab_size is checked separately: a pretrained model may lack the EOT row).
ARCHITECTURE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "tie_embeddings", "rope_theta",
                       "rope_type", *LLAMA3_ROPE_FIELDS, "norm_eps")
# What a model.json written before the RoPE scaling fields existed means by their absence: plain RoPE.
_ABSENT_ROPE = {"rope_type": "default", **{field: None for field in LLAMA3_ROPE_FIELDS}}


def check_model_matches(stored: dict, model: ModelConfig, where: str, allow_smaller_vocab: bool = False) -> None:
    """Raises ConfigError naming `where` and the field when a checkpoint's model differs from the config's.

    With `allow_smaller_vocab` the checkpoint may lack rows the config has (the EOT row of a pretrained
    model, added on load by `model.resize_vocab`)."""
    stored = {**_ABSENT_ROPE, **stored}
    for field in ARCHITECTURE_FIELDS:
        if stored[field] != getattr(model, field):
            raise ConfigError(f"{where}: checkpoint has model.{field}={stored[field]}, the config has "
                              f"{getattr(model, field)}")
    vocab = stored["vocab_size"]
    if vocab == model.vocab_size or (allow_smaller_vocab and vocab < model.vocab_size):
        return
    hint = (" (a pretrained model without the EOT row: fine-tune it first, or set "
            f"--config.model.vocab_size={vocab})" if vocab < model.vocab_size else "")
    raise ConfigError(f"{where}: checkpoint vocabulary {vocab} differs from the config's model vocabulary "
                      f"{model.vocab_size} (tokenizer + EOT){hint}")


# Fields that may differ on resume: they change memory use and speed, not what the network computes.
RESUMABLE_MODEL_CHANGES = ("remat_policy", "attention", "attention_block", "scan_unroll")


def check_resume_matches(stored: dict, model: ModelConfig, where: str) -> None:
    """Raises ConfigError naming every model field where the config differs from what the run's checkpoint was
    trained with (all of ModelConfig but `RESUMABLE_MODEL_CHANGES`); a field an older checkpoint lacks had its
    default then (e.g. `vocab_multiple` 1: no padding), a field without a default passes."""
    current = dataclasses.asdict(model)
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.default is not dataclasses.MISSING}
    stored = {**{k: v for k, v in defaults.items() if k not in stored}, **stored}
    differing = [f"model.{name}: checkpoint {stored[name]!r}, config {value!r}" for name, value in current.items()
                 if name not in RESUMABLE_MODEL_CHANGES and name in stored and stored[name] != value]
    if differing:
        raise ConfigError(f"{where}: this run was trained with a different model than the config describes "
                          f"({'; '.join(differing)}). Resume with the run's own config (config.json in the "
                          "workdir), or start a new workdir with --config.init_from=<this workdir> to fine-tune "
                          "from it.")
