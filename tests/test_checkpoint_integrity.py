"""Checkpoints are verified before use, nothing non-finite is saved, and resume checks the whole model config.

One toy run is trained for 2 of its 3 epochs (checkpoints 6 and 12) and copied for each test, which then
damages it the way a disk, a kill or a careless user would.
"""
import json
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lima_jax import checkpoint, manifest, rundir
from lima_jax.config import load_config_file
from lima_jax.errors import CheckpointError, ConfigError, TrainingDiverged
from lima_jax.train_step import TrainState
from lima_jax.training import _check_restored_finite, train

from tests.conftest import train_stopping_after

REPO = pathlib.Path(__file__).resolve().parent.parent


def toy_config(workdir, **train_fields):
    config = load_config_file(REPO / "configs" / "toy.py")
    config.workdir = str(workdir)
    config.train.num_epochs = 3
    config.dev_report.epochs = ()
    for name, value in train_fields.items():
        config.train[name] = value
    return config


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A run stopped after epoch 2 of 3: checkpoints/6 and checkpoints/12, both sealed."""
    workdir = tmp_path_factory.mktemp("two_epochs") / "run"

    train_stopping_after(toy_config(workdir), 2)
    return workdir


@pytest.fixture
def run(two_epochs, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(two_epochs, copy)
    return copy


def largest_data_file(step_folder: pathlib.Path) -> pathlib.Path:
    return max((p for p in (step_folder / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_bit(path: pathlib.Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


# --------------------------------------------------------------------------------------------- the manifest


def test_manifest_names_a_flipped_bit_a_truncation_and_a_missing_file(tmp_path):
    for name, content in (("a.bin", b"x" * 100_000), ("sub/b.bin", b"y" * 10), ("sub/deep/c.bin", b"z" * 7)):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    manifest.write_manifest(tmp_path)
    assert sorted(manifest.read_manifest(tmp_path)) == ["a.bin", "sub/b.bin", "sub/deep/c.bin"]
    assert manifest.verify(tmp_path) == []
    (tmp_path / "added_later.txt").write_text("not in the manifest: ignored")
    assert manifest.verify(tmp_path) == []

    flip_bit(tmp_path / "a.bin")
    (tmp_path / "sub/b.bin").write_bytes(b"y" * 9)
    (tmp_path / "sub/deep/c.bin").unlink()
    problems = manifest.verify(tmp_path)
    assert len(problems) == 3
    assert problems[0].startswith("a.bin: CRC-32") and "corrupted" in problems[0]
    assert problems[1] == "sub/b.bin: 9 bytes, 10 when written (truncated or overwritten)"
    assert problems[2] == "sub/deep/c.bin: missing"

    (tmp_path / manifest.MANIFEST).write_text("{not json")
    assert manifest.verify(tmp_path)[0].startswith(f"{manifest.MANIFEST}: unreadable")
    (tmp_path / manifest.MANIFEST).unlink()
    assert "missing" in manifest.verify(tmp_path)[0]


def test_manifest_parts_of_several_processes_cover_every_file_once(tmp_path):
    for i in range(7):
        (tmp_path / f"f{i}").write_bytes(bytes([i]) * (i + 1))
    manifest.write_manifest(tmp_path, manifest.Shard(0, 2))  # left by an earlier attempt on 2 processes
    (tmp_path / "f0").write_bytes(b"changed since")
    # a part being written (or left half-written) by another process: every process must list the same names
    (tmp_path / "lima_manifest.part-00001-of-00002.json.tmp").write_text('{"files": {}')
    for index in range(3):
        manifest.write_manifest(tmp_path, manifest.Shard(index, 3))
    assert len(list(tmp_path.glob("lima_manifest.part-*"))) == 5
    manifest.merge_parts(tmp_path, 3)
    assert manifest.verify(tmp_path) == []  # the stale part was not merged
    assert not list(tmp_path.glob("lima_manifest.part-*"))
    assert sorted(manifest.read_manifest(tmp_path)) == [f"f{i}" for i in range(7)]
    flip_bit(tmp_path / "f4", 0)
    found = [manifest.verify(tmp_path, manifest.Shard(index, 3)) for index in range(3)]
    assert sum(len(p) for p in found) == 1 and any(p and p[0].startswith("f4:") for p in found)


# ------------------------------------------------------------------------------------------ resume policy


def test_every_checkpoint_is_sealed_and_the_verify_tool_passes_an_intact_run(run):
    assert steps(run) == [6, 12]
    assert all(manifest.has_manifest(run / "checkpoints" / str(s)) for s in (6, 12))
    done = subprocess.run([sys.executable, "-m", "lima_jax.verify", str(run)], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 of 2 checkpoints intact" in done.stdout


def test_a_flipped_bit_in_the_latest_checkpoint_is_refused_naming_the_file_and_the_intact_one(run):
    damaged = largest_data_file(run / "checkpoints" / "12")
    flip_bit(damaged)
    with pytest.raises(CheckpointError) as e:
        train(toy_config(run))
    message = str(e.value)
    assert f"{run}/checkpoints/12: corrupt checkpoint, not resumed from" in message
    assert str(damaged) in message and "CRC-32" in message
    assert f"newest intact checkpoint is {run}/checkpoints/6" in message
    assert "--config.train.resume_step=6" in message
    assert steps(run) == [6, 12]  # nothing moved or deleted by the refusal

    verify = subprocess.run([sys.executable, "-m", "lima_jax.verify", str(run)], cwd=REPO, capture_output=True,
                            text=True)
    assert verify.returncode == 1
    assert f"CORRUPT     {run}/checkpoints/12: {damaged}" in verify.stdout
    assert f"ok          {run}/checkpoints/6" in verify.stdout

    # Readers (generate, convert to_hf, init_from) refuse it too.
    with pytest.raises(CheckpointError, match=str(damaged)):
        rundir.load_checkpoint_params(rundir.resolve_checkpoint(run / "checkpoints" / "12"))


def test_resume_step_resumes_from_the_intact_checkpoint_and_keeps_the_corrupt_one_aside(run, caplog):
    damaged = largest_data_file(run / "checkpoints" / "12")
    flip_bit(damaged)
    damaged_bytes = damaged.read_bytes()
    train(toy_config(run, resume_step=6))
    assert steps(run) == [6, 12, 18]
    kept = run / "checkpoints" / "set_aside" / "12"
    assert (kept / damaged.relative_to(run / "checkpoints" / "12")).read_bytes() == damaged_bytes
    assert "is newer than --config.train.resume_step=6" in caplog.text and str(kept) in caplog.text
    assert manifest.verify(run / "checkpoints" / "12") == []  # rewritten by the resumed run
    assert rundir.checkpoint_folders(run)[-1] == kept
    # The flag applies once: the same command again (a preemption restart) must not roll back a second time.
    assert json.loads((run / "config.json").read_text())["train"]["resume_step"] == 0
    train(toy_config(run, resume_step=6))
    assert steps(run) == [6, 12, 18]
    assert sorted(p.name for p in (run / "checkpoints" / "set_aside").iterdir()) == ["12"]


def test_truncated_and_missing_files_are_named_without_an_orbax_traceback(run):
    metadata = run / "checkpoints" / "12" / "state" / "_METADATA"
    metadata.write_bytes(metadata.read_bytes()[:100])
    (run / "checkpoints" / "12" / "meta" / "metadata").unlink()
    with pytest.raises(CheckpointError) as e:
        train(toy_config(run))
    assert f"{metadata}: 100 bytes" in str(e.value) and "truncated" in str(e.value)
    assert f"{run}/checkpoints/12/meta/metadata: missing" in str(e.value)


def test_resume_step_that_does_not_exist_is_a_config_error(run):
    with pytest.raises(ConfigError, match=r"resume_step=7: .* has no checkpoint 7 \(it has \[6, 12\]\)"):
        train(toy_config(run, resume_step=7))


def test_an_unfinished_save_is_set_aside_and_training_resumes_from_the_previous_checkpoint(run, caplog):
    (run / "checkpoints" / "12" / manifest.MANIFEST).unlink()  # killed after orbax's save, before the manifest
    caplog.set_level("INFO")
    train(toy_config(run))
    assert "its save did not finish" in caplog.text
    assert "resumed from" in caplog.text and f"{run}/checkpoints/6 (verified)" in caplog.text
    assert (run / "checkpoints" / "set_aside" / "12" / "state").is_dir()
    assert steps(run) == [6, 12, 18]


def test_a_checkpoint_from_before_checksums_is_refused_until_adopted(run, capsys):
    for step in (6, 12):
        folder = run / "checkpoints" / str(step)
        (folder / manifest.MANIFEST).unlink()
        meta_file = folder / "meta" / "metadata"
        meta = json.loads(meta_file.read_text())
        del meta["checksummed"]
        meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"checkpoints/12: no lima_manifest.json: .* --adopt"):
        train(toy_config(run))
    from lima_jax import verify
    assert verify.main([str(run)]) == 1
    assert "UNVERIFIED" in capsys.readouterr().out
    assert verify.main(["--adopt", str(run)]) == 0
    assert capsys.readouterr().out.count("adopted") == 2
    train(toy_config(run))
    assert steps(run) == [6, 12, 18]


# ---------------------------------------------------------------------------------------------- finite only


def test_an_update_that_makes_the_state_non_finite_stops_before_anything_is_saved(tmp_path):
    config = toy_config(tmp_path / "run", checkpoint_every_steps=1)
    config.optimizer.learning_rate = 1e39  # inf in float32: the loss and gradients of step 1 stay finite
    config.optimizer.end_learning_rate = 1e39
    with pytest.raises(TrainingDiverged) as e:
        train(config)
    message = str(e.value)
    assert "step 1: the update made the parameters or the optimizer state NaN or infinite" in message
    assert "no checkpoint of this state was written" in message
    assert not (tmp_path / "run" / "checkpoints").exists() or steps(tmp_path / "run") == []


def test_a_restored_state_with_nan_is_called_a_bad_checkpoint_not_divergence():
    tx = optax.adamw(1e-3)
    params = {"w": jnp.array([1.0, jnp.nan])}
    state = TrainState.create(apply_fn=None, params=params, tx=tx)
    with pytest.raises(CheckpointError, match="ckpt/7: its checksums match, but it holds NaN"):
        _check_restored_finite(state, "ckpt/7")
    _check_restored_finite(state.replace(params={"w": jnp.ones(2)}, opt_state=tx.init({"w": jnp.ones(2)})),
                           "ckpt/7")


# ------------------------------------------------------------------------------------ the whole model config


@pytest.mark.parametrize("field, value", [("rope_theta", 500000.0), ("n_layers", 3), ("residual_dropout_max", 0.3)])
def test_resume_with_a_different_model_names_the_field(run, field, value):
    config = toy_config(run)
    old = config.model[field]
    config.model[field] = value
    with pytest.raises(ConfigError) as e:
        train(config)
    message = str(e.value)
    assert f"{run}/checkpoints/12: this run was trained with a different model" in message
    assert f"model.{field}: checkpoint {old!r}, config {value!r}" in message
    assert "--config.init_from" in message


def test_remat_policy_may_change_on_resume(run):
    config = toy_config(run)
    config.model.remat_policy = "full"
    train(config)
    assert steps(run) == [6, 12, 18]
    assert np.isfinite(json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["loss"])
    assert checkpoint.verify_folder(run / "checkpoints" / "18") == []
