r"""OlympiadBench ("olympiadbench"): the English, text-only, open-ended maths competition set
`OE_TO_maths_en_COMP` (674 problems in the hub's release), the
set the text-reasoning tables of R1-style papers report as "OlympiadBench", and the one the
paper's text table (Table 4) is taken to use.

Layouts read, same fields in both:
  - Hugging Face `Hothan/OlympiadBench`, config `OE_TO_maths_en_COMP` (parquet); columns `id`,
    `question`, `solution` (list), `final_answer` (list of strings, LaTeX in `$...$`),
    `context`, `image_1`..`image_5` (HF Image structs, null in the text-only configs),
    `modality`, `difficulty`, `is_multiple_answer`, `unit`, `answer_type`, `error`,
    `question_type`, `subfield`, `subject`, `language`;
  - the authors' JSON (OpenBMB/OlympiadBench release, `data/OE_TO_maths_en_COMP.json`, a JSON
    array; a JSONL copy with the same fields reads the same): `id`, `subfield`, `context`,
    `question`, `solution`, `final_answer`, `is_multiple_answer`, `unit`, `answer_type`,
    `error`, with images as `<img_N>` markers into an `images/` folder.
Only that set is read: a file named after another config (OE_MM_*, *_physics_*, *_zh_*,
TP_*), a row with an image (an `image_N` value or an `<image_N>`/`<img_N>` marker in its
question), a row whose `language`/`subject` is not English/Math, and a theorem-proving row (no
final answer) are DataErrors naming the file, the row and OE_TO_maths_en_COMP: the paper's
OlympiadBench is text only, and the multimodal configs are a different benchmark.

Prompt: the authors' English open-ended prompt (OpenBMB/OlympiadBench
`inference/code/evaluators/evaluator.py`, `make_prompt` and `get_answer_type_text`) without its
answer-format sentences (LaTeX notation, 'So the final answer is \boxed{answer}', the unit
kept out of the box), since the suite's evaluation appends ARES's own think/boxed instruction:
  "The following is an open-ended problem from an International Math competition.
  {answer-type sentence}Please calculate the answer according to the given requirements and the
  information provided.\n{context\n}{question}"
where the answer-type sentence is the authors' ("The answer of The problem should be a
numerical value. ", "The problem has multiple answers, each of them should be an expression. ",
..., none for Tuple answers). A `context` (null throughout the maths set; the authors' code
uses it for physics only) is kept before the question so that nothing is lost.

Answers, by `answer_type` (the authors' judge, `inference/code/math_judger.py`, compares
`final_answer[0]` with an absolute tolerance `error`, default 1e-8):
  - gold = the `final_answer` strings joined with ", ", surrounding `$` removed;
  - a single Numerical answer that is a plain number: INTEGER when integral, else FLOAT; with
    a tolerance `error` e it is FLOAT with `Item.tolerance` e (|a - b| <= e, the authors'
    rule);
  - everything else (a Numerical gold in LaTeX such as `\frac{\sqrt 3}{2}`, Expression,
    Equation, Interval, Tuple, and every multiple-answer problem) is EXPRESSION, compared by
    math-verify; a comma-separated multiple answer is compared as a set, so order does not
    matter, as in the authors' judge, which pairs the answers in any order. The tolerance of
    such rows, and a tolerance that is not a single positive number, is not applied
    (math-verify's own numeric comparison is used);
  - `unit` is the item's unit, stripped from a numeric response; it is stored as grading sees
    a response's unit (`$`, `\mathrm{}`/`\text{}` and `~` removed: "$\mathrm{~cm}$" -> "cm").
`difficulty` is the `subfield` (Algebra, Combinatorics, Geometry, Number Theory). Metric:
accuracy.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence

from ares_jax.data.records import BAD_FIELD, MISSING_ANSWER, DataError
from ares_jax.suite import items
from ares_jax.suite.items import EXPRESSION, FLOAT, INTEGER, Item

PAPER_CONFIG = "OE_TO_maths_en_COMP"

LAYOUTS = (
    f"OlympiadBench's English text-only maths set {PAPER_CONFIG}: the Hugging Face parquet "
    "(Hothan/OlympiadBench, columns id, question, final_answer, is_multiple_answer, unit, "
    f"answer_type, error, ...) or the authors' JSON/JSONL ({PAPER_CONFIG}.json) with the same "
    "fields."
)

_CONFIG = re.compile(r"(?:OE|TP)_(?:MM|TO)_(?:maths|physics)_(?:en|zh)_(?:COMP|CEE)")
_IMAGE_MARKER = re.compile(r"<(?:image_\d+|img_\d+)>")
_IMAGE_COLUMN = re.compile(r"^image_\d+$")
_INTEGER = re.compile(r"^[-+]?\d+$")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_DECIMAL = re.compile(r"^[-+]?(?:\d+\.\d*|\.\d+)(?:[eE][-+]?\d+)?$")

_TYPE_TEXT = {
    "Numerical": "a numerical value",
    "Expression": "an expression",
    "Equation": "an equation",
    "Interval": "an interval",
}
_PREAMBLE = "The following is an open-ended problem from an International Math competition. "
_REQUEST = (
    "Please calculate the answer according to the given requirements and the information provided."
)


def _field(row, names, where, *, required=True):
    try:
        return items.field(row, names, where, required=required)
    except DataError as e:
        raise DataError(f"{e}; olympiadbench reads {LAYOUTS}", reason=e.reason) from None


def _wrong_set(where: str, what: str) -> DataError:
    return DataError(
        f"{where}: {what}; the paper's OlympiadBench is the English text-only maths set "
        f"{PAPER_CONFIG} (Hothan/OlympiadBench config {PAPER_CONFIG}, or the authors' "
        f"{PAPER_CONFIG}.json)",
        reason=BAD_FIELD,
    )


def _type_text(answer_type: str) -> str | None:
    for key, text in _TYPE_TEXT.items():
        if key in answer_type:
            return text
    return None


def answer_type_sentence(answer_type: str | None, multiple: bool) -> str:
    """The authors' sentence naming the answer type (`get_answer_type_text`, English)."""
    answer_type = answer_type or ""
    # The authors leave Tuple out: "tuple" means a point, a sequence of values, ... by context.
    if not answer_type or "Tuple" in answer_type or "Need_human_evaluate" in answer_type:
        return ""
    if not multiple:
        text = _type_text(answer_type)
        return f"The answer of The problem should be {text}. " if text else ""
    texts = [_type_text(t) for t in answer_type.split(",")]
    if any(t is None for t in texts):
        return ""
    if len(set(texts)) == 1:
        return f"The problem has multiple answers, each of them should be {texts[0]}. "
    return f"The problem has multiple answers, with the answers in order being {', '.join(texts)}. "


