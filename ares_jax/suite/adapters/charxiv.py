"""CharXiv reasoning questions (validation): one question over a chart from an arXiv paper.

Layouts read:
  - the authors' GitHub release (`princeton-nlp/CharXiv`): `data/reasoning_val.json`, a JSON
    object keyed by figure id, each value {figure_id, query, answer, inst_category (1-4, the
    answer type), qa_source (1-3)}; the chart is `images/<figure_id>.jpg` of the repository root
    (from the HF `images.zip`), looked up next to the JSON file and one directory up. The same
    rows as a JSON array or JSONL are read too. The path may be the file, `data/`, or the
    repository root.
  - the Hugging Face release (`princeton-nlp/CharXiv`, `val.parquet`): one row per chart with
    image (an HF Image struct), figure_path ("images/<figure_id>.jpg", the id), reasoning_q,
    reasoning_a, reasoning_a_type (= inst_category, which picks the instructions and the
    grading rule; lmms-eval's port picks them by reasoning_q_source, unlike the official code),
    reasoning_q_source (= qa_source),
    category, year, original_id, descriptive_q1..4/descriptive_a1..4 (unused). A directory
    holding `val.parquet` reads that file (not `test.parquet`, whose answers are withheld; a row
    without an answer is refused).

Prompt (`src/reasoning_utils.py` `build_reasoning_queries` with `src/constants.py`
`REASONING_RESP_INST`, the bullet lines' indentation removed): "<image>\\n{query}\\n" followed
by the answer type's instructions:
  1 Text-in-Chart: ground the answer in text written in the chart, commas between terms, full
    names of subplots/labels;
  2 Text-in-General: conform to the options or instructions of the question, else a short
    phrase;
  3 Number-in-Chart: a number written in the chart, possibly approximate;
  4 Number-in-General: "an exact integer" or "a number with N decimal places", N from the gold
    (as the official code does).
These instructions say what the answer is, not how to format it, so they are kept; ARES's
think/boxed instruction is appended by the evaluation.

Answer kinds (rule-based; CharXiv grades reasoning answers with a GPT-4o judge, per answer type,
`REASONING_GRADING_INST`):
  - types 1 and 2: TEXT (equal after folding case, spaces, punctuation and `\\text{}`, else
    math-verify). The judge also accepts different grammar or notation (alpha vs α), the terms
    of a multi-term answer in another order, and (type 2 without options) a paraphrase with the
    same meaning; none of that is accepted here. Type 2 questions that offer options write them
    inline in free text ("top cluster, right cluster, or bottom cluster?") and the gold is one of
    them verbatim, so they stay TEXT: equality with the gold is choosing that option;
  - types 3 and 4, a numeric gold: INTEGER (no decimal point) or FLOAT without a precision
    (equal within 1e-6 relative), the judge's "exactly equal in value" rule; thousands commas
    and a % sign are ignored; a power of ten written "10^-2" and e-notation ("1e+06") are stored
    as their decimal value ("0.01", "1000000"), which the number parser and math-verify match
    with 10^{-2}, 1e-2 or 0.01;
  - types 3 and 4, any other gold (a list such as "30, 40"): TEXT.
So scores are lower than the judge's, mainly on types 1 and 2.
Difficulty: the answer type's name (Text-in-Chart, ...). Ids: the figure id.

Metric: accuracy over the 1,000 validation reasoning questions.
"""

from __future__ import annotations

import decimal
import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from ares_jax.data import records
from ares_jax.data.records import DataError
from ares_jax.suite import items
from ares_jax.suite.adapters import mmmu
from ares_jax.suite.items import FLOAT, INTEGER, TEXT, Item

LAYOUTS = (
    "CharXiv's GitHub data/reasoning_val.json (an object keyed by figure id: query, answer, "
    "inst_category, qa_source; images/ID.jpg at the repository root), or the HF "
    "princeton-nlp/CharXiv val.parquet (image, figure_path, reasoning_q, reasoning_a, "
    "reasoning_a_type); a file, data/ directory, or repository/snapshot root."
)

ANSWER_TYPES = {
    1: "Text-in-Chart",
    2: "Text-in-General",
    3: "Number-in-Chart",
    4: "Number-in-General",
}

# REASONING_RESP_INST of CharXiv's src/constants.py, verbatim but for the indentation (the
# typo "exlicitly" is the benchmark's prompt).
_INSTRUCTIONS = {
    1: (
        "* Your final answer must be grounded to some text that is explicitly written and "
        "relevant to the question in the chart.\n"
        "* If you need to answer multiple terms, separate them with commas.\n"
        "* Unless specified in the question (such as answering with a letter), you are required "
        "to answer the full names of subplots and/or labels by default."
    ),
    2: (
        "* If there are options in the question, your final answer must conform to one of the "
        "options.\n"
        "* If there are additional instructions in the question, follow them accordingly.\n"
        "* If there are neither options nor additional instructions, you are allowed to respond "
        "with a short phrase only."
    ),
    3: (
        "* Your final answer must be grounded to a number that is exlicitly written and relevant "
        "to the question in the chart, even if it's an approximate value.\n"
        "* You are allowed to extract numbers within some text when needed."
    ),
}

_PLAIN_NUMBER = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?$")
_SCIENTIFIC = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)[eE][-+]?\d+$")
_POWER_OF_TEN = re.compile(r"^10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?$")
_GITHUB = ("query", "answer", "inst_category")
_HF = ("reasoning_q", "reasoning_a", "reasoning_a_type")


