"""The LIMA recipe on LLaMA-3.2 1B: `lima_small.py` (batch 64, dropout 0.2) with this model shape.

Meta's config.json: 2048 wide, 16 layers, 32 heads with 8 KV heads, SwiGLU 8,192, vocabulary 128,256, *tied*
embeddings (the LM head is the embedding), RoPE as LLaMA-3.1 (`llama31_8b.py`) but with factor 32. 1.24B
parameters.
"""
import ml_collections

from lima_jax.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "lima_small.py")
    rope = load_sibling(__file__, "llama31_8b.py").model
    c.model.update(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, norm_eps=1e-05,
                   max_seq_len=rope.max_seq_len, tie_embeddings=True,
                   **{k: rope[k] for k in c.model if k.startswith("rope_")})
    c.model.rope_scaling_factor = 32.0
    # LLaMA-3.x ships a 128K-token BPE, not sentencepiece (see llama31_8b.py).
    return c
