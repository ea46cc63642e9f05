"""The LIMA recipe on LLaMA-3.2 3B: `llama32_1b.py` (the `lima_small.py` recipe, tied embeddings, LLaMA-3.1 RoPE
with factor 32, the 128K-token BPE) with Meta's 3B shape: 3072 wide, 28 layers, 24 heads with 8 KV heads, SwiGLU
8,192. 3.21B parameters.
"""
import ml_collections

from lima_jax.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "llama32_1b.py")
    c.model.update(dim=3072, n_layers=28, n_heads=24)
    return c
