"""`Example`, the unit of data of both stages, and readers for JSONL, JSON and parquet files.

A row becomes an `Example` by looking up each field under the first column name present (and not
null) in `COLUMNS`; `columns=` overrides the lookup per field. Accepted layouts:

- ViRL39K (TIGER-Lab: `question`, `answer`, `image` list of relative paths, `qid`, `source`,
  `category`, and the pass rates `PassRate_7BBase` / `PassRate_32BTrained`; the HF parquet
  mirrors: `problem`, `answer`, `images` list of `{"bytes", "path"}`, `qid`/`id`). ViRL39K has
  no teacher traces: it is RL data, and AdaCS needs traces supplied by the user.
- EasyR1 / verl parquet: `problem`/`prompt` (a string, or a chat list whose first user turn is
  taken), `answer` or `reward_model.ground_truth`, `images`, `data_source`.
- Cold-start / AdaCS rows (the released ARES cold-start set): the above plus a teacher trace in
  `traces`/`trace`/`responses`/`response`/`reasoning`/`teacher_response`/`cot`/`output` (a string
  or a list of strings), `source`/`data_source`/`dataset`, and a pass rate in
  `pass_rate`/`passrate`/`acc`/`accuracy`/`PassRate_7BBase`/`PassRate_32BTrained` (a number in
  [0, 1]). Per row the first of these that is present and not null wins, so in ViRL39K the 7B
  base model's rate wins over the trained 32B model's (AdaCS measures difficulty for the base
  model it fine-tunes, METHOD.md 3.1); a row whose 7B rate is null takes the 32B one. To use
  one column only, map it: `columns={"pass_rate": "PassRate_32BTrained"}`.
- Chat rows (LLaMA-Factory / ShareGPT): `messages` (`role`/`content`) or `conversations`
  (`from`/`value`): the first user turn is the question, assistant turns are traces, and a
  missing answer is the content of the last `\\boxed{}` of the first assistant turn.

An answer that contains `\\boxed{}` (a worked solution, e.g. a MATH-style `solution` column)
is reduced to the content of its last `\\boxed{}`.

An image entry is raw bytes (parquet binary), a `{"bytes": ..., "path": ...}` dict (what HF
`datasets` writes; bytes win), a `data:image/...;base64,` URL, a file path or a bare base64
string. A single entry instead of a list is one image; a string holding a JSON or Python list
of entries (`"['images/a.png']"`, as CSV-born files carry) is that list. Images are stored
encoded, as read; `check_images` decodes each once with PIL to reject unreadable files early.

Image files. A relative path is resolved against `image_root`, else the data file's directory
(the image root), and must stay inside it once `..` and symlinks are resolved; an absolute path
must lie inside it too, unless `allow_absolute_image_paths` lifts the rule. Only regular files
are read (not devices, FIFOs or directories), and none larger than `MAX_IMAGE_FILE_BYTES`.

A question's `<image>` markers place its images in the prompt (processor.build_prompt): a
question with markers must have exactly one per image; one without markers gets all its images
before the text. A question holding the model's own image token `<|image_pad|>` is refused.

Data paths (`expand_paths`): a file; a directory, meaning every .jsonl, .json and .parquet file
directly in it, sorted by name (subdirectories are not searched, so an `images/` folder beside the
data costs nothing; name nested files with a glob such as `DIR/**/*.parquet`); or a glob pattern
(`*`, `?`, `[...]`, and `**` across directories), expanded to the files it matches, sorted. A
pattern or directory that yields no data file is an error naming it.

`columns` maps a field of `COLUMNS` to the one column that holds it in a file (configs:
`data.columns`); an unknown field is a ValueError naming the known ones. `ReadStats.columns`
counts, per field, the rows whose value came from each column (e.g. which pass-rate column).

Errors name the file and the place: `path, line N` (JSONL, 1-based), `path, entry N` (a JSON
array, 0-based) or `path, row N` (parquet, 0-based); each Example keeps that place as `origin`.
With `on_error="skip"` bad rows are skipped and counted by reason in `ReadStats`; a missing,
unreadable or empty data file always raises, and so does a data set left empty by skipping.
"""

from __future__ import annotations

import ast
import base64
import binascii
import dataclasses
import glob
import io
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import PIL.Image

