"""Does an export's scaled RoPE load right in another transformers version? transformers 4.x reads
config.json's `rope_scaling` and `rope_theta`, 5.x `rope_parameters` (or a non-null `rope_scaling`); lima_jax's
export writes all of them. This script checks the export with whichever transformers runs it.

    # 1. with lima_jax: tiny random models of each kind, exported, with lima_jax's logits beside them
    python benchmarks/rope_other_transformers.py export --out /tmp/rope_exports
    # 2. with any python that has torch + transformers (lima_jax not needed), e.g. a transformers 4.57 venv
    /path/to/venv/bin/python benchmarks/rope_other_transformers.py check --out /tmp/rope_exports

`check` prints one row per kind: the transformers version, the RoPE type transformers parsed, and the max
|logit diff| against lima_jax. The llama3 kinds pretrain at 16 positions and run on 40 (theta 10,000, head_dim
16), so plain RoPE instead of the scaling would show as a difference of order 1 (the row's last column).
"""
from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

TINY_LLAMA3 = dict(rope_type="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                   rope_original_max_seq_len=16)
KINDS = {  # folder name: (n_kv_heads, tie_embeddings, llama3 RoPE)
    "gqa_untied_default": (2, False, False), "gqa_tied_default": (2, True, False),
    "gqa_untied_llama3": (2, False, True), "gqa_tied_llama3": (2, True, True), "mha_untied_llama3": (4, False, True),
}
TOKENS = np.random.default_rng(3).integers(0, 513, size=(2, 40))


def export(out: pathlib.Path) -> None:
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax.linen import meta

    from lima_jax import checkpoint, conversion
    from lima_jax.config import ModelConfig
    from lima_jax.model import Llama
    toy_tokenizer = pathlib.Path(__file__).resolve().parent.parent / "data" / "toy_tokenizer.model"
    for name, (n_kv, tied, llama3) in KINDS.items():
        cfg = ModelConfig(vocab_size=513, dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv, hidden_dim=96,
                          max_seq_len=128, tie_embeddings=tied, **(TINY_LLAMA3 if llama3 else {}))
        params = meta.unbox(Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
        rng = np.random.default_rng(0)  # weights large enough that every layer matters to the logits
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: (1 + 0.2 * rng.normal(size=x.shape) if "norm" in jax.tree_util.keystr(path)
                             else 0.15 * rng.normal(size=x.shape)).astype(np.float32), params)
        checkpoint.save_params(out / name / "lima", params, cfg)
        conversion.export_hf(out / name / "lima", toy_tokenizer, out / name / "hf")
        logits, _ = Llama(cfg).apply({"params": params}, jnp.asarray(TOKENS))
        np.save(out / name / "lima_logits.npy", np.asarray(logits))
        plain = dataclasses.replace(cfg, rope_type="default", **{k: None for k in TINY_LLAMA3 if k != "rope_type"})
        plain_logits, _ = Llama(plain).apply({"params": params}, jnp.asarray(TOKENS))
        np.save(out / name / "plain_rope_logits.npy", np.asarray(plain_logits))
        print(f"{name}: exported {out / name / 'hf'}")


def check(out: pathlib.Path) -> None:
    import torch
    import transformers
    print(f"| kind | transformers | RoPE type parsed | max abs logit diff vs lima_jax | vs lima_jax with plain RoPE |")
    print("| --- | --- | --- | --- | --- |")
    for name in KINDS:
        model = transformers.AutoModelForCausalLM.from_pretrained(out / name / "hf", local_files_only=True).eval()
        # transformers 4 reads rope_scaling (rope_parameters is kept as an unread attribute); in 5 it is an alias
        rope = getattr(model.config, "rope_scaling", None) or {}
        with torch.no_grad():
            ours = model(torch.as_tensor(TOKENS)).logits.float().numpy()
        diff = float(np.abs(ours - np.load(out / name / "lima_logits.npy")).max())
        plain = float(np.abs(ours - np.load(out / name / "plain_rope_logits.npy")).max())
        print(f"| {name} | {transformers.__version__} | {rope.get('rope_type', 'default')} | {diff:.2e} | "
              f"{plain:.2e} |")
    hf = json.loads((out / "gqa_untied_llama3" / "hf" / "config.json").read_text())
    print("config.json RoPE keys:", {k: hf[k] for k in ("rope_scaling", "rope_parameters", "rope_theta")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("export", "check"))
    parser.add_argument("--out", type=pathlib.Path, required=True, help="folder for the exports")
    args = parser.parse_args()
    (export if args.step == "export" else check)(args.out)


if __name__ == "__main__":
    main()
