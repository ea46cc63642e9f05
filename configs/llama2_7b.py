"""The LIMA recipe on LLaMA-2 7B: `lima_small.py` (batch 64, dropout 0.2) with this model shape."""
import ml_collections

from lima_jax.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "lima_small.py")
    c.model.update(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008,
                   norm_eps=1e-05, rope_theta=10000.0, max_seq_len=4096)
    return c
