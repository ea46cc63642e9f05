"""Writing files so that a crash never leaves half of one: write a temporary sibling, fsync, rename."""
from __future__ import annotations

import os
import pathlib


def atomic_write_text(path: str | pathlib.Path, text: str) -> None:
    """Replaces `path` with `text` in one step; readers see the old file or the new one, never a part."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