def _unwrap(text: str) -> str:
    """A final answer without the `$...$` around it."""
    text = text.strip()
    if len(text) >= 2 and text.startswith("$") and text.endswith("$") and "$" not in text[1:-1]:
        text = text[1:-1].strip()
    elif text.startswith("$$") and text.endswith("$$") and "$" not in text[2:-2]:
        text = text[2:-2].strip()
    return text


def _unit(value) -> str:
    """A unit as grading strips it from a response: `$`, `\\mathrm{}`/`\\text{}` and LaTeX
    spaces removed (grading unwraps those in the response before it strips the unit)."""
    if not value:
        return ""
    text = _TEXT_WRAP.sub(r"\1", _unwrap(str(value)))
    for space in ("~", "\\,", "\\;", "\\ "):
        text = text.replace(space, " ")
    return " ".join(text.split())


def _tolerance(error) -> float | None:
    """A single absolute tolerance (module docstring); None when there is none, several
    (comma-separated, one per answer of a multiple answer) or one that is not a positive
    number."""
    try:
        tolerance = float(str(error).strip())
    except ValueError:
        return None
    if not math.isfinite(tolerance) or tolerance <= 0:
        return None
    return tolerance


def _check_row(row: dict, where: str) -> None:
    """DataError for a row outside the text-only English maths set (module docstring)."""
    images = [k for k, v in row.items() if _IMAGE_COLUMN.match(k) and v is not None]
    question = str(row.get("question") or "")
    if images or _IMAGE_MARKER.search(question) or row.get("images"):
        found = ", ".join(images) if images else "image markers in its question"
        raise _wrong_set(where, f"the problem has images ({found}), a multimodal problem")
    language = row.get("language")
    if language and not str(language).strip().lower().startswith("en"):
        raise _wrong_set(where, f"language {language!r}")
    subject = row.get("subject")
    if subject and str(subject).strip().lower() not in ("math", "maths", "mathematics"):
        raise _wrong_set(where, f"subject {subject!r}")
    question_type = str(row.get("question_type") or "")
    if "proof" in question_type.lower() or "theorem" in question_type.lower():
        raise _wrong_set(where, f"a theorem-proving problem ({question_type!r})")


