"""The LIMA recipe on LLaMA-3 8B: `lima_small.py` (batch 64, dropout 0.2) with this model shape."""
import ml_collections

from lima_jax.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "lima_small.py")
    c.model.update(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                   norm_eps=1e-05, rope_theta=500000.0, max_seq_len=8192)
    # LLaMA-3 ships a tiktoken BPE, not sentencepiece: the shape serves layout comparison and AOT compiles;
    # training needs a sentencepiece tokenizer (docs/model.md).
    return c
