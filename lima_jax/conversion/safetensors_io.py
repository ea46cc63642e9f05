"""Our own .safetensors reader and writer (numpy only, bfloat16 included), one tensor in memory at a time:
the reader reads the header table, then each tensor by a plain read at its offset; the writer computes the
header from shapes, then produces, writes and drops each tensor in turn. Local paths and gs:// URLs alike."""
from __future__ import annotations

import dataclasses
import json
import math
import struct
from typing import Any, Callable, Sequence

import ml_dtypes
import numpy as np
from etils import epath

from lima_jax.conversion.source import require
from lima_jax.errors import ConversionError
from lima_jax.paths import PathLike, as_path

DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
          "F64": np.dtype(np.float64)}
NAMES = {v: k for k, v in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    file: epath.Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file


def read_safetensors_header(path: PathLike) -> dict[str, TensorEntry]:
    """The tensor table of a .safetensors file (no tensor data is read); validates offsets and sizes."""
    path = as_path(path)
    size = path.stat().length
    with path.open("rb") as f:
        raw = f.read(8)
        require(len(raw) >= 8, path, "not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        require(header_len <= size - 8, path, f"header length {header_len} exceeds the file size {size}")
        header = json.loads(f.read(header_len))
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        require(info["dtype"] in DTYPES, path, f"tensor {name}: dtype {info['dtype']} is not supported "
                f"(supported: {sorted(DTYPES)})")
        dtype = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        require(end - begin == math.prod(shape) * dtype.itemsize and 8 + header_len + end <= size, path,
                f"tensor {name}: data_offsets {info['data_offsets']} do not match shape {list(shape)} "
                f"{info['dtype']} within a file of {size} bytes")
        entries[name] = TensorEntry(path, dtype, shape, 8 + header_len + begin)
    return entries


def read_array(path: PathLike, offset: int, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """An array of `shape` stored at byte `offset` of a file, read straight into its own buffer (no mmap:
    the pages do not linger in this process; the file may be a gs:// URL)."""
    array = np.empty(shape, dtype)
    buffer = memoryview(array.reshape(-1).view(np.uint8))
    with as_path(path).open("rb") as f:
        f.seek(offset)
        filled = 0
        while filled < len(buffer):
            count = f.readinto(buffer[filled:])
            if not count:
                raise ConversionError(f"{path}: ends before byte {offset + len(buffer)} (truncated?)")
            filled += count
    return array


def read_tensor(entry: TensorEntry) -> np.ndarray:
    """One tensor of a header table."""
    return read_array(entry.file, entry.offset, entry.dtype, entry.shape)


def write_safetensors(path: PathLike, tensors: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray]) -> None:
    """Writes a .safetensors file tensor by tensor: the header is computed from shapes, then each tensor
    is produced, written and dropped, so only one tensor is in memory at a time."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    with as_path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape, dtype in tensors:
            array = np.ascontiguousarray(produce(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise AssertionError(f"{name}: produced shape {array.shape}, header says {shape}")
            f.write(array.tobytes())
