"""The LIMA training loop: data -> steps -> metrics -> a checkpoint per epoch -> end-of-epoch hooks.

Runs `train.num_epochs` epochs over the data, writes a checkpoint at the end of every epoch (every epoch is kept,
since LIMA picks the epoch by reading dev-set answers: as a full state, or with train.snapshots="params" as a
parameter snapshot beside the newest full state), and resumes from the latest checkpoint in the workdir when
restarted, at the exact batch it stopped before. Mid-epoch checkpoints (train.checkpoint_every_steps /
_minutes) are written in the background with train.async_checkpointing and sealed at the first step boundary
where every host has written its part. Every host of a pod slice runs the same loop. SIGTERM or
SIGINT while the loop runs stops it at a step boundary every host agrees on, after a checkpoint there
(`lima_jax.preemption`): `Preempted`, exit 75, and the same command resumes exactly.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from lima_jax import checkpoint, data, distributed, manifest, preemption, rundir, runlock, runtime, sharding
from lima_jax.config import ModelConfig, packing_mode, validate
from lima_jax.errors import CheckpointError, ConfigError, Preempted, TrainingDiverged
from lima_jax.metrics import Goodput, MetricsWriter
from lima_jax.optim import learning_rate_schedule, make_optimizer
from lima_jax.paths import atomic_write_text
from lima_jax.rundir import RunDir
from lima_jax.train_step import TrainState, all_finite, jit_train_step


@dataclasses.dataclass
class Position:
    """Where training stands: the next epoch (1-based) and the number of its batches already done."""

    epoch: int = 1
    batches_done: int = 0
    step: int = 0


@dataclasses.dataclass(frozen=True)
class EpochEnd:
    """What an end-of-epoch hook gets: the epoch just finished (its checkpoint written), the state, the
    runtime it lives on, the metrics writer, and `resumed` when a restarted run calls the hook again for the
    epoch it resumed after (the interrupted run may have stopped inside the hook)."""

    epoch: int
    state: TrainState
    rt: runtime.Runtime
    writer: MetricsWriter
    resumed: bool = False

    @property
    def step(self) -> int:
        return int(self.state.step)


EpochHook = Callable[[EpochEnd], None]


@dataclasses.dataclass(frozen=True)
class _Dispatched:
    """A step sent to the devices: its metrics (device arrays, not yet read) and where it stands."""

    metrics: dict[str, jax.Array]
    epoch: int
    step: int
    end_of_epoch: bool
    started: float  # perf_counter when it was dispatched


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything checked before anything is compiled: the runtime and the training examples."""

    rt: runtime.Runtime
    report: data.LoadReport


def setup(config: ml_collections.ConfigDict) -> Setup:
    """Validates everything cheap first (config, tokenizer, mesh, init_from, data), before any compilation."""
    validate(config)
    rt = runtime.build(config)
    if config.init_from and not checkpoint.has_train_checkpoints(RunDir.at(config.workdir).checkpoints):
        runtime.check_init_from(config, rt.model_cfg)
    max_line_bytes = config.data.get("max_line_bytes", data.formats.MAX_LINE_BYTES)  # absent: an older config.json
    report = data.load_examples(config.data.train_path, rt.tokenizer, config.data.max_len, config.data.loss_on,
                                config.data.on_bad_example, max_line_bytes=max_line_bytes)
    return Setup(rt, report)


def plan_run(config: ml_collections.ConfigDict, examples: Sequence[data.Example], batch_shards: int) -> data.StepPlan:
    """The run's StepPlan: with packing="examples" the rows per step are planned over every epoch and rounded
    up to a multiple of `batch_shards` x train.grad_accum_steps (each shard of each micro-batch gets as many
    rows); otherwise train.batch_size rows (validated to divide)."""
    plan = data.plan_steps(examples, batch_size=config.train.batch_size, max_len=config.data.max_len,
                           seed=config.seed, shuffle=config.data.shuffle, packing=packing_mode(config.data.packing),
                           num_epochs=config.train.num_epochs,
                           row_multiple=batch_shards * config.train.grad_accum_steps)
    if plan.packing == "examples" and plan.rows_per_step >= config.train.batch_size:
        logging.warning("packing='examples': %d rows per step for %d examples (rounded up to a multiple of %d batch "
                        "shards x %d micro-batches) saves nothing over one example per row; fewer batch shards or "
                        "micro-batches would", plan.rows_per_step, config.train.batch_size, batch_shards,
                        config.train.grad_accum_steps)
    return plan


