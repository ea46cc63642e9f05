"""Checkpoints with orbax.

Training checkpoints (`TrainCheckpoints`): `workdir/checkpoints/<step>/` with the train state and a JSON
`meta` item (epoch, position in the epoch, the model config). One is written at the end of every epoch
and all are kept, because LIMA picks the epoch by reading dev-set answers. Orbax writes into a temporary
folder and renames it when complete, so a crash never leaves a checkpoint that looks finished. All hosts
call save/restore together; each writes and reads only its own shards.

Parameter checkpoints (`save_params` / `restore_params`): a folder with `params/` (orbax) and
`model.json` (the ModelConfig): what `lima_jax.convert` writes and `config.init_from` reads.
`save_params_incrementally` writes the same kind of folder from parts of the tree (orbax partial saving),
so a converter never holds the whole model; such a `params/` keeps its tree in `params/state/`.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import pathlib
import shutil
from typing import Any, Iterable

import jax
from absl import logging
import numpy as np
import orbax.checkpoint as ocp

from lima_jax.config import ConfigError, ModelConfig


def _abspath(path: str | pathlib.Path) -> str:
    path = str(path)
    return path if "://" in path else str(pathlib.Path(path).resolve())


def has_train_checkpoints(directory: str | pathlib.Path) -> bool:
    """Whether `directory` holds a finished training checkpoint (orbax's temporary folders don't count)."""
    directory = pathlib.Path(directory)
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


class TrainCheckpoints:
    """Per-epoch (and optionally periodic) training checkpoints under `directory`, none ever deleted."""

    def __init__(self, directory: str | pathlib.Path):
        self.directory = _abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True),
            item_names=("state", "meta"))

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores onto the shardings of `abstract_state` (jax.ShapeDtypeStruct leaves with .sharding)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def close(self) -> None:
        self.manager.close()


def save_params(directory: str | pathlib.Path, params: Any, model: ModelConfig, extra: dict | None = None) -> None:
    """Writes `params/` and `model.json` (plus `extra` metadata) into `directory`."""
    directory = pathlib.Path(_abspath(directory))
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params, force=True)
    meta = {"model": dataclasses.asdict(model), **(extra or {})}
    if jax.process_index() == 0:
        (directory / "model.json").write_text(json.dumps(meta, indent=2))


def read_params_meta(directory: str | pathlib.Path) -> dict:
    path = pathlib.Path(directory) / "model.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a lima_jax parameter checkpoint (no model.json)")
    return json.loads(path.read_text())


def save_params_incrementally(directory: str | pathlib.Path, parts: Iterable[dict], model: ModelConfig,
                              extra: dict | None = None) -> None:
    """Like `save_params`, but from disjoint sub-trees written one after another (each can be freed once
    written): peak memory is the largest part. Single-process (conversion) use."""
    from orbax.checkpoint.experimental.v1 import partial
    directory = pathlib.Path(_abspath(directory))
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "params"
    (directory / "model.json").unlink(missing_ok=True)  # written last: its presence means complete
    for stale in (target, *directory.glob("params.partial_save*")):  # incl. an interrupted earlier session
        if stale.exists():
            shutil.rmtree(stale)
    for part in parts:
        partial.save(target, part)
        del part  # before the next part is built
        _return_freed_memory()
    partial.finalize(target)
    meta = {"model": dataclasses.asdict(model), **(extra or {})}
    (directory / "model.json").write_text(json.dumps(meta, indent=2))


def _return_freed_memory() -> None:
    """Hands freed heap back to the OS (glibc's malloc_trim; a no-op elsewhere). Tensorstore's writer
    threads leave freed buffers in per-thread arenas: without this the RSS of a conversion creeps up by
    about one parameter kind per save instead of staying flat."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tree_dir(directory: str | pathlib.Path) -> pathlib.Path:
    """`params/`, or `params/state/` when it was written by `save_params_incrementally`."""
    path = pathlib.Path(_abspath(directory)) / "params"
    return path / "state" if (path / "state" / "_METADATA").is_file() else path


def restore_params(directory: str | pathlib.Path, abstract_params: Any = None) -> Any:
    """Reads `params/`; with `abstract_params` (ShapeDtypeStructs with shardings) straight onto the mesh,
    cast to their dtypes. Without, as stored (numpy arrays)."""
    with ocp.StandardCheckpointer() as ckptr:
        path = _tree_dir(directory)
        return ckptr.restore(path, abstract_params) if abstract_params is not None else ckptr.restore(path)


def restore_train_params(step_dir: str | pathlib.Path, abstract_params: Any = None) -> tuple[Any, ModelConfig]:
    """(params, ModelConfig) of one `TrainCheckpoints` step folder; the optimizer state is never read.

    With `abstract_params` (ShapeDtypeStructs with shardings) the parameters go straight onto the mesh,
    cast to their dtypes; without, they come back as numpy arrays."""
    step_dir = pathlib.Path(_abspath(step_dir))
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        meta = ckptr.restore(step_dir / "meta")
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


def resolve_checkpoint(path: str | pathlib.Path) -> tuple[str, pathlib.Path]:
    """("params" | "train", folder) for a parameter checkpoint (model.json), a training checkpoint step
    folder (state/), or a training workdir: its chosen epoch (`lima_jax.report choose`), else the latest."""
    from lima_jax import report
    path = pathlib.Path(path)
    if (path / "model.json").is_file():
        return "params", path
    if (path / "state").is_dir() and (path / "meta").is_dir():
        return "train", path
    if (path / "checkpoints").is_dir():
        chosen = report.chosen_checkpoint(path)
        if chosen is not None:
            return "train", chosen
        manager = TrainCheckpoints(path / "checkpoints")
        try:
            latest = manager.latest_step()
        finally:
            manager.close()
        if latest is not None:
            logging.info("%s: no epoch chosen (python -m lima_jax.report choose); using the latest checkpoint %d",
                         path, latest)
            return "train", path / "checkpoints" / str(latest)
    raise FileNotFoundError(f"{path}: not a training workdir (checkpoints/), a training checkpoint step folder "
                            "(state/ + meta/) or a parameter checkpoint (model.json + params/)")


def load_checkpoint_params(path: str | pathlib.Path, abstract_params: Any = None) -> tuple[Any, ModelConfig]:
    """(params, ModelConfig) of anything `resolve_checkpoint` accepts; see `restore_train_params` for
    `abstract_params`."""
    kind, folder = resolve_checkpoint(path)
    if kind == "train":
        return restore_train_params(folder, abstract_params)
    return restore_params(folder, abstract_params), ModelConfig(**read_params_meta(folder)["model"])


# Fields that change what the network computes; a mismatch would load fine and silently compute another
# function (vocab_size is checked separately: a pretrained model may lack the EOT row).
ARCHITECTURE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "tie_embeddings", "rope_theta",
                       "norm_eps")


def stored_model_config(path: str | pathlib.Path) -> dict:
    """The model config saved with anything `resolve_checkpoint` accepts, read without loading weights."""
    kind, folder = resolve_checkpoint(path)
    if kind == "params":
        return read_params_meta(folder)["model"]
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        return ckptr.restore(pathlib.Path(_abspath(folder)) / "meta")["model"]


def check_model_matches(stored: dict, model: ModelConfig, where: str, allow_smaller_vocab: bool = False) -> None:
    """Raises ConfigError naming `where` and the field when a checkpoint's model differs from the config's.

    With `allow_smaller_vocab` the checkpoint may lack rows the config has (the EOT row of a pretrained
    model, added on load by `model.resize_vocab`)."""
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
