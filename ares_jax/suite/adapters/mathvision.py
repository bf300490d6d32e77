"""MATH-Vision (Wang et al., 2024): 3,040 competition problems with diagrams (test), and its
304-problem testmini; the paper's Table 2 reports accuracy.

Layouts read (a file, a directory of them or a glob; test or testmini, as given):
  - Hugging Face `MathLLMs/MathVision` parquet (`data/test-*.parquet`,
    `data/testmini-*.parquet`): columns id, question, options (a list of five option texts, or
    empty for a free-form problem), image (the relative path "images/<id>.jpg"), decoded_image
    (an HF Image struct {"bytes", "path"}), answer, solution, level (1-5), subject;
  - the authors' GitHub `mathllm/MATH-V` `data/test.jsonl` / `data/testmini.jsonl`: the same
    columns without decoded_image; images as relative paths, under the file's directory or its
    parent.
The image is decoded_image's bytes, else the image path. Each row has one image (sub-figures
are drawn in it); the question refers to them as "<image1>", "<image2>", ... and keeps those
tags as released (they are not the suite's `<image>` marker, which goes first).

Prompt: as the authors' model scripts (`models/*.py`) build it for chain-of-thought, without
their answer-format sentence ("Please solve the problem step by step and put your answer in
one \\boxed{}..." / "Answer the question using a single word or phrase."): the question, then
the options one a line as "A. <text>". When the options are just the letters A-E (the choices
are drawn in the image) they are not listed, as the authors' scripts do.

Answers and grading (the authors' `evaluation/evaluate.py` counts a response right when it
equals the gold letter or the gold option's text, or, free form, the gold by string, numeric or
latex2sympy equality):
  - options present: CHOICE, gold = the letter (A-E), `choices` = the option texts (the letters
    themselves when the options are drawn), so the letter or, for listed options, the text
    counts;
  - no options: INTEGER when the answer is an integer, else EXPRESSION (string match, then
    math-verify). The gold is cleaned of release artefacts: surrounding "$...$" and a whole
    "\\boxed{...}" are unwrapped, and control characters that a "\\f"/"\\b"/"\\a"/"\\v"
    escape became in the JSON ("\\x0crac{36}{13}") are turned back into the backslash;
  - no options but a letter answer (ids 59 and 434: the options are drawn in the image):
    CHOICE over the letters A-E.
Metric: accuracy (`metrics.accuracy`). `Item.difficulty` = the level ("1".."5").
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from ares_jax.data import records
from ares_jax.data.records import DataError
from ares_jax.suite import items
from ares_jax.suite.adapters.mathvista import keyed_rows, need, option_index, row_image, unique
from ares_jax.suite.items import CHOICE, EXPRESSION, INTEGER, LETTERS, Item

LAYOUTS = (
    "MATH-Vision: the Hugging Face MathLLMs/MathVision parquet (id, question, options, "
    "decoded_image, answer, level, subject) or the authors' GitHub data/test.jsonl / "
    "testmini.jsonl (images as relative paths such as images/1.jpg)"
)

_INTEGER = re.compile(r"[-+]?\d+")
_BOXED = re.compile(r"\\boxed\{(.*)\}", re.DOTALL)
# "\frac" written into a JSON string unescaped reads as a form feed and "rac".
_ESCAPES = {"\x07": "\\a", "\x08": "\\b", "\x0b": "\\v", "\x0c": "\\f"}
_DRAWN = list(LETTERS[:5])  # options drawn in the image: A-E


def load(path: str | os.PathLike, name: str) -> list[Item]:
    """MATH-Vision items from a file, directory or glob in `LAYOUTS` (module docstring).

    Raises:
      DataError: a file in another layout, a row without a needed column, a choice answer
        that names no option; naming the file and row.
    """
    out = [_item(row, file, where, name) for file, where, _, row in keyed_rows(path)]
    if not out:
        raise DataError(f"no MATH-Vision rows in {os.fspath(path)}; expected {LAYOUTS}")
    return unique(out)  # test and testmini share ids: one split at a time


def _item(row: Mapping[str, Any], file: str, where: str, name: str) -> Item:
    pid = str(need(row, "id", where, LAYOUTS)).strip()
    question = str(need(row, "question", where, LAYOUTS)).strip()
    answer = clean_answer(str(need(row, "answer", where, LAYOUTS)))
    if not answer:
        raise DataError(f"{where}: empty answer", reason=records.MISSING_ANSWER)
    options = [str(o).strip() for o in (row.get("options") or [])]
    images = row_image(row, ("decoded_image", "image"), file, where)

    text, choices = question, ()
    if options:
        if options != list(LETTERS[: len(options)]):  # not just the letters of drawn options
            text += "\n" + items.options_text(options)
        index = _letter(answer, len(options))
        if index is None:
            index = option_index(answer, options)
        if index is None:
            raise DataError(
                f"{where}: answer {answer!r} names none of its options {options}",
                reason=records.BAD_FIELD,
            )
        kind, answer, choices = CHOICE, LETTERS[index], tuple(options)
    elif (index := _letter(answer, len(_DRAWN))) is not None:
        kind, answer, choices = CHOICE, LETTERS[index], tuple(_DRAWN)
    else:
        kind = INTEGER if _INTEGER.fullmatch(answer) else EXPRESSION
    level = row.get("level")
    return Item(
        benchmark=name,
        id=pid,
        question=items.with_images(text, len(images)),
        answer=answer,
        kind=kind,
        images=images,
        choices=choices,
        difficulty="" if level is None else str(level).strip(),
        origin=where,
    )


def _letter(answer: str, count: int) -> int | None:
    if len(answer) == 1 and answer in LETTERS[:count]:
        return LETTERS.index(answer)
    return None


def clean_answer(answer: str) -> str:
    """A free-form gold as released, without its artefacts (module docstring)."""
    for char, escape in _ESCAPES.items():
        answer = answer.replace(char, escape)
    answer = answer.strip()
    while len(answer) >= 2 and answer.startswith("$") and answer.endswith("$"):
        answer = answer[1:-1].strip()
    m = _BOXED.fullmatch(answer)
    return m.group(1).strip() if m else answer