def check_schedule_length(meta: dict, total_steps: int, where: str) -> None:
    """A resumed run must keep the learning-rate schedule it started with (same total steps)."""
    if meta.get("total_steps", total_steps) != total_steps:
        raise ConfigError(f"{where}: this run was started for {meta['total_steps']} steps, the config now gives "
                          f"{total_steps} (train.num_epochs / batch_size / data changed): resuming would bend the "
                          "learning-rate schedule. Start a new workdir with --config.init_from=<this workdir>.")


def position_after(meta: dict, steps_per_epoch: int) -> Position:
    if meta["batches_done"] >= steps_per_epoch:
        return Position(meta["epoch"] + 1, 0, meta["step"])
    return Position(meta["epoch"], meta["batches_done"], meta["step"])


def train(config: ml_collections.ConfigDict, after_epoch: EpochHook | None = None) -> dict:
    """Runs (or resumes) training; returns the last logged metrics. `after_epoch(EpochEnd)` runs after each
    epoch's checkpoint is written (e.g. the dev-set report). Holds the workdir's run lock throughout: while
    another live run holds it, RunLocked right after the config is validated, before any other work."""
    validate(config)
    # The early SIGTERM handler goes in before the lock file exists: a signal that sees the lock is recorded.
    with preemption.record_sigterm_early() as early, runlock.hold(RunDir.at(config.workdir), config) as lock:
        return _train_holding_lock(config, after_epoch, lock, early)


