"""train.snapshots="params": each epoch kept as a parameter snapshot, the full train state only in the newest
checkpoint; choosing, generating, exporting and init_from work from a snapshot, resuming never needs one."""
import json
import pathlib

import jax
import numpy as np
import pytest

from lima_jax import checkpoint, manifest, rundir, runtime
from lima_jax.config import ConfigError, load_config_file, model_config, validate
from lima_jax.training import train

from tests.conftest import train_stopping_after

REPO = pathlib.Path(__file__).resolve().parent.parent


def params_config(workdir):
    config = load_config_file(REPO / "configs" / "toy.py")
    config.workdir = str(workdir)
    config.train.num_epochs = 3
    config.train.snapshots = "params"
    config.train.snapshot_dtype = "bfloat16"
    config.dev_report.epochs = ()
    return config


def folder_bytes(folder: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory):
    """3 epochs stopped after epoch 2, the snapshot of epoch 2 then damaged as if the run died while writing it,
    and resumed to the end."""
    workdir = tmp_path_factory.mktemp("snapshots") / "run"

    train_stopping_after(params_config(workdir), 2)
    stopped = {"checkpoints": sorted(p.name for p in (workdir / "checkpoints").iterdir()),
               "snapshots": sorted(p.name for p in (workdir / "snapshots").iterdir())}
    (workdir / "snapshots" / "epoch_002" / manifest.MANIFEST).unlink()  # its save never finished
    train(params_config(workdir))
    return workdir, stopped


def test_only_the_newest_full_state_is_kept_and_every_epoch_as_a_snapshot(snapshot_run):
    workdir, stopped = snapshot_run
    assert stopped == {"checkpoints": ["12"], "snapshots": ["epoch_001", "epoch_002"]}
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["18"]
    assert sorted(p.name for p in (workdir / "snapshots").iterdir()) == ["epoch_001", "epoch_002", "epoch_003"]
    for epoch, step in ((1, 6), (2, 12), (3, 18)):
        folder = workdir / "snapshots" / f"epoch_{epoch:03d}"
        assert manifest.verify(folder) == []  # epoch 2's was rewritten by the resumed run
        meta = json.loads((folder / "model.json").read_text())
        assert (meta["epoch"], meta["step"], meta["model"]["param_dtype"]) == (epoch, step, "bfloat16")
    full, snapshot = folder_bytes(workdir / "checkpoints" / "18"), folder_bytes(workdir / "snapshots" / "epoch_003")
    assert snapshot < full / 4, (snapshot, full)  # bfloat16 parameters vs float32 parameters + two moments


def test_the_last_snapshot_holds_the_final_parameters_in_bfloat16(snapshot_run):
    workdir, _ = snapshot_run
    final, _ = checkpoint.restore_train_params(workdir / "checkpoints" / "18")
    snap = checkpoint.restore_params(workdir / "snapshots" / "epoch_003")
    for got, want in zip(jax.tree.leaves(snap), jax.tree.leaves(final)):
        assert got.dtype == np.dtype("bfloat16") or str(got.dtype) == "bfloat16"
        np.testing.assert_array_equal(np.asarray(got, np.float32),
                                      np.asarray(np.asarray(want).astype("bfloat16"), np.float32))


def test_choose_generate_and_init_from_work_from_a_snapshot(snapshot_run):
    workdir, _ = snapshot_run
    marker = rundir.mark_chosen_epoch(workdir, 1)
    assert marker["checkpoint"] == "snapshots/epoch_001" and marker["step"] == 6
    choice = rundir.resolve_checkpoint(workdir)
    assert (choice.kind, choice.reason, choice.epoch, choice.folder) == ("params", "chosen", 1,
                                                                        workdir / "snapshots" / "epoch_001")
    assert "parameter checkpoint" in choice.describe() and "epoch 1" in choice.describe()
    params, model = rundir.load_checkpoint_params(choice)
    assert model.param_dtype == "bfloat16" and jax.tree.leaves(params)
    assert rundir.run_config_of(choice.folder) == workdir / "config.json"

    config = params_config(workdir.parent / "from_snapshot")
    config.init_from = str(workdir)
    used, stored = runtime.check_init_from(config, model_config(config, vocab_size=model.vocab_size))
    assert used.folder == workdir / "snapshots" / "epoch_001" and stored["param_dtype"] == "bfloat16"

    from lima_jax.conversion import export_hf  # the tokenizer is found through the snapshot's run
    exported = export_hf(workdir, None, workdir.parent / "hf_from_snapshot")
    assert exported.param_dtype == "bfloat16"
    hf_config = json.loads((workdir.parent / "hf_from_snapshot" / "config.json").read_text())
    assert hf_config["num_hidden_layers"] == model.n_layers
    (workdir / "chosen_epoch.json").unlink()


def test_snapshot_settings_are_validated():
    config = params_config("/tmp/unused")
    config.train.snapshots = "some"
    with pytest.raises(ConfigError, match=r"config.train.snapshots='some': must be one of \('full', 'params'\)"):
        validate(config, paths=False)
    config.train.snapshots = "params"
    config.train.snapshot_dtype = "int8"
    with pytest.raises(ConfigError, match="config.train.snapshot_dtype='int8'"):
        validate(config, paths=False)


def test_switching_a_run_to_snapshots_keeps_the_epochs_that_have_no_snapshot(tmp_path):
    workdir = tmp_path / "run"
    full = params_config(workdir)
    full.train.snapshots = "full"
    train_stopping_after(full, 2)  # checkpoints 6 and 12, no snapshots
    rundir.mark_chosen_epoch(workdir, 2)  # names checkpoints/12
    train(params_config(workdir))
    # epoch 1 exists only as checkpoints/6: kept. Epoch 2's snapshot was written on resume, but
    # chosen_epoch.json names checkpoints/12: kept too.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["12", "18", "6"]
    assert sorted(p.name for p in (workdir / "snapshots").iterdir()) == ["epoch_002", "epoch_003"]
    assert {e: c.folder for e, c in rundir.epoch_checkpoints(workdir).items()} == {
        1: "checkpoints/6", 2: "snapshots/epoch_002", 3: "snapshots/epoch_003"}
