"""Row-length sweep of the train step: step time and compiled temporaries, one attention kernel against another.

    python benchmarks/attention_sweep.py [--lengths 512,1024,2048,4096] [--tokens 4096]
        [--attention reference,blocked] [--steps 3] [--layers 4] [--time_up_to 4096]

The shape is issue 15's (dim 256, 8 heads / 4 KV heads, ffn 688, vocab 8,000, float32; 4 layers unless
--layers says otherwise). Each row length L runs batch = tokens / L packed rows (segments of 64-1,024 tokens, a
little padding at the end of each row), so every point does the same work outside attention. The step is the
real one (`lima_jax.train_step.make_train_step`: forward, backward, AdamW) with the state donated, jitted once per
(kernel, length); the kernels are timed alternately, step by step, after one warm-up step each. Printed per
point: median step seconds, compiled temporaries (`memory_analysis().temp_size_in_bytes`) and the ratio to the
first kernel, and the compile seconds. Lengths above --time_up_to are compiled only (temporaries, no step time): on a small shared CPU
the reference's longest rows take minutes per step.
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def packed_batch(rows: int, length: int, vocab: int, seed: int) -> dict:
    """Rows of consecutive segments (64-1,024 tokens, cut at the row end), the last 1-8% of each row padding."""
    import numpy as np

    rng = np.random.default_rng(seed)
    seg = np.zeros((rows, length), np.int32)
    pos = np.zeros((rows, length), np.int32)
    for r in range(rows):
        end = length - int(rng.integers(length // 100 + 1, length // 12 + 2))
        start, segment = 0, 1
        while start < end:
            stop = min(end, start + int(rng.integers(64, 1025)))
            seg[r, start:stop], pos[r, start:stop] = segment, np.arange(stop - start)
            start, segment = stop, segment + 1
    tokens = rng.integers(0, vocab, (rows, length), dtype=np.int32)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=1), "weights": (seg != 0).astype(np.float32),
            "segment_ids": seg, "positions": pos}


def build_step(attention: str, length: int, rows: int, layers: int):
    """(jitted step, initial state, compiled temporaries in bytes) for one kernel and row length."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax
    from flax.training import train_state

    from lima_jax.config import ModelConfig, load_config_file
    from lima_jax.model import Llama
    from lima_jax.train_step import make_train_step

    cfg = ModelConfig(vocab_size=8000, dim=256, n_layers=layers, n_heads=8, n_kv_heads=4, hidden_dim=688,
                      max_seq_len=max(length, 2048), attention=attention)
    config = load_config_file(REPO / "configs" / "toy.py")
    config.train.grad_accum_steps = 1
    model = Llama(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))["params"])
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adamw(1e-4))
    step = jax.jit(make_train_step(model, config, optax.constant_schedule(1e-4), jax.random.key(1)),
                   donate_argnums=0)
    batch = {k: jnp.asarray(v) for k, v in packed_batch(rows, length, cfg.vocab_size, seed=length).items()}
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    return compiled, state, batch, compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,1024,2048,4096")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch (rows = tokens / length)")
    parser.add_argument("--attention", default="reference,blocked", help="kernels, the first is the baseline")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per kernel and length")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--time_up_to", type=int, default=1 << 30, help="longer rows: compiled, not timed")
    args = parser.parse_args()

    import jax

    kernels = args.attention.split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
          f"load {os.getloadavg()[0]:.1f}; {args.tokens} tokens per batch, {args.layers} layers, "
          f"{args.steps} timed steps per point", flush=True)
    header = (f"{'row':>6} {'rows':>4} {'attention':>10} {'step s':>8} {'temp MiB':>9} {'time x':>7} {'temp x':>7} "
              f"{'compile s':>9}")
    print(header, flush=True)
    for length in lengths:
        rows = max(1, args.tokens // length)
        timed = length <= args.time_up_to
        runs = {}
        for name in kernels:
            compiled, state, batch, temp, compile_s = build_step(name, length, rows, args.layers)
            runs[name] = {"step": compiled, "state": state, "batch": batch, "temp": temp, "times": [math.nan],
                          "loss": math.nan, "compile_s": compile_s}
            if timed:
                runs[name]["state"], metrics = compiled(state, batch)  # warm-up
                runs[name].update(times=[], loss=float(metrics["loss"]))
        for _ in range(args.steps if timed else 0):  # alternate kernels step by step
            for run in runs.values():
                start = time.perf_counter()
                run["state"], metrics = run["step"](run["state"], run["batch"])
                jax.block_until_ready(metrics)
                run["times"].append(time.perf_counter() - start)
        base = runs[kernels[0]]
        for name, run in runs.items():
            median = statistics.median(run["times"])
            note = f"first-step loss {run['loss']:.4f}" if timed else "compiled only"
            print(f"{length:>6} {rows:>4} {name:>10} {median:>8.3f} {run['temp'] / 2**20:>9.1f} "
                  f"{median / statistics.median(base['times']):>7.2f} {run['temp'] / base['temp']:>7.2f} "
                  f"{run['compile_s']:>9.1f}   ({note})", flush=True)
        del runs
    print(f"load at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
