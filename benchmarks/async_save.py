"""What a mid-epoch checkpoint costs the train loop: synchronous vs asynchronous (orbax async) saves.

    JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/async_save.py                  # toy, dim 384 x 6 layers
    JAX_PLATFORMS=cpu PYTHONPATH=. python benchmarks/async_save.py --rounds 5 --config.model.dim=768 --config.model.n_layers=12

One process, the real pieces of `lima_jax.training`: the config's model, train state and jitted (donating) train
step on the toy data, and `checkpoint.TrainCheckpoints` as the loop calls it. Each round runs, alternating:

* `--steps` plain steps (no save anywhere): the baseline step time;
* sync: `TrainCheckpoints.save` (write, then the CRC manifest) after a step: the loop waits for all of it;
* async: `start_save` after a step (returns once orbax holds a host copy), then steps while the write goes on
  in the background (as the loop does: each boundary asks whether it is written, then seals it with
  `finish_save`), until it is sealed.

Prints the medians over rounds: the baseline step, the sync stall, the async stall (the blocking start plus the
seal at a boundary), steps with a save in flight, and per save the time lost to checkpointing (sync: the
stall; async: the stall plus the extra step time while in flight), with ratios. The model should be large
enough that a save takes longer than a step (the defaults: ~40x the toy model's parameters, 1/8 of its tokens per step).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time

import jax

from lima_jax import cli, data, runtime, sharding
from lima_jax.checkpoint import TrainCheckpoints
from lima_jax.config import load_config_file, apply_overrides
from lima_jax.optim import learning_rate_schedule, make_optimizer
from lima_jax.train_step import jit_train_step
from lima_jax.training import plan_run, setup

# ~40x the toy model's parameters on 1/8 of its tokens per step: a save takes longer than a step on a CPU.
DEFAULTS = (("model.dim", "384"), ("model.n_layers", "6"), ("model.n_heads", "6"), ("model.n_kv_heads", "3"),
            ("model.hidden_dim", "1024"), ("data.max_len", "32"), ("train.batch_size", "4"))


class Loop:
    """The toy train loop's state and step, cycling over the epoch's batches."""

    def __init__(self, config) -> None:
        ready = setup(config)
        rt = ready.rt
        batch_sharding = sharding.batch_sharding(rt.mesh, rt.rules)
        plan = plan_run(config, ready.report.examples, sharding.batch_shards(batch_sharding))
        total = plan.steps_per_epoch * config.train.num_epochs
        tx = make_optimizer(config, total)
        self.activation = sharding.activate(rt.mesh, rt.rules)
        self.activation.__enter__()
        _, shardings = runtime.abstract_train_state(rt.model, tx, rt.mesh, rt.rules)
        self.state = runtime.initial_state(config, rt, tx, shardings)
        self.step_fn = jit_train_step(rt.model, config, learning_rate_schedule(config, total), shardings,
                                      batch_sharding)
        shape = (plan.rows_per_step, config.data.max_len)
        self.batches = [runtime.global_batch(local, batch_sharding, shape) for local in data.epoch_batches(
            ready.report.examples, batch_size=config.train.batch_size, max_len=config.data.max_len, seed=config.seed,
            epoch=1, shuffle=config.data.shuffle, packing=plan.packing, num_rows=plan.rows_per_step)]
        self.count = 0
        self.num_params = sum(x.size for x in jax.tree.leaves(self.state.params))

    def step(self) -> float:
        """One step, its metrics fetched as the loop does; its wall time."""
        tic = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, self.batches[self.count % len(self.batches)])
        jax.device_get(metrics)
        self.count += 1
        return time.perf_counter() - tic


def one_round(loop: Loop, store: TrainCheckpoints, steps: int, times: dict[str, list[float]]) -> None:
    times["step"] += [loop.step() for _ in range(steps)]

    loop.step()
    tic = time.perf_counter()
    store.save(loop.count, loop.state, {"step": loop.count})
    times["sync_stall"].append(time.perf_counter() - tic)
    times["sync_write"].append(store.last_save_s)
    times["sync_seal"].append(store.last_seal_s)

    loop.step()
    tic = time.perf_counter()
    store.start_save(loop.count, loop.state, {"step": loop.count})
    stall, in_flight, started = time.perf_counter() - tic, [], time.perf_counter()
    while store.pending_step is not None:
        in_flight.append(loop.step())
        if store.written_here():
            tic = time.perf_counter()
            store.finish_save()
            stall += time.perf_counter() - tic
    times["async_stall"].append(stall)
    times["async_blocking"].append(store.last_blocking_s)
    times["async_seal"].append(store.last_seal_s)
    times["async_until_sealed"].append(time.perf_counter() - started)
    times["steps_in_flight"].append(len(in_flight))
    times["step_in_flight"].append(statistics.median(in_flight))
    times["async_extra_step_s"].append(sum(in_flight) - len(in_flight) * statistics.median(times["step"]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/toy.py")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="plain steps per round (the baseline)")
    p.add_argument("--dir", default=None, help="where to write (default: the system temp folder)")
    rest, overrides = cli.split_overrides(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(rest)
    cli.setup_logging(quiet=True)
    config = load_config_file(args.config)
    apply_overrides(config, [*DEFAULTS, *overrides])
    config.workdir = tempfile.mkdtemp(dir=args.dir)
    loop = Loop(config)
    for _ in range(2):  # compile, warm the writers
        loop.step()
    store = TrainCheckpoints(f"{config.workdir}/checkpoints")
    state_gib = sum(x.nbytes for x in jax.tree.leaves(loop.state)) / 2**30
    print(f"model dim {config.model.dim} x {config.model.n_layers} layers: {loop.num_params:,} parameters, train "
          f"state {state_gib:.2f} GiB; {len(jax.devices())} {jax.devices()[0].platform} device(s); {args.rounds} "
          f"rounds of {args.steps} plain steps, a sync save, an async save", flush=True)
    times: dict[str, list[float]] = {k: [] for k in (
        "step", "sync_stall", "sync_write", "sync_seal", "async_stall", "async_blocking", "async_seal",
        "async_until_sealed", "steps_in_flight", "step_in_flight", "async_extra_step_s")}
    for _ in range(args.rounds):
        one_round(loop, store, args.steps, times)
    store.close()
    shutil.rmtree(config.workdir)
    m = {k: statistics.median(v) for k, v in times.items()}
    sync_lost, async_lost = m["sync_stall"], m["async_stall"] + max(m["async_extra_step_s"], 0.0)
    print(f"step, no save in flight:        {m['step']:.3f} s (median of {len(times['step'])})")
    print(f"step, an async save in flight:  {m['step_in_flight']:.3f} s ({m['step_in_flight'] / m['step']:.2f}x; "
          f"median {m['steps_in_flight']:.0f} steps until sealed, {m['async_until_sealed']:.2f} s)")
    print(f"sync save, the loop waits:      {m['sync_stall']:.3f} s (write {m['sync_write']:.3f} s + checksums "
          f"{m['sync_seal']:.3f} s) = {m['sync_stall'] / m['step']:.1f} steps")
    print(f"async save, the loop waits:     {m['async_stall']:.3f} s (start {m['async_blocking']:.3f} s + seal "
          f"{m['async_seal']:.3f} s) = {m['async_stall'] / m['step']:.1f} steps")
    print(f"time lost per save:             sync {sync_lost:.3f} s, async {async_lost:.3f} s (stall + extra step "
          f"time while in flight): async/sync {async_lost / sync_lost:.2f}")
    print(f"(medians of {args.rounds} rounds; jax {jax.__version__})")


if __name__ == "__main__":
    main()
