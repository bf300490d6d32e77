"""LogicVista: 448 visual logical-reasoning questions, multiple choice with options in the image.

Layouts read (`LAYOUTS`):
  - the GitHub release (`Yijia-Xiao/LogicVista`, `data/dataset.json` with `data/images/`): one
    JSON object of rows keyed by id ("v1_0" ... "v1_447"), each with "imagename" ("v1_0.png", a
    file in `images/` beside the JSON file, or beside it), "question", "answer", "reasoning",
    "skill" (a list: inductive, deductive, numerical, spatial or mechanical),
    "broad_capability", "specific_capability", "imagesource", "sourcelink", "liscenced";
  - the Hugging Face copy `lscpku/LogicVista` (split "test"): parquet rows with the same
    columns plus "id", the image as an HF Image struct {"bytes", "path"} in "image" (JSONL or
    JSON-array rows of either form are read too).

Prompt: the question as released, after the image. The options are mostly drawn in the image;
where the question lists them ("... Select from A, B, C, and D. (A) 30% (B) 40% ..."), they stay
inline as the question has them (the authors' and VLMEvalKit's prompts are the bare question;
neither adds options, and the text is not rewritten here).

Answers and grading. The official scorer (`eval/extract_accuracy.py`) has GPT-4 extract the
list of option labels a response chose and counts it correct when the sorted list equals the
gold's ("A, C".split(", "), sorted): an unordered, exact set match; VLMEvalKit's
`vlmeval/dataset/utils/logicvista.py` does the same (letters sorted and joined). So:
  - one letter (443 rows): CHOICE, gold the letter. Choices: the option texts when the question
    lists "(A) ... (B) ..." labels with text after each (a response naming an option's text is
    then graded as its letter), else the labels themselves ("A", "B", ...) up to the last
    letter the question names ("A-E", "A to F", "(A, B, C, or D)", "(A) (B) (C) (D)"), A-D when
    it names none, and at least up to the gold;
  - several letters (3 rows, "A, C" and "B, D"): TEXT with gold "A, C" (letters sorted); an
    extracted answer equal to it after folding, or a set equal to it by math-verify ("C, A",
    "A and C", "{A, C}"), is correct; "AC" written without a separator is not (the official
    GPT extraction would split it);
  - a digit (1 row, "3", options labelled 1-5): INTEGER.
A row with neither question nor answer (v1_382 of the release) is skipped: there is nothing to
ask; the official scorer keeps it in its 448 and counts it wrong, so its accuracy is this one's
times 447/448. A row with a question but no answer is refused.

Metric: accuracy (the official "Total"). `Item.difficulty` is the reasoning skill (the official
per-skill breakdown).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

from ares_jax.data import records
from ares_jax.data.records import DataError
from ares_jax.suite import items
from ares_jax.suite.items import CHOICE, INTEGER, LETTERS, TEXT, Item

LAYOUTS = (
    "LogicVista: the GitHub release's data/dataset.json (rows keyed by id, with imagename, "
    "question, answer, skill; images in images/ beside it), or the Hugging Face copy "
    "lscpku/LogicVista as parquet/JSONL rows (id, question, answer, skill, image as an HF Image "
    "struct)"
)

_LABEL = re.compile(r"\(([A-Z])\)")
_RANGE = re.compile(r"\b([A-Z])\s*(?:-|–|to)\s*([A-Z])\b")
_LIST = re.compile(r"\(?\bA\b\)?(?:\s*,?\s*(?:or\s+|and\s+)?\(?\b[B-Z]\b\)?)+")
_LETTERS = re.compile(r"^[A-Z](?:\s*,\s*[A-Z])*$")


def _inline_options(question: str) -> list[str]:
    """The option texts of the question's last "(A) ... (B) ..." run of consecutive labels, or []
    when it has none or an option without text (labels alone, options in the image)."""
    labels = list(_LABEL.finditer(question))
    starts = [i for i, m in enumerate(labels) if m.group(1) == "A"]
    if not starts:
        return []
    run = [labels[starts[-1]]]  # the last "(A)": "Select from (A), (B) ... (A) text" lists twice
    for m in labels[starts[-1] + 1 :]:
        if m.group(1) == LETTERS[len(run)]:
            run.append(m)
    texts = []
    for i, m in enumerate(run):
        stop = run[i + 1].start() if i + 1 < len(run) else len(question)
        texts.append(question[m.end() : stop].strip().rstrip(",;").strip())
    return texts if len(texts) >= 2 and all(texts) else []


def _letters_named(question: str) -> int:
    """How many option letters the question names (A-E: 5), 0 when it names none."""
    count = 0
    for m in _RANGE.finditer(question):
        if m.group(1) == "A" and m.group(2) > "A":
            count = max(count, LETTERS.index(m.group(2)) + 1)
    for m in _LIST.finditer(question):
        letters = re.findall(r"\b[A-Z]\b", m.group(0))
        if letters == list(LETTERS[: len(letters)]):
            count = max(count, len(letters))
    return count


def _choices(question: str, gold: str) -> tuple[str, ...]:
    texts = _inline_options(question)
    if LETTERS.index(gold) < len(texts):
        return tuple(texts)
    count = max(_letters_named(question) or 4, LETTERS.index(gold) + 1)
    return tuple(LETTERS[:count])


def _image(row: dict, root: str, where: str) -> bytes:
    if row.get("image") is not None:
        return items.image(row["image"], root, where)
    name = str(items.field(row, ["imagename", "image_path"], where))
    for base in (os.path.join(root, "images"), root):
        if os.path.isfile(os.path.join(base, name)):
            return items.image(name, base, where)
    raise DataError(
        f"{where}: image {name!r} is in neither {os.path.join(root, 'images')} nor {root}",
        reason=records.MISSING_IMAGE,
    )


def _item(row: dict, key: str, root: str, where: str, name: str) -> Item | None:
    question = str(items.field(row, ["question"], where)).strip()
    answer = str(items.field(row, ["answer"], where)).strip()
    if not question and not answer:
        return None  # v1_382 of the release: nothing to ask (module docstring)
    if not answer:
        raise DataError(f"{where}: the question has no answer", reason=records.BAD_FIELD)
    skill = row.get("skill") or ""
    common = dict(
        benchmark=name,
        id=str(row.get("id") or key),
        question=items.with_images(question, 1),
        images=(_image(row, root, where),),
        difficulty=skill if isinstance(skill, str) else ", ".join(map(str, skill)),
        origin=where,
    )
    if answer.isdigit():
        return Item(answer=answer, kind=INTEGER, **common)
    if not _LETTERS.match(answer.upper()):
        raise DataError(
            f"{where}: answer {answer!r} is not option letters (LogicVista: 'C' or 'A, C')",
            reason=records.BAD_FIELD,
        )
    letters = sorted({s.strip() for s in answer.upper().split(",")})
    if len(letters) > 1:
        return Item(answer=", ".join(letters), kind=TEXT, **common)
    return Item(answer=letters[0], kind=CHOICE, choices=_choices(question, letters[0]), **common)


def _keyed_rows(path: str) -> Iterator[tuple[str, str, dict]] | None:
    """(where, key, row) of a JSON file holding one object of rows keyed by id (the GitHub
    release), or None when the file is in another form."""
    if not path.lower().endswith(".json"):
        return None
    with open(path, "rb") as f:
        if not f.read(4096).lstrip().startswith(b"{"):
            return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # JSONL named .json: the row reader reports its lines
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DataError(f"{path}: a JSON object that is not rows keyed by id ({LAYOUTS})")
    return ((f"{path}, entry {key!r}", str(key), row) for key, row in data.items())


def _rows(path: str | os.PathLike) -> Iterator[tuple[str, str, dict]]:
    for file in records.expand_paths(path):
        if not os.path.isfile(file):
            raise DataError(f"data file {file} does not exist")
        keyed = _keyed_rows(file)
        if keyed is not None:
            yield from keyed
            continue
        for number, (where, row) in enumerate(items.rows(file)):
            key = row.get("imagename") or f"v1_{number}"
            yield where, os.path.splitext(str(key))[0], row


def load(path: str | os.PathLike, name: str = "logicvista") -> list[Item]:
    """The items of LogicVista rows in a file, directory or glob (module docstring).

    Raises:
      DataError: a file in another layout, a bad row or a missing image, naming it; or an id
        twice.
    """
    root = items.root_of(path)
    out: list[Item] = []
    seen: dict[str, str] = {}
    for where, key, row in _rows(path):
        item = _item(row, key, root, where, name)
        if item is None:
            continue
        if item.id in seen:
            raise DataError(f"{where}: id {item.id} already at {seen[item.id]}")
        seen[item.id] = where
        out.append(item)
    if not out:
        raise DataError(f"{os.fspath(path)}: no LogicVista rows ({LAYOUTS})")
    return out