# Field -> accepted column names, first match wins. "a.b" looks up key b of a dict column a.
COLUMNS: dict[str, tuple[str, ...]] = {
    "question": ("question", "problem", "prompt", "query"),
    "answer": (
        "answer",
        "solution",
        "ground_truth",
        "gt_answer",
        "final_answer",
        "reward_model.ground_truth",
    ),
    "images": ("images", "image", "image_paths", "image_path"),
    "id": ("id", "global_id", "qid", "uid", "problem_id", "question_id"),
    "traces": (
        "traces",
        "trace",
        "responses",
        "response",
        "reasoning",
        "teacher_response",
        "cot",
        "output",
    ),
    "source": ("source", "data_source", "dataset"),
    # ViRL39K: the 7B base model's rate first (module docstring); the trained 32B's if null.
    "pass_rate": (
        "pass_rate",
        "passrate",
        "acc",
        "accuracy",
        "PassRate_7BBase",
        "PassRate_32BTrained",
    ),
    "difficulty": ("difficulty",),
    "messages": ("messages", "conversations"),
}

# Reasons a row is rejected (keys of ReadStats.skipped).
MALFORMED_JSON = "malformed_json"
MISSING_QUESTION = "missing_question"
MISSING_ANSWER = "missing_answer"
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
BAD_FIELD = "bad_field"
MARKER_MISMATCH = "image_marker_mismatch"  # <image> markers != images, or a raw <|image_pad|>
IMAGE_OUTSIDE_ROOT = "image_outside_root"  # absolute, `..` or symlinked out of the image root
IMAGE_NOT_A_FILE = "image_not_a_file"  # a device, FIFO, directory, ...
IMAGE_TOO_LARGE = "image_too_large"  # an image file over MAX_IMAGE_FILE_BYTES
# Found when a stage measures its prompts (data/prompts.py), not by the readers.
OVERLONG_PROMPT = "overlong_prompt"  # longer than the largest prompt length bucket
BAD_IMAGE_SIZE = "bad_image_size"  # an aspect ratio the processor refuses (> 200)

# The largest image file read from disk. Real photos and diagrams are well below it (a 2048 x
# 2048 PNG of noise is 12 MiB); the cap keeps a wrong path from reading gigabytes.
MAX_IMAGE_FILE_BYTES = 64 * 2**20

IMAGE_MARKER = "<image>"  # processor.IMAGE_MARKER
IMAGE_PAD = "<|image_pad|>"  # processor.IMAGE_PAD

_MAX_LOGGED_ERRORS = 10
_EXTENSIONS = (".jsonl", ".json", ".parquet")


@dataclasses.dataclass(frozen=True)
class Example:
    """One problem with its images, as every stage sees it.

    Attributes:
      id: unique within a data set; "<file name>:<line or row>" when the row has none.
      question: the problem text; `<image>` markers, if any, place the images (processor).
      answer: the reference answer, checked with math-verify against the last `\\boxed{}`.
      images: encoded image files (PNG, JPEG, ...), in prompt order.
      source: the data source, e.g. "geoqa"; AdaCS takes length medians per source.
      traces: teacher reasoning traces (AdaCS curation picks one per problem).
      pass_rate: fraction of correct samples in [0, 1] (AdaCS, METHOD.md 3.1), if known.
      difficulty: 1 (easiest) to 5, for the synthetic task only.
      origin: where the row came from, "path, line N" (see the module docstring); "" when not
        read from a file. Not part of equality or hash.
    """

    id: str
    question: str
    answer: str
    images: tuple[bytes, ...] = ()
    source: str = ""
    traces: tuple[str, ...] = ()
    pass_rate: float | None = None
    difficulty: int | None = None
    origin: str = dataclasses.field(default="", compare=False)

    def __post_init__(self):
        # Lists are accepted for convenience; stored as tuples so Examples stay hashable.
        if not isinstance(self.images, tuple):
            object.__setattr__(self, "images", tuple(self.images))
        if not isinstance(self.traces, tuple):
            object.__setattr__(self, "traces", tuple(self.traces))


