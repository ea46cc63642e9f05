"""The LIMA recipe on LLaMA-1 33B: `lima_small.py` (batch 64, dropout 0.2) with this model shape."""
import ml_collections

from lima_jax.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "lima_small.py")
    c.model.update(dim=6656, n_layers=60, n_heads=52, n_kv_heads=52, hidden_dim=17920,
                   norm_eps=1e-06, rope_theta=10000.0, max_seq_len=2048)
    return c
