"""The LIMA recipe for models smaller than 65B: `lima_65b.py` with the paper's small-model settings.

"We use a batch size of 32 examples (64 for smaller models)" and residual dropout rising to 0.3 at the last
layer "(0.2 for smaller models)". The model shape is LLaMA-1 65B's until a preset (lima_7b.py, ...) sets it.
"""
import ml_collections

from lima_jax.config import load_sibling


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "lima_65b.py")
    c.train.batch_size = 64
    c.model.residual_dropout_max = 0.2
    return c
