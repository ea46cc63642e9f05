"""Checkpoints with orbax.

Training checkpoints (`TrainCheckpoints`): `workdir/checkpoints/<step>/` with the train state and a JSON
`meta` item (epoch, position in the epoch, the model config). One is written at the end of every epoch
and all are kept, because LIMA picks the epoch by reading dev-set answers. Orbax writes into a temporary
folder and renames it when complete, so a crash never leaves a checkpoint that looks finished. All hosts
call save/restore together; each writes and reads only its own shards.

Parameter checkpoints (`save_params` / `restore_params`): a folder with `params/` (orbax) and
`model.json` (the ModelConfig): what `lima_jax.convert` writes and `config.init_from` reads.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from lima_jax.config import ModelConfig


def _abspath(path: str | pathlib.Path) -> str:
    path = str(path)
    return path if "://" in path else str(pathlib.Path(path).resolve())


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


def restore_params(directory: str | pathlib.Path, abstract_params: Any = None) -> Any:
    """Reads `params/`; with `abstract_params` (ShapeDtypeStructs with shardings) straight onto the mesh."""
    with ocp.StandardCheckpointer() as ckptr:
        path = pathlib.Path(_abspath(directory)) / "params"
        return ckptr.restore(path, abstract_params) if abstract_params is not None else ckptr.restore(path)
