"""The train loop end to end on the toy config, resuming after a kill, divergence, gradient accumulation."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lima_jax import data, training
from lima_jax.config import ConfigError, model_config
from lima_jax.model import Llama
from lima_jax.optim import learning_rate_schedule
from lima_jax.errors import TrainingDiverged
from lima_jax.train_step import TrainState, make_train_step
from lima_jax.training import setup, train

REPO = pathlib.Path(__file__).resolve().parent.parent


def read_metrics(workdir) -> dict[int, dict]:
    """The record of each step; each step appears once, in order, even after a crash and resume."""
    records = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"metrics.jsonl steps repeat or go back: {steps}"
    return {r["step"]: r for r in records}


def finished_checkpoints(workdir) -> list[int]:
    """Steps whose save finished: orbax renamed the folder and the manifest, written last, is there."""
    folder = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir()
                  if p.name.isdigit() and (p / "lima_manifest.json").is_file()) if folder.exists() else []


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """Three epochs of the toy config, trained in this process (6 steps per epoch)."""
    from lima_jax.config import load_config_file
    config = load_config_file(REPO / "configs" / "toy.py")
    config.workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    config.train.num_epochs = 4
    final = train(config)
    return config, final


def test_toy_run_learns_and_writes_a_checkpoint_per_epoch(uninterrupted_run):
    config, final = uninterrupted_run
    metrics = read_metrics(config.workdir)
    assert sorted(metrics) == list(range(1, 25))
    first, last = metrics[1]["loss"], metrics[24]["loss"]
    assert last < first - 1.0, (first, last)
    assert finished_checkpoints(config.workdir) == [6, 12, 18, 24]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "epoch", "target_tokens"):
        assert key in metrics[24]
    assert metrics[1]["learning_rate"] == pytest.approx(3e-3) and metrics[24]["learning_rate"] == pytest.approx(3e-4)
    assert [metrics[s]["epoch"] for s in (1, 6, 7, 24)] == [1, 1, 2, 4]
    assert list((pathlib.Path(config.workdir) / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((pathlib.Path(config.workdir) / "config.json").read_text())["train"]["num_epochs"] == 4
    assert final["loss"] == pytest.approx(last)


def run_cli(workdir, *extra, **popen):
    cmd = [sys.executable, "-m", "lima_jax.train", "--config", str(REPO / "configs" / "toy.py"),
           f"--config.workdir={workdir}", "--config.train.num_epochs=4", *extra]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **popen)


def test_killed_run_resumes_from_the_last_epoch_and_matches_an_uninterrupted_run(uninterrupted_run, tmp_path):
    config, _ = uninterrupted_run
    workdir = tmp_path / "killed"
    cache = tmp_path / "jit_cache"  # train.compilation_cache_dir: the restart can load the compiled step
    first = run_cli(workdir, f"--config.train.compilation_cache_dir={cache}")
    deadline = time.time() + 300
    while len(finished_checkpoints(workdir)) < 2 and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the run ended before it could be killed:\n" + first.stdout.read()
    first.send_signal(signal.SIGKILL)
    first.wait()
    first.stdout.close()
    done_before_kill = finished_checkpoints(workdir)
    assert 2 <= len(done_before_kill) < 4

    assert any(cache.iterdir()), "the first run wrote nothing to train.compilation_cache_dir"
    second = run_cli(workdir, f"--config.train.compilation_cache_dir={cache}")
    output, _ = second.communicate(timeout=300)
    assert second.returncode == 0, output
    assert f"compilation cache: {cache}" in output
    assert f"resumed from {workdir / 'checkpoints'}/{done_before_kill[-1]}" in output
    assert "total parameters" in output  # the parameter overview is printed at start
    assert finished_checkpoints(workdir) == [6, 12, 18, 24]
    # every step after the resume point equals the uninterrupted run: no replayed or skipped batch
    resumed, reference = read_metrics(workdir), read_metrics(config.workdir)
    for step in range(done_before_kill[-1] + 1, 25):
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), step
    restarted_lines = [line for line in output.splitlines() if " step " in line and "loss" in line]
    assert f"step {done_before_kill[-1] + 1}/24" in restarted_lines[0]


def test_non_finite_loss_stops_without_a_checkpoint(toy_config):
    toy_config.optimizer.learning_rate = float("inf")
    with pytest.raises(TrainingDiverged, match="no checkpoint of this state was written"):
        train(toy_config)
    assert finished_checkpoints(toy_config.workdir) == []


def test_gradient_accumulation_normalizes_by_all_target_tokens(toy_config, toy_tokenizer):
    """accum=2 gives the full-batch update even when micro-batches hold very different token counts."""
    toy_config.model.residual_dropout_max = 0.0
    report = data.load_examples(toy_config.data.train_path, toy_tokenizer, 128)
    examples = sorted(report.examples, key=len)
    # rows i, i+2, ... form micro-batch 0: put the 4 longest there, the 4 shortest in micro-batch 1
    rows = [examples[-1], examples[0], examples[-2], examples[1], examples[-3], examples[2], examples[-4],
            examples[3]]
    batch = {k: jnp.asarray(v) for k, v in data.pad_rows(rows, 128).items()}
    cfg = model_config(toy_config, toy_tokenizer.vocab_size)
    model = Llama(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), batch["tokens"][:1])["params"])

    def one_step(accum):
        toy_config.train.grad_accum_steps = accum
        # plain SGD with lr 1: the parameter change is exactly the (normalized) gradient
        state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(1.0))
        step = make_train_step(model, toy_config, learning_rate_schedule(toy_config, 10), jax.random.key(1))
        return jax.jit(step)(state, batch)

    full_state, full = one_step(1)
    accum_state, accum = one_step(2)
    assert float(accum["loss"]) == pytest.approx(float(full["loss"]), rel=1e-5)
    assert float(accum["grad_norm"]) == pytest.approx(float(full["grad_norm"]), rel=1e-4)
    assert float(accum["target_tokens"]) == float(full["target_tokens"])
    for a, b in zip(jax.tree.leaves(accum_state.params), jax.tree.leaves(full_state.params)):
        np.testing.assert_allclose(a, b, atol=2e-7)
    # the trap this guards against: averaging per-micro-batch means gives a different loss here
    weights = np.asarray(batch["weights"])
    per_micro = [weights[0::2].sum(), weights[1::2].sum()]
    assert abs(per_micro[0] - per_micro[1]) > 50


def test_resume_refuses_a_changed_schedule_before_restoring(uninterrupted_run):
    config, _ = uninterrupted_run
    saved = (pathlib.Path(config.workdir) / "config.json").read_text()
    changed = config.copy_and_resolve_references()
    changed.train.num_epochs = 5
    with pytest.raises(ConfigError, match="started for 24 steps, the config now gives 30"):
        train(changed)
    assert (pathlib.Path(config.workdir) / "config.json").read_text() == saved  # the run's record is kept


def test_init_from_is_checked_before_anything_is_compiled(toy_config, tmp_path):
    toy_config.init_from = str(tmp_path / "no_such_checkpoint")
    with pytest.raises(ConfigError, match="config.init_from=.*no_such_checkpoint"):
        setup(toy_config)


def test_metrics_of_an_interrupted_run_after_the_resume_point_are_dropped(tmp_path):
    from lima_jax.metrics import MetricsWriter
    record = {"loss": 1.0, "learning_rate": 1e-5, "grad_norm": 1.0}
    first = MetricsWriter(tmp_path, total_steps=10)
    for step in range(1, 6):
        first.write(step, {**record, "loss": float(step)})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed while writing step 6; the latest checkpoint holds step 3
    resumed = MetricsWriter(tmp_path, total_steps=10, resumed_at=3)
    resumed.write(4, {**record, "loss": 40.0})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path).values()] == [(1, 1.0), (2, 2.0), (3, 3.0),
                                                                                  (4, 40.0)]


def test_metrics_are_written_in_order_off_the_loop_and_a_failed_write_is_raised(tmp_path):
    from lima_jax.metrics import MetricsWriter
    record = {"loss": 1.0, "learning_rate": 1e-5, "grad_norm": 1.0}
    writer = MetricsWriter(tmp_path, total_steps=10)
    for step in range(1, 8):
        writer.write(step, {**record, "loss": float(step)})
    writer.flush()  # what the loop does before a checkpoint: every line so far on disk
    assert [r["step"] for r in read_metrics(tmp_path).values()] == list(range(1, 8))
    writer.jsonl.close()  # the next write fails on the writer's thread ...
    writer.write(8, record)
    with pytest.raises(ValueError, match="closed file"):
        writer.flush()  # ... and is raised in the caller's, once
    writer.write(9, record)  # not queued after a failure
    writer.close()
    assert [r["step"] for r in read_metrics(tmp_path).values()] == list(range(1, 8))


@pytest.mark.parametrize("every", [2, 3])
def test_a_diverged_step_is_caught_before_any_later_save(toy_config, monkeypatch, every):
    """Metrics are read a step late: step 3's NaN must still stop the run before the save at step 4 (every=2),
    and a step that is itself due to be saved is checked before its save (every=3)."""
    original = training.jit_train_step

    def nan_at_step_3(*args, **kwargs):
        step_fn = original(*args, **kwargs)

        def step(state, batch):
            state, metrics = step_fn(state, batch)
            return state, {**metrics, "loss": jnp.where(state.step == 3, jnp.nan, metrics["loss"])}
        return step

    monkeypatch.setattr(training, "jit_train_step", nan_at_step_3)
    toy_config.train.checkpoint_every_steps = every
    with pytest.raises(TrainingDiverged, match="diverged at epoch 1 step 3: loss nan"):
        train(toy_config)
    assert finished_checkpoints(toy_config.workdir) == ([2] if every == 2 else [])
