r"""AIME 2024 and AIME 2025 ("aime24", "aime25"): 30 problems each, integer answers 0-999.

Layouts read (one adapter for both years; `load(path, name)` gets the registry name), by their
columns, whichever a row has first:
  - question: `problem` (HuggingFaceH4/aime_2024, AI-MO/aimo-validation-aime, math-ai/aime24,
    math-ai/aime25, yentinglin/aime_2025, MathArena/aime_2025), `Problem` (Maxwell-Jia/AIME_2024),
    `question` (opencompass/AIME2025's aime2025-I.jsonl / aime2025-II.jsonl);
  - answer: `answer` (a string, or an int in MathArena's), `Answer` (Maxwell-Jia); a release
    without an answer column whose `solution` is the bare answer or `\boxed{answer}`
    (math-ai/aime24) gives that;
  - id: `id` (an int in HuggingFaceH4, a string in math-ai/aime25), `ID` ("2024-I-1",
    Maxwell-Jia), `problem_idx` (MathArena); opencompass's rows have none: "<file stem>-<row>".
    When ids repeat across files (two files numbered 1-15), each is prefixed with its file's
    stem.
Files are parquet (the hub's data/train-*.parquet, test-*.parquet) or JSONL/JSON. Text only.

Year: a row whose year can be read (a `year` column, an id like "2024-I-1", or an AoPS url
".../2024_AIME_I_Problems/...") and is not the benchmark's (2024 for aime24, 2025 for aime25) is
skipped, so AI-MO/aimo-validation-aime (AIME 2022-2024, 90 rows) can be given for aime24; a file
set with no row of the year is a DataError.

Prompt: the problem text as released. AIME has no prompt of its own; the chain-of-thought
evaluations of R1-style models (Qwen2.5-Math's evaluation, DeepSeek-R1's) give the problem with
only an answer-format instruction ("Please reason step by step, and put your final answer within
\boxed{}."), which the suite's evaluation supplies itself (ARES's think/boxed instruction).

Answers: INTEGER (AIME answers are integers 0-999; a gold written "033" is stored as "33", and
a gold that is not such an integer is a DataError). Metric: avg@16, the paper's: 16 responses
per problem (registry `samples=16`) and the mean correctness over all of them, which is the
default `metrics.accuracy`.
"""

from __future__ import annotations

import collections
import logging
import os
import re
from collections.abc import Sequence

from ares_jax.data.records import BAD_FIELD, MISSING_ANSWER, DataError
from ares_jax.suite import items
from ares_jax.suite.items import INTEGER, Item

log = logging.getLogger(__name__)

LAYOUTS = (
    "AIME rows (parquet or JSONL/JSON) with a problem/Problem/question column and an "
    "answer/Answer column (or a boxed answer as `solution`), as in HuggingFaceH4/aime_2024, "
    "Maxwell-Jia/AIME_2024, math-ai/aime24, AI-MO/aimo-validation-aime, opencompass/AIME2025 "
    "(aime2025-I/II.jsonl), yentinglin/aime_2025, math-ai/aime25 and MathArena/aime_2025; rows "
    "of another year are skipped."
)

_QUESTION = ("problem", "Problem", "question", "Question")
_ANSWER = ("answer", "Answer")
_ID = ("id", "ID", "Id", "problem_idx", "unique_id")
_YEAR = ("year", "Year")
_BOXED = re.compile(r"^\\boxed\{\s*([^{}]*?)\s*\}$")
_INTEGER = re.compile(r"^[+]?\d+$")
_ID_YEAR = re.compile(r"^((?:19|20)\d\d)\b")
_URL_YEAR = re.compile(r"/((?:19|20)\d\d)_AIME")


def _field(row, names, where, *, required=True):
    try:
        return items.field(row, names, where, required=required)
    except DataError as e:
        raise DataError(f"{e}; AIME reads {LAYOUTS}", reason=e.reason) from None


def _year_of(name: str) -> int | None:
    """The contest year a registry name stands for ("aime24" -> 2024), or None."""
    m = re.search(r"(\d\d)$", name)
    return 2000 + int(m.group(1)) if m else None


