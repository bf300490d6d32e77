"""MathVista testmini (Lu et al., 2023): 1,000 problems over charts, tables, geometry diagrams,
puzzles and natural images; the paper's Table 2 reports accuracy on testmini.

Layouts read (either; a file, a directory of them or a glob):
  - Hugging Face `AI4Math/MathVista` parquet (`data/testmini-*.parquet`): columns pid, question,
    image (the relative path "images/<pid>.jpg"), decoded_image (an HF Image struct
    {"bytes", "path"}), choices (a list of option texts, or null), unit, precision (float64:
    decimals, or null), answer, question_type ("multi_choice" / "free_form"), answer_type
    ("text" / "integer" / "float" / "list"), shot_type, query, metadata (a struct: task,
    category, grade, skills, ...). The image comes from decoded_image; without its bytes, from
    the image path, relative to the file's directory or its parent (the dataset root, where
    images.zip unpacks).
  - The authors' GitHub `lupantech/MathVista` `data/testmini.json`: one JSON object keyed by
    pid, each value a row with the columns above but no decoded_image/query; images as
    relative paths ("images/<pid>.jpg") under the data directory. A JSON array or JSONL of such
    rows is read too.
  Rows of the test split carry no answer (it is withheld); they are refused by name.

Prompt: the question of the authors' query builder (`evaluation/build_query.py`, zero-shot,
"solution" shot type) for a chain-of-thought model: "<question>", " (Unit: <unit>)" when the
row has a unit, then "Choices:" and the options one a line as "A. <text>". The builder's
"Hint: Please answer ... at the end." line is an answer-format instruction and is left out (the
evaluation appends ARES's think/boxed instruction); it also states the float precision, which
grading applies itself (below). The image marker goes first.

Answers and grading (the authors' `evaluation/calculate_score.py` normalises an extracted
answer by type and compares it with the gold string):
  - multi_choice: the data's gold is the option TEXT; the item's gold is its letter (the first
    option equal to it; pid 781 lists "18" twice: the other copy's letter is an alternative
    gold, as the authors' scorer, comparing option texts, accepts either) and `choices` keeps
    the texts, so a response naming the letter or the option's text is right
    (the authors map a letter to its option, and other text to the nearest option by edit
    distance; that nearest-option fallback is not reproduced: an answer must name an option);
  - free_form integer: INTEGER with the row's unit stripped ("years" for 49 problems);
  - free_form float: FLOAT with the row's `precision` (1 or 2 decimals), both sides rounded;
  - free_form list (pids 225 and 506, e.g. "[2014, 2016]"): EXPRESSION. The authors compare
    the Python list's string; EXPRESSION's whitespace-free string match is that comparison
    without the spacing convention ("[2014,2016]" counts), and math-verify only adds
    numeric/symbolic equality of the same elements in the same order. TEXT would reject
    "[2014,2016]" (case/space folding does not delete spaces), hence EXPRESSION.
Metric: accuracy (`metrics.accuracy`). `Item.difficulty` = metadata.task (the five task types
the paper breaks accuracy down by).

Also home to reading helpers the MathVerse, MATH-Vision and DynaMath adapters share:
`keyed_rows` (JSON objects keyed by id besides `items.rows`' files), `row_image` (an image
column, with the dataset root as a fallback for relative paths), `need`, `option_index` and
`unique` (each id once: the same data given twice is refused).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ares_jax.data import records
from ares_jax.data.records import DataError
from ares_jax.suite import items
from ares_jax.suite.items import CHOICE, EXPRESSION, FLOAT, INTEGER, LETTERS, TEXT, Item

LAYOUTS = (
    "MathVista testmini: the Hugging Face AI4Math/MathVista parquet (pid, question, "
    "decoded_image, choices, unit, precision, answer, question_type, answer_type, metadata) or "
    "the authors' GitHub data/testmini.json (an object keyed by pid, images as relative paths "
    "such as images/1.jpg under the data directory)"
)

_FREE_FORM_KINDS = {"integer": INTEGER, "float": FLOAT, "list": EXPRESSION, "text": TEXT}


def load(path: str | os.PathLike, name: str) -> list[Item]:
    """MathVista items from a file, directory or glob in `LAYOUTS` (module docstring).

    Raises:
      DataError: a file in another layout, a row without a needed column, an answer that is
        not one of its options, a test-split row without an answer; naming the file and row.
    """
    out = []
    for file, where, key, row in keyed_rows(path):
        out.append(_item(row, key, file, where, name))
    if not out:
        raise DataError(f"no MathVista rows in {os.fspath(path)}; expected {LAYOUTS}")
    return unique(out)


def _item(row: Mapping[str, Any], key: str | None, file: str, where: str, name: str) -> Item:
    question = _text(need(row, "question", where, LAYOUTS))
    qtype = str(need(row, "question_type", where, LAYOUTS)).strip()
    if "answer" not in row:
        need(row, "answer", where, LAYOUTS)  # raises: not this layout
    answer = _text(row["answer"])
    if not answer:  # null or "": the test split
        raise DataError(
            f"{where}: no answer (the test split's answers are withheld; use testmini)",
            reason=records.MISSING_ANSWER,
        )
    pid = _text(row.get("pid")) or key
    if not pid:
        raise DataError(f"{where}: no pid; expected {LAYOUTS}", reason=records.BAD_FIELD)
    unit = _text(row.get("unit"))
    choices = [_text(c) for c in (row.get("choices") or [])]
    images = row_image(row, ("decoded_image", "image"), file, where)

    text = question + (f" (Unit: {unit})" if unit else "")
    if qtype == "multi_choice":
        if not choices:
            raise DataError(
                f"{where}: a multi_choice row without choices", reason=records.BAD_FIELD
            )
        text += "\nChoices:\n" + items.options_text(choices)
        index = option_index(answer, choices)
        if index is None:
            raise DataError(
                f"{where}: answer {answer!r} is not one of its choices {choices}",
                reason=records.BAD_FIELD,
            )
        kind, gold, precision = CHOICE, LETTERS[index], None
        # The same text under another letter (pid 781) is the same answer to the authors.
        alternatives = tuple(
            LETTERS[i] for i, c in enumerate(choices) if i != index and c == choices[index]
        )
    elif qtype == "free_form":
        atype = str(need(row, "answer_type", where, LAYOUTS)).strip()
        if atype not in _FREE_FORM_KINDS:
            raise DataError(
                f"{where}: answer_type {atype!r} is not one of {sorted(_FREE_FORM_KINDS)}",
                reason=records.BAD_FIELD,
            )
        kind, gold, precision, alternatives = _FREE_FORM_KINDS[atype], answer, None, ()
        if kind == FLOAT:
            precision = _precision(row.get("precision"), where)
    else:
        raise DataError(
            f"{where}: question_type {qtype!r} is neither multi_choice nor free_form",
            reason=records.BAD_FIELD,
        )
    metadata = row.get("metadata") if isinstance(row.get("metadata"), Mapping) else {}
    return Item(
        benchmark=name,
        id=pid,
        question=items.with_images(text, len(images)),
        answer=gold,
        kind=kind,
        images=images,
        choices=tuple(choices) if kind == CHOICE else (),
        precision=precision,
        alternatives=alternatives,
        unit=unit,
        difficulty=_text(metadata.get("task")),
        origin=where,
    )


def _precision(value: Any, where: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataError(
            f"{where}: precision {value!r} is not a number", reason=records.BAD_FIELD
        ) from None
    if number != number:  # NaN: pandas' missing value
        return None
    return int(number)


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


_SPACE = re.compile(r"\s+")


def option_index(answer: str, choices: Sequence[str]) -> int | None:
    """The index of the first option equal to `answer` (exactly, else after folding case and
    whitespace), or None."""
    for fold in (lambda s: s, lambda s: _SPACE.sub(" ", s).strip().lower()):
        want = fold(answer)
        for i, choice in enumerate(choices):
            if fold(choice) == want:
                return i
    return None


def need(row: Mapping[str, Any], column: str, where: str, layouts: str) -> Any:
    """`row[column]`; DataError naming the row, its columns and the accepted layouts if absent."""
    value = row.get(column)
    if value is None:
        raise DataError(
            f"{where}: no {column!r} column (the row has {sorted(row)}); expected {layouts}",
            reason=records.BAD_FIELD,
        )
    return value


def unique(found: list[Item]) -> list[Item]:
    """`found`, checked to hold each id once; DataError naming both rows otherwise (the same
    data given twice: a directory with both a .json and a .parquet copy, or two splits)."""
    first: dict[str, Item] = {}
    for item in found:
        if item.id in first:
            raise DataError(
                f"{item.origin}: id {item.id!r} again (first at {first[item.id].origin}); "
                "is the same data given twice (a .json and a .parquet copy, or two splits)? "
                "Name one file",
                reason=records.BAD_FIELD,
            )
        first[item.id] = item
    return found


def keyed_rows(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
) -> Iterator[tuple[str, str, str | None, dict[str, Any]]]:
    """(file, where, key, row) of every row of the files `paths` names (files, directories,
    globs): a .json file holding one JSON object whose values are all objects is read as rows
    keyed by id (key = the object's key; where = "path, entry KEY"), as the authors' GitHub
    releases of MathVista and DynaMath store them; every other file as `items.rows` reads it
    (JSONL, a JSON array, parquet; key None).

    Raises:
      DataError: a missing or unreadable file, naming it.
    """
    for file in records.expand_paths(paths):
        keyed = _keyed_object(file)
        if keyed is not None:
            for key, row in keyed.items():
                yield file, f"{file}, entry {key}", str(key), row
            continue
        for where, row in items.rows(file):
            yield file, where, None, row


def _keyed_object(file: str) -> dict[str, dict] | None:
    """The rows of a .json file holding one object of objects, else None (JSONL, arrays, ...)."""
    if not file.lower().endswith(".json") or not os.path.isfile(file):
        return None
    with open(file, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"{"):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # JSONL (several objects): `items.rows` reads it line by line
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        return value
    return None


def row_image(
    row: Mapping[str, Any], columns: Sequence[str], file: str, where: str
) -> tuple[bytes, ...]:
    """The image of a row as encoded bytes: the first of `columns` with bytes or a path (an HF
    Image struct, bytes, base64 or a relative path); () when none has one (a text-only row).
    A relative path resolves against the file's directory, else its parent (a dataset root
    whose data/ holds the parquet files)."""
    for column in columns:
        value = row.get(column)
        if isinstance(value, Mapping):
            if not value.get("bytes") and not value.get("path"):
                continue
            path = None if value.get("bytes") else str(value["path"])
        elif isinstance(value, bytes | bytearray | memoryview):
            if not value:
                continue
            path = None
        elif isinstance(value, str):
            if not value.strip():
                continue
            path = value.strip()
            value = path
        else:
            continue
        return (items.image(value, _image_root(path, file), f"{where}, column {column}"),)
    return ()


def _image_root(path: str | None, file: str) -> str:
    here = os.path.dirname(file) or "."
    if path is None or os.path.isabs(path) or os.path.exists(os.path.join(here, path)):
        return here
    parent = os.path.dirname(os.path.abspath(here))
    return parent if os.path.exists(os.path.join(parent, path)) else here
