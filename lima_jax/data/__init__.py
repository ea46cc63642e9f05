"""Data: conversation formats (`formats`), rows and packing (`packing`), the batch pipeline (`pipeline`),
TFDS datasets (`tfds_builders`), dataset statistics (`stats`), and the `python -m lima_jax.data
build|stats|tokenizer` entry point (`__main__`). Every path may be local or a gs:// URL (`lima_jax.paths`)."""
from lima_jax.data.formats import Conversation, DataError, read_conversations
from lima_jax.data.packing import best_fit_decreasing
from lima_jax.data.pipeline import (BATCH_FIELDS, Example, LoadReport, RowLayout, StepPlan, check_input_signature,
                                    epoch_batches, epoch_order, epoch_rows, epoch_steps, input_signature,
                                    load_examples, pad_rows, plan_steps, prefetch, row_layout, rows_per_step,
                                    steps_per_epoch, tokenize_all, tokenize_conversation)

__all__ = ["BATCH_FIELDS", "Conversation", "DataError", "Example", "LoadReport", "RowLayout", "StepPlan",
           "best_fit_decreasing", "check_input_signature", "epoch_batches", "epoch_order", "epoch_rows", "epoch_steps",
           "input_signature", "load_examples", "pad_rows", "plan_steps", "prefetch", "read_conversations",
           "row_layout", "rows_per_step", "steps_per_epoch", "tokenize_all", "tokenize_conversation"]