def _train_holding_lock(config: ml_collections.ConfigDict, after_epoch: EpochHook | None,
                        lock: runlock.RunLock, early_stops: preemption.StopRequests | None = None) -> dict:
    """`train` with the run lock held: `lock.check()` before every checkpoint save. Raises Preempted after the
    checkpoint of the step where the hosts agreed to stop (a signal, JAX's preemption notice)."""
    goodput = Goodput()  # from here: setup, restore and compile count as start-up
    # Check everything cheap before compiling: config, tokenizer, mesh, init_from, data.
    ready = setup(config)
    rt, examples = ready.rt, ready.report.examples
    run = RunDir.at(config.workdir)

    # The epoch plan: rows per step, steps, and a signature of the data order for exact resumes.
    batch_sharding = sharding.batch_sharding(rt.mesh, rt.rules)
    plan = plan_run(config, examples, sharding.batch_shards(batch_sharding))
    logging.info("%s", plan.describe())
    steps_per_epoch = plan.steps_per_epoch
    total_steps = steps_per_epoch * config.train.num_epochs
    data_signature = data.input_signature(examples, batch_size=config.train.batch_size, max_len=config.data.max_len,
                                          seed=config.seed, shuffle=config.data.shuffle, packing=plan.packing)
    logging.info("%d examples (%d trimmed, %d skipped), %d steps per epoch, %d steps in all, mesh %s, layout %s",
                 len(examples), ready.report.num_trimmed, len(ready.report.skipped), steps_per_epoch, total_steps,
                 dict(rt.mesh.shape), config.mesh.layout)

    model, schedule, tx = rt.model, learning_rate_schedule(config, total_steps), make_optimizer(config, total_steps)
    with sharding.activate(rt.mesh, rt.rules):
        # The state: resumed from the latest checkpoint, else init_from's weights, else a random init.
        abstract, state_shardings = runtime.abstract_train_state(model, tx, rt.mesh, rt.rules)
        checkpoints = checkpoint.TrainCheckpoints(run.checkpoints)

        def check_run_matches(meta: dict, where: str) -> None:
            data.check_input_signature(meta, data_signature, where)
            check_schedule_length(meta, total_steps, where)
            checkpoint.check_resume_matches(meta.get("model", {}), rt.model_cfg, where)

        requested = config.train.get("resume_step", 0)
        latest = choose_resume_step(checkpoints, requested, check_run_matches)
        if latest is not None:
            where = f"{checkpoints.step_folder(latest)}"
            meta = checkpoints.read_meta(latest)
            check_run_matches(meta, where)
            rolled_back_to = requested if requested == latest else meta.get("rolled_back_to", 0)
            if requested == latest:
                _set_aside_later_snapshots(run, meta)
            state, _ = checkpoints.restore(latest, abstract)
            _check_restored_finite(state, where)
            position = position_after(meta, steps_per_epoch)
            logging.info("resumed from %s (verified): epoch %d, %d batches done", where, meta["epoch"],
                         meta["batches_done"])
        else:
            state, position = runtime.initial_state(config, rt, tx, state_shardings), Position()
            rolled_back_to = 0
        _save_config(config, run)
        _log_parameter_overview(state.params, rt.model_cfg)

        # The step: one jitted program with the state donated; each host feeds its block of rows.
        batch_shape = (plan.rows_per_step, config.data.max_len)
        block, num_blocks = sharding.process_batch_block(batch_sharding, batch_shape)
        step_fn = jit_train_step(model, config, schedule, state_shardings, batch_sharding)
        writer = MetricsWriter(run, total_steps, resumed_at=int(state.step) if latest is not None else 0)
        goodput.after_earlier_runs(run.goodput, writer.redone_steps, writer.redone_s)
        last_metrics: dict = {}
        pending: _Dispatched | None = None  # the step whose metrics are still on the device
        last_read = 0.0  # when the previous step's metrics were read

        def read_metrics(done: _Dispatched) -> None:
            """Reads a step's metrics (a step late: the device meanwhile runs the next one), checks them before
            anything of that step is saved, and logs them."""
            nonlocal last_metrics, last_read
            values = {k: float(v) for k, v in jax.device_get(done.metrics).items()}
            try:
                _check_finite(values, done.epoch, done.step, checkpoints, resumed_from=latest)
            except TrainingDiverged:  # on every host alike: the save in flight is of a finite state
                finish_save()
                raise
            now = time.perf_counter()
            step_s = now - max(done.started, last_read)  # steps overlap: each one's share of the wall time
            last_read = now
            goodput.step(step_s)
            values.update(epoch=done.epoch, step_s=step_s, tokens_per_s=values["tokens"] / step_s,
                          goodput=goodput.totals()["goodput"])
            last_metrics = values
            if done.step % config.train.log_every == 0 or done.end_of_epoch:
                writer.write(done.step, values)

        def epoch_done(epoch: int, resumed: bool = False) -> None:
            if after_epoch is not None:
                tic = time.perf_counter()
                after_epoch(EpochEnd(epoch, state, rt, writer, resumed))
                goodput.hooks_s += time.perf_counter() - tic

        async_saves = bool(config.train.get("async_checkpointing", True))  # absent in an older config.json

        def save(epoch: int, batch_index: int, step: int, stopping: bool = False) -> None:
            """The checkpoint of `step`: mid-epoch ones (train.checkpoint_every_steps / _minutes) in the
            background with train.async_checkpointing, sealed later by `finish_save`; the others (epoch ends,
            where the hosts agreed to stop) written and sealed before this returns."""
            finish_save(prune=not stopping)  # a save in flight is sealed before the next one starts
            lock.check()  # RunLocked if another run took this workdir over: it saves, not we
            tic = time.perf_counter()
            writer.flush()  # the metrics of the steps saved are on disk before their checkpoint
            end_of_epoch = batch_index == steps_per_epoch
            meta = {"epoch": epoch, "batches_done": batch_index, "step": step, "data_signature": data_signature,
                    "total_steps": total_steps, "end_of_epoch": end_of_epoch, "checksummed": True,
                    "rolled_back_to": rolled_back_to, "model": dataclasses.asdict(rt.model_cfg)}
            with stops.saving():
                if async_saves and not end_of_epoch and not stopping:
                    checkpoints.start_save(step, state, meta)
                else:
                    checkpoints.save(step, state, meta)
                    after_sealed(step, epoch if end_of_epoch else None, prune=not stopping)
            goodput.checkpoint_s += time.perf_counter() - tic
            goodput.save(run.goodput)
            agreement.saved()

        def after_sealed(step: int, epoch_ended: int | None, prune: bool) -> None:
            if epoch_ended is not None:
                keep_epoch(config, run, rt.model_cfg, state.params, epoch_ended, step)
            if prune:  # a preempted job has seconds left: the next run's first save prunes
                prune_full_states(config, run, checkpoints, step)

        def finish_save(prune: bool = True) -> None:
            """Waits for the save in flight (if any) and seals it; every host calls it at the same point."""
            if checkpoints.pending_step is None:
                return
            tic = time.perf_counter()
            lock.check()  # a run that took the workdir over meanwhile: this one seals and prunes nothing
            with stops.saving():
                step = checkpoints.finish_save()
                after_sealed(step, None, prune)
            goodput.checkpoint_s += time.perf_counter() - tic
            goodput.save(run.goodput)

        def stop_if_agreed(epoch: int, step: int) -> None:
            """Raises Preempted naming the checkpoint of `step` (just written, or in flight: then sealed first)
            when any host was asked to stop during a save or a hook."""
            if agreement.stop_agreed():
                finish_save(prune=False)
                raise _preempted(checkpoints, epoch, step)

        step = int(state.step)  # counted on the host from here: reading state.step would wait for the device
        placed = None  # this epoch's prefetched batches
        # SIGTERM / SIGINT from here on: stop at a step boundary all hosts agree on, save there, exit 75.
        with preemption.catch_stop_signals(early_stops) as stops:  # incl. a SIGTERM during setup
            agreement = preemption.StepAgreement(stops, config.train.get("checkpoint_every_minutes", 0.0))
            try:
                if latest is not None and position.batches_done == 0:
                    # Resumed at an epoch boundary: the previous run may have stopped before this epoch's
                    # snapshot or inside its hook.
                    keep_epoch(config, run, rt.model_cfg, state.params, position.epoch - 1, latest)
                    epoch_done(position.epoch - 1, resumed=True)
                    stop_if_agreed(position.epoch - 1, latest)
                for epoch in range(position.epoch, config.train.num_epochs + 1):
                    start = position.batches_done if epoch == position.epoch else 0
                    batches = data.epoch_batches(
                        examples, batch_size=config.train.batch_size, max_len=config.data.max_len,
                        seed=config.seed, epoch=epoch, shuffle=config.data.shuffle, start_step=start,
                        process_index=block, process_count=num_blocks, packing=plan.packing,
                        num_rows=plan.rows_per_step)
                    # the next batch is assembled on a thread while a step runs (closed below if the loop raises)
                    placed = data.prefetch(runtime.global_batch(b, batch_sharding, batch_shape) for b in batches)
                    for batch_index, batch in enumerate(placed, start=start + 1):
                        # One step, dispatched without waiting on an accelerator: the host reads the previous
                        # step's metrics while the device runs it.
                        tic = time.perf_counter()
                        state, metrics = step_fn(state, batch)
                        step += 1
                        end_of_epoch = batch_index == steps_per_epoch
                        dispatched = _Dispatched(metrics, epoch, step, end_of_epoch, tic)
                        if pending is not None:
                            read_metrics(pending)
                            pending = None
                        # A checkpoint at the end of every epoch, every checkpoint_every_steps /
                        # checkpoint_every_minutes if set, and where the hosts agree to stop.
                        decision = agreement.after_step(step)
                        if checkpoints.pending_step is not None and \
                                distributed.all_processes_ok(checkpoints.written_here()):
                            finish_save()  # the background write is done on every host: seal it now
                        every = config.train.checkpoint_every_steps
                        if end_of_epoch or (every and step % every == 0) or decision.checkpoint_due or decision.stop:
                            read_metrics(dispatched)  # this step checked before anything of it is saved
                            save(epoch, batch_index, step, stopping=decision.stop)
                            if end_of_epoch:
                                logging.info("epoch %d done: checkpoint %s/%d", epoch, checkpoints.directory, step)
                            if decision.stop:
                                raise _preempted(checkpoints, epoch, step)
                            stop_if_agreed(epoch, step)  # a signal during the save
                        else:
                            pending = dispatched
                    # The end-of-epoch hooks (dev report), after the checkpoint exists (written and sealed: the
                    # epoch's save is synchronous, and it sealed any save still in flight first).
                    epoch_done(epoch)
                    if epoch < config.train.num_epochs:  # after the last hook training is done anyway
                        stop_if_agreed(epoch, step)  # a signal during the hook
            finally:
                if placed is not None:
                    placed.close()  # its thread stopped and joined, not left to the interpreter's exit
                checkpoints.close()
                goodput.save(run.goodput)
                # a failed metrics write is raised unless an error (a stop, a divergence) is already on its way
                writer.close(raise_error=sys.exc_info()[1] is None)
                if distributed.is_main_process():
                    logging.info("%s", goodput.summary())
    distributed.barrier("train_done")
    return last_metrics


