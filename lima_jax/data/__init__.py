"""Data: conversation formats (`formats`) and the batch pipeline (`pipeline`)."""
from lima_jax.data.formats import Conversation, DataError, read_conversations
from lima_jax.data.pipeline import (BATCH_FIELDS, Example, LoadReport, epoch_batches, epoch_order, load_examples,
                                    pad_rows, steps_per_epoch, tokenize_conversation)

__all__ = ["BATCH_FIELDS", "Conversation", "DataError", "Example", "LoadReport", "epoch_batches", "epoch_order",
           "load_examples", "pad_rows", "read_conversations", "steps_per_epoch", "tokenize_conversation"]
