"""The output folder of every command, written atomically: into a sibling temporary folder
`<output>.lima-partial-<token>`, renamed onto `<output>` only when complete, so a crash never leaves a
half-written folder at `--output`. `<token>` is 12 random hex digits drawn once per command, so these names
cannot be a user's folder (`<output>.partial`, `<output>.old`, an input): the tool creates its temporary
folders itself (refusing a name that exists) and deletes only those, never a folder it finds.

An existing non-empty `<output>` is refused unless `overwrite`, and even then it is replaced only when it is
an output this tool recognizes (`is_lima_output`): a lima_jax parameter checkpoint (`model.json` + `params/`)
or a lima_jax Hugging Face export (its `EXPORT_MARKER` file). Any other folder (`--output .`, a home folder,
a run directory) is refused untouched. The old folder is renamed to `<output>.lima-old-<token>` and deleted
only after the new one is in place.

Object stores (gs://) have no folder rename: there the folder is written in place (an old one, allowed by
`overwrite` under the same rule, is deleted first) and removed again when the writing fails."""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import Iterator, Sequence

from etils import epath

import lima_jax
from lima_jax import checkpoint
from lima_jax.conversion.source import require
from lima_jax.paths import PathLike, as_path, is_remote

EXPORT_MARKER = "lima_jax_export.json"  # written last into every Hugging Face export (`hf_writer`)
EXPORT_WRITER = "lima_jax.convert to_hf"
_PARTIAL, _OLD = "lima-partial", "lima-old"


def _is_link(path: epath.Path) -> bool:
    return not is_remote(path) and os.path.islink(path)


def _absolute(path: PathLike) -> epath.Path:
    """`path` made absolute, with `.` and `..` resolved for a local path (so `--output .` has a name)."""
    return as_path(path) if is_remote(path) else as_path(os.path.abspath(path))


def _real(path: PathLike) -> epath.Path:
    """`path` with symbolic links resolved (local paths)."""
    return as_path(path) if is_remote(path) else as_path(os.path.realpath(path))


def is_hf_export(folder: PathLike) -> bool:
    """A Hugging Face folder written by `to_hf`: its `EXPORT_MARKER` is a JSON object naming the writer."""
    marker = as_path(folder) / EXPORT_MARKER
    try:
        return marker.is_file() and json.loads(marker.read_text()).get("writer") == EXPORT_WRITER
    except (ValueError, AttributeError, OSError):
        return False


def mark_hf_export(folder: PathLike) -> None:
    """Writes `EXPORT_MARKER` into a complete Hugging Face export: the writer, its version and the files
    written (the last file of an export; `is_hf_export` recognizes it)."""
    folder = as_path(folder)
    files = sorted(p.name for p in folder.iterdir())
    marker = {"writer": EXPORT_WRITER, "version": lima_jax.__version__, "files": files}
    (folder / EXPORT_MARKER).write_text(json.dumps(marker, indent=2))


def is_lima_output(folder: PathLike) -> bool:
    """What `--overwrite` may replace: a lima_jax parameter checkpoint (`model.json` + `params/`, extra files
    allowed) or a lima_jax Hugging Face export (`is_hf_export`)."""
    folder = as_path(folder)
    return ((checkpoint.is_params_checkpoint(folder) and (folder / checkpoint.PARAMS_DIR).is_dir())
            or is_hf_export(folder))


def check_output(output: PathLike, overwrite: bool, inputs: Sequence[PathLike | None] = ()) -> epath.Path:
    """The absolute `output` folder, refused when it exists non-empty without `overwrite`, when replacing it
    would delete one of `inputs`, or when it is not an output of this tool (`is_lima_output`). Creates
    nothing."""
    output = _absolute(output)
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
        require(is_lima_output(output), output, "--overwrite replaces only an output of lima_jax.convert (a "
                f"parameter checkpoint with {checkpoint.MODEL_FILE} and {checkpoint.PARAMS_DIR}/, or a Hugging "
                f"Face export with {EXPORT_MARKER}), and this folder is neither: nothing was changed; choose "
                "another --output, or empty or delete this folder yourself")
    return output


def remove(path: epath.Path) -> None:
    """Deletes a folder (recursively), a file or a symbolic link; nothing when absent."""
    if path.is_dir() and not _is_link(path):
        path.rmtree()
    elif path.exists() or _is_link(path):
        path.unlink()


def _sibling(output: epath.Path, kind: str, token: str) -> epath.Path:
    """`<output>.<kind>-<token>`: a name for this command's own temporary or backup folder."""
    return output.with_name(f"{output.name}.{kind}-{token}")


def _require_free(path: epath.Path) -> None:
    """Refuses a name for this command's own folder that something already has (so never reused or deleted)."""
    require(not (path.exists() or _is_link(path)), path, "exists: not created by this command, so left alone; "
            "run the command again")


@contextlib.contextmanager
def atomic_folder(output: PathLike, overwrite: bool, inputs: Sequence[PathLike | None] = ()) -> Iterator[epath.Path]:
    """Yields a new empty sibling folder `<output>.lima-partial-<token>` to write into. When the block
    completes it is renamed onto `output`; an existing `output` (allowed by `check_output`) is first renamed
    to `<output>.lima-old-<token>`, and deleted once the new folder is in place. When the block raises, the
    temporary folder is removed and `output` is left as it was. Nothing else is ever deleted."""
    output = check_output(output, overwrite, inputs)
    if is_remote(output):
        yield from _in_place(output)
        return
    token = uuid.uuid4().hex[:12]
    partial, old = _sibling(output, _PARTIAL, token), _sibling(output, _OLD, token)
    _require_free(partial)
    _require_free(old)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.mkdir()  # fails, rather than reusing, if it appeared meanwhile
    try:
        yield partial
        output = check_output(output, overwrite, inputs)  # again: it may have been filled meanwhile
    except BaseException:
        _discard(partial)
        raise
    _replace(output, partial, old)


def _discard(partial: epath.Path) -> None:
    """Removes this command's temporary folder after a failure (best effort: the failure is what matters)."""
    with contextlib.suppress(OSError):
        remove(partial)


def _replace(output: epath.Path, partial: epath.Path, old: epath.Path) -> None:
    """Renames the complete `partial` onto `output`; an old `output` is first moved aside to the free name
    `old` (and put back if the rename fails, `partial` then discarded), then deleted."""
    moved = False
    try:
        if output.exists() or _is_link(output):
            if output.is_dir() and not _is_link(output) and not any(output.iterdir()):
                output.rmdir()
            else:
                _require_free(old)  # still
                output.rename(old)
                moved = True
        partial.rename(output)
    except BaseException:
        if moved:
            old.rename(output)
        _discard(partial)
        raise
    if moved:
        remove(old)


def _in_place(output: epath.Path) -> Iterator[epath.Path]:
    """An object-store `output` (already checked: absent, empty or a lima_jax output), emptied and written
    directly; removed if writing fails."""
    remove(output)
    output.mkdir(parents=True)
    try:
        yield output
    except BaseException:
        with contextlib.suppress(OSError):
            output.rmtree()
        raise