def keeps_params_snapshots(config: ml_collections.ConfigDict) -> bool:
    """train.snapshots="params": each epoch kept as parameters only, the full state only where resuming needs it."""
    return config.train.get("snapshots", "full") == "params"


def keep_epoch(config: ml_collections.ConfigDict, run: RunDir, model_cfg: ModelConfig, params: Any, epoch: int,
               step: int) -> None:
    """With params snapshots: writes `snapshots/epoch_NNN` (a parameter checkpoint in train.snapshot_dtype, what
    `report choose`, `generate`, export and `init_from` read), unless a sealed one is there already."""
    folder = run.snapshot(epoch)
    if not keeps_params_snapshots(config) or manifest.has_manifest(folder):
        return
    dtype = config.train.get("snapshot_dtype", "bfloat16")
    tic = time.perf_counter()
    checkpoint.save_params(folder, jax.tree.map(lambda x: x.astype(dtype), params),
                           dataclasses.replace(model_cfg, param_dtype=dtype),
                           extra={"epoch": epoch, "step": step, "snapshot_of": str(run.step_folder(step))})
    logging.info("epoch %d: parameter snapshot %s (%s) in %.2f s", epoch, folder, dtype, time.perf_counter() - tic)


def prune_full_states(config: ml_collections.ConfigDict, run: RunDir, checkpoints: checkpoint.TrainCheckpoints,
                      newest: int) -> None:
    """With params snapshots: once the newest full state is sealed (its manifest was computed by reading back
    every file it wrote, so a second full read would find the same bytes), removes the older ones (their
    epochs live on as snapshots; a resume needs only the newest). Kept: an end-of-epoch state whose epoch has
    no sealed snapshot (written before the run switched to snapshots), and the one chosen_epoch.json names."""
    older = [s for s in checkpoints.all_steps() if s < newest]
    if not keeps_params_snapshots(config) or not older:
        return
    if not checkpoints.is_sealed(newest):
        logging.warning("not removing older checkpoints: %s has no manifest", checkpoints.step_folder(newest))
        return
    marker = _chosen_epoch_marker(run)
    removable = [step for step in older if not _needed_for_choosing(run, checkpoints, step, marker)]
    # every host deletes the same steps (orbax's delete syncs them): host 0's list, read from files it owns
    removable = json.loads(distributed.main_process_text("prune", json.dumps(removable)))
    for step in removable:
        checkpoints.delete(step)
    if removable:
        logging.info("removed the full train states of steps %s: %s is sealed, and their epochs are kept as "
                     "snapshots", removable, checkpoints.step_folder(newest))


