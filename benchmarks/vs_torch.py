"""One training step (forward, backward, AdamW) of lima_jax vs PyTorch + transformers on the CPU, side by side.

    nice python benchmarks/vs_torch.py [--shapes peer,toy] [--sides lima_jax,torch] [--rounds 5] [--threads N]
        [--xla_flags "..."] [--config.a.b=v ...]

Shapes: `peer` is the issue's LLaMA shape (dim 256, 4 layers, 8 heads / 4 KV heads, ffn 688, vocab 8,000, batch
8 x 512, float32); `toy` is configs/toy.py (batch 8 x 128). lima_jax runs its real train step (the jitted step
`lima_jax.train` runs, through `lima_jax.analysis.bench.compile_case`: random tokens, one segment per row, LIMA's
residual dropout on); PyTorch runs `LlamaForCausalLM` (SDPA attention) with token cross-entropy and
`torch.optim.AdamW` (betas 0.9/0.95, weight decay 0.1), and the same residual dropout as lima_jax's config (the
same per-layer rates, `torch.nn.functional.dropout` on each layer's attention and MLP output through forward
hooks; none at rate 0), so both do the recipe's work. After one warm-up step each, the two alternate for
--rounds rounds, with the same thread count (torch.set_num_threads; XLA's CPU client uses every core of the
process, so --threads also pins the process to that many cores with sched_setaffinity). In a round each side
runs --settle untimed steps (default 1) and then one timed step: torch's OpenMP threads keep spinning for some
milliseconds after its work and slow whatever XLA runs next (a [4,096, 256] x [256, 688] product: 7.8 ms alone,
10.9 ms right after a torch op; torch right after XLA: no change), so without a settling step the alternation
measures lima_jax on a machine torch still occupies, which a training loop never is. Prints the median step
time of each, the ratio of the medians lima_jax / torch (< 1: lima_jax faster), and the median and range of
the per-round ratios.

--xla_flags=FLAGS (with "=", as the value starts with --): extra XLA_FLAGS for this run, set before jax is
imported, e.g. --xla_flags=--xla_cpu_use_xnnpack=true; compare the ratio to torch between runs (on a machine
with spare cores: on an oversubscribed one torch's OpenMP pool slows down far more than XLA's, use --threads 1).
--config.a.b=v: an override of configs/toy.py applied to lima_jax's step after the shape's (e.g.
--config.model.attention=reference; --config.model.residual_dropout_max=0.0 turns dropout off on both sides).
lima_jax's CPU memory setting (lima_jax.xla_cpu: once a CPU mesh exists glibc keeps freed memory, so each step
reuses the last one's pages) applies to the whole process, torch included; LIMA_JAX_MALLOC=default leaves glibc's
and JAX's defaults to both. To time each at its own defaults, run one side per process, alternating:
`--sides lima_jax` and `LIMA_JAX_MALLOC=default ... --sides torch`.
Needs torch and transformers (`pip install "lima_jax[parity]"`).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lima_jax import cli  # noqa: E402 (after the path; it does not start a backend, so XLA_FLAGS set later apply)

PEER = dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, hidden_dim=688, vocab_size=8000, batch=8, length=512)


SHAPES = ("peer", "toy")
SIDES = ("lima_jax", "torch")


def shape_overrides(name: str) -> list[tuple[str, str]]:
    """Config overrides of configs/toy.py giving the named shape (float32, no remat, one device)."""
    common = [("model.compute_dtype", "float32"), ("model.param_dtype", "float32"), ("model.remat_policy", "none"),
              ("mesh.data", "1")]
    if name == "toy":
        return common
    if name == "peer":
        p = PEER
        return common + [("model.dim", str(p["dim"])), ("model.n_layers", str(p["n_layers"])),
                         ("model.n_heads", str(p["n_heads"])), ("model.n_kv_heads", str(p["n_kv_heads"])),
                         ("model.hidden_dim", str(p["hidden_dim"])), ("model.vocab_size", str(p["vocab_size"])),
                         ("model.max_seq_len", str(p["length"])), ("data.max_len", str(p["length"])),
                         ("train.batch_size", str(p["batch"]))]
    raise ValueError(f"unknown shape {name!r}: {', '.join(SHAPES)}")


def add_residual_dropout(model, rates) -> None:
    """LIMA's residual dropout on a transformers LLaMA: layer l drops its attention and MLP outputs at rates[l]."""
    import torch

    for layer, rate in zip(model.model.layers, rates):
        if rate == 0:
            continue
        p = float(rate)
        layer.self_attn.register_forward_hook(
            lambda module, _inputs, out, p=p: (torch.nn.functional.dropout(out[0], p, module.training), *out[1:]))
        layer.mlp.register_forward_hook(
            lambda module, _inputs, out, p=p: torch.nn.functional.dropout(out, p, module.training))


