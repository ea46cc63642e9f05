"""The output folder of every command, written atomically: into a sibling `<output>.partial`, renamed onto
`<output>` only when complete, so a crash never leaves a half-written folder at `--output`. An existing
non-empty `<output>` is refused unless `overwrite`; it is then deleted only after the new one is in place.

Object stores (gs://) have no folder rename: there the folder is written in place (an old one, allowed by
`overwrite`, is deleted first) and removed again when the writing fails."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

from etils import epath

from lima_jax.conversion.source import require
from lima_jax.paths import PathLike, as_path, is_remote


def _is_link(path: epath.Path) -> bool:
    return not is_remote(path) and os.path.islink(path)


def _real(path: PathLike) -> epath.Path:
    """`path` with symbolic links resolved (local paths)."""
    return as_path(path) if is_remote(path) else as_path(os.path.realpath(path))


def check_output(output: PathLike, overwrite: bool, inputs: Sequence[PathLike | None] = ()) -> epath.Path:
    """The absolute `output` folder, refused when it exists non-empty without `overwrite`, or when replacing it
    would delete one of `inputs`. Creates nothing."""
    output = as_path(output)
    if not (output.exists() or _is_link(output)):
        return output
    require(output.is_dir(), output, "exists and is not a folder")
    if any(output.iterdir()):
        require(overwrite, output, "exists and is not empty: pass --overwrite to replace it (the old folder "
                "is deleted only once the new one is complete)")
        for path in inputs:
            if path is not None:
                path = _real(path)
                require(not path.is_relative_to(_real(output)), output, f"--overwrite would delete the input {path}")
    return output


def remove(path: epath.Path) -> None:
    """Deletes a folder (recursively), a file or a symbolic link; nothing when absent."""
    if path.is_dir() and not _is_link(path):
        path.rmtree()
    elif path.exists() or _is_link(path):
        path.unlink()


@contextlib.contextmanager
def atomic_folder(output: PathLike, overwrite: bool, inputs: Sequence[PathLike | None] = ()) -> Iterator[epath.Path]:
    """Yields an empty sibling folder `<output>.partial` to write into (one left over from a crashed run is
    removed first). When the block completes it is renamed onto `output`; an existing `output` (allowed by
    `check_output`) is first renamed to `<output>.old`, and deleted once the new folder is in place. When the
    block raises, `<output>.partial` is removed and `output` is left as it was."""
    output = check_output(output, overwrite, inputs)
    if is_remote(output):
        yield from _in_place(output)
        return
    partial = output.with_name(output.name + ".partial")
    remove(partial)
    partial.mkdir(parents=True)
    try:
        yield partial
        output = check_output(output, overwrite, inputs)  # again: it may have been filled meanwhile
    except BaseException:
        with contextlib.suppress(OSError):
            partial.rmtree()
        raise
    old = None
    if output.exists() or _is_link(output):
        if output.is_dir() and not _is_link(output) and not any(output.iterdir()):
            output.rmdir()
        else:
            old = output.with_name(output.name + ".old")
            remove(old)
            output.rename(old)
    partial.rename(output)
    if old is not None:
        remove(old)


def _in_place(output: epath.Path) -> Iterator[epath.Path]:
    """An object-store `output` (already checked), emptied and written directly; removed if writing fails."""
    remove(output)
    output.mkdir(parents=True)
    try:
        yield output
    except BaseException:
        with contextlib.suppress(OSError):
            output.rmtree()
        raise
