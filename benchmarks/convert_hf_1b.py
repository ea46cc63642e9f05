"""Conversion time and peak host memory for a ~1.1B-parameter LLaMA (TinyLlama-1.1B's shape, random weights).

    python benchmarks/convert_hf_1b.py --workdir /tmp/convert_bench [--dtype bfloat16]

Writes a random model as sharded bfloat16 safetensors (2 GB shards + index, transformers 5 config.json),
then times `python -m lima_jax.convert from_hf` and `to_hf` in child processes under `/usr/bin/time -v`
(falling back to `resource` when absent) and prints wall time and peak resident memory of each, next to
the model's size: the point is that the import never holds the whole model, the export holds it once.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import resource
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

from lima_jax import conversion
from lima_jax.config import ModelConfig

# TinyLlama-1.1B: 22 layers, GQA 32/4 heads, LLaMA-2 tokenizer size.
SHAPE = ModelConfig(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
                    norm_eps=1e-5, max_seq_len=2048)


def write_random_hf(folder: pathlib.Path, cfg: ModelConfig, shard_bytes: int) -> int:
    """A sharded bfloat16 HF folder with random weights, written tensor by tensor; returns its byte size."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    dtype = np.dtype(ml_dtypes.bfloat16)
    shards, size = [[]], 0
    for name, shape, _ in conversion.hf_tensors({}, cfg):
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, dtype))
        size += nbytes
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        conversion.write_safetensors(folder / file, shard, lambda name: (
            rng.standard_normal(next(s for n, s, _ in shard if n == name), np.float32) * 0.02).astype(dtype))
        weight_map.update({name: file for name, _, _ in shard})
        total += sum(math.prod(s) * dtype.itemsize for _, s, _ in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(conversion.model_to_hf_config(cfg, "bfloat16", 1, 2, None)))
    return total


def measure(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a child process."""
    if shutil.which("time") or pathlib.Path("/usr/bin/time").exists():
        tic = time.perf_counter()
        run = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
        wall = time.perf_counter() - tic
        if run.returncode != 0:
            sys.exit(run.stdout + run.stderr)
        peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
        print(run.stdout.strip())
        return wall, peak_kib / 1024
    tic = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - tic, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/convert_bench"))
    parser.add_argument("--dtype", default=None, help="dtype of the lima_jax checkpoint (default: bfloat16)")
    parser.add_argument("--tokenizer", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
                                                   / "llama" / "llama_tokenizer.model"))
    args = parser.parse_args()
    hf, lima, back = args.workdir / "hf", args.workdir / "lima", args.workdir / "hf_back"
    for path in (hf, lima, back):
        shutil.rmtree(path, ignore_errors=True)
    tic = time.perf_counter()
    size = write_random_hf(hf, SHAPE, 2 * 2**30)
    print(f"wrote a random {SHAPE.num_params() / 1e9:.2f}B-parameter LLaMA ({size / 2**30:.2f} GiB bfloat16, "
          f"{len(list(hf.glob('*.safetensors')))} shards) in {time.perf_counter() - tic:.0f} s")
    command = [sys.executable, "-m", "lima_jax.convert", "from_hf", "--input", str(hf), "--output", str(lima)]
    wall, peak = measure(command + (["--dtype", args.dtype] if args.dtype else []))
    print(f"from_hf: {wall:.1f} s wall, peak RSS {peak:.0f} MiB (model {size / 2**20:.0f} MiB as bfloat16)")
    if pathlib.Path(args.tokenizer).is_file():
        wall, peak = measure([sys.executable, "-m", "lima_jax.convert", "to_hf", "--input", str(lima),
                              "--tokenizer", args.tokenizer, "--output", str(back)])
        print(f"to_hf:   {wall:.1f} s wall, peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