def _row_year(row: dict) -> int | None:
    """The year a row says it is from (a year column, a dated id, an AoPS url), or None."""
    year = next((row[k] for k in _YEAR if row.get(k) is not None), None)
    if year is not None and str(year).strip().isdigit():
        return int(str(year).strip())
    for key in ("ID", "id"):
        if isinstance(row.get(key), str) and (m := _ID_YEAR.match(row[key].strip())):
            return int(m.group(1))
    url = row.get("url")
    if isinstance(url, str) and (m := _URL_YEAR.search(url)):
        return int(m.group(1))
    return None


def _gold(row: dict, where: str) -> str:
    """The integer answer of a row as a canonical string ("033" -> "33")."""
    value = _field(row, _ANSWER, where, required=False)
    if value is None:
        # math-ai/aime24 keeps the answer, boxed, in its `solution` column.
        solution = row.get("solution")
        if isinstance(solution, str) and (m := _BOXED.match(solution.strip())):
            value = m.group(1)
        elif isinstance(solution, str | int) and _INTEGER.match(str(solution).strip()):
            value = solution
        else:
            raise DataError(
                f"{where}: no answer column {list(_ANSWER)} and no bare or boxed answer in "
                f"`solution` (the row has {sorted(row)}); AIME reads {LAYOUTS}",
                reason=MISSING_ANSWER,
            )
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip().strip("$").strip()
    if (m := _BOXED.match(text)) is not None:
        text = m.group(1)
    if not _INTEGER.match(text) or not 0 <= int(text) <= 999:
        raise DataError(
            f"{where}: AIME answer {value!r} is not an integer from 0 to 999", reason=BAD_FIELD
        )
    return str(int(text))


def load(path: str | os.PathLike | Sequence[str | os.PathLike], name: str) -> list[Item]:
    """The AIME problems of `name`'s year from `path` (module docstring)."""
    want_year = _year_of(name)
    found: list[tuple[str, str, dict, str]] = []  # (id, stem, row, where)
    skipped: collections.Counter[int] = collections.Counter()
    for where, row in items.rows(path):
        file = where.rsplit(", ", 1)[0]
        stem = os.path.splitext(os.path.basename(file))[0]
        year = _row_year(row)
        if want_year is not None and year is not None and year != want_year:
            skipped[year] += 1
            continue
        raw_id = _field(row, _ID, where, required=False)
        row_number = where.rsplit(" ", 1)[-1]
        item_id = str(raw_id).strip() if raw_id is not None else f"{stem}-{row_number}"
        found.append((item_id, stem, row, where))
    if skipped:
        log.info(
            "%s: skipped %d rows of other years (%s) in %s",
            name,
            sum(skipped.values()),
            ", ".join(f"{y}: {n}" for y, n in sorted(skipped.items())),
            os.fspath(path) if isinstance(path, str | os.PathLike) else path,
        )
    if not found:
        got = f" (its rows are from {sorted(skipped)})" if skipped else ""
        raise DataError(f"{path}: no AIME {want_year or ''} problem{got}; AIME reads {LAYOUTS}")
    ids = [i for i, _, _, _ in found]
    if len(set(ids)) != len(ids):
        # Two files numbered from 1 (AIME I and II): their ids repeat, their file stems do not.
        ids = [f"{stem}-{i}" if not i.startswith(stem) else i for i, stem, _, _ in found]
        if len(set(ids)) != len(ids):
            dup = next(i for i, n in collections.Counter(ids).items() if n > 1)
            where = next(w for (_, _, _, w), i in zip(found, ids, strict=True) if i == dup)
            raise DataError(f"{where}: id {dup!r} repeats", reason=BAD_FIELD)
    out = []
    for item_id, (_, _, row, where) in zip(ids, found, strict=True):
        question = _field(row, _QUESTION, where)
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: empty problem text", reason=BAD_FIELD)
        out.append(
            Item(
                benchmark=name,
                id=item_id,
                question=question.strip(),
                answer=_gold(row, where),
                kind=INTEGER,
                origin=where,
            )
        )
    return out