def _chosen_epoch_marker(run: RunDir) -> dict | str | None:
    """chosen_epoch.json as host 0 reads it, the same on every host (`report choose` may rewrite it while the
    hosts read, and every host must then read the same steps' meta, a collective); its problem as text when
    it is malformed; None when no epoch was chosen."""
    try:
        found: dict | str | None = rundir.read_chosen_epoch(run.root)
    except CheckpointError as e:
        found = str(e)
    return json.loads(distributed.main_process_text("chosen_epoch_marker", json.dumps(found)))


def _needed_for_choosing(run: RunDir, checkpoints: checkpoint.TrainCheckpoints, step: int,
                         marker: dict | str | None) -> bool:
    if isinstance(marker, str):  # a malformed marker: keep what it might name
        logging.warning("%s; keeping checkpoint %s", marker, checkpoints.step_folder(step))
        return True
    if marker is not None and marker["checkpoint"] == f"{rundir.CHECKPOINTS}/{step}":
        return True
    try:
        meta = checkpoints.read_meta(step)
    except Exception:  # an unreadable step (e.g. a deletion cut short) is no epoch's copy
        logging.warning("checkpoint %s: unreadable meta; removing it", checkpoints.step_folder(step))
        return False
    return bool(meta.get("end_of_epoch")) and not manifest.has_manifest(run.snapshot(int(meta["epoch"])))


