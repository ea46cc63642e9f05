"""Fine-tune the real pretrained stories260K (llama2.c, TinyStories) on LIMA-shaped story requests.

    python -m lima_jax.experiments.small_lima run --out /tmp/small_lima     # everything, one command
    # or by hand:
    python -m lima_jax.convert from_llama2c --input ../shared/data/llama/stories260K.bin --output /tmp/s260k
    python -m lima_jax.experiments.small_lima build-data --out /tmp/stories_data --base /tmp/s260k
    python -m lima_jax.train --config configs/stories260k.py --config.workdir=/tmp/s260k_lima \
        --config.init_from=/tmp/s260k --config.data.train_path=/tmp/stories_data/train.jsonl \
        --config.data.dev_path=/tmp/stories_data/dev.jsonl \
        --config.dev_report.reference_path=/tmp/stories_data/dev_ref.jsonl

The LIMA recipe of `lima_65b.py` on a model small enough for a 2-core CPU: the model shape is stories260K's
(read from the checkpoint's header; `init_from` refuses a mismatch, and is required: without it training would
start from random weights), its tok512 sentencepiece tokenizer plus the new EOT token, whose row starts as a
copy of BOS's (`tokenizer.eot_init`: llama2.c's pretraining begins every story with BOS, so EOT starts out
predicted where a story ends; from the mean row the model never learned to stop). The learning rate (30x the
paper's 1e-5: a 260K-parameter model moves far less per step than a 65B one) and the 5 epochs were measured
on the stories the base model wrote (docs/reproducing.md, 1,030 conversations): at lr 3e-4 sampled answers
stop on EOT for 95-100% of unseen prompts at every epoch, the held-out story loss stays within 4.5-6.3% of
the base model's, and the answers copy the request's subject as often as the model copies a word in plain
text from epoch 3; lr 1e-3 stops as often and learns the copy in one epoch, but costs 8-10%; lr 1e-4 keeps
more and stops on EOT for fewer sampled answers.
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
    c.require_init_from = True
    c.data.max_len = 512  # a two-turn conversation of two stories is ~450 tokens
    c.train.batch_size = 32  # LIMA's 32 examples per step: ~32 steps per epoch on ~1,000 examples
    c.train.num_epochs = 5
    c.tokenizer.eot_init = "bos"  # llama2.c's pretraining starts every story with BOS: EOT starts where it did
    c.optimizer.learning_rate = 3e-4
    c.optimizer.end_learning_rate = 3e-5
    c.dev_report.epochs = tuple(range(1, 21))  # every epoch: the report is how the epoch is chosen
    c.dev_report.max_new_tokens = 0  # sized from the data: the 99th percentile of the training answers
    c.dev_report.batch_size = 64  # the 50 dev prompts in one batch
    return c
