"""Export: a lima_jax checkpoint (parameter folder, training step folder, or a run: see
`rundir.resolve_checkpoint`) written as a Hugging Face LLaMA folder that `transformers` loads offline:
safetensors weights (sharded above a size), config.json, generation_config.json (LIMA's sampling settings)
and the tokenizer (tokenizer.json beside the original tokenizer.model), with lima_jax's EOT as a special
token and EOT and EOS as stop tokens, and last the marker `output.EXPORT_MARKER` by which a later
`--overwrite` recognizes the folder as an export it may replace. The parameters are held once; tensors are
streamed out."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable, Iterator

import numpy as np
from etils import epath

from lima_jax import rundir
from lima_jax.config import ModelConfig, load_config_file
from lima_jax.conversion.output import atomic_folder, check_output, mark_hf_export
from lima_jax.conversion.params_table import hf_names, leaf, params_of
from lima_jax.conversion.rope import hf_rope_config
from lima_jax.conversion.safetensors_io import write_safetensors
from lima_jax.conversion.source import numpy_dtype, require
from lima_jax.conversion.tokenizer_export import write_hf_tokenizer
from lima_jax.errors import ConversionError
from lima_jax.generation import SamplingConfig
from lima_jax.model import strip_vocab_padding
from lima_jax.paths import PathLike, as_path
from lima_jax.tokenizer import EOT_NEW_ROW, Tokenizer, tokenizer_file

Checkpoint = PathLike | rundir.CheckpointChoice


def model_to_hf_config(cfg: ModelConfig, dtype: str, bos_id: int, eos_id: int | list[int],
                       pad_id: int | None) -> dict:
    """A transformers LlamaConfig dict (written in the transformers 5 form, with `rope_theta` kept too
    so transformers 4 reads the same value)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        **hf_rope_config(cfg),
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "dtype": dtype,
        "torch_dtype": dtype, "use_cache": True,
    }


def stop_token_ids(tok: Tokenizer, has_eot: bool) -> list[int]:
    """Every id lima_jax's generation stops on (`generation.Generator`): EOT (first: transformers pads with the
    first) and EOS; EOS alone for a model without the EOT row."""
    return [tok.eot_id, tok.eos_id] if has_eot else [tok.eos_id]


def generation_config(bos_id: int, stop_ids: list[int], sampling: SamplingConfig) -> dict:
    """generation_config.json: LIMA's decoding (`SamplingConfig`'s defaults: nucleus p=0.9, temperature 0.7,
    repetition penalty 1.2, 2,048 new tokens) and the stop ids. transformers and vLLM apply the repetition
    penalty to the prompt's tokens too, lima_jax to the generated ones only (docs/checkpoints.md)."""
    return {"bos_token_id": bos_id, "eos_token_id": stop_ids, "do_sample": not sampling.greedy,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0,
            "repetition_penalty": sampling.repetition_penalty, "max_new_tokens": sampling.max_new_tokens}


