"""Memory levers of the real train step, side by side: compiled temporaries and median step time per variant.

    python benchmarks/memory_levers.py [--dim 256 --layers 4 --heads 8 --kv_heads 4 --ffn 688 --vocab 8000
                                        --batch 8 --length 512] [--steps 5] [--variants baseline,chunk,...]

Every variant is the step training runs (`lima_jax.analysis.layouts.compile_layout`: `jit_train_step` over the
sharded abstract state, the state donated) on one device, built from `configs/toy.py` with the shape above
(the issue-15 peer shape by default: dim 256, 4 layers, 8 heads / 4 KV heads, ffn 688, vocab 8,000, 8 x 512
tokens, float32) and one lever changed:

  baseline        float32, no remat, the loss over the whole sequence, no vocabulary padding, float32 moments
  chunk=N         train.loss_chunk_length=N (the loss's logits N positions at a time, recomputed in backward)
  pad=128         model.vocab_multiple=128 (embedding / LM head rows padded, padded logits -inf)
  remat=P         model.remat_policy=P for P in full, dots, dots_no_batch, attention_out
  bf16            model.compute_dtype=bfloat16 with float32 parameters (master weights)
  bf16_moments    optimizer.mu_dtype = nu_dtype = bfloat16
  all             chunk + pad + remat=full + bf16 + bf16_moments

Columns: XLA's compiled memory analysis (temporaries; arguments = train state + batch; peak where the backend
reports one) and the median of `--steps` timed steps after one warm-up step, the variants run alternately
(one step of each per round) so machine load hits all alike; `x base` is the ratio to the baseline's median.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

REMATS = ("full", "dots", "dots_no_batch", "attention_out")
BASELINE = {"model.remat_policy": "none", "model.compute_dtype": "float32", "model.param_dtype": "float32",
            "model.vocab_multiple": 1, "train.loss_chunk_length": 0, "optimizer.mu_dtype": "param",
            "optimizer.nu_dtype": "param"}


def variants(chunk: int) -> dict[str, dict]:
    """{name: the fields it changes from BASELINE}."""
    table = {"baseline": {}, f"chunk={chunk}": {"train.loss_chunk_length": chunk},
             "pad=128": {"model.vocab_multiple": 128}}
    table.update({f"remat={p}": {"model.remat_policy": p} for p in REMATS})
    table["bf16"] = {"model.compute_dtype": "bfloat16"}
    table["bf16_moments"] = {"optimizer.mu_dtype": "bfloat16", "optimizer.nu_dtype": "bfloat16"}
    table["all"] = {**table[f"chunk={chunk}"], **table["pad=128"], "model.remat_policy": "full", **table["bf16"],
                    **table["bf16_moments"]}
    return table


def set_fields(config, fields: dict) -> None:
    for dotted, value in fields.items():
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node[part]
        with node.ignore_type():
            node[leaf] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("dim", 256), ("layers", 4), ("heads", 8), ("kv_heads", 4), ("ffn", 688), ("vocab", 8000),
                          ("batch", 8), ("length", 512), ("steps", 5), ("chunk", 128)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--variants", default="", help="comma-separated names (default: all of them)")
    parser.add_argument("--json", default="", help="also write one JSON line per variant to this file")
    args = parser.parse_args()

    import jax

    from lima_jax import runtime
    from lima_jax.analysis.layouts import compile_layout, synthetic_batch
    from lima_jax.config import load_config_file, model_config, validate

    table = variants(args.chunk)
    names = [n for n in args.variants.split(",") if n] or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(table)}")
    device = jax.devices()[0]
    print(f"device {device.platform} ({device.device_kind}), shape dim {args.dim}, {args.layers} layers, "
          f"{args.heads}/{args.kv_heads} heads, ffn {args.ffn}, vocab {args.vocab}, "
          f"batch {args.batch} x {args.length}, {args.steps} timed steps, load {os.getloadavg()[0]:.1f}")

    runs = {}
    for name in names:
        config = load_config_file(REPO / "configs" / "toy.py")
        config.model.update(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                            hidden_dim=args.ffn, vocab_size=args.vocab, max_seq_len=args.length,
                            residual_dropout_max=0.0)
        config.data.update(max_len=args.length, packing="rows")
        config.train.update(batch_size=args.batch)
        config.mesh.update(data=1, fsdp=1, tensor=1, layout="data")
        set_fields(config, {**BASELINE, **table[name]})
        validate(config, paths=False)
        cfg = model_config(config)
        tic = time.perf_counter()
        compiled, model, tx, shardings, batch_sharding, mesh = compile_layout(config, cfg, [device])
        compile_s = time.perf_counter() - tic
        memory = compiled.memory_analysis()
        with jax.set_mesh(mesh):
            state = runtime.create_train_state(model, tx, shardings, jax.random.key(0))
            batch = runtime.global_batch(synthetic_batch(config, args.vocab), batch_sharding)
            state, metrics = compiled(state, batch)  # warm-up
            jax.block_until_ready(metrics)
        runs[name] = {"compiled": compiled, "state": state, "batch": batch, "mesh": mesh, "times": [],
                      "compile_s": compile_s, "temp": memory.temp_size_in_bytes,
                      "args": memory.argument_size_in_bytes,
                      "peak": getattr(memory, "peak_memory_in_bytes", 0), "loss": float(metrics["loss"])}
        print(f"  compiled {name} in {compile_s:.1f} s: temporaries {memory.temp_size_in_bytes / 2 ** 20:.0f} MiB, "
              f"arguments {memory.argument_size_in_bytes / 2 ** 20:.0f} MiB", flush=True)

    for _ in range(args.steps):  # alternating: one step of every variant per round
        for name in names:
            run = runs[name]
            with jax.set_mesh(run["mesh"]):
                tic = time.perf_counter()
                run["state"], metrics = run["compiled"](run["state"], run["batch"])
                jax.block_until_ready((run["state"], metrics))
                run["times"].append(time.perf_counter() - tic)

    base = statistics.median(runs[names[0]]["times"])
    mib = 2 ** 20
    print(f"\n| variant | temporaries MiB | arguments MiB | peak MiB | step s (median) | x {names[0]} | compile s | "
          "first loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = []
    for name in names:
        run = runs[name]
        median = statistics.median(run["times"])
        peak = f"{run['peak'] / mib:.0f}" if run["peak"] else "n/a"
        print(f"| {name} | {run['temp'] / mib:.0f} | {run['args'] / mib:.0f} | {peak} | {median:.3f} | "
              f"{median / base:.2f} | {run['compile_s']:.1f} | {run['loss']:.4f} |")
        lines.append({"variant": name, "fields": table[name], "temp_bytes": run["temp"], "argument_bytes": run["args"],
                      "peak_bytes": run["peak"], "step_s": run["times"], "median_step_s": median,
                      "compile_s": run["compile_s"], "first_loss": run["loss"]})
    print(f"load {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        pathlib.Path(args.json).write_text("".join(json.dumps(line) + "\n" for line in lines))


if __name__ == "__main__":
    main()