def torch_step(case, threads: int):
    """A PyTorch + transformers train step of the same shape and optimizer as `case`; returns a timer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lima_jax.model import residual_dropout_rates  # here: jax is imported once XLA_FLAGS are set

    torch.set_num_threads(threads)
    m, cfg = case.model_cfg, case.cfg
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.hidden_dim, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=False, attention_dropout=0.0,
        attn_implementation="sdpa"))
    model.train()
    add_residual_dropout(model, residual_dropout_rates(m.n_layers, m.residual_dropout_max))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    rows, length = cfg.train.batch_size, cfg.data.max_len
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, m.vocab_size, (rows, length), generator=generator)
    targets = torch.roll(tokens, -1, dims=1)

    def step() -> float:
        tic = time.perf_counter()
        logits = model(input_ids=tokens).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, m.vocab_size), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())
        return time.perf_counter() - tic

    return step


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="peer,toy", help="comma-separated: peer, toy (default both)")
    p.add_argument("--rounds", type=int, default=5, help="timed steps of each, alternating (default 5)")
    p.add_argument("--settle", type=int, default=1,
                   help="untimed steps of the same side before each timed one (default 1; 0: strict alternation)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="threads for both (default: the cores this process may use)")
    p.add_argument("--xla_flags", default="", help="extra XLA_FLAGS for this run")
    p.add_argument("--sides", default="lima_jax,torch", help="comma-separated: lima_jax, torch (default both)")
    rest, extra = cli.split_overrides(argv)
    args = p.parse_args(rest)
    if args.rounds < 1 or args.settle < 0:
        p.error(f"--rounds must be >= 1 and --settle >= 0 (got {args.rounds}, {args.settle})")
    for flag, names, known in (("--shapes", args.shapes, SHAPES), ("--sides", args.sides, SIDES)):
        unknown = [name for name in names.split(",") if name not in known]
        if unknown:
            p.error(f"{flag}: unknown {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()

    import jax

    from lima_jax.analysis import bench
    from lima_jax.config import load_config_file

    config = load_config_file(REPO / "configs" / "toy.py")
    print(f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}; overrides {extra}; {args.threads} threads; "
          f"load {os.getloadavg()[0]:.1f} (1-min average) on {os.cpu_count()} cores; jax {jax.__version__}",
          flush=True)
    for name in args.shapes.split(","):
        variant = bench.Variant(name, tuple(shape_overrides(name) + extra))
        case = bench.compile_case(config, variant, jax.devices()[:1])
        sides = args.sides.split(",")
        timers = {side: case.step if side == "lima_jax" else torch_step(case, args.threads) for side in sides}
        for timer in timers.values():  # warm-up
            timer()
        times = {label: [] for label in timers}
        for _ in range(args.rounds):
            for label, timer in timers.items():
                for _ in range(args.settle):
                    timer()
                times[label].append(timer())
        median = {label: statistics.median(t) for label, t in times.items()}
        m = case.model_cfg
        line = (f"{name}: dim {m.dim}, {m.n_layers} layers, {m.n_heads}/{m.n_kv_heads} heads, ffn {m.hidden_dim}, "
                f"vocab {m.vocab_size}, batch {case.cfg.train.batch_size} x {case.cfg.data.max_len}, float32; median "
                f"of {args.rounds}: " + ", ".join(f"{label} {t * 1e3:,.1f} ms" for label, t in median.items()))
        if len(times) == 2:
            per_round = sorted(a / b for a, b in zip(times["lima_jax"], times["torch"]))
            line += (f", ratio lima_jax/torch {median['lima_jax'] / median['torch']:.3f} (per round: median "
                     f"{statistics.median(per_round):.3f}, {per_round[0]:.3f}-{per_round[-1]:.3f})")
        print(f"{line}; settle {args.settle}; load now {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    cli.run(main)  # bad input (an unknown --config field): one error line, exit 2