def hf_tensors(params: dict, cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(Hugging Face name, shape, producer of the torch-layout tensor) for every tensor, in file order."""
    for param in params_of(cfg):
        for layer, name in enumerate(hf_names(param, cfg)):
            def produce(param=param, layer=layer):
                value = np.asarray(leaf(params, param.path))
                return param.to_hf(value[layer] if param.per_layer else value, cfg)
            yield name, param.hf_shape(cfg), produce


def write_hf_weights(folder: PathLike, params: dict, cfg: ModelConfig, dtype: np.dtype,
                     max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000K-of-0000N.safetensors + index when larger than `max_shard_bytes`."""
    folder = as_path(folder)
    entries = list(hf_tensors(params, cfg))
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
    for file, shard in zip(names, shards):
        producers = {name: produce for name, _, produce in shard}
        write_safetensors(folder / file, [(name, shape, dtype) for name, shape, _ in shard],
                          lambda name: producers[name]())
    if len(shards) > 1:
        total = sum(math.prod(shape) * dtype.itemsize for _, shape, _ in entries)
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: file for file, shard in zip(names, shards) for name, _, _ in shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def _choice(checkpoint: Checkpoint) -> rundir.CheckpointChoice:
    return checkpoint if isinstance(checkpoint, rundir.CheckpointChoice) else rundir.resolve_checkpoint(checkpoint)


def load_lima_params(checkpoint: Checkpoint) -> tuple[dict, ModelConfig]:
    """Parameters (numpy) and model config of a parameter checkpoint, a training checkpoint step folder, or
    a training workdir (its chosen epoch, else the latest; see `rundir.resolve_checkpoint`)."""
    try:
        return rundir.load_checkpoint_params(_choice(checkpoint))
    except FileNotFoundError as e:
        raise ConversionError(str(e)) from None


def unpadded(params: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """The parameters and config without the vocabulary padding (`ModelConfig.vocab_multiple`): a Hugging Face
    model has exactly the real vocabulary's rows."""
    return strip_vocab_padding(params, cfg.vocab_size), dataclasses.replace(cfg, vocab_multiple=1)


def export_tokenizer(checkpoint: Checkpoint, tokenizer: PathLike | None = None) -> tuple[epath.Path, str]:
    """(the tokenizer file to export with `checkpoint`, where it came from): `tokenizer` when given, else
    `config.tokenizer.path` of the training run the checkpoint belongs to; a folder gives the file in it that
    training reads (`tokenizer.tokenizer_file`)."""
    if tokenizer is not None:
        given = as_path(tokenizer)
        return (tokenizer_file(given, "--tokenizer") if given.is_dir() else given), "given (--tokenizer)"
    choice = _choice(checkpoint)
    run_config = rundir.run_config_of(choice.folder)
    require(run_config is not None, choice.folder, "no --tokenizer given, and this is not a checkpoint of a training "
            "run with a config.json to take config.tokenizer.path from: pass --tokenizer")
    config = load_config_file(run_config)
    path = config.get("tokenizer", {}).get("path")
    require(bool(path), run_config, "tokenizer.path is not set: pass --tokenizer")
    require(as_path(path).exists(), run_config, f"tokenizer.path={path} not found (a relative path is taken "
            "from the current directory): pass --tokenizer")
    # a file, or a folder holding one, as training reads it
    found = tokenizer_file(path, f"config.tokenizer.path of {run_config}")
    return found, f"config.tokenizer.path of the run's {run_config}"


def export_eot(checkpoint: Checkpoint, eot: str | None = None) -> tuple[str, str]:
    """(the EOT choice of the model, where it came from): `eot` when given, else `config.tokenizer.eot` of the
    checkpoint's training run, else the paper's new row."""
    if eot is not None:
        return eot, "given (--eot)"
    run_config = rundir.run_config_of(_choice(checkpoint).folder)
    if run_config is None:
        return EOT_NEW_ROW, "default (no training run config)"
    choice = load_config_file(run_config).get("tokenizer", {}).get("eot")
    return (choice, f"config.tokenizer.eot of the run's {run_config}") if choice else (EOT_NEW_ROW, "default")


def _open_tokenizer(path: epath.Path, eot: str) -> Tokenizer:
    require(path.is_file(), path, "tokenizer file not found (--tokenizer)")
    try:
        return Tokenizer(path, "--tokenizer", eot, "--eot")
    except (FileNotFoundError, ValueError) as e:
        raise ConversionError(str(e)) from None


def _has_eot(tok: Tokenizer, cfg: ModelConfig, where: epath.Path, tokenizer_path: epath.Path) -> bool:
    """Whether the model's vocabulary holds EOT: the tokenizer's size + 1 with a new-row EOT (the tokenizer's
    size alone is a model without it, e.g. a pretrained one); a named EOT needs exactly the tokenizer's size."""
    if cfg.vocab_size == tok.vocab_size:
        return True
    if tok.eot_is_new_row and cfg.vocab_size == tok.eot_id:
        return False
    raise ConversionError(f"{where}: model vocabulary {cfg.vocab_size} does not match the tokenizer "
                          f"{tokenizer_path} ({tok.base_vocab_size} ids, EOT {tok.eot}: {tok.vocab_size} expected"
                          + (f", or {tok.eot_id} for a model without EOT)" if tok.eot_is_new_row else ")"))


def export_hf(checkpoint: Checkpoint, tokenizer_path: PathLike | None, output: PathLike, dtype: str | None = None,
              max_shard_bytes: int = 5 * 2**30, overwrite: bool = False, eot: str | None = None) -> ModelConfig:
    """Writes a Hugging Face LLaMA folder (weights, config, tokenizer, generation config) for a lima_jax
    checkpoint (a path, or a `rundir.CheckpointChoice`). Without `tokenizer_path` the tokenizer is the one of
    the checkpoint's training run (`export_tokenizer`), and without `eot` its EOT choice (`export_eot`). When
    the vocabulary includes lima_jax's EOT (a new row: tokenizer size + 1, or a named special token such as
    LLaMA-3's `<|eot_id|>`), EOT is a special token (`<eot>` for a new row) and the eos token, and config.json
    and generation_config.json list EOT and EOS as stop ids (`stop_token_ids`).

    The folder is written atomically (see `output.atomic_folder`): an existing non-empty `output` is refused
    unless `overwrite`, and is then replaced as a whole, so no file of an earlier export survives; with
    `overwrite` too, only a lima_jax checkpoint or export is replaced (`output.is_lima_output`)."""
    choice = _choice(checkpoint)
    tokenizer_path, _ = export_tokenizer(choice, tokenizer_path)
    tok = _open_tokenizer(tokenizer_path, export_eot(choice, eot)[0])  # fails early, before the weights are read
    given = None if isinstance(checkpoint, rundir.CheckpointChoice) else checkpoint
    inputs = [given, choice.folder, tokenizer_path]
    check_output(output, overwrite, inputs)  # likewise (creates nothing)
    params, cfg = load_lima_params(choice)
    params, cfg = unpadded(params, cfg)
    has_eot = _has_eot(tok, cfg, choice.folder, tokenizer_path)
    dtype = dtype or cfg.param_dtype
    stop_ids = stop_token_ids(tok, has_eot)
    hf_config = model_to_hf_config(cfg, dtype, tok.bos_id, stop_ids, None)
    generation = generation_config(tok.bos_id, stop_ids, SamplingConfig())
    with atomic_folder(output, overwrite, inputs) as folder:
        write_hf_weights(folder, params, cfg, numpy_dtype(dtype), max_shard_bytes)
        (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
        write_hf_tokenizer(tok, folder, with_eot=has_eot)
        mark_hf_export(folder)
    return cfg