def _preempted(checkpoints: checkpoint.TrainCheckpoints, epoch: int, step: int) -> Preempted:
    return Preempted(f"preempted at epoch {epoch} step {step}: checkpoint {checkpoints.step_folder(step)} written; "
                     "run the same command again to resume")


def choose_resume_step(checkpoints: checkpoint.TrainCheckpoints, requested: int,
                       check_run_matches: Callable[[dict, str], None]) -> int | None:
    """The verified checkpoint a restarted run resumes from; None for a new run.

    `requested` (train.resume_step) names one, 0 the newest. Newer step folders whose save did not finish (no
    manifest though their meta says one was due) are set aside with a warning: they were never complete. A
    corrupt newest checkpoint is refused, naming the newest intact one and the flag that resumes from it:
    falling back silently would hide a failing disk and redo epochs unnoticed. `check_run_matches(meta, where)`
    checks the newest step's meta (data, schedule, model) before any checkpoint is read in full."""
    steps = sorted(checkpoints.all_steps())
    flag = "config.train.resume_step"
    if requested and requested not in steps:
        raise ConfigError(f"--{flag}={requested}: {checkpoints.directory} has no checkpoint {requested} "
                          f"(it has {steps or 'none'})")
    if not steps:
        return None
    try:
        newest_meta = checkpoints.read_meta(steps[-1])
    except Exception:  # unreadable: reported below by its verification
        newest_meta = None
    if newest_meta is not None:
        check_run_matches(newest_meta, str(checkpoints.step_folder(steps[-1])))
    if requested and newest_meta is not None and newest_meta.get("rolled_back_to") == requested:
        logging.info("--%s=%d: already resumed from it (the newer checkpoints were written after that); resuming "
                     "from the newest", flag, requested)
        requested = 0
    if requested:
        _require_intact(checkpoints, requested, [])
        for later in (s for s in steps if s > requested):
            _set_aside(checkpoints, later, f"it is newer than --{flag}={requested}")
        return requested
    for step in reversed(steps):
        if checkpoints.is_sealed(step):
            _require_intact(checkpoints, step, [s for s in steps if s < step])
            return step
        if not _save_was_checksummed(checkpoints, step):
            raise CheckpointError(
                f"{checkpoints.step_folder(step)}: no {manifest.MANIFEST}: this checkpoint was written "
                "before lima_jax recorded checksums, so it cannot be verified. `python -m lima_jax.verify --adopt "
                f"{checkpoints.directory.parent}` checks that every checkpoint loads and records its checksums; "
                "then restart.")
        _set_aside(checkpoints, step, "its save did not finish (no manifest): the run stopped while writing it")
    return None


