"""TFDS datasets of conversations, stored as ArrayRecord (random access, no TensorFlow), built from local files.

  lima        the released LIMA files from a manual dir: `train.jsonl` (1,030 rows: 1,000 single-turn
              plus 30 multi-turn dialogues), `test.jsonl` (300 prompts), optional `dev.jsonl`
              (or `dev_file=`). Configs: `single_turn` (train = the 2-turn rows) and `with_dialogues`
              (train = all rows).
  sft_jsonl   any local JSONL files in the three schemas of `formats.py`, one per split; the config
              name is chosen by the user (`sft_jsonl/<name>/1.0.0`).

Every record keeps its text (`conversation`), `source`, and the `file` and `line` it came from, so that
an error found later (e.g. nothing left to train on after trimming) still names the original file and
line. Tokenization is not stored: it belongs to the input pipeline (and depends on the tokenizer).
Examples keep file order (`disable_shuffling`), so a dataset trains exactly like its JSONL file.

Build: `python -m lima_jax.data build lima --manual_dir DIR --data_dir OUT` (see `__main__`); read:
`read_conversations("OUT/lima/single_turn/1.0.0:train")`, or set that path as `config.data.train_path`.
Builds never download anything: the data come only from the manual dir or the given files. Every path
(manual dir, split files, data dir, dataset folder) may be local or a gs:// URL (`lima_jax.paths`).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lima_jax.data.formats import Conversation, DataError, read_conversations as read_jsonl
from lima_jax.paths import PathLike, as_path

VERSION = tfds.core.Version("1.0.0")
RELEASED_TRAIN_ROWS = {"single_turn": 1000, "with_dialogues": 1030}
_DATASET_INFO = "dataset_info.json"


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "conversation": tfds.features.Sequence(tfds.features.Text()),  # user, assistant, user, ...
        "source": tfds.features.Text(),
        "file": tfds.features.Text(),
        "line": tfds.features.Scalar(np.int32),
    })


def _info(builder: tfds.core.DatasetBuilder, **kwargs) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=builder, description=__doc__, features=_features(),
                                 disable_shuffling=True, **kwargs)  # file order


def _record(conv: Conversation) -> dict:
    return {"conversation": list(conv.turns), "source": conv.source, "file": conv.path, "line": conv.line}


def _records(convs: list[Conversation]) -> Iterator[tuple[int, dict]]:
    for index, conv in enumerate(convs):
        yield index, _record(conv)


def _read_split(path: epath.Path, for_training: bool | None) -> list[Conversation]:
    """All records of one file, validated before anything is written (the first bad one raises)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return read_jsonl(path, for_training=for_training)


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
    """What both builders share: records from validated local files, in file order."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup of the builder's source file needs the `importlib_resources` backport; the
        # path only serves to find a checksums file, which local builds do not have.
        return epath.Path(__file__)

    def _generate_examples(self, records: Iterator[tuple[int, dict]]):
        yield from records


@dataclasses.dataclass(eq=False)
class LimaConfig(tfds.core.BuilderConfig):
    with_dialogues: bool = False


class Lima(_LocalBuilder):
    """LIMA (Zhou et al. 2023) from the released files in the manual dir; see the module docstring."""

    VERSION = VERSION
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the released LIMA files in the manual dir: train.jsonl (1,030 rows) and test.jsonl (300 prompts), "
        "from the GAIR/lima release; optionally dev.jsonl (or pass dev_file=).")
    BUILDER_CONFIGS = [
        LimaConfig(name="single_turn", description="the 1,000 single-turn training examples",
                   with_dialogues=False),
        LimaConfig(name="with_dialogues", description="all 1,030: the 1,000 plus the 30 multi-turn dialogues",
                   with_dialogues=True),
    ]

    def __init__(self, *, dev_file: PathLike | None = None, **kwargs):
        self._dev_file = as_path(dev_file) if dev_file else None
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return _info(self, homepage="https://arxiv.org/abs/2305.11206")

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        manual = as_path(dl_manager.manual_dir)
        train = _read_split(manual / "train.jsonl", for_training=True)
        if not self.builder_config.with_dialogues:
            train = [conv for conv in train if len(conv.turns) == 2]
        expected = RELEASED_TRAIN_ROWS[self.builder_config.name]
        if len(train) != expected:
            logging.warning("lima/%s: %d training rows, the release has %d (a different train.jsonl?)",
                            self.builder_config.name, len(train), expected)
        splits = {"train": _records(train)}
        if (manual / "test.jsonl").is_file():
            splits["test"] = _records(_read_split(manual / "test.jsonl", for_training=False))
        dev = self._dev_file or (manual / "dev.jsonl")
        if self._dev_file or dev.is_file():
            splits["dev"] = _records(_read_split(dev, for_training=None))
        return splits


class SftJsonl(_LocalBuilder):
    """Conversations from local JSONL files, one per split: `SftJsonl(config=name, split_files={...})`."""

    VERSION = VERSION
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the JSONL file of each split as split_files={'train': path, ...}."

    def __init__(self, *, config: str | tfds.core.BuilderConfig = "default",
                 split_files: Mapping[str, PathLike] | None = None, **kwargs):
        self._split_files = {name: as_path(path) for name, path in (split_files or {}).items()}
        if isinstance(config, str):
            config = tfds.core.BuilderConfig(name=config, description="user JSONL files")
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return _info(self)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager
        if "train" not in self._split_files:
            raise DataError("sft_jsonl: no 'train' file given (split_files={'train': path, ...})")
        return {name: _records(_read_split(path, for_training=name == "train" or None))
                for name, path in self._split_files.items()}


def _prepare(builder: tfds.core.GeneratorBasedBuilder, manual_dir: epath.Path | None) -> epath.Path:
    config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None,
                                          try_download_gcs=False)
    builder.download_and_prepare(download_config=config)
    return as_path(builder.data_dir)


def build_lima(manual_dir: PathLike, data_dir: PathLike, config: str = "single_turn",
               dev_file: PathLike | None = None) -> epath.Path:
    """Builds `lima/<config>` from the manual dir into `data_dir`; returns the dataset folder."""
    manual_dir = as_path(manual_dir)
    if not (manual_dir / "train.jsonl").is_file():
        raise DataError(f"{manual_dir / 'train.jsonl'}: file not found. {Lima.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    if config not in RELEASED_TRAIN_ROWS:
        raise DataError(f"lima config {config!r}: expected one of {sorted(RELEASED_TRAIN_ROWS)}")
    builder = Lima(config=config, data_dir=str(as_path(data_dir)), file_format="array_record", dev_file=dev_file)
    return _prepare(builder, manual_dir)


def build_jsonl(name: str, split_files: Mapping[str, PathLike], data_dir: PathLike) -> epath.Path:
    """Builds `sft_jsonl/<name>` from one JSONL file per split into `data_dir`; returns the dataset folder."""
    builder = SftJsonl(config=name, split_files=split_files, data_dir=str(as_path(data_dir)),
                       file_format="array_record")
    return _prepare(builder, None)


def split_dataset_path(path: PathLike) -> tuple[epath.Path, str]:
    """`dir` or `dir:split` (default split "train") to (dataset folder, split); `gs://b/dir:split` too."""
    text = str(path)
    head, sep, tail = text.rpartition(":")
    if sep and tail and "/" not in tail:
        return as_path(head), tail
    return as_path(text), "train"


def is_dataset_path(path: PathLike) -> bool:
    """True when `path` (`dir` or `dir:split`) is a prepared TFDS dataset folder."""
    folder, _ = split_dataset_path(path)
    return (folder / _DATASET_INFO).is_file()


def data_source(path: PathLike):
    """The random-access source (`len`, `[i]`) of one split of a prepared dataset."""
    folder, split = split_dataset_path(path)
    if not (folder / _DATASET_INFO).is_file():
        raise DataError(f"{folder}: not a prepared TFDS dataset (no {_DATASET_INFO}); "
                        "build one with `python -m lima_jax.data build ...`")
    builder = tfds.builder_from_directory(folder)
    if split not in builder.info.splits:
        raise DataError(f"{folder}: no split {split!r}; it has {sorted(builder.info.splits)}")
    return builder.as_data_source(split)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def to_conversation(record: Mapping) -> Conversation:
    """A data-source record back to the Conversation it was built from (file and line included)."""
    return Conversation(tuple(_text(t) for t in record["conversation"]), _text(record["source"]),
                        _text(record["file"]), int(record["line"]))


def read_conversations(path: PathLike) -> list[Conversation]:
    """Every conversation of one split (`dir` or `dir:split`), in file order."""
    source = data_source(path)
    return [to_conversation(source[i]) for i in range(len(source))]
