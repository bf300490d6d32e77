"""One benchmark problem as the evaluation suite grades it, and the helpers adapters read with.

An adapter (`ares_jax/suite/adapters/<benchmark>.py`) turns the rows of a benchmark's released
files into `Item`s: the prompt text (with `<image>` markers and the options laid out as the
benchmark's own template does), the images as encoded bytes, the gold answer and its kind, and
what the benchmark's metric groups by. Grading (`grading.py`) and the metrics (`metrics.py`)
need nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import string
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ares_jax.data import records
from ares_jax.data.records import DataError, Example

# How an answer is compared (grading.py):
CHOICE = "choice"  # a letter of `choices` (A, B, ...); the response may give the letter or text
INTEGER = "integer"  # an integer, compared exactly (units, commas and a trailing .0 ignored)
FLOAT = "float"  # a number; equal when rounded to `precision` decimals (else 1e-6 relative)
EXPRESSION = "expression"  # free-form math: string match, then math-verify
TEXT = "text"  # a short text: equal after case, space and punctuation folding
KINDS = (CHOICE, INTEGER, FLOAT, EXPRESSION, TEXT)

LETTERS = string.ascii_uppercase


@dataclasses.dataclass(frozen=True)
class Item:
    """One problem of a benchmark.

    Attributes:
      benchmark: the registry name (`registry.BENCHMARKS`), e.g. "mathvista".
      id: unique within the benchmark (the release's own id where it has one).
      question: the prompt text the model sees, `<image>` markers placing the images, options
        laid out as the benchmark's template does (the think/boxed instruction is appended by
        the evaluation, as in training).
      answer: the gold answer: a letter for CHOICE, else the answer text.
      kind: one of KINDS.
      images: encoded image files in prompt order.
      choices: the option texts in letter order (CHOICE); a response naming an option's text is
        graded as that letter.
      precision: FLOAT: decimals both sides are rounded to before comparing (None: 1e-6
        relative, unless `tolerance`).
      tolerance: FLOAT: equal when |answer - gold| <= tolerance (the benchmark's own error
        bound; takes the place of `precision`).
      alternatives: further accepted golds, compared as `answer` is (a benchmark listing
        several correct answers).
      unit: the answer's unit, stripped from a response before a numeric comparison.
      group: what the metric aggregates over besides the item (DynaMath: the seed question of
        its variants; WeMath: the composite problem of its steps); "" when unused.
      role: the item's place in its group (WeMath: "one-step 1", "two-step", ...); "" when unused.
      difficulty: a level or category the data carries, reported separately ("" if none).
      origin: "path, row N" of the row it came from (for messages and the audit record).
    """

    benchmark: str
    id: str
    question: str
    answer: str
    kind: str
    images: tuple[bytes, ...] = ()
    choices: tuple[str, ...] = ()
    precision: int | None = None
    tolerance: float | None = None
    alternatives: tuple[str, ...] = ()
    unit: str = ""
    group: str = ""
    role: str = ""
    difficulty: str = ""
    origin: str = dataclasses.field(default="", compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.origin or self.id}: kind {self.kind!r} is not one of {KINDS}")
        for name in ("images", "choices", "alternatives"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if self.kind == CHOICE:
            if not self.choices:
                raise ValueError(f"{self.origin or self.id}: a choice item needs its choices")
            if self.answer not in LETTERS[: len(self.choices)]:
                raise ValueError(
                    f"{self.origin or self.id}: gold {self.answer!r} is not one of the letters "
                    f"of its {len(self.choices)} choices"
                )
        markers = self.question.count(records.IMAGE_MARKER)
        if markers != len(self.images):
            raise ValueError(
                f"{self.origin or self.id}: {markers} {records.IMAGE_MARKER} markers for "
                f"{len(self.images)} images"
            )

    def example(self) -> Example:
        """The problem as the sampler's data (`records.Example`): its question, images and
        answer; `source` is the benchmark."""
        return Example(
            id=self.id,
            question=self.question,
            answer=self.answer,
            images=self.images,
            source=self.benchmark,
            origin=self.origin,
        )


def rows(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> Iterator[tuple[str, dict]]:
    """(where, row) of every row of the files named by `paths` (files, directories, globs;
    JSONL, JSON arrays, parquet): `records.file_rows`."""
    yield from records.file_rows(paths)


def image(value: Any, root: str | os.PathLike, where: str) -> bytes:
    """One image entry of a row (bytes, HF Image struct, base64, or a path relative to `root`)
    as encoded bytes; DataError naming `where` if it cannot be read or decoded."""
    try:
        return records.image_bytes(value, root)
    except ValueError as e:
        raise DataError(f"{where}: {e}", reason=records.UNREADABLE_IMAGE) from None


def root_of(path: str | os.PathLike) -> str:
    """The directory relative image paths of a data path resolve against: the directory itself,
    else the file's directory (for a glob, the part before its first wildcard)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    head = path.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0]
    return os.path.dirname(head) or "."


def field(row: Mapping[str, Any], names: Sequence[str], where: str, *, required: bool = True):
    """The first of `names` the row has (not None); DataError naming the row and the columns it
    has when `required` and none is there."""
    for name in names:
        if row.get(name) is not None:
            return row[name]
    if required:
        raise DataError(
            f"{where}: none of the columns {list(names)} (the row has {sorted(row)})",
            reason=records.BAD_FIELD,
        )
    return None


def options_text(choices: Sequence[str]) -> str:
    """Options laid out one a line, "A. first", "B. second", ... (the layout most of the
    benchmarks' own prompts use)."""
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def with_images(question: str, count: int) -> str:
    """The question with `count` `<image>` markers: as it is when it already has them, else
    the markers first (one a line)."""
    have = question.count(records.IMAGE_MARKER)
    if have == count:
        return question
    if have:
        raise ValueError(f"question has {have} {records.IMAGE_MARKER} markers for {count} images")
    return "".join(records.IMAGE_MARKER + "\n" for _ in range(count)) + question
