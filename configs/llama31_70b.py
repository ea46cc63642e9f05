"""The LIMA recipe on LLaMA-3.1 70B: `lima_65b.py` (batch 32, dropout 0.3) with this model shape.

Meta's config.json: 8192 wide, 80 layers, 64 heads with 8 KV heads, SwiGLU 28,672, vocabulary 128,256, untied
embeddings, RoPE as LLaMA-3.1 8B (`llama31_8b.py`). 70.6B parameters.
"""
import ml_collections

from lima_jax.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "lima_65b.py")
    rope = load_sibling(__file__, "llama31_8b.py").model
    c.model.update(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672, norm_eps=1e-05,
                   max_seq_len=rope.max_seq_len, tie_embeddings=False,
                   **{k: rope[k] for k in c.model if k.startswith("rope_")})
    # LLaMA-3.x ships a 128K-token BPE, not sentencepiece (see llama31_8b.py).
    return c
