"""The nucleus mask alone: the threshold search (`lima_jax.generation.top_p_mask`) vs the full-vocabulary sort it
replaced, side by side (alternating calls, medians), on LIMA's vocabulary (32,001 with EOT) at temperature 0.7.

    nice python benchmarks/top_p_speed.py [--rows 1,4,16] [--vocab 32001] [--calls 15]
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def sorted_top_p_mask(logits, top_p):
    """The sort-based nucleus lima_jax used before (argsort, softmax, cumsum, scatter back)."""
    import jax
    import jax.numpy as jnp
    order = jnp.argsort(-logits, axis=-1)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--vocab", type=int, default=32001)
    p.add_argument("--calls", type=int, default=15)
    args = p.parse_args()

    import jax
    import numpy as np

    from lima_jax.generation import top_p_mask

    rng = np.random.default_rng(0)
    fns = {"sorted": jax.jit(sorted_top_p_mask, static_argnums=1),
           "threshold search": jax.jit(top_p_mask, static_argnums=1)}
    for rows in (int(r) for r in args.rows.split(",")):
        logits = jax.numpy.asarray(rng.normal(size=(rows, args.vocab)).astype(np.float32) / 0.7)
        for fn in fns.values():
            fn(logits, 0.9).block_until_ready()
        times = {name: [] for name in fns}
        for _ in range(args.calls):
            for name, fn in fns.items():
                tic = time.perf_counter()
                fn(logits, 0.9).block_until_ready()
                times[name].append(time.perf_counter() - tic)
        med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(f"[{rows}, {args.vocab}] top_p 0.9, median of {args.calls}: sorted {med['sorted']:.2f} ms, threshold "
              f"search {med['threshold search']:.2f} ms, ratio {med['threshold search'] / med['sorted']:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
