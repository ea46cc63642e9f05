"""The LIMA recipe on LLaMA-1 33B: `lima_65b.py` with this model shape and the small-model batch/dropout."""
import ml_collections

from lima_jax.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "lima_65b.py")
    c.model.update(dim=6656, n_layers=60, n_heads=52, n_kv_heads=52, hidden_dim=17920,
                   norm_eps=1e-06, rope_theta=10000.0, max_seq_len=2048)
    # The paper: batch 64 and dropout 0.2 for the smaller models.
    c.train.batch_size = 64
    c.model.residual_dropout_max = 0.2
    return c
