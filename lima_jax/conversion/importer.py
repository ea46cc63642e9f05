"""Import: a validated `Source` written as a lima_jax parameter checkpoint, one parameter kind (e.g. all
layers' w1) at a time, so peak host memory is about the largest stacked kind plus one source tensor."""
from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from lima_jax import checkpoint
from lima_jax.config import ModelConfig
from lima_jax.conversion.output import atomic_folder, check_output
from lima_jax.conversion.params_table import Param, TreePath, hf_names, nest, params_of
from lima_jax.conversion.rope import interleaved_to_halves
from lima_jax.conversion.source import Source, numpy_dtype, require
from lima_jax.paths import PathLike, as_path
from lima_jax.tokenizer import FOLDER_FILES


def check_source(source: Source) -> None:
    """Every tensor the model needs is present with the expected shape (cheap: shapes only)."""
    cfg = source.config
    for param in params_of(cfg):
        want = param.hf_shape(cfg)
        for name in hf_names(param, cfg):
            got = source.shape(name)
            require(got is not None, source.describe(name), "missing")
            require(tuple(got) == want, source.describe(name), f"shape {list(got)}, but the config implies "
                    f"{list(want)} ({cfg})")


def _to_lima(source: Source, param: Param, name: str, dtype: np.dtype) -> np.ndarray:
    w = param.to_lima(source.read(name), source.config)
    if param.rope and source.rope_layout == "interleaved":
        w = interleaved_to_halves(w)
    return w.astype(dtype, copy=False)


def _kind_arrays(source: Source, dtype: np.dtype) -> Iterator[tuple[TreePath, np.ndarray]]:
    """One stacked lima_jax array per parameter kind, built layer by layer into one preallocated buffer."""
    cfg = source.config
    for param in params_of(cfg):
        names = hf_names(param, cfg)
        first = _to_lima(source, param, names[0], dtype)
        if not param.per_layer:
            yield param.path, first
            continue
        stacked = np.empty((cfg.n_layers, *first.shape), dtype)
        stacked[0] = first
        for i, name in enumerate(names[1:], start=1):
            stacked[i] = _to_lima(source, param, name, dtype)
        yield param.path, stacked


def source_tokenizer(source: Source) -> str | None:
    """The name of the tokenizer file in the source folder that the import keeps (a Hugging Face folder's
    tokenizer.model, else its tokenizer.json; Meta's tokenizer.model, sentencepiece or LLaMA-3 tiktoken), in
    the order `lima_jax.tokenizer` searches a folder, so the import folder itself works as
    `config.tokenizer.path`; None for a single-file source (llama2.c) or a folder without one."""
    location = getattr(source, "location", None)
    if location is None or not as_path(location).is_dir():
        return None
    return next((name for name in FOLDER_FILES if (as_path(location) / name).is_file()), None)


def import_checkpoint(source: Source, output: PathLike, dtype: str | None = None, extra: dict | None = None,
                      overwrite: bool = False) -> ModelConfig:
    """Validates `source` and writes it as a lima_jax parameter checkpoint in `dtype` (default: as stored),
    atomically (see `output.atomic_folder`): an existing non-empty `output` is refused unless `overwrite`. The
    source folder's tokenizer file (`source_tokenizer`) is copied unchanged into the checkpoint folder, so
    `config.tokenizer.path` can name the import folder (or that file)."""
    check_source(source)
    inputs = [getattr(source, "location", None)]
    check_output(output, overwrite, inputs)
    dtype = dtype or source.dtype
    cfg = dataclasses.replace(source.config, param_dtype=dtype)
    meta = {"source_rope_layout": source.rope_layout, **(extra or {})}
    with atomic_folder(output, overwrite, inputs) as folder:
        checkpoint.save_params_incrementally(
            folder, (nest(path, array) for path, array in _kind_arrays(source, numpy_dtype(dtype))), cfg, meta)
        tokenizer = source_tokenizer(source)
        if tokenizer is not None:
            (folder / tokenizer).write_bytes((as_path(source.location) / tokenizer).read_bytes())
    return cfg