def load(path: str | os.PathLike | Sequence[str | os.PathLike], name: str) -> list[Item]:
    """The OE_TO_maths_en_COMP problems in `path` (module docstring)."""
    out = []
    seen: dict[str, str] = {}
    checked: set[str] = set()
    for where, row in items.rows(path):
        file = where.rsplit(", ", 1)[0]
        if file not in checked:
            checked.add(file)
            # The innermost config name in the path names the file's set.
            configs = _CONFIG.findall(file)
            if configs and configs[-1] != PAPER_CONFIG:
                raise _wrong_set(file, f"a file of the config {configs[-1]}")
        question = _field(row, ("question",), where)
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: empty question", reason=BAD_FIELD)
        _check_row(row, where)
        finals = _field(row, ("final_answer",), where, required=False)
        if isinstance(finals, str):
            finals = [finals]
        finals = [_unwrap(str(a)) for a in finals or () if a is not None and str(a).strip()]
        if not finals:
            raise _wrong_set(where, "no final_answer (a theorem-proving problem?)")
        gold = ", ".join(finals)
        multiple = bool(row.get("is_multiple_answer")) or len(finals) > 1
        answer_type = str(row.get("answer_type") or "")
        tolerance = _tolerance(row.get("error"))
        # The authors cut a type at its "-" (`get_single_answer_type_text`).
        single_number = not multiple and answer_type.split("-")[0].strip() == "Numerical"
        if single_number and _INTEGER.match(gold) and tolerance is None:
            kind = INTEGER
        elif single_number and (_INTEGER.match(gold) or _DECIMAL.match(gold)):
            kind = FLOAT
        else:
            kind, tolerance = EXPRESSION, None
        context = row.get("context")
        body = question.strip()
        if isinstance(context, str) and context.strip():
            body = context.strip() + "\n" + body
        prompt = _PREAMBLE + answer_type_sentence(answer_type, multiple) + _REQUEST + "\n" + body
        raw_id = _field(row, ("id",), where, required=False)
        item_id = str(raw_id) if raw_id is not None else where.rsplit(" ", 1)[-1]
        if item_id in seen:
            raise DataError(
                f"{where}: id {item_id!r} repeats (first at {seen[item_id]})", reason=BAD_FIELD
            )
        seen[item_id] = where
        unit = _unit(row.get("unit"))
        out.append(
            Item(
                benchmark=name,
                id=item_id,
                question=prompt,
                answer=gold,
                kind=kind,
                tolerance=tolerance if kind == FLOAT else None,
                unit=unit,
                difficulty=str(row.get("subfield") or ""),
                origin=where,
            )
        )
    if not out:
        raise DataError(f"{path}: no rows; olympiadbench reads {LAYOUTS}", reason=MISSING_ANSWER)
    return out
