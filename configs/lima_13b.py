"""The LIMA recipe on LLaMA-1 13B: `lima_65b.py` with this model shape and the small-model batch/dropout."""
import ml_collections

from lima_jax.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "lima_65b.py")
    c.model.update(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824,
                   norm_eps=1e-06, rope_theta=10000.0, max_seq_len=2048)
    # The paper: batch 64 and dropout 0.2 for the smaller models.
    c.train.batch_size = 64
    c.model.residual_dropout_max = 0.2
    return c