def _set_aside_later_snapshots(run: RunDir, meta: dict) -> None:
    """After a rollback to `meta`'s checkpoint: the snapshots of later epochs (and of its own epoch when it is
    mid-epoch) come from the abandoned steps; they move to `snapshots/set_aside/` (kept) so that choosing,
    generating and exporting never take them, and the resumed run writes its own."""
    epoch, complete = int(meta["epoch"]), bool(meta.get("end_of_epoch"))
    stale = [folder for folder, snap_epoch in rundir.snapshot_folders(run)
             if snap_epoch > epoch or (snap_epoch == epoch and not complete)]
    if jax.process_index() == 0:
        for folder in stale:
            target = checkpoint.aside_target(run.snapshots / checkpoint.SET_ASIDE, folder.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(target)
            logging.warning("snapshot %s is from the steps after the checkpoint resumed from: moved to %s (kept)",
                            folder, target)
    distributed.barrier("snapshots_set_aside")


def _save_was_checksummed(checkpoints: checkpoint.TrainCheckpoints, step: int) -> bool:
    try:
        return bool(checkpoints.read_meta(step).get("checksummed"))
    except Exception:  # orbax finished the folder but its meta is unreadable: treat as an unfinished save
        return True


def _set_aside(checkpoints: checkpoint.TrainCheckpoints, step: int, why: str) -> None:
    target = checkpoints.set_aside(step)
    logging.warning("checkpoint %s is not resumed from: %s. Moved to %s (kept; delete it yourself once you "
                    "have looked).", checkpoints.step_folder(step), why, target)


def _require_intact(checkpoints: checkpoint.TrainCheckpoints, step: int, older: list[int]) -> None:
    """Raises CheckpointError when `step` is corrupt, naming the newest intact one of `older` and the flag."""
    folder = checkpoints.step_folder(step)
    problems = checkpoint.verify_folder(folder)
    if not problems:
        return
    intact = next((s for s in reversed(older) if checkpoints.is_sealed(s) and not checkpoint.verify_folder(
        checkpoints.step_folder(s))), None)
    advice = (f"The newest intact checkpoint is {checkpoints.step_folder(intact)}: restart with "
              f"--config.train.resume_step={intact} to resume from it (the newer ones are then moved to "
              f"{checkpoints.directory / checkpoint.SET_ASIDE}, kept)." if intact is not None else
              "No older checkpoint is intact: start a new workdir, with --config.init_from=<a snapshot of this "
              "run, snapshots/epoch_NNN> to continue from its weights (the optimizer state starts afresh).")
    raise CheckpointError(f"{folder}: corrupt checkpoint, not resumed from: "
                          f"{checkpoint.describe_problems(folder, problems)}. {advice}")


def _check_restored_finite(state: TrainState, where: str) -> None:
    if not bool(jax.jit(all_finite)((state.params, state.opt_state))):
        raise CheckpointError(f"{where}: its checksums match, but it holds NaN or infinite values (written by a "
                              "lima_jax that did not check the updated state before saving): resume from an "
                              "earlier checkpoint with --config.train.resume_step=<step>.")


def _check_finite(metrics: dict[str, float], epoch: int, step: int, checkpoints: checkpoint.TrainCheckpoints,
                  resumed_from: int | None) -> None:
    """Stops training before anything non-finite is saved. The state this step started from was finite (it
    was checked after the previous step, or verified and checked on restore), so this is divergence."""
    started = (f"resumed from the verified checkpoint {checkpoints.step_folder(resumed_from)}" if resumed_from
               else "a finite state")
    latest = checkpoints.latest_step()
    advice = (f"no checkpoint of this state was written (latest good: {checkpoints.step_folder(latest)}). "
              if latest is not None else "no checkpoint of this state was written. ")
    advice += "Lower optimizer.learning_rate or set optimizer.grad_clip_norm, then restart."
    if not np.isfinite(metrics["loss"]) or not np.isfinite(metrics["grad_norm"]):
        raise TrainingDiverged(f"diverged at epoch {epoch} step {step}: loss {metrics['loss']} / grad_norm "
                               f"{metrics['grad_norm']} from {started}; {advice}")
    if not metrics["state_finite"]:
        raise TrainingDiverged(f"diverged at epoch {epoch} step {step}: the update made the parameters or the "
                               f"optimizer state NaN or infinite (loss {metrics['loss']:.4f} and grad_norm "
                               f"{metrics['grad_norm']:.4g} were finite, from {started}); {advice}")


def _save_config(config: ml_collections.ConfigDict, run: RunDir) -> None:
    """The run's full config as `config.json` (host 0), beside the checkpoints it produced."""
    if jax.process_index() == 0:
        saved = config.copy_and_resolve_references()
        if "resume_step" in saved.train:
            saved.train.resume_step = 0  # a one-time choice: rerunning from config.json must not roll back again
        atomic_write_text(run.config, saved.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def _log_parameter_overview(params: Any, model_cfg: ModelConfig) -> None:
    if jax.process_index() != 0:
        return
    from clu import parameter_overview
    logging.info("parameters:\n%s", parameter_overview.get_parameter_overview(params, include_stats=False))
    logging.info("total parameters: %s (expected %s)", f"{sum(x.size for x in jax.tree.leaves(params)):,}",
                 f"{model_cfg.num_params():,}")
