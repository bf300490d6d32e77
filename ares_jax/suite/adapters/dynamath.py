"""DynaMath (Zou et al., 2024): 501 seed questions, each a program that draws variants; the
released sample has 10 variants of each (5,010 problems), and the paper's Table 2 reports the
worst-case accuracy ("DynaMath-W").

Layouts read (a file, a directory of them or a glob; one variant per file, or all together):
  - Hugging Face `DynaMath/DynaMath_Sample` parquet, one split per variant
    (`data/sample_variant<k>-*.parquet`; older revisions `data/sample<k>-*.parquet`): columns
    id (the seed question's id, the same in every variant: lmms-eval's worst-case aggregation
    groups by it), question, image (a relative path), decoded_image (an HF Image struct
    {"bytes", "path"}), ground_truth, answer_type ("multiple choice" / "float" / "text"),
    subject, knowledge_level. Mirrors with a `sample_all` split (all variants in one file) read
    the same way.
  - the authors' GitHub `DynaMath/DynaMath` `dataset.json` as `generate_json.py` writes it
    (and `samples and result/10trials/trial<k>/dataset.json`): one JSON object keyed by the
    seed id, values with question, answer, image ("image/image<id>.png", relative to the file's
    directory), answer_type, subject, level.
The variant number of a row: its `varid` column if any, else the number in the file's name or
its directory's ("sample_variant3", "sample3", "trial3"), else the order in which its seed
id recurs in the data. Item.id = "<seed>_v<variant>", Item.group = the seed id.

Prompt: the question as released (the authors' scripts add a JSON answer-format guide, and
"Please answer in a floating-point number." for floats: answer-format instructions, left out;
ARES's think/boxed instruction is appended by the evaluation). A multiple-choice question
writes its options inline ("... Choices: (A) yes (B) no", "choice: (A) 2 (B) 1", or "A. x"
lines); they are parsed (`mathverse.split_options`) and laid out one a line as "A. <text>"
under "Choices:". Options drawn in the image ("choice: (A) (B) (C) (D)") read as their
letters, and such a question is kept as it is; so is one whose options cannot be parsed, with
the letters A-E as choices. The image marker goes first.

Answers and grading (the authors' `evaluation/*_json_eval.py` and VLMEvalKit's
`dataset/dynamath.py`):
  - multiple choice: CHOICE, gold = the letter, `choices` = the parsed option texts (the
    letter or the option's text counts; the authors compare the letter only);
  - float: FLOAT with DynaMath's own rule, an absolute tolerance: |answer - gold| <= 0.001
    (`Item.tolerance`; the authors ask for a "three-digit floating-point number", so gold
    2.0944 accepts 2.094 and 2.095, not 2.09);
  - text (times, coordinates, months, node names, ...): TEXT, equal after case/space folding,
    else math-verify ("(0,6)" equals "(0, 6)", "4" equals "y = 4"). The authors count a text
    answer right when the gold is a substring of it (VLMEvalKit: the answer a substring of
    the gold); an exact comparison is stricter than both for an answer with extra words.
Metric: worst-case accuracy (`score` = `metrics.worst_case`): a seed question counts only when
all its variants are right. `Item.difficulty` = knowledge_level (elementary school, high
school, undergraduate).
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Mapping
from typing import Any

from ares_jax.data import records
from ares_jax.data.records import DataError
from ares_jax.suite import items, metrics
from ares_jax.suite.adapters.mathverse import split_options
from ares_jax.suite.adapters.mathvista import keyed_rows, need, row_image
from ares_jax.suite.items import CHOICE, FLOAT, LETTERS, TEXT, Item

LAYOUTS = (
    "DynaMath: the Hugging Face DynaMath/DynaMath_Sample parquet, one file per variant "
    "(id = the seed question, question, decoded_image, ground_truth, answer_type, subject, "
    "knowledge_level) or the authors' GitHub dataset.json (an object keyed by seed id; images "
    "as relative paths such as image/image1.png)"
)

FLOAT_TOLERANCE = 0.001  # |answer - gold|, the authors' and VLMEvalKit's float rule
score = metrics.worst_case

_VARIANT_IN_PATH = re.compile(r"(?i)(?:variant|sample|trial)[_-]?(\d+)")
_ONE_LETTER = re.compile(r"\(?\s*([A-Z])\s*\)?\.?")


def load(path: str | os.PathLike, name: str) -> list[Item]:
    """DynaMath items (Item.group = the seed question) from a file, directory or glob in
    `LAYOUTS` (module docstring).

    Raises:
      DataError: a file in another layout, a bad row, or variant files whose ids share no
        seed question (so worst-case accuracy could not group them); naming the file and row.
    """
    out = []
    used: dict[str, set[int]] = collections.defaultdict(set)  # seed -> variant numbers
    named: dict[int, set[str]] = collections.defaultdict(set)  # file-named variant -> files
    for file, where, key, row in keyed_rows(path):
        seed = _seed(row, key, where)
        hint = _variant_hint(row, file)
        if hint is not None and row.get("varid") is None:
            named[hint].add(file)
        variant = hint if hint is not None and hint not in used[seed] else None
        if variant is None:  # the next number not yet taken by this seed
            variant = next(k for k in range(1, len(used[seed]) + 2) if k not in used[seed])
        used[seed].add(variant)
        out.append(_item(row, seed, variant, file, where, name))
    if not out:
        raise DataError(f"no DynaMath rows in {os.fspath(path)}; expected {LAYOUTS}")
    if len(named) > 1 and all(len(variants) == 1 for variants in used.values()):
        files = sorted(f for fs in named.values() for f in fs)
        raise DataError(
            f"the variant files {files} share no seed question id, so the worst case over "
            "variants cannot be taken; DynaMath's id column must name the seed question in "
            f"every variant ({LAYOUTS})",
            reason=records.BAD_FIELD,
        )
    return out


def _seed(row: Mapping[str, Any], key: str | None, where: str) -> str:
    for column in ("qid", "id"):
        if row.get(column) is not None and str(row[column]).strip():
            return str(row[column]).strip()
    if key is not None:
        return key
    raise DataError(
        f"{where}: no 'id' column (the row has {sorted(row)}); expected {LAYOUTS}",
        reason=records.BAD_FIELD,
    )


def _variant_hint(row: Mapping[str, Any], file: str) -> int | None:
    if row.get("varid") is not None:
        try:
            return int(row["varid"])
        except (TypeError, ValueError):
            pass
    full = os.path.abspath(file)
    for part in (os.path.basename(full), os.path.basename(os.path.dirname(full))):
        m = _VARIANT_IN_PATH.search(part)
        if m:
            return int(m.group(1))
    return None


def _item(
    row: Mapping[str, Any], seed: str, variant: int, file: str, where: str, name: str
) -> Item:
    question = str(need(row, "question", where, LAYOUTS)).strip()
    gold = row.get("ground_truth", row.get("answer"))
    if gold is None:
        raise DataError(
            f"{where}: no 'ground_truth' (HF) or 'answer' (GitHub) column (the row has "
            f"{sorted(row)}); expected {LAYOUTS}",
            reason=records.BAD_FIELD,
        )
    gold = str(gold).strip()
    if not gold:
        raise DataError(f"{where}: empty answer", reason=records.MISSING_ANSWER)
    atype = str(need(row, "answer_type", where, LAYOUTS)).strip().lower()
    images = row_image(row, ("decoded_image", "image"), file, where)

    text, choices, tolerance = question, (), None
    if atype == "multiple choice":
        m = _ONE_LETTER.fullmatch(gold)
        if not m:
            raise DataError(
                f"{where}: multiple-choice answer {gold!r} is not a letter",
                reason=records.BAD_FIELD,
            )
        gold = m.group(1)
        parsed = split_options(question)
        if parsed and LETTERS.index(gold) < len(parsed[1]):
            choices = tuple(parsed[1])
            if choices != tuple(LETTERS[: len(choices)]):  # drawn options keep "(A) (B) (C)"
                text = parsed[0] + "\nChoices:\n" + items.options_text(choices)
        else:
            choices = tuple(LETTERS[: max(5, LETTERS.index(gold) + 1)])
        kind = CHOICE
    elif atype == "float":
        kind, tolerance = FLOAT, FLOAT_TOLERANCE
    elif atype == "text":
        kind = TEXT
    else:
        raise DataError(
            f"{where}: answer_type {atype!r} is not one of 'multiple choice', 'float', 'text'",
            reason=records.BAD_FIELD,
        )
    level = row.get("knowledge_level", row.get("level"))
    return Item(
        benchmark=name,
        id=f"{seed}_v{variant}",
        question=items.with_images(text, len(images)),
        answer=gold,
        kind=kind,
        images=images,
        choices=choices,
        tolerance=tolerance,
        group=seed,
        difficulty="" if level is None else str(level).strip(),
        origin=where,
    )
