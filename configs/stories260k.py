"""Fine-tune the real pretrained stories260K (llama2.c, TinyStories) on the bundled toy conversations.

    python -m lima_jax.convert from_llama2c --input ../shared/data/llama/stories260K.bin --output /tmp/s260k
    python -m lima_jax.train --config configs/stories260k.py --config.workdir=/tmp/s260k_lima \
        --config.init_from=/tmp/s260k

The LIMA recipe of `lima_65b.py` on a model small enough for a 2-core CPU: the model shape is stories260K's
(read from the checkpoint's header; `init_from` refuses a mismatch), its tok512 sentencepiece tokenizer
plus the new EOT token (the EOT embedding row starts as the mean row). The learning rate is larger than the
paper's 1e-5 because a 260K-parameter model moves far less per step than a 65B one.
"""
import pathlib

import ml_collections

from lima_jax.config import load_sibling

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data" / "llama"  # override with --config.tokenizer.path elsewhere


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "toy.py")
    c.model.update(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, hidden_dim=172, norm_eps=1e-5, rope_theta=10000.0,
                   max_seq_len=512, tie_embeddings=True, vocab_size=0, residual_dropout_max=0.1)
    c.tokenizer.path = str(SHARED / "tok512.model")
    c.init_from = ""  # required: a `lima_jax.convert from_llama2c` output folder
    c.train.num_epochs = 10
    c.optimizer.learning_rate = 1e-3
    c.optimizer.end_learning_rate = 1e-4
    return c