@dataclasses.dataclass
class ReadStats:
    """What a read saw: rows read, examples kept, rows skipped by reason, the files read."""

    files: int = 0
    rows: int = 0
    examples: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    first_errors: list[str] = dataclasses.field(default_factory=list)
    first_by_reason: dict[str, str] = dataclasses.field(default_factory=dict)
    paths: list[str] = dataclasses.field(default_factory=list)
    # field -> {column: rows of kept examples whose value came from it}
    columns: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, message: str) -> None:
        """Counts one skipped row under `reason`; keeps the first messages."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.first_by_reason.setdefault(reason, message)
        if len(self.first_errors) < _MAX_LOGGED_ERRORS:
            self.first_errors.append(message)

    def summary(self) -> str:
        """The skip counts by reason with each reason's first row, for a log line."""
        return "; ".join(
            f"{reason}: {n} (first: {self.first_by_reason.get(reason, '?')})"
            for reason, n in sorted(self.skipped.items())
        )

    def merge(self, other: ReadStats) -> ReadStats:
        self.files += other.files
        self.paths.extend(other.paths)
        self.rows += other.rows
        self.examples += other.examples
        for reason, count in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count
        for reason, message in other.first_by_reason.items():
            self.first_by_reason.setdefault(reason, message)
        room = _MAX_LOGGED_ERRORS - len(self.first_errors)
        self.first_errors.extend(other.first_errors[: max(room, 0)])
        for field, counts in other.columns.items():
            for column, n in counts.items():
                self.count_column(field, column, n)
        return self

    def count_column(self, field: str, column: str, n: int = 1) -> None:
        """Counts `n` kept rows whose `field` came from `column`."""
        per_field = self.columns.setdefault(field, {})
        per_field[column] = per_field.get(column, 0) + n

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def require_examples(self) -> None:
        """Raises a `DataError` naming the files and the skip counts when no example is left."""
        if self.examples:
            return
        counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
        first = f"; first: {self.first_errors[0]}" if self.first_errors else ""
        raise DataError(
            f"no usable example in {', '.join(self.paths) or 'the data'}: all {self.rows} "
            f"row(s) were skipped ({counts or 'none read'}){first}"
        )


class DataError(ValueError):
    """A data file or one of its rows cannot be used; the message names the file and line."""

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


