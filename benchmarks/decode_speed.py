"""Decoding speed of the toy model with and without the KV cache (medians side by side).

    python benchmarks/decode_speed.py [--config configs/toy.py] [--batch 4] [--new_tokens 128] [--runs 5]

Both modes run the same jitted loop (`lima_jax.generation.decode`) with LIMA's sampling settings and the same
right-padded batch; without the cache every step recomputes the full forward pass over the whole buffer.
EOT does not stop a row here, so every run decodes exactly batch x new_tokens tokens. Compilation is
excluded (one warm-up run per mode).
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPTS = ["Hi", "What is the capital of Portugal?", "Write a short poem about the sun, please.",
           "Explain, in simple words, why leaves fall from the trees in autumn and what happens to them."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "toy.py"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from lima_jax import sharding
    from lima_jax.config import load_config_file, model_config
    from lima_jax.generation import Generator, SamplingConfig
    from lima_jax.model import Llama
    from lima_jax.tokenizer import load_tokenizer

    config = load_config_file(args.config)
    tokenizer = load_tokenizer(config)
    cfg = model_config(config, tokenizer.vocab_size)
    model = Llama(cfg)
    params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]))(
        jax.random.key(0))
    mesh, rules = sharding.make_mesh(config, vocab_size=cfg.vocab_size), sharding.layout_rules(config)
    prompts = [tokenizer.encode_dialog([PROMPTS[i % len(PROMPTS)]]).ids for i in range(args.batch)]
    settings = SamplingConfig(max_new_tokens=args.new_tokens, stop_at_eot=False)

    results = {}
    for label, use_cache in (("with cache", True), ("without cache", False)):
        generator = Generator(cfg, params, tokenizer, mesh, rules, batch_size=args.batch, use_cache=use_cache)
        generator.generate_ids(prompts, settings)  # compile
        seconds = []
        for _ in range(args.runs):
            tic = time.perf_counter()
            completions = generator.generate_ids(prompts, settings)
            seconds.append(time.perf_counter() - tic)
        tokens = sum(c.response_tokens for c in completions)
        results[label] = (tokens / statistics.median(seconds), statistics.median(seconds))

    lengths = sorted(len(p) for p in prompts)
    print(f"toy model (dim {cfg.dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size}) on {jax.devices()[0].platform}"
          f" x{jax.device_count()}, batch {args.batch}, prompts {lengths[0]}-{lengths[-1]} tokens, "
          f"{args.new_tokens} new tokens per row, median of {args.runs} runs")
    print(f"{'':15}{'tokens/s':>12}{'s/run':>10}")
    for label, (rate, secs) in results.items():
        print(f"{label:15}{rate:12.1f}{secs:10.3f}")
    print(f"{'speed-up':15}{results['with cache'][0] / results['without cache'][0]:11.2f}x")


if __name__ == "__main__":
    main()
