"""What the checkpoint checksums cost: manifest on save, verification before restore, side by side with orbax.

    JAX_PLATFORMS=cpu python benchmarks/checkpoint_verify.py                      # toy-size and 250M states
    JAX_PLATFORMS=cpu python benchmarks/checkpoint_verify.py --sizes 1e9 --repeats 1

For each size, a float32 train-state-like tree (parameters, plus AdamW's two moments unless --params_only) is
saved with `lima_jax.checkpoint.TrainCheckpoints` (orbax save, then the manifest), then verified
(`checkpoint.verify_folder`) and restored (orbax). Prints the median seconds of each and the checksum share.
Restores read from the page cache here (the files were just written); a cold read makes verification cost
about as much as the restore's own read, since both read every byte once.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from lima_jax import checkpoint

TOY_PARAMS = 250_560  # configs/toy.py (training logs "total parameters")
CHUNK = 1 << 26  # elements per array: like the larger LLaMA matrices


def synthetic_state(num_params: int, params_only: bool) -> dict:
    sizes = [CHUNK] * (num_params // CHUNK) + ([num_params % CHUNK] if num_params % CHUNK else [])
    key = jax.random.key(0)
    params = {f"w{i}": jax.random.normal(jax.random.fold_in(key, i), (n,), jnp.float32) for i, n in enumerate(sizes)}
    if params_only:
        return {"params": params}
    return {"params": params, "mu": jax.tree.map(lambda x: x * 1e-3, params),
            "nu": jax.tree.map(lambda x: x * x, params)}


def measure(num_params: int, params_only: bool, repeats: int, root: str) -> dict:
    times: dict[str, list[float]] = {"save": [], "checksums": [], "verify": [], "restore": []}
    for repeat in range(repeats):
        state = synthetic_state(num_params, params_only)
        nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        directory = tempfile.mkdtemp(dir=root)
        manager = checkpoint.TrainCheckpoints(directory)
        manager.save(1, state, {"step": 1})
        del state  # only one copy in memory at a time: a 1B-parameter train state is 12 GiB
        times["save"].append(manager.last_save_s)
        times["checksums"].append(manager.last_seal_s)
        tic = time.perf_counter()
        assert checkpoint.verify_folder(manager.step_folder(1)) == []
        times["verify"].append(time.perf_counter() - tic)
        tic = time.perf_counter()
        restored, _ = manager.restore(1, abstract)
        jax.block_until_ready(restored)
        times["restore"].append(time.perf_counter() - tic)
        manager.close()
        del restored
        shutil.rmtree(directory)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"params": num_params, "GiB": nbytes / 2**30, **median}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=f"{TOY_PARAMS},2.5e8", help="parameter counts, comma-separated")
    p.add_argument("--params_only", action="store_true", help="parameters only (no optimizer moments)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: the system temp folder)")
    args = p.parse_args()
    root = args.dir or tempfile.gettempdir()
    print("| params | state | GiB | orbax save s | checksums s | share of save | verify s | orbax restore s | "
          "verify / restore |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in (int(float(s)) for s in args.sizes.split(",")):
        r = measure(size, args.params_only, args.repeats, root)
        print(f"| {size:,} | {'params' if args.params_only else 'params+AdamW'} | {r['GiB']:.3f} | {r['save']:.2f} | "
              f"{r['checksums']:.3f} | {r['checksums'] / (r['save'] + r['checksums']):.1%} | {r['verify']:.3f} | "
              f"{r['restore']:.2f} | {r['verify'] / r['restore']:.1%} |", flush=True)
    print(f"(medians of {args.repeats}; jax {jax.__version__}, numpy {np.__version__}, {jax.devices()[0].platform})")


if __name__ == "__main__":
    main()
