"""Checkpoint interop: import pretrained LLaMA weights and export fine-tuned models to Hugging Face
(the library behind `python -m lima_jax.convert`).

An import writes a lima_jax parameter checkpoint (`params/` + `model.json`, see `lima_jax.checkpoint`) that
`config.init_from` reads; the EOT row is added there, at the start of fine-tuning. `export_hf` reads such a
folder, a training checkpoint (`workdir/checkpoints/<step>`) or a run (its chosen epoch, else its latest
checkpoint: `rundir.resolve_checkpoint`) and writes a folder that `transformers.AutoModelForCausalLM` /
`AutoTokenizer` load offline, with EOT as a special and stop token.

Every reader turns its format into tensors named and laid out as in Hugging Face (`model.layers.0.self_attn
.q_proj.weight`, torch [out, in]); one table (`params_table.PARAMS`) maps those to the lima_jax tree. RoPE:
lima_jax and Hugging Face rotate the two *halves* of each head; Meta and llama2.c rotate interleaved *pairs*
(2i, 2i+1). The q/k projections of an interleaved source are permuted into halves on import
(`interleaved_to_halves`); nothing else needs to change, since permuting q and k alike leaves every attention
score unchanged.

Memory: a reader yields one tensor at a time and the checkpoint is written one parameter kind (e.g. all
layers' w1) at a time, so peak host memory is about the largest stacked kind plus one source tensor. Inputs
are validated (config fields, missing files, tensor shapes) before any tensor is read.

Output: every command writes into a sibling `<output>.lima-partial-<random token>` and renames it onto the
output only when complete (`output.atomic_folder`), so a crash never leaves a half-written folder there; it
deletes only folders it created itself, never a user's `<output>.partial` or `<output>.old`, nor an input. An
existing non-empty output is refused unless `overwrite`, and even then unless it is a lima_jax parameter
checkpoint or a lima_jax Hugging Face export (marked by `output.EXPORT_MARKER`): `output.is_lima_output`. The
old folder is deleted only after the new one is in place. Paths are `etils.epath` paths
(`lima_jax.paths.as_path`): local, or gs:// URLs.

Tokenizer export: tokenizer.json beside the original tokenizer file (copied unchanged), every special id in
`added_tokens_decoder`, and a chat template that reads messages as lima_jax's reader does (a system message
joined to the first user turn, bad role orders a template error). It escapes special-token text (`<eot>`,
`<s>`, ...) in message content, and the tokenizer's normalizer undoes the escape, so a user who types `<eot>`
gets the ids lima_jax gives it (text), not the EOT id (`tokenizer_export`). config.json and
generation_config.json list EOT and EOS as stop ids; generation_config.json carries LIMA's sampling.

Modules, one concern each:
  rope              interleaved_to_halves / halves_to_interleaved; RoPE settings of config.json / params.json
  params_table      the Hugging Face name <-> lima_jax tree table
  source            the Source protocol of readers, input checks, dtype names
  safetensors_io    .safetensors header reader, tensor reads, writer
  output            the atomic output folder, --overwrite, the export marker
  hf_reader         HuggingFaceSource, hf_config_to_model
  meta_reader       MetaSource (params.json checks, model-parallel shard merging)
  llama2c_reader    Llama2cSource
  importer          check_source, import_checkpoint, source_tokenizer (kept with the import)
  tokenizer_export  write_hf_tokenizer (sentencepiece -> BPE; LLaMA-3 tiktoken -> Meta's byte-level BPE,
                    tiktoken_to_hf; tokenizer.json + <eot>), chat_template (roles checked, special-token
                    text escaped), CHAT_TEMPLATE, added_tokens_decoder, ship_original_tokenizer
  hf_writer         export_hf and its parts (model_to_hf_config, stop_token_ids, generation_config,
                    hf_tensors, write_hf_weights, ...)
"""
from lima_jax.conversion.hf_reader import HuggingFaceSource, hf_config_to_model
from lima_jax.conversion.hf_writer import (export_eot, export_hf, export_tokenizer, hf_tensors, load_lima_params,
                                           model_to_hf_config, write_hf_weights)
from lima_jax.conversion.importer import check_source, import_checkpoint, source_tokenizer
from lima_jax.conversion.llama2c_reader import Llama2cSource
from lima_jax.conversion.meta_reader import MetaSource, meta_hidden_dim
from lima_jax.conversion.output import EXPORT_MARKER, atomic_folder, check_output, is_hf_export, is_lima_output
from lima_jax.conversion.rope import describe_rope, halves_to_interleaved, interleaved_to_halves
from lima_jax.conversion.safetensors_io import read_safetensors_header, read_tensor, write_safetensors
from lima_jax.conversion.source import DTYPES, Source
from lima_jax.conversion.tokenizer_export import CHAT_TEMPLATE, chat_template, write_hf_tokenizer
from lima_jax.errors import ConversionError

__all__ = [
    "CHAT_TEMPLATE", "DTYPES", "EXPORT_MARKER", "ConversionError", "HuggingFaceSource", "Llama2cSource",
    "MetaSource", "Source", "atomic_folder", "chat_template", "check_output", "check_source", "describe_rope",
    "export_eot", "export_hf",
    "export_tokenizer", "halves_to_interleaved", "hf_config_to_model", "hf_tensors", "import_checkpoint",
    "interleaved_to_halves", "is_hf_export", "is_lima_output", "load_lima_params",
    "meta_hidden_dim", "model_to_hf_config", "read_safetensors_header", "read_tensor", "source_tokenizer",
    "write_hf_tokenizer", "write_hf_weights", "write_safetensors",
]
