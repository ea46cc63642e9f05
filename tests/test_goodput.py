"""Goodput: each run's wall time split into productive steps and what was lost, summed over restarts."""
import json
import pathlib

import pytest

from lima_jax import metrics
from lima_jax.config import load_config_file
from lima_jax.training import train

REPO = pathlib.Path(__file__).resolve().parent.parent


class Crash(Exception):
    pass


def test_goodput_counts_every_run_and_the_steps_a_crash_makes_redo(tmp_path, monkeypatch):
    config = load_config_file(REPO / "configs" / "toy.py")
    config.workdir = str(tmp_path / "run")
    config.train.num_epochs = 2
    config.dev_report.epochs = ()
    original = metrics.MetricsWriter.write

    def crash_after_step_9(self, step, values):
        original(self, step, values)
        if step == 9:  # three steps after checkpoint 6: the restart redoes them
            raise Crash

    monkeypatch.setattr(metrics.MetricsWriter, "write", crash_after_step_9)
    with pytest.raises(Crash):
        train(config)
    monkeypatch.setattr(metrics.MetricsWriter, "write", original)
    first_records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lost = sum(r["step_s"] for r in first_records if r["step"] > 6)
    train(config)

    goodput = json.loads((tmp_path / "run" / "goodput.json").read_text())
    first, second = goodput["runs"]
    assert (first["steps"], first["redone_steps"]) == (9, 0)
    assert (second["steps"], second["redone_steps"]) == (6, 3)  # steps 7..12, of which 7, 8, 9 were done before
    assert second["redone_s"] == pytest.approx(lost)
    for run in (first, second):
        parts = run["productive_s"] + run["startup_and_compile_s"] + run["checkpoint_s"] + run["hooks_s"]
        assert parts == pytest.approx(run["wall_s"], rel=1e-6)
        assert run["productive_s"] > 0 and run["checkpoint_s"] > 0
    total = goodput["total"]
    assert total["runs"] == 2
    assert total["productive_s"] == pytest.approx(first["productive_s"] + second["productive_s"])
    assert total["goodput"] == pytest.approx(total["productive_s"] / (total["wall_s"] + total["redone_s"]))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(0 <= r["goodput"] <= 1 and r["step_s"] > 0 for r in records) and records[-1]["goodput"] > 0


def test_an_unreadable_goodput_file_restarts_the_count(tmp_path, caplog):
    path = tmp_path / "goodput.json"
    path.write_text("{not json")
    accounting = metrics.Goodput()
    accounting.after_earlier_runs(path, 0, 0.0)
    assert accounting.earlier == [] and "unreadable" in caplog.text
    accounting.step(1.0)
    accounting.step(2.0)  # the first step (with the compile) is start-up; the second is productive
    assert accounting.record()["productive_s"] == 2.0 and accounting.totals()["runs"] == 1
