"""A tiny LLaMA on the bundled toy conversations: the whole recipe on a 2-core CPU in about a minute.

    python -m lima_jax.train --config configs/toy.py --config.workdir=/tmp/lima_toy

Same recipe as `lima_65b.py` (AdamW 0.9/0.95/0.1, linear decay, per-layer residual dropout, EOT turns,
assistant-only loss, a checkpoint per epoch); only the sizes and the learning rate differ: a model trained
from scratch needs a far larger learning rate than fine-tuning a pretrained one.
"""
import pathlib

import ml_collections

from lima_jax.config import load_sibling

DATA = pathlib.Path(__file__).resolve().parent.parent / "data"


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "lima_65b.py")
    c.model.update(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=176, norm_eps=1e-5,
                   max_seq_len=256, residual_dropout_max=0.2, compute_dtype="float32", remat_policy="none")
    c.tokenizer.path = str(DATA / "toy_tokenizer.model")
    c.data.train_path = str(DATA / "toy_lima.jsonl")
    c.data.dev_path = str(DATA / "toy_dev.jsonl")
    c.data.max_len = 128
    c.train.batch_size = 8
    c.train.num_epochs = 15
    c.train.snapshots = "full"  # every epoch's full state, so a resume can start from any of them
    c.optimizer.learning_rate = 3e-3
    c.optimizer.end_learning_rate = 3e-4
    c.mesh.update(data=-1, fsdp=1, tensor=1, layout="data")
    c.dev_report.epochs = (5, 10, 15)
    c.dev_report.max_new_tokens = 48
    return c
