"""What every reader shares: the `Source` protocol (a pretrained checkpoint seen as Hugging Face-named,
torch-layout tensors read one at a time), the input check that names the file and field, and dtype names."""
from __future__ import annotations

import json
from typing import Any, Protocol

import ml_dtypes
import numpy as np
from etils import epath

from lima_jax.config import ModelConfig
from lima_jax.errors import ConversionError

DTYPES = ("float32", "bfloat16", "float16")


class Source(Protocol):
    """A pretrained checkpoint seen as Hugging Face-named torch-layout tensors, read one at a time."""

    config: ModelConfig
    rope_layout: str  # "halves" (Hugging Face) or "interleaved" (Meta, llama2.c)
    dtype: str  # the stored dtype, e.g. "bfloat16"

    def shape(self, name: str) -> tuple[int, ...] | None: ...  # None: no such tensor

    def read(self, name: str) -> np.ndarray: ...

    def describe(self, name: str) -> str: ...  # where the tensor lives, for error messages


def require(cond: bool, where: Any, message: str) -> None:
    """Raises ConversionError `<where>: <message>` unless `cond`."""
    if not cond:
        raise ConversionError(f"{where}: {message}")


def read_json(path: epath.Path, missing: str) -> Any:
    """The JSON in `path`; ConversionError `<path>: <missing>` when absent, or naming the parse error."""
    require(path.is_file(), path, missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a dtype name ("bfloat16" via ml_dtypes)."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)