def load(path: str | os.PathLike, name: str = "charxiv") -> list[Item]:
    """CharXiv's reasoning items from either release (module docstring).

    Raises:
      DataError: a file in another layout, a bad row, or a missing chart, naming it.
    """
    out: list[Item] = []
    seen: set[str] = set()
    for file in records.expand_paths(_data_files(path)):
        for where, row in _file_rows(file):
            item = _item(row, where, file, name)
            if item.id in seen:
                raise DataError(f"{where}: figure {item.id!r} appears twice in the data")
            seen.add(item.id)
            out.append(item)
    return out


def _data_files(path: str | os.PathLike) -> str:
    """The reasoning file of a directory (repository root, data/, or HF snapshot), else
    `path`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for candidate in ("reasoning_val.json", os.path.join("data", "reasoning_val.json")):
            if os.path.isfile(os.path.join(path, candidate)):
                return os.path.join(path, candidate)
        if os.path.isfile(os.path.join(path, "val.parquet")):
            return os.path.join(path, "val.parquet")
    return path


def _file_rows(file: str) -> Iterator[tuple[str, dict]]:
    """(where, row) of one file; a JSON object keyed by figure id gives its values."""
    if file.lower().endswith(".json"):
        with open(file, "rb") as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"{"):
            try:
                with open(file, encoding="utf-8") as f:
                    data = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(
                    f"{file}: malformed JSON: {e}", reason=records.MALFORMED_JSON
                ) from None
            if not isinstance(data, dict) or not all(isinstance(v, Mapping) for v in data.values()):
                raise DataError(f"{file}: not in a layout CharXiv's adapter reads. {LAYOUTS}")
            for key, value in data.items():
                yield f"{file}, key {key}", {"figure_id": key, **value}
            return
    yield from items.rows(file)


def _category(value: Any, where: str) -> int:
    try:
        category = int(value)
    except (TypeError, ValueError):
        category = 0
    if category not in ANSWER_TYPES:
        raise DataError(f"{where}: answer type {value!r} is not 1-4", reason=records.BAD_FIELD)
    return category


def _instruction(category: int, answer: str) -> str:
    if category != 4:
        return _INSTRUCTIONS[category]
    # As the official get_number_instruction: the gold's decimals set the required form.
    _, dot, decimals = answer.partition(".")
    if not dot:
        return "* Your final answer must be an exact integer."
    return f"* Your final answer must be a number with {len(decimals)} decimal places."


def kind_of(answer: str, category: int) -> tuple[str, str]:
    """(kind, gold) of an answer of the given type (module docstring)."""
    text = answer.strip()
    if category in (1, 2):
        return TEXT, text
    if m := _POWER_OF_TEN.match(text):
        value = decimal.Decimal(10) ** int(m.group(1))
    elif _SCIENTIFIC.match(text):
        value = decimal.Decimal(text)
    elif _PLAIN_NUMBER.match(text):
        return (FLOAT if "." in text else INTEGER), text
    else:
        return TEXT, text
    # A power of ten or e-notation as its decimal value, which both the number parser and
    # math-verify read ("0.01" matches 0.01, 1e-2 and 10^{-2}).
    plain = format(value.normalize(), "f")
    return (FLOAT if "." in plain else INTEGER), plain


def _figure_id(row: Mapping[str, Any], where: str) -> str:
    if row.get("figure_id") is not None:
        return str(row["figure_id"])
    if row.get("figure_path"):
        return os.path.splitext(os.path.basename(str(row["figure_path"])))[0]
    if row.get("original_id"):
        return str(row["original_id"])
    raise DataError(f"{where}: no figure_id or figure_path to name the chart by")


def _github_image(figure_id: str, file: str, where: str) -> bytes:
    """The chart of a GitHub-layout row: images/<id>.jpg next to the data file or one up."""
    here = os.path.dirname(os.path.abspath(file))
    relative = os.path.join("images", f"{figure_id}.jpg")
    roots = (here, os.path.dirname(here))
    for root in roots:
        if os.path.isfile(os.path.join(root, relative)):
            return items.image(relative, root, where)
    tried = ", ".join(os.path.join(r, relative) for r in roots)
    raise DataError(
        f"{where}: chart {relative} not found (tried {tried}); unzip the HF images.zip into "
        "the repository's images/ folder",
        reason=records.MISSING_IMAGE,
    )


def _item(row: Mapping[str, Any], where: str, file: str, name: str) -> Item:
    hf = all(c in row for c in _HF)
    mmmu.check_layout(row, where, (*_HF, "image") if hf else _GITHUB, LAYOUTS)
    query, answer, raw_type = (row[c] for c in (_HF if hf else _GITHUB))
    if answer is None or not str(answer).strip():
        raise DataError(
            f"{where}: no answer (the test split's answers are withheld; use validation)",
            reason=records.MISSING_ANSWER,
        )
    answer = str(answer).strip()
    category = _category(raw_type, where)
    figure_id = _figure_id(row, where)
    if row.get("image") is not None:
        image = items.image(row["image"], items.root_of(file), f"{where}, image")
    else:
        image = _github_image(figure_id, file, where)
    kind, gold = kind_of(answer, category)
    question = f"{str(query).strip()}\n{_instruction(category, answer)}"
    return mmmu.make_item(
        where,
        benchmark=name,
        id=figure_id,
        question=items.with_images(question, 1),
        answer=gold,
        kind=kind,
        images=(image,),
        difficulty=ANSWER_TYPES[category],
    )
