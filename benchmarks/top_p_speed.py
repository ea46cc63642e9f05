"""One sampling step, side by side (alternating calls, medians): LIMA's sampler (`lima_jax.generation.choose_tokens`:
repetition penalty 1.2, temperature 0.7, top-p 0.9), the full-vocabulary sampler it replaced (the same penalty and
temperature, the 32-pass threshold search `top_p_mask` over the vocabulary, then `jax.random.categorical`: V Gumbel
numbers per row), and greedy (`choose_tokens` with greedy=True: the penalty and an argmax), on LIMA's vocabulary
(32,001 with EOT).

Two regimes of logits: "peaked", N(0, 1) x 4 before the temperature (a fine-tuned model's shape: at temperature
0.7 the nucleus is a few to a few dozen tokens, inside the `TOP_P_CANDIDATES` of the fast path), and "flat",
N(0, 1) (a randomly initialised model: the nucleus is most of the vocabulary, so every row takes the fallback).
`--stories260k BIN` adds a third, "stories260k": real next-token logits of llama2.c's stories260K model (vocabulary
512) after a story prompt, each row a different prefix. The "candidates" column is the fraction of rows whose
nucleus was inside the candidates (`generation.sampling_nucleus`).

    nice python benchmarks/top_p_speed.py [--rows 1,4,16] [--vocab 32001] [--calls 21] [--stories260k BIN]
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def old_choose_tokens(logits, seen, keys, settings):
    """The sampler lima_jax used before the candidate path: the nucleus by the threshold search over the whole
    vocabulary, then a categorical draw over the whole vocabulary (V Gumbel numbers per row)."""
    import jax
    import jax.numpy as jnp

    from lima_jax.generation import sampling_logits
    return jax.vmap(jax.random.categorical)(keys, sampling_logits(logits, seen, settings)).astype(jnp.int32)


def stories260k_logits(path: str, rows: int):
    """[rows, 512] next-token logits of stories260K (converted from llama2.c's .bin) after prefixes of a story
    it writes itself (greedy from BOS, so every row is a real context)."""
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np

    from lima_jax import checkpoint, convert
    from lima_jax.config import ModelConfig
    from lima_jax.model import Llama
    with tempfile.TemporaryDirectory() as tmp:
        out = str(pathlib.Path(tmp) / "stories260k")
        convert.main(["from_llama2c", "--input", path, "--output", out])
        cfg = ModelConfig(**checkpoint.read_params_meta(out)["model"])
        params = checkpoint.restore_params(out)
    model = Llama(cfg)
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
    tokens = [1]
    out = []
    while len(out) < rows:
        logits = np.asarray(forward(params, jnp.asarray([tokens], jnp.int32))[0, -1])
        out.append(logits)
        tokens.append(int(logits.argmax()) if len(tokens) % 3 else int(np.argsort(logits)[-2]))
    return np.stack(out).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--vocab", type=int, default=32001)
    p.add_argument("--calls", type=int, default=21)
    p.add_argument("--stories260k", default="", help="llama2.c stories260K.bin: add its real logits as a regime")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from lima_jax.generation import SamplingConfig, choose_tokens, sampling_nucleus

    lima = SamplingConfig()
    greedy = SamplingConfig(greedy=True)
    fns = {"greedy": jax.jit(lambda l, s, k: choose_tokens(l, s, k, greedy)),
           "old": jax.jit(lambda l, s, k: old_choose_tokens(l, s, k, lima)),
           "new": jax.jit(lambda l, s, k: choose_tokens(l, s, k, lima))}
    candidates = jax.jit(lambda l: sampling_nucleus(l / lima.temperature, lima.top_p)[1])
    rng = np.random.default_rng(0)
    row_counts = [int(r) for r in args.rows.split(",")]
    real = stories260k_logits(args.stories260k, max(row_counts)) if args.stories260k else None
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; ms per call, median of {args.calls} alternating calls")
    for regime in ("peaked", "flat") + (("stories260k",) if real is not None else ()):
        for rows in row_counts:
            if regime == "stories260k":
                logits = real[:rows]
            else:
                scale = 4.0 if regime == "peaked" else 1.0
                logits = rng.normal(size=(rows, args.vocab)).astype(np.float32) * scale
            vocab = logits.shape[-1]
            logits = jnp.asarray(logits)
            seen = jnp.asarray(rng.random((rows, vocab)) < 0.002)  # ~64 generated tokens so far
            keys = jax.random.split(jax.random.key(1), rows)
            for fn in fns.values():
                fn(logits, seen, keys).block_until_ready()
            times = {name: [] for name in fns}
            for _ in range(args.calls):
                for name, fn in fns.items():
                    tic = time.perf_counter()
                    fn(logits, seen, keys).block_until_ready()
                    times[name].append(time.perf_counter() - tic)
            med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            share = float(np.asarray(candidates(logits)).mean())
            print(f"{regime:>11} [{rows:>2}, {vocab}] candidates {share:4.0%}: greedy {med['greedy']:.3f}, "
                  f"old {med['old']:.3f}, new {med['new']:.3f}; new/old {med['new'] / med['old']:.3f}, "
                  f"new/greedy {med['new'] / med['greedy']:.3f}", flush=True)


if __name__ == "__main__":
    main()
