"""MMStar: 1500 vision-indispensable multiple-choice questions over six core capabilities.

Layout read (`LAYOUTS`): the Hugging Face dataset `Lin-Chen/MMStar` (split "val",
`mmstar.parquet`), one row per question: "index" (0 ... 1499), "question" (the question with
its options inside), "image" (encoded bytes, or an HF Image struct {"bytes", "path"}),
"answer" (a letter), "category" (one of the six capabilities, 250 questions each),
"l2_category" (one of 18 axes), "meta_info" (source benchmark, split, image path; unused).
JSONL or JSON-array rows with these columns are read too.

The question holds its options in one of two forms (the sources' own):
  - "{question}\\nOptions: A: {a}, B: {b}, C: {c}, D: {d}" (most rows): split at the labels
    "A:", then ", B:" (or a new line before it), ... in order, so an option may contain commas;
  - MathVista's "Hint: Please answer the question and provide the correct option letter, e.g.,
    A, B, C, D, at the end.\\nQuestion: {question}\\nChoices:\\n(A) {a}\\n(B) {b} ...": the
    question after "Question:", one option a line; the hint, an answer-format instruction, is
    left out.
Options padded with the text "nan" after the gold one (the release's trace of empty option
columns; the official TSV shows no such option) are dropped.

Prompt: the question, then its options one a line ("A. {a}", ...), as the official evaluation
(`MMStar-Benchmark/MMStar` `eval/vlmeval/utils/dataset.py`, VLMEvalKit's multiple-choice
prompt: "Question: ...", "Options:", "A. ...") lays them out, after the image, without its
"Please select the correct answer from the options above." line.

Answers: multiple choice (kind CHOICE, gold the letter, choices the option texts). The
official scorer (`eval/vlmeval/evaluate/mmstar.py`) compares the gold letter with the first
character of a short answer ("B", "(B)", "option B", "the answer is B"); here the extracted
(boxed) answer may be the letter or the option's text.

Metric: accuracy over the 1500 questions (the official "final score"); `Item.difficulty` is the
"category" (the official per-capability scores are accuracies over 250 each).
"""

from __future__ import annotations

import os
import re

from ares_jax.data import records
from ares_jax.data.records import DataError
from ares_jax.suite import items
from ares_jax.suite.items import CHOICE, LETTERS, Item

LAYOUTS = (
    "MMStar: Hugging Face Lin-Chen/MMStar mmstar.parquet (index, question with 'Options: A: ..., "
    "B: ...' or MathVista's 'Choices: (A) ...' inside, image bytes or HF Image struct, answer "
    "letter, category, l2_category), or JSONL/JSON rows with those columns"
)

_OPTIONS = re.compile(r"(?:^|\n)\s*Options\s*:\s*")
_CHOICES = re.compile(r"(?:^|\n)\s*Choices\s*:\s*\n")
_HINT = re.compile(r"^\s*Hint:\s*Please answer the question[^\n]*\n", re.IGNORECASE)
_QUESTION = re.compile(r"^\s*Question:\s*")
_LINE = re.compile(r"^\s*\(([A-Z])\)\s?(.*)$")


def _inline(body: str) -> list[str] | None:
    """Option texts of "A: x, B: y, ..." ("A. x, ..." too; labels in order, each after a comma,
    semicolon or line break; commas may occur inside options)."""
    m = re.match(r"\s*A\s*([:.])\s?", body)
    if not m:
        return None
    labels, sep = [m], re.escape(m.group(1))  # the later labels use the same mark as "A"
    while len(labels) < len(LETTERS) and (
        m := re.compile(r"[,;\n]\s*" + LETTERS[len(labels)] + r"\s*" + sep + r"\s?").search(
            body, labels[-1].end()
        )
    ):
        labels.append(m)
    return [
        body[m.end() : labels[i + 1].start() if i + 1 < len(labels) else len(body)].strip()
        for i, m in enumerate(labels)
    ]


def _lines(body: str) -> list[str] | None:
    """Option texts of "(A) x" lines, in letter order."""
    found = [m for m in map(_LINE.match, body.strip().splitlines()) if m]
    if [m.group(1) for m in found] != list(LETTERS[: len(found)]):
        return None
    return [m.group(2).strip() for m in found]


def parse_question(text: str) -> tuple[str, list[str]] | None:
    """(question, option texts) of an MMStar question (module docstring), or None when it holds
    no options in either form."""
    for pattern, parse in ((_CHOICES, _lines), (_OPTIONS, _inline)):
        marks = list(pattern.finditer(text))
        if marks:
            options = parse(text[marks[-1].end() :])
            if options and len(options) >= 2:
                stem = _QUESTION.sub("", _HINT.sub("", text[: marks[-1].start()]))
                return stem.strip(), options
    return None


def _item(row: dict, root: str, where: str, name: str) -> Item:
    text = str(items.field(row, ["question"], where))
    parsed = parse_question(text)
    if parsed is None:
        raise DataError(
            f"{where}: the question holds no 'Options: A: ..., B: ...' nor 'Choices:\\n(A) ...' "
            f"list: {text[:120]!r}",
            reason=records.BAD_FIELD,
        )
    stem, options = parsed
    gold = str(items.field(row, ["answer"], where)).strip().strip("()").upper()
    if gold not in LETTERS[: len(options)]:
        raise DataError(
            f"{where}: answer {gold!r} is not a letter of its {len(options)} options",
            reason=records.BAD_FIELD,
        )
    while len(options) > LETTERS.index(gold) + 1 and options[-1].strip().lower() == "nan":
        options.pop()  # padding of the release (module docstring)
    index = items.field(row, ["index", "id"], where)
    return Item(
        benchmark=name,
        id=str(index),
        question=items.with_images(stem + "\n" + items.options_text(options), 1),
        answer=gold,
        kind=CHOICE,
        images=(items.image(items.field(row, ["image"], where), root, where),),
        choices=tuple(options),
        difficulty=str(row.get("category") or ""),
        origin=where,
    )


def load(path: str | os.PathLike, name: str = "mmstar") -> list[Item]:
    """The items of MMStar rows in a file, directory or glob (module docstring).

    Raises:
      DataError: a file in another layout, a bad row or an unreadable image, naming it; or an
        index twice.
    """
    root = items.root_of(path)
    out: list[Item] = []
    seen: dict[str, str] = {}
    for where, row in items.rows(path):
        item = _item(row, root, where, name)
        if item.id in seen:
            raise DataError(f"{where}: index {item.id} already at {seen[item.id]}")
        seen[item.id] = where
        out.append(item)
    if not out:
        raise DataError(f"{os.fspath(path)}: no MMStar rows ({LAYOUTS})")
    return out