class _RowError(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Public readers
# ---------------------------------------------------------------------------------------------


def iter_examples(
    path: str | os.PathLike,
    *,
    on_error: str = "raise",
    columns: Mapping[str, str] | None = None,
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    allow_absolute_image_paths: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[Example]:
    """Yields the Examples of one .jsonl, .json or .parquet file, in file order.

    Args:
      path: the data file.
      on_error: "raise" stops at the first bad row with a `DataError` naming the file and line;
        "skip" skips it and counts it in `stats.skipped` under its reason.
      columns: field -> column name, overriding `COLUMNS` for that field (e.g.
        `{"pass_rate": "PassRate_7BBase"}`).
      image_root: directory relative image paths are resolved against, and that image files
        must lie in (default: the data file's directory).
      check_images: decode every image once with PIL; an undecodable one is a bad row.
      allow_absolute_image_paths: read image files anywhere (absolute paths, `..`, symlinks out
        of the image root); by default such a path is a bad row.
      stats: updated in place while iterating.

    Raises:
      DataError: the file is missing, of an unknown type, unreadable or has no row; or (with
        on_error="raise") a bad row, naming the file and the line.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    lookup = _column_lookup(columns)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        raise DataError(
            f"unsupported data file type {ext or '(none)'!r}: {path}; expected one of "
            f"{', '.join(_EXTENSIONS)}"
        )
    stats = ReadStats() if stats is None else stats
    stats.files += 1
    stats.paths.append(path)
    images = _ImageFiles(
        os.fspath(image_root) if image_root is not None else os.path.dirname(path),
        allow_absolute_image_paths,
    )
    rows = _parquet_rows(path) if ext == ".parquet" else _json_rows(path)
    count = 0
    for where, default_id, row in rows:
        count += 1
        stats.rows += 1
        used: dict[str, str] = {}
        try:
            if isinstance(row, _RowError):
                raise row
            example = _to_example(
                row, default_id, f"{path}, {where}", lookup, images, check_images, used
            )
        except _RowError as e:
            message = f"{path}, {where}: {e}"
            if on_error == "raise":
                raise DataError(message, reason=e.reason) from None
            stats.skip(e.reason, message)
            continue
        stats.examples += 1
        for field, column in used.items():
            stats.count_column(field, column)
        yield example
    if not count:
        raise DataError(f"data file {path} is empty: it has no rows")


def read_examples(
    path: str | os.PathLike,
    *,
    on_error: str = "raise",
    columns: Mapping[str, str] | None = None,
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    allow_absolute_image_paths: bool = False,
) -> tuple[list[Example], ReadStats]:
    """All Examples of one data file and the read statistics (see `iter_examples`)."""
    stats = ReadStats()
    examples = list(
        iter_examples(
            path,
            on_error=on_error,
            columns=columns,
            image_root=image_root,
            check_images=check_images,
            allow_absolute_image_paths=allow_absolute_image_paths,
            stats=stats,
        )
    )
    return examples, stats


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Files named by a path, a directory, a glob pattern or a list of these (module docstring).

    A directory gives the .jsonl, .json and .parquet files directly in it, sorted (not its
    subdirectories, nor hidden files); a glob the files it matches, sorted, `**` spanning
    directories. A plain file path is kept as it is (`iter_examples` checks it).

    Raises:
      DataError: a glob matches no file, or a directory holds no data file; naming it.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    files: list[str] = []
    for pattern in paths:
        pattern = os.fspath(pattern)
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"no data file matches {pattern}")
            files.extend(matches)
        elif os.path.isdir(pattern):
            files.extend(_directory_files(pattern))
        else:
            files.append(pattern)
    return files


def file_columns(path: str | os.PathLike) -> tuple[str, ...]:
    """The column names of one data file, without reading its rows: a parquet file's schema,
    else the keys of the first JSON object (so a check such as "has a traces column" is cheap).

    Raises:
      DataError: the file is missing or unreadable, naming it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist")
    if path.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return tuple(pq.read_schema(path).names)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            raise DataError(f"cannot read parquet file {path}: {e}") from None
    for _, _, row in _json_rows(path):
        if isinstance(row, dict):
            return tuple(row)
    return ()


def _directory_files(directory: str) -> list[str]:
    names = sorted(
        name
        for name in os.listdir(directory)
        if not name.startswith(".")
        and os.path.splitext(name)[1].lower() in _EXTENSIONS
        and os.path.isfile(os.path.join(directory, name))
    )
    if not names:
        nested = os.path.join(directory, "**", "*.parquet")
        raise DataError(
            f"directory {directory} holds no {', '.join(_EXTENSIONS)} file (subdirectories are "
            f"not searched: name nested files with a glob such as {nested})"
        )
    return [os.path.join(directory, name) for name in names]


def read_many(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    on_error: str = "raise",
    columns: Mapping[str, str] | None = None,
    image_root: str | os.PathLike | None = None,
    check_images: bool = True,
    allow_absolute_image_paths: bool = False,
) -> tuple[list[Example], ReadStats]:
    """The Examples of several files (paths, globs or a list), concatenated in order.

    Raises:
      DataError: as `iter_examples`; also when every row of every file was skipped (naming the
        files and the counts by reason).
    """
    stats = ReadStats()
    examples: list[Example] = []
    for path in expand_paths(paths):
        examples.extend(
            iter_examples(
                path,
                on_error=on_error,
                columns=columns,
                image_root=image_root,
                check_images=check_images,
                allow_absolute_image_paths=allow_absolute_image_paths,
                stats=stats,
            )
        )
    stats.require_examples()
    return examples, stats


def write_jsonl(examples: Sequence[Example], path: str | os.PathLike) -> str:
    """Writes Examples as JSONL that `read_examples` reads back equal (images as base64).

    The file is written next to its destination and renamed, so a crash leaves no half file.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            row = dataclasses.asdict(ex)
            del row["origin"]  # where this file's rows come from is this file
            row["images"] = [base64.b64encode(b).decode("ascii") for b in ex.images]
            row["traces"] = list(ex.traces)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# File formats: each yields (where, default id, row dict or _RowError)
# ---------------------------------------------------------------------------------------------


def file_rows(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The raw rows of data files (paths, directories or globs as `expand_paths`; JSONL, a JSON
    array or parquet), each with where it came from ("path, line N" / "path, row N"), for
    readers of other layouts (the evaluation suite's adapters).

    Raises:
      DataError: a missing or unreadable file, or a row that is not a JSON object, naming it.
    """
    for path in expand_paths(paths):
        if not os.path.isfile(path):
            raise DataError(f"data file {path} does not exist")
        rows = _parquet_rows(path) if path.lower().endswith(".parquet") else _json_rows(path)
        for where, _, row in rows:
            if isinstance(row, _RowError):
                raise DataError(f"{path}, {where}: {row}", reason=row.reason)
            yield f"{path}, {where}", row


def image_bytes(item: Any, root: str | os.PathLike) -> bytes:
    """One image entry as a data file holds it (bytes, an HF `Image` struct `{"bytes", "path"}`,
    base64 or a data URL, or a path relative to `root`), as encoded bytes, checked to decode.

    Raises:
      ValueError: a missing, unreadable or undecodable image, naming it.
    """
    files = _ImageFiles(os.fspath(root), anywhere=True)
    try:
        data, name = _image_bytes(item, files)
        _check_image(data, name)
    except _RowError as e:
        raise ValueError(str(e)) from None
    return data


def _json_rows(path: str) -> Iterator[tuple[str, str, Any]]:
    name = os.path.basename(path)
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if path.lower().endswith(".json") and head.startswith(b"["):
        try:
            with open(path, encoding="utf-8") as f:
                items = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: malformed JSON: {e}", reason=MALFORMED_JSON) from None
        for i, item in enumerate(items):
            yield f"entry {i}", f"{name}:{i}", _as_object(item)
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                item = _RowError(MALFORMED_JSON, f"malformed JSON: {e}")
            yield f"line {number}", f"{name}:{number}", _as_object(item)


def _as_object(item: Any) -> Any:
    if isinstance(item, dict | _RowError):
        return item
    return _RowError(MALFORMED_JSON, f"expected a JSON object, got {type(item).__name__}")


def _parquet_rows(path: str) -> Iterator[tuple[str, str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a test dependency
        raise DataError(f"reading {path} needs pyarrow: pip install pyarrow") from e
    name = os.path.basename(path)
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"cannot read parquet file {path}: {e}") from None
    index = 0
    for batch in parquet.iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield f"row {index}", f"{name}:{index}", row
            index += 1


# ---------------------------------------------------------------------------------------------
# Row -> Example
# ---------------------------------------------------------------------------------------------


def column_overrides(columns: Mapping[str, str | None] | None) -> dict[str, str]:
    """The field -> column overrides of `columns` (a dict or a ConfigDict), None values dropped.

    Raises:
      ValueError: a field that `COLUMNS` does not know, or a column that is not a non-empty
        string, naming the field and the known fields.
    """
    out = {}
    for field, column in dict(columns or {}).items():
        if field not in COLUMNS:
            raise ValueError(
                f"unknown field {field!r} in columns; known fields: {', '.join(sorted(COLUMNS))}"
            )
        if column is None:
            continue
        if not isinstance(column, str) or not column:
            raise ValueError(f"columns[{field!r}] must be a column name, got {column!r}")
        out[field] = column
    return out


def column_names(field: str, columns: Mapping[str, str | None] | None = None) -> tuple[str, ...]:
    """The columns `field` is looked up in, first match first, given the `columns` overrides."""
    return _column_lookup(columns)[field]


def _column_lookup(columns: Mapping[str, str | None] | None) -> dict[str, tuple[str, ...]]:
    lookup = dict(COLUMNS)
    for field, column in column_overrides(columns).items():
        lookup[field] = (column,)
    return lookup


def _get(
    row: Mapping[str, Any],
    names: tuple[str, ...],
    used: dict[str, str] | None = None,
    field: str = "",
) -> Any:
    """The first present, non-empty value of `names` in `row`; `used[field]` = its column."""
    for name in names:
        head, _, tail = name.partition(".")
        value = row.get(head)
        if tail and isinstance(value, Mapping):
            value = value.get(tail)
        elif tail:
            value = None
        if value is not None and not (isinstance(value, str | list | tuple) and not value):
            if used is not None:
                used[field] = name
            return value
    return None


def _to_example(
    row: Mapping[str, Any],
    default_id: str,
    origin: str,
    lookup: Mapping[str, tuple[str, ...]],
    image_files: _ImageFiles,
    check_images: bool,
    used: dict[str, str] | None = None,
) -> Example:
    """The Example of one row; `used` gets field -> the column each value came from."""

    def get(field: str) -> Any:
        return _get(row, lookup[field], used, field)

    turns = _chat_turns(get("messages"))
    question = _question_text(get("question"))
    if question is None and turns:
        question = next((text for role, text in turns if role == "user"), None)
    if not question or not question.strip():
        raise _RowError(
            MISSING_QUESTION, f"row has no question (columns {', '.join(lookup['question'])})"
        )
    traces = _traces(get("traces"))
    if not traces and turns:
        traces = tuple(text for role, text in turns if role == "assistant" and text.strip())
    answer = _answer_text(get("answer"))
    if answer is not None and _BOXED.search(answer):  # a worked solution: keep its result
        answer = _last_boxed(answer) or answer
    if answer is None and traces:
        answer = _last_boxed(traces[0])
    if answer is None or not answer.strip():
        raise _RowError(
            MISSING_ANSWER, f"row has no answer (columns {', '.join(lookup['answer'])})"
        )
    images = _images(get("images"), image_files, check_images)
    _check_markers(question, len(images))
    raw_id = get("id")
    source = get("source")
    return Example(
        id=default_id if raw_id is None else str(raw_id),
        question=question,
        answer=answer.strip(),
        images=images,
        source="" if source is None else str(source),
        traces=traces,
        pass_rate=_pass_rate(get("pass_rate")),
        difficulty=_difficulty(get("difficulty")),
        origin=origin,
    )


def _check_markers(question: str, num_images: int) -> None:
    """The question's `<image>` markers fit its images (processor.build_prompt's rule)."""
    markers = question.count(IMAGE_MARKER)
    if markers and markers != num_images:
        raise _RowError(
            MARKER_MISMATCH,
            f"the question has {markers} {IMAGE_MARKER} marker(s) but the row has {num_images} "
            f"image(s); give one marker per image, or none (images then precede the text)",
        )
    if IMAGE_PAD in question:
        raise _RowError(
            MARKER_MISMATCH,
            f"the question contains the model's image token {IMAGE_PAD}; mark images with "
            f"{IMAGE_MARKER}",
        )


def _chat_turns(value: Any) -> list[tuple[str, str]]:
    """[(role, text)] of a chat list; roles normalised to user / assistant / system."""
    if not isinstance(value, list | tuple):
        return []
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    turns = []
    for turn in value:
        if not isinstance(turn, Mapping):
            continue
        role = roles.get(str(turn.get("role", turn.get("from", ""))).lower(), "system")
        text = _content_text(turn.get("content", turn.get("value")))
        if text is not None:
            turns.append((role, text))
    return turns


def _content_text(content: Any) -> str | None:
    """Text of a chat turn; OpenAI-style part lists put an `<image>` marker per image part."""
    if isinstance(content, str):
        return content
    if isinstance(content, list | tuple):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, Mapping) and part.get("type") in ("image", "image_url"):
                parts.append("<image>")
        return "".join(parts)
    return None


def _question_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):  # verl-style prompt: a chat list
        return next((text for role, text in _chat_turns(value) if role == "user"), None)
    return None


def _answer_text(value: Any) -> str | None:
    if isinstance(value, bool):
        raise _RowError(BAD_FIELD, f"answer must be a string or a number, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple) and len(value) == 1:
        return _answer_text(value[0])
    if value is None or isinstance(value, str):
        return value
    raise _RowError(BAD_FIELD, f"answer must be a string or a number, got {type(value).__name__}")


def _traces(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(t, str) or t is None for t in value):
        return tuple(t for t in value if t)
    raise _RowError(BAD_FIELD, "traces must be a string or a list of strings")


def _pass_rate(value: Any) -> float | None:
    if value is None:
        return None
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise _RowError(BAD_FIELD, f"pass rate {value!r} is not a number") from None
    if rate != rate:  # NaN: unknown
        return None
    if not 0.0 <= rate <= 1.0:
        raise _RowError(BAD_FIELD, f"pass rate {rate} is outside [0, 1]")
    return rate


def _difficulty(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _RowError(BAD_FIELD, f"difficulty {value!r} is not an integer") from None


_BOXED = re.compile(r"\\boxed\s*\{")


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (braces balanced), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

_BASE64 = re.compile(r"^[A-Za-z0-9+/=\s]+$")


@dataclasses.dataclass(frozen=True)
class _ImageFiles:
    """Where a data file's image paths may point: inside `root` unless `anywhere`."""

    root: str
    anywhere: bool = False

    def full_path(self, path: str) -> str:
        return os.path.join(self.root, path)  # an absolute path stays as it is

    def read(self, path: str) -> tuple[bytes, str]:
        """(bytes, full path) of one image file, refusing what `iter_examples` documents."""
        full = self.full_path(path)
        if not self.anywhere:
            root = os.path.realpath(self.root)
            real = os.path.realpath(full)
            if os.path.commonpath([root, real]) != root:
                raise _RowError(
                    IMAGE_OUTSIDE_ROOT,
                    f"image path {path!r} leads to {real}, outside the image root {root}; "
                    "use paths inside it, or set data.image_root to a directory that holds the "
                    "images, or data.allow_absolute_image_paths=True",
                )
        try:
            info = os.stat(full)
        except FileNotFoundError:
            raise _RowError(MISSING_IMAGE, f"image file {full} does not exist") from None
        except OSError as e:
            raise _RowError(UNREADABLE_IMAGE, f"cannot read image file {full}: {e}") from None
        if not stat.S_ISREG(info.st_mode):
            raise _RowError(IMAGE_NOT_A_FILE, f"image path {full} is not a regular file")
        too_large = _RowError(
            IMAGE_TOO_LARGE,
            f"image file {full} is larger than {MAX_IMAGE_FILE_BYTES} bytes "
            "(records.MAX_IMAGE_FILE_BYTES)",
        )
        if info.st_size > MAX_IMAGE_FILE_BYTES:
            raise too_large
        try:
            with open(full, "rb") as f:
                data = f.read(MAX_IMAGE_FILE_BYTES + 1)
        except OSError as e:
            raise _RowError(UNREADABLE_IMAGE, f"cannot read image file {full}: {e}") from None
        if len(data) > MAX_IMAGE_FILE_BYTES:  # it grew since stat
            raise too_large
        return data, full


def _images(value: Any, files: _ImageFiles, check: bool) -> tuple[bytes, ...]:
    if value is None:
        return ()
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        value = _listed(value)
    items = value if isinstance(value, list | tuple) else [value]
    images = []
    for item in items:
        if item is None:
            continue
        data, name = _image_bytes(item, files)
        if check:
            _check_image(data, name)
        images.append(data)
    return tuple(images)


def _listed(text: str) -> list[Any]:
    """The list a string such as `["a.png"]` or `['a.png']` holds (JSON, else a Python literal)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise _RowError(BAD_FIELD, f"image list {text[:80]!r} is not a list") from None
    if not isinstance(value, list):
        raise _RowError(BAD_FIELD, f"image list {text[:80]!r} is not a list")
    return value


def _image_bytes(item: Any, files: _ImageFiles) -> tuple[bytes, str]:
    """(encoded bytes, a name for messages) of one image entry."""
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item), "<bytes>"
    if isinstance(item, Mapping):
        if item.get("bytes"):
            data = item["bytes"]
            if isinstance(data, str):
                return _decode_base64(data, "<base64>"), "<base64>"
            return bytes(data), str(item.get("path") or "<bytes>")
        if item.get("path"):
            return files.read(str(item["path"]))
        raise _RowError(MISSING_IMAGE, "image entry has neither bytes nor a path")
    if isinstance(item, str):
        if item.startswith("data:"):
            return _decode_base64(item.partition(",")[2], "<data URL>"), "<data URL>"
        # A file name has a "." (not a base64 character); base64 text is not a file.
        if not os.path.exists(files.full_path(item)) and len(item) >= 16 and _BASE64.match(item):
            return _decode_base64(item, "<base64>"), "<base64>"
        return files.read(item)
    raise _RowError(BAD_FIELD, f"unsupported image entry of type {type(item).__name__}")


def _decode_base64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as e:
        raise _RowError(UNREADABLE_IMAGE, f"image {name} is not valid base64: {e}") from None


def _check_image(data: bytes, name: str) -> None:
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            image.load()
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        raise _RowError(UNREADABLE_IMAGE, f"image {name} cannot be decoded: {e}") from None
