"""MMMU (validation split): college-level multi-discipline questions over one to seven images.

Layout read (Hugging Face `MMMU/MMMU`, one parquet per subject,
`<Subject>/validation-00000-of-00001.parquet`), one row per question:
  id              "validation_<Subject>_<n>"
  question        text with `<image 1>` .. `<image 7>` placeholders
  options         a string holding a Python list literal, e.g. "['12 cm', '<image 2>']"; "[]"
                  for open questions; options may hold placeholders too
  image_1..image_7  HF Image structs {"bytes", "path"}, null when absent
  answer          a letter (multiple-choice); for open questions the answer text, a few as a
                  list literal in a string ("['24/7', '3.429']": any of them is accepted)
  question_type   "multiple-choice" or "open"
  topic_difficulty  "Easy" / "Medium" / "Hard" (-> Item.difficulty)
  explanation, img_type, subfield  (unused)
A directory that holds no data file itself is read as such a snapshot: its
`*/validation-*.parquet` files (the dev and test splits are left out; test answers are withheld
and a row without an answer is refused).

Prompt (CoT form of MMMU's `construct_prompt`, `MMMU-Benchmark/MMMU` `mmmu/utils/data_utils.py`,
with options laid out "A. text" one a line as lmms-eval and the MMMU-Pro scripts do, and no
answer-format line): multiple-choice "{question}\\n{A. option ...}"; open "{question}".

Images: every `<image k>` placeholder of the question and the options becomes an `<image>`
marker with image_k, in the order the placeholders appear (a placeholder used twice gets its
image twice, as the MMMU-Pro inference scripts and VLMEvalKit's `split_MMMU` do); images of
the row that no placeholder names come first, one marker a line, in column order. A
placeholder whose image is null is refused.

Answer kinds, following MMMU's own evaluation (`mmmu/utils/eval_utils.py`):
  - multiple-choice: CHOICE, gold = the letter, choices = the option texts;
  - open, numeric gold (MMMU's `check_is_number`: a float once commas are removed): FLOAT with
    precision 2, since MMMU rounds both the gold and the predicted numbers to 2 decimals;
  - open, any other gold: TEXT.
  An open gold stored as a list (three validation items) is its first entry, the others
  `Item.alternatives` (any of them is accepted, as MMMU's evaluation does).
Differences from MMMU's rule-based scorer: MMMU searches the whole response for candidate
numbers/strings and counts a text gold correct when it is a substring of a candidate, and
guesses a random letter when it finds none; here the answer is the extracted (boxed) one and a
text gold must equal it after folding (case, spaces, punctuation, `\\text{}`), with math-verify
as fallback; nothing is guessed.

Metric: accuracy over the 900 validation questions (MMMU's micro average over subjects).
"""

from __future__ import annotations

import ast
import glob
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ares_jax.data import records
from ares_jax.data.records import DataError
from ares_jax.suite import items
from ares_jax.suite.items import CHOICE, FLOAT, LETTERS, TEXT, Item

LAYOUTS = (
    "MMMU/MMMU parquet (id, question with `<image k>` placeholders, options as a list string, "
    "image_1..image_7 HF Image structs, answer, question_type, topic_difficulty): a file, glob, "
    "or a snapshot directory (its `*/validation-*.parquet`)."
)

_PLACEHOLDER = re.compile(r"<image\s*(\d+)>")
_NUMBER = re.compile(r"^[-+]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?$")
MAX_IMAGES = 7
_COLUMNS = ("id", "question", "options", "answer")


def load(path: str | os.PathLike, name: str = "mmmu") -> list[Item]:
    """MMMU's items from a parquet file, a glob, or a snapshot directory (module docstring).

    Raises:
      DataError: a file in another layout, or a bad row, naming it.
    """
    root = items.root_of(path)
    out: list[Item] = []
    seen: set[str] = set()
    for where, row in items.rows(_data_files(path, "validation")):
        item = _item(row, where, root, name)
        if item.id in seen:
            raise DataError(f"{where}: id {item.id!r} appears twice in the data")
        seen.add(item.id)
        out.append(item)
    return out


def _data_files(path: str | os.PathLike, split: str) -> str | list[str]:
    """`path`, or for a directory that holds no data file itself (an HF snapshot), the
    split's parquet files one directory down."""
    path = os.fspath(path)
    if os.path.isdir(path) and not has_data_files(path):
        nested = sorted(glob.glob(os.path.join(glob.escape(path), "*", f"{split}-*.parquet")))
        if nested:
            return nested
    return path


def has_data_files(directory: str) -> bool:
    """Whether `directory` itself holds a .jsonl, .json or .parquet file."""
    return any(
        os.path.splitext(n)[1].lower() in (".jsonl", ".json", ".parquet")
        for n in os.listdir(directory)
        if not n.startswith(".")
    )


def check_layout(row: Mapping[str, Any], where: str, columns: Sequence[str], layouts: str):
    """DataError naming the row's file when it lacks any of `columns`."""
    missing = [c for c in columns if c not in row]
    if missing:
        raise DataError(
            f"{where}: not in a layout this benchmark reads (no {', '.join(missing)} column; "
            f"the row has {sorted(row)}). Accepted: {layouts}",
            reason=records.BAD_FIELD,
        )


