"""A tensorflow-datasets builder that stores Examples as ArrayRecord, without TensorFlow.

    path = build_tfds("virl39k", "data/virl39k/*.parquet", "/data/tfds").path
    source = TfdsExamples(path)             # random access: len(source), source[i] -> Example
    # equivalently: tfds.data_source("ares_examples/virl39k", data_dir="/data/tfds", split="train")

Layout on disk: `<out_dir>/ares_examples/<name>/<VERSION>/` with `dataset_info.json`,
`features.json` and one `ares_examples-<split>.array_record-XXXXX-of-YYYYY` file per shard; tfds
writes into an `incomplete.*` folder and renames it at the end, so a failed build leaves nothing
that a reader would take for a data set. Rows keep their input order (shuffling is the pipeline's
job). The read statistics per split are stored in the dataset metadata (`metadata.json`).

Record format (VERSION 1.0.0), tfds features: id, question, answer, source (Text); images
(Sequence of scalar bytes: the encoded image files, as read); traces (Sequence of Text);
pass_rate (float64, NaN = unknown); difficulty (int32, -1 = unknown).

What tfds 4.9.10 can and cannot do here without TensorFlow (checked in this venv):
- `GeneratorBasedBuilder` with `file_format="array_record"` writes and `tfds.data_source` /
  `builder_from_directory(...).as_data_source()` read ArrayRecord with no TensorFlow import:
  serialization uses tfds's own `tf_example_pb2` protos.
- `tfds.features.Image` cannot encode NumPy images (it calls `tf.image.encode_png`), so images
  are stored as raw encoded bytes, which is also what we want (no decode-re-encode).
- `DatasetBuilder.code_path` touches the `importlib_resources` backport, which tfds only
  requires on Python < 3.9; without it every builder defined in a package (ours, and
  `tfds.dataset_builders.store_as_tfds_dataset`'s `AdhocBuilder`) fails. `AresExamples`
  overrides `code_path` (it has no checksums file to find), so `store_as_tfds_dataset` stays
  unusable but our builder works.
- The builder is defined under `skip_registration()` so that its name cannot clash with a
  registered tfds dataset; tfds then reads a built data set from its directory.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import registered

from ares_jax.data import records
from ares_jax.data.records import Example, ReadStats

VERSION = "1.0.0"
BUILDER_NAME = "ares_examples"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")

Inputs = str | os.PathLike | Sequence[str | os.PathLike] | Sequence[Example]


def features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "id": tfds.features.Text(),
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            "source": tfds.features.Text(),
            "traces": tfds.features.Sequence(tfds.features.Text()),
            "pass_rate": tfds.features.Scalar(dtype=np.float64),
            "difficulty": tfds.features.Scalar(dtype=np.int32),
        }
    )


def to_record(example: Example) -> dict[str, Any]:
    return {
        "id": example.id,
        "question": example.question,
        "answer": example.answer,
        "images": list(example.images),
        "source": example.source,
        "traces": list(example.traces),
        "pass_rate": math.nan if example.pass_rate is None else float(example.pass_rate),
        "difficulty": -1 if example.difficulty is None else int(example.difficulty),
    }


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def from_record(record: Mapping[str, Any]) -> Example:
    pass_rate = float(record["pass_rate"])
    difficulty = int(record["difficulty"])
    return Example(
        id=_text(record["id"]),
        question=_text(record["question"]),
        answer=_text(record["answer"]),
        images=tuple(bytes(b) for b in record["images"]),
        source=_text(record["source"]),
        traces=tuple(_text(t) for t in record["traces"]),
        pass_rate=None if math.isnan(pass_rate) else pass_rate,
        difficulty=None if difficulty < 0 else difficulty,
    )


with registered.skip_registration():

    class AresExamples(tfds.core.GeneratorBasedBuilder):
        """Examples from local files or memory, one config (a data set name) per build."""

        VERSION = tfds.core.Version(VERSION)

        def __init__(
            self,
            *,
            splits: Mapping[str, Inputs] | None = None,
            read_options: Mapping[str, Any] | None = None,
            **kwargs,
        ):
            self._splits = dict(splits or {})
            self._read_options = dict(read_options or {})
            self.read_stats: dict[str, ReadStats] = {}
            super().__init__(**kwargs)

        @tfds.core.utils.classproperty
        @classmethod
        def code_path(cls):  # noqa: N805 - see the module docstring
            return None

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self,
                description="ares_jax Examples (ares_jax/data/tfds_builder.py).",
                features=features(),
                disable_shuffling=True,
                metadata=tfds.core.MetadataDict(),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(split) for split in self._splits}

        def _generate_examples(self, split: str):
            inputs = self._splits[split]
            stats = self.read_stats.setdefault(split, ReadStats())
            if _is_examples(inputs):
                stream = iter(inputs)
                stats.rows = stats.examples = len(inputs)
            else:
                stream = (
                    ex
                    for path in records.expand_paths(inputs)
                    for ex in records.iter_examples(path, stats=stats, **self._read_options)
                )
            for index, example in enumerate(stream):
                yield index, to_record(example)
            self.info.metadata[f"read_stats/{split}"] = stats.as_dict()
            self.info.metadata["format_version"] = VERSION


def _is_examples(inputs: Any) -> bool:
    return (
        isinstance(inputs, Sequence)
        and not isinstance(inputs, str)
        and (len(inputs) == 0 or isinstance(inputs[0], Example))
    )


class TfdsBuild(NamedTuple):
    path: str  # <out_dir>/ares_examples/<name>/<VERSION>
    num_examples: dict[str, int]  # split -> examples written
    read_stats: dict[str, ReadStats]  # split -> what the readers saw (empty when reused)


def build_tfds(
    name: str,
    files: Inputs | Mapping[str, Inputs],
    out_dir: str | os.PathLike,
    *,
    on_error: str = "raise",
    columns: Mapping[str, str] | None = None,
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    overwrite: bool = False,
) -> TfdsBuild:
    """Builds (or reuses) the ArrayRecord data set `name` under `out_dir`.

    Args:
      name: the data set's name (the tfds config), letters, digits, `_`, `-`, `.`.
      files: the "train" split, or a mapping split -> inputs; inputs are data files, glob
        patterns, a list of either (read with `records.iter_examples`), or a list of Examples.
      out_dir: the tfds data_dir.
      on_error, columns, image_root, check_images: as for `records.iter_examples`.
      overwrite: rebuild even if the data set exists; otherwise an existing build is reused.

    Raises:
      records.DataError: a bad row (with `on_error="raise"`) or a missing data file; nothing is
        left in `out_dir` except tfds's empty parent folders.
    """
    if not _NAME.match(name):
        raise ValueError(
            f"data set name {name!r} must be letters, digits, '_', '-' or '.', not starting "
            "with '-' or '.'"
        )
    splits = dict(files) if isinstance(files, Mapping) else {"train": files}
    builder = AresExamples(
        splits=splits,
        read_options=dict(
            on_error=on_error, columns=columns, image_root=image_root, check_images=check_images
        ),
        config=tfds.core.BuilderConfig(name=name),
        data_dir=os.fspath(out_dir),
        file_format="array_record",
    )
    mode = tfds.download.GenerateMode
    download_dir = tempfile.mkdtemp(prefix="ares_tfds_")
    try:
        builder.download_and_prepare(
            download_dir=download_dir,
            download_config=tfds.download.DownloadConfig(
                download_mode=mode.REUSE_CACHE_IF_EXISTS
                if overwrite
                else mode.REUSE_DATASET_IF_EXISTS,
            ),
        )
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)
    path = os.fspath(builder.data_dir)
    counts = {split: int(info.num_examples) for split, info in builder.info.splits.items()}
    return TfdsBuild(path, counts, builder.read_stats)


class TfdsExamples:
    """Random-access source of Examples over a build (`__len__`, `__getitem__` -> Example).

    Args:
      path: a build directory (`TfdsBuild.path`, holding dataset_info.json), or a data set name
        with `data_dir` (then the newest version under `<data_dir>/ares_examples/<name>/`).
      split: which split.
    """

    def __init__(
        self, path: str | os.PathLike, *, split: str = "train", data_dir: str | None = None
    ):
        path = os.fspath(path)
        if data_dir is not None:
            name = f"{BUILDER_NAME}/{path}"
            try:
                self._source = tfds.data_source(
                    name, data_dir=data_dir, split=split, download=False
                )
            except Exception as e:  # tfds raises several types for a missing data set
                raise records.DataError(
                    f"no ArrayRecord data set {path!r} under {data_dir}: {e}"
                ) from None
            self.path = os.path.join(data_dir, BUILDER_NAME, path)
        else:
            if not os.path.isfile(os.path.join(path, "dataset_info.json")):
                raise records.DataError(
                    f"{path} is not a tfds build directory (it has no dataset_info.json)"
                )
            builder = tfds.builder_from_directory(path)
            if split not in builder.info.splits:
                raise records.DataError(
                    f"{path} has no split {split!r}; it has {', '.join(builder.info.splits)}"
                )
            self._source = builder.as_data_source(split=split)
            self.path = path
        self.split = split

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Example:
        return from_record(self._source[int(index)])

    def __repr__(self) -> str:
        return f"TfdsExamples({self.path!r}, split={self.split!r}, n={len(self)})"
