"""GSM8K ("gsm8k"): the 1,319 grade-school word problems of the test split.

Layout read: `openai/gsm8k` on the Hugging Face hub, config `main`
(`main/test-00000-of-00001.parquet`), and the JSONL of the authors' repository
(openai/grade-school-math `grade_school_math/data/test.jsonl`): one problem a row, columns
`question` and `answer`, where the answer is the worked solution (with `<<48/2=24>>` calculator
annotations) ending in a line `#### <number>`. The gold is that number, thousands commas
removed. A row whose `answer` is already a bare number is taken as it is. The rows carry no
id: items are numbered "<split>-<n>" (split = the file name up to its first "-" or ".", n
counting from 0 over the files of that split in order). A file named train* (the training
split, next to the test file in `main/`) is skipped; a path holding only training files is a
DataError. Text only.

Prompt: the question as released (zero-shot chain-of-thought evaluations, e.g. Qwen2.5-Math's,
give the question with only an answer-format instruction, which the suite's evaluation supplies
itself: ARES's think/boxed instruction).

Answers: INTEGER (all test golds are integers; a non-integer gold would be FLOAT, compared
within 1e-6 relative). Metric: accuracy.
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Sequence

from ares_jax.data import records
from ares_jax.data.records import MISSING_ANSWER, DataError
from ares_jax.suite import items
from ares_jax.suite.items import FLOAT, INTEGER, Item

LAYOUTS = (
    "GSM8K rows with a question column and an answer column ending in '#### N': "
    "openai/gsm8k main/test-*.parquet or the authors' test.jsonl."
)

_NUMBER = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)$")


def _field(row, names, where, *, required=True):
    try:
        return items.field(row, names, where, required=required)
    except DataError as e:
        raise DataError(f"{e}; gsm8k reads {LAYOUTS}", reason=e.reason) from None


def gold_number(answer: str, where: str) -> str:
    """The number after the last `####` of a GSM8K answer (or a bare number), commas and a
    trailing period removed; DataError naming `where` otherwise."""
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    text = text.strip().replace(",", "").replace("$", "").rstrip(".").strip()
    if not _NUMBER.match(text):
        raise DataError(
            f"{where}: the answer does not end in '#### <number>' (it ends "
            f"{str(answer)[-40:]!r}); gsm8k reads {LAYOUTS}",
            reason=MISSING_ANSWER,
        )
    return text.lstrip("+")


def _split(path: str) -> str:
    return re.split(r"[-.]", os.path.basename(path), maxsplit=1)[0]


def load(path: str | os.PathLike | Sequence[str | os.PathLike], name: str) -> list[Item]:
    """The GSM8K problems in `path`, training files skipped (module docstring)."""
    files = records.expand_paths(path)
    kept = [f for f in files if _split(f).lower() != "train"]
    if not kept:
        raise DataError(
            f"{path}: only training files ({', '.join(files)}); GSM8K's benchmark is the test "
            f"split (main/test-00000-of-00001.parquet or test.jsonl)"
        )
    counters: collections.Counter[str] = collections.Counter()
    out = []
    for where, row in items.rows(kept):
        split = _split(where.rsplit(", ", 1)[0])
        question = _field(row, ("question",), where)
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: empty question", reason=records.BAD_FIELD)
        answer = gold_number(_field(row, ("answer",), where), where)
        is_integer = re.fullmatch(r"[-+]?\d+(?:\.0*)?", answer) is not None
        if is_integer:
            answer = answer.split(".", 1)[0]
        out.append(
            Item(
                benchmark=name,
                id=f"{split}-{counters[split]}",
                question=question.strip(),
                answer=answer,
                kind=INTEGER if is_integer else FLOAT,
                origin=where,
            )
        )
        counters[split] += 1
    if not out:
        raise DataError(f"{path}: no rows; gsm8k reads {LAYOUTS}")
    return out
