r"""MATH-500 ("math500"): the 500-problem test subset of MATH chosen by OpenAI's "Let's Verify
Step by Step" (PRM800K), as released on the Hugging Face hub.

Layout read: `HuggingFaceH4/MATH-500` `test.jsonl` (also the same rows as parquet, and their
source, openai/prm800k `prm800k/math_splits/test.jsonl`), one problem a row with the
columns `problem`, `solution` (worked solution ending in `\boxed{...}`), `answer` (the final
answer as LaTeX), `subject` (Algebra, Precalculus, ...), `level` (1-5, an int) and `unique_id`
("test/precalculus/807.json"). A row without `answer` (a MATH-style row) takes the last
`\boxed{}` of its `solution`. Text only.

Prompt: the problem text as released. The chain-of-thought evaluations of R1-style models
(Qwen2.5-Math's evaluation, DeepSeek-R1's) give the problem with only an answer-format
instruction ("Please reason step by step, and put your final answer within \boxed{}."), which
the suite's evaluation supplies itself (ARES's think/boxed instruction).

Answers: a gold that is a plain integer ("18", "-3") is INTEGER (compared as a number; a
response that is not a plain number, like `\frac{36}{2}`, goes to math-verify); every other
gold (`\frac{14}{3}`, `(3, \frac{\pi}{2})`, `\text{(C)}`, `10,\!000`, `x^2+7x+10`) is
EXPRESSION, compared by math-verify (`rewards.answers.is_correct`: string match, then symbolic
and numeric equivalence). `difficulty` is the level ("Level 3"). Metric: accuracy (pass@1).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from ares_jax.data.records import BAD_FIELD, MISSING_ANSWER, DataError
from ares_jax.suite import grading, items
from ares_jax.suite.items import EXPRESSION, INTEGER, Item

LAYOUTS = (
    "MATH-500 rows (HuggingFaceH4/MATH-500 test.jsonl, or parquet) with the columns problem, "
    "solution, answer, subject, level and unique_id."
)

_INTEGER = re.compile(r"^[-+]?\d+$")


def _field(row, names, where, *, required=True):
    try:
        return items.field(row, names, where, required=required)
    except DataError as e:
        raise DataError(f"{e}; math500 reads {LAYOUTS}", reason=e.reason) from None


def _gold(row: dict, where: str) -> str:
    answer = _field(row, ("answer",), where, required=False)
    if answer is None:
        solution = _field(row, ("solution",), where)
        answer, how = grading.extract_answer(str(solution))
        if how not in ("boxed", "boxed_in_reasoning"):
            raise DataError(
                f"{where}: no answer column and no \\boxed{{}} in its solution",
                reason=MISSING_ANSWER,
            )
    answer = str(answer).strip()
    if not answer:
        raise DataError(f"{where}: empty answer", reason=MISSING_ANSWER)
    return answer


def _level(value) -> str:
    if value is None:
        return ""
    text = str(value).strip()
    return f"Level {text}" if text.isdigit() else text


def load(path: str | os.PathLike | Sequence[str | os.PathLike], name: str) -> list[Item]:
    """The MATH-500 problems in `path` (module docstring)."""
    out = []
    seen: dict[str, str] = {}
    for where, row in items.rows(path):
        question = _field(row, ("problem", "question"), where)
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: empty problem text", reason=BAD_FIELD)
        answer = _gold(row, where)
        raw_id = _field(row, ("unique_id", "id"), where, required=False)
        item_id = str(raw_id) if raw_id is not None else where.rsplit(" ", 1)[-1]
        if item_id in seen:
            raise DataError(
                f"{where}: id {item_id!r} repeats (first at {seen[item_id]})", reason=BAD_FIELD
            )
        seen[item_id] = where
        out.append(
            Item(
                benchmark=name,
                id=item_id,
                question=question.strip(),
                answer=answer,
                kind=INTEGER if _INTEGER.match(answer) else EXPRESSION,
                difficulty=_level(row.get("level")),
                origin=where,
            )
        )
    if not out:
        raise DataError(f"{path}: no rows; math500 reads {LAYOUTS}")
    return out
