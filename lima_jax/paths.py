"""Every user path (workdir, data, tokenizer, init_from, prompts, outputs) as an `etils.epath.Path`, the path
library orbax and tfds use, so a local folder and a `gs://bucket/...` URL take the same code; and writes that
never leave half a file."""
from __future__ import annotations

import os
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]


def as_path(path: PathLike) -> epath.Path:
    """`path` as an epath.Path: a local path (relative ones made absolute) or a URL such as gs://b/x."""
    path = epath.Path(path)
    return path if is_remote(path) else path.absolute()


def is_remote(path: PathLike) -> bool:
    """Whether `path` is a URL (gs://, s3://, ...) rather than a local path."""
    return "://" in os.fspath(path)


TEMPORARY_SUFFIX = ".tmp"  # atomic_write_text's sibling, renamed over the target when complete


def atomic_write_text(path: PathLike, text: str) -> None:
    """Replaces `path` with `text` in one step; readers see the old file or the new one, never a part.

    Local files: a temporary sibling, fsync, rename. Object stores (gs://): one upload, which GCS makes
    visible only when complete."""
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        path.write_text(text, encoding="utf-8")
        return
    tmp = path.with_name(path.name + TEMPORARY_SUFFIX)
    with open(os.fspath(tmp), "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.fspath(tmp), os.fspath(path))