def parse_list(value: Any, where: str, what: str) -> list[str]:
    """A list column as the HF releases store it: a list, or a string holding a Python (or
    JSON) list literal. A list whose only entry is a list (or a list literal) is that list:
    MMMU-Pro's validation_Accounting_29 stores "[['A', 'B', 'Not enough information']]", which
    read as one option leaves its gold B out of reach."""
    parsed = _literal_list(value) if isinstance(value, str) else value
    if isinstance(parsed, list | tuple):
        if len(parsed) == 1:
            inner = parsed[0]
            inner = _literal_list(inner) if isinstance(inner, str) else inner
            if isinstance(inner, list | tuple):
                parsed = inner
        return [str(v) for v in parsed]
    raise DataError(f"{where}: {what} {str(value)[:80]!r} is not a list", reason=records.BAD_FIELD)


def _literal_list(text: str) -> list | tuple | None:
    text = text.strip() or "[]"
    if not text.startswith("["):
        return None
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return parsed if isinstance(parsed, list | tuple) else None


def _present(value: Any) -> bool:
    # An absent HF image is a null struct, or a struct with neither bytes nor path.
    if value is None:
        return False
    if isinstance(value, Mapping):
        return bool(value.get("bytes")) or bool(value.get("path"))
    return True


def interleave(
    text: str, row: Mapping[str, Any], root: str, where: str
) -> tuple[str, tuple[bytes, ...]]:
    """(prompt, images): `<image k>` placeholders -> `<image>` markers with image_k, in the
    order they appear (repeats repeated); images no placeholder names first (module
    docstring)."""
    referenced = [int(m.group(1)) for m in _PLACEHOLDER.finditer(text)]
    for k in referenced:
        if not 1 <= k <= MAX_IMAGES or not _present(row.get(f"image_{k}")):
            raise DataError(
                f"{where}: the text refers to <image {k}> but image_{k} is empty",
                reason=records.MISSING_IMAGE,
            )
    unreferenced = [
        k
        for k in range(1, MAX_IMAGES + 1)
        if _present(row.get(f"image_{k}")) and k not in referenced
    ]
    decoded: dict[int, bytes] = {}
    for k in unreferenced + referenced:
        if k not in decoded:
            decoded[k] = items.image(row[f"image_{k}"], root, f"{where}, image_{k}")
    prompt = "".join(records.IMAGE_MARKER + "\n" for _ in unreferenced)
    prompt += _PLACEHOLDER.sub(records.IMAGE_MARKER, text)
    return prompt, tuple(decoded[k] for k in unreferenced + referenced)


def make_item(where: str, **fields) -> Item:
    """`Item(**fields)`, its ValueError (marker count, gold letter) as a DataError naming the
    row."""
    try:
        return Item(origin=where, **fields)
    except ValueError as e:
        # Item's message starts with the origin, `where`.
        raise DataError(str(e), reason=records.BAD_FIELD) from None


def is_number(text: str) -> bool:
    """MMMU's `check_is_number` (a float once commas are removed), limited to plain numerals
    with well-placed thousands commas (Python's float also takes "nan", "inf", "1_000", and
    "1,2,3" once its commas are gone)."""
    return bool(_NUMBER.match(text.strip()))


def _open_golds(answer: Any, where: str) -> list[str]:
    """An open question's golds: the text, or the entries of a list stored as a string."""
    if isinstance(answer, list | tuple):
        golds = [str(a) for a in answer]
    elif isinstance(answer, str) and answer.strip().startswith("["):
        try:
            parsed = ast.literal_eval(answer.strip())
        except (ValueError, SyntaxError):
            # A malformed list ("['24/7', '3.43]"): its entries by comma, quotes stripped.
            parsed = [p.strip().strip("'\"") for p in answer.strip()[1:].rstrip("]").split(",")]
        golds = [str(a) for a in parsed] if isinstance(parsed, list | tuple) else [answer]
    else:
        golds = [str(answer)]
    golds = [g.strip() for g in golds if str(g).strip()]
    if not golds:
        raise DataError(f"{where}: empty answer", reason=records.MISSING_ANSWER)
    return golds


def _item(row: Mapping[str, Any], where: str, root: str, name: str) -> Item:
    check_layout(row, where, _COLUMNS, LAYOUTS)
    answer = row.get("answer")
    if answer is None or (isinstance(answer, str) and answer.strip() in ("", "?")):
        raise DataError(
            f"{where}: no answer (the test split's answers are withheld; use validation)",
            reason=records.MISSING_ANSWER,
        )
    question = str(items.field(row, ["question"], where))
    options = parse_list(row.get("options") or "[]", where, "options")
    qtype = str(row.get("question_type") or "").strip().lower()
    letter = str(answer).strip().upper()
    # Besides the release's two types, a row with options and a letter gold is multiple-choice.
    choice = qtype == "multiple-choice" or (
        qtype != "open" and options and letter in LETTERS[: len(options)]
    )
    difficulty = str(row.get("topic_difficulty") or "")
    common = dict(benchmark=name, id=str(row["id"]), difficulty=difficulty)
    if choice:
        if not options:
            raise DataError(f"{where}: a multiple-choice question without options")
        text = question + "\n" + items.options_text(options)
        prompt, images = interleave(text, row, root, where)
        return make_item(
            where,
            question=prompt,
            images=images,
            answer=letter,
            kind=CHOICE,
            choices=tuple(options),
            **common,
        )
    gold, *others = _open_golds(answer, where)
    prompt, images = interleave(question, row, root, where)
    common.update(question=prompt, images=images, answer=gold, alternatives=tuple(others))
    if is_number(gold):
        return make_item(where, kind=FLOAT, precision=2, **common)
    return make_item(where, kind=TEXT, **common)
