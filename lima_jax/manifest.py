"""Checksums of what a checkpoint wrote, and their verification before the checkpoint is used.

Every checkpoint folder lima_jax writes (a training step folder, a parameter checkpoint) ends with
`lima_manifest.json`: the size and CRC-32 of every other file in it, written last, after the checkpoint is
complete. Reading a checkpoint starts by re-reading its files against the manifest, so one flipped bit, a
truncated or a missing file is reported as "<folder>: <file>: <what>" before orbax sees the data.

CRC-32 (zlib) catches every burst error up to 32 bits and random corruption with probability 1 - 2^-32; it is
not a defence against an attacker (nothing here is). Files are read in 8 MiB chunks on a few threads (zlib
releases the GIL), so verification runs at disk speed on large checkpoints.

On a pod slice each process checksums a share of the files (`shard`), so no host reads the whole state:
saving writes one part per process, and host 0 merges them (`merge_parts`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import json
import zlib
from typing import Iterable

from etils import epath

from lima_jax.paths import TEMPORARY_SUFFIX, PathLike, as_path, atomic_write_text

MANIFEST = "lima_manifest.json"
_PART = "lima_manifest.part-{index:05d}-of-{count:05d}.json"
_PART_GLOB = "lima_manifest.part-*.json"
FORMAT = 1
_CHUNK = 8 << 20
_THREADS = 8


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's share of the files: every `count`-th file from `index` in sorted order."""

    index: int = 0
    count: int = 1

    def select(self, names: list[str]) -> list[str]:
        return sorted(names)[self.index::self.count]


def has_manifest(folder: PathLike) -> bool:
    return (as_path(folder) / MANIFEST).is_file()


def _is_manifest_file(path: epath.Path) -> bool:
    """The manifest, a process's part, or either one's temporary while another process is writing it."""
    name = path.name.removesuffix(TEMPORARY_SUFFIX)
    return name == MANIFEST or fnmatch.fnmatchcase(name, _PART_GLOB)


def _checksummed_files(folder: epath.Path) -> list[str]:
    """Relative paths of every file under `folder` except manifests.

    On several processes each lists the folder while the others may be writing their parts, so the parts and
    their temporaries are never listed: every process must see the same names to take its share."""
    names = []
    pending = [folder]
    while pending:  # epath has no recursive glob on object stores
        for path in pending.pop().iterdir():
            if path.is_dir():
                pending.append(path)
            elif not _is_manifest_file(path):
                names.append(str(path.relative_to(folder)))
    return names


def file_checksum(path: epath.Path) -> dict:
    """{"size": bytes, "crc32": CRC-32 of the content} of one file."""
    crc, size = 0, 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": crc}


def _checksums(folder: epath.Path, names: Iterable[str]) -> dict[str, dict]:
    names = list(names)
    with concurrent.futures.ThreadPoolExecutor(max_workers=_THREADS) as pool:
        return dict(zip(names, pool.map(lambda name: file_checksum(folder / name), names)))


def write_manifest(folder: PathLike, shard: Shard = Shard()) -> None:
    """Single process: writes `folder/lima_manifest.json`. Several processes (shard.count > 1): writes this
    process's part; host 0 then calls `merge_parts` once every part is written."""
    folder = as_path(folder)
    files = _checksums(folder, shard.select(_checksummed_files(folder)))
    if shard.count == 1:
        _write(folder / MANIFEST, files)
    else:
        _write(folder / _PART.format(index=shard.index, count=shard.count), files)


def merge_parts(folder: PathLike, count: int) -> None:
    """Host 0, after each of `count` processes wrote its part: one `lima_manifest.json`, then every part file
    removed (also ones left by an earlier attempt with another process count, which are not merged)."""
    folder = as_path(folder)
    files: dict[str, dict] = {}
    for index in range(count):
        files.update(json.loads((folder / _PART.format(index=index, count=count)).read_text())["files"])
    _write(folder / MANIFEST, files)
    remove_parts(folder)


def remove_parts(folder: PathLike) -> None:
    """Every part file in `folder`, and the temporary of a part whose writer was killed."""
    for part in as_path(folder).glob(_PART_GLOB + "*"):
        if _is_manifest_file(part):
            part.unlink()


def _write(path: epath.Path, files: dict[str, dict]) -> None:
    atomic_write_text(path, json.dumps({"format": FORMAT, "algorithm": "crc32", "files": files}, indent=1,
                                       sort_keys=True) + "\n")


def read_manifest(folder: PathLike) -> dict[str, dict]:
    """{relative path: {"size", "crc32"}} recorded for `folder`; ValueError naming the problem if unreadable."""
    path = as_path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"unknown manifest format {manifest.get('format')!r}")
        return files
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{MANIFEST}: unreadable ({e})") from None


def verify(folder: PathLike, shard: Shard = Shard()) -> list[str]:
    """The problems found in this process's share of `folder`'s files, each "<file>: <what>"; [] when intact.

    A file the manifest lists that is missing, shorter or longer, or whose CRC-32 differs, is a problem; so is
    a missing or unreadable manifest. Files that are not in the manifest (added later) are ignored."""
    folder = as_path(folder)
    if not has_manifest(folder):
        return [f"{MANIFEST}: missing (the save did not finish, or it was written before checksums)"]
    try:
        expected = read_manifest(folder)
    except ValueError as e:
        return [str(e)]
    problems = []
    mine = shard.select(list(expected))
    present = [name for name in mine if (folder / name).is_file()]
    problems += [f"{name}: missing" for name in mine if name not in present]
    for name, got in _checksums(folder, present).items():
        want = expected[name]
        if got["size"] != want["size"]:
            problems.append(f"{name}: {got['size']} bytes, {want['size']} when written (truncated or overwritten)")
        elif got["crc32"] != want["crc32"]:
            problems.append(f"{name}: CRC-32 {got['crc32']:08x}, {want['crc32']:08x} when written (corrupted)")
    return sorted(problems)
