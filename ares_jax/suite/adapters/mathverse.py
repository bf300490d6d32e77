"""MathVerse testmini (Zhang et al., 2024), vision-only version: the paper's "MathVerse-V",
788 problems whose whole question (text, values, options) is drawn in the diagram.

Layout read: Hugging Face `AI4Math/MathVerse`, config "testmini": testmini.parquet (the image
column an HF Image struct {"bytes", "path"}) or testmini.json (a JSON array; images as relative
paths such as "images_version_6/image_685.png" under the file's directory, or its parent); the
authors' GitHub `ZrrSkywalker/MathVerse` data/testmini.json has the same rows. Columns:
sample_index, problem_index, problem_version ("Text Dominant", "Text Lite", "Vision
Intensive", "Vision Dominant", "Vision Only"; "Text Only" in testmini_text_only), question,
image, answer, question_type ("multi-choice" / "free-form"), metadata (split, source,
subject, subfield), query_wo, query_cot, question_for_eval (the problem's full text with its
options, which the authors' GPT judge is shown; absent from older copies).

Versions: `load(path, name)` keeps the "Vision Only" rows (the paper's MathVerse-V). Other
versions: `load(path, name, versions=("Text Lite",))`, or versions="all" (every row); names
are matched ignoring case, "_" and "-" ("vision_dominant" works). From the command line only
the default is reachable; a file holding only other versions is refused with the versions it
has.

Prompt (chain-of-thought): a vision-only row has an empty question, and its `query_cot`
reads "According to the question shown in the image, please first conduct reasoning, and then
answer the question and provide the correct option letter, e.g., A, B, C, D, at the end." The
prompt is that sentence without its answer-format clause: "According to the question shown in
the image, please first conduct reasoning, and then answer the question." (ARES's think/boxed
instruction is appended by the evaluation). Other versions: the row's question, its options
laid out one a line as "A. <text>" under "Choices:" when a multiple-choice question lists
them. The image marker goes first.

Multiple choice: gold = the letter (the data's answer; "(C)" is read as C). In the vision-only
version the options exist only in the image, so `choices` (what a response may name besides
the letter) are the option texts parsed from the row's question_for_eval, else from another
version of the same problem_index in the file (the text versions list them: "Choices:\\nA:40°
\\nB:60°..."), else the letters themselves ("A".."E", or up to the gold letter): then only a
letter is graded, and a response such as "B: 60°" is not (grading rejects a letter whose
trailing text differs from its option). The authors' judge also accepts the option's text. Two
problems expect two letters ("C\\nD"): graded as TEXT "C, D"; an answer given as an option's
text ("False", "090^\\circ T") becomes that option's letter.
Free form: INTEGER when the answer is an integer, else EXPRESSION (string match, then
math-verify); a leading word label before "=" in the gold ("Area $=113.1 \\mathrm{~cm}^{2}$",
"Weekly water intake $=15.5$ Litres") is dropped, and then plain words after the value, so
math-verify compares the value ("113.1 \\mathrm{~cm}^{2}", "15.5"). The authors grade with a
GPT-4 extractor and judge (`evaluation/extract_answer_s1.py`, `score_answer_s2.py`), which
this rule-based grading approximates: answers such as "domain: [-4, 0) and range: (-3, 1]"
depend on math-verify.
Metric: accuracy (`metrics.accuracy`). `Item.difficulty` = metadata.subject (Plane Geometry,
Solid Geometry, Functions), or the problem_version when several versions are loaded.

Also home to `split_options`, the option parser DynaMath's adapter shares.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ares_jax.data import records
from ares_jax.data.records import DataError
from ares_jax.suite import items
from ares_jax.suite.adapters.mathvista import keyed_rows, need, option_index, row_image, unique
from ares_jax.suite.items import CHOICE, EXPRESSION, INTEGER, LETTERS, TEXT, Item

LAYOUTS = (
    "MathVerse testmini: the Hugging Face AI4Math/MathVerse testmini.parquet or testmini.json "
    "(sample_index, problem_index, problem_version, question, image, answer, question_type, "
    "metadata, query_cot, question_for_eval; images as HF Image structs or relative paths)"
)

VISION_ONLY = "Vision Only"
VISION_ONLY_PROMPT = (
    "According to the question shown in the image, please first conduct reasoning, and then "
    "answer the question."
)

_INTEGER = re.compile(r"[-+]?\d+")
_ONE_LETTER = re.compile(r"\(?\s*([A-Z])\s*\)?\.?")
_LETTERS = re.compile(r"(?:\(?[A-Z]\)?(?:\s*(?:,|;|and|\n)\s*|\s+|$)){2,}")
_LABEL = re.compile(r"^[A-Za-z][A-Za-z .]+?\s*(\$?)\s*=\s*")  # "Area $=", "slope ="
_TRAILING_WORDS = re.compile(r"\s+(?:[A-Za-z]+\s*)+$")  # " cubic units", " Litres"


def load(
    path: str | os.PathLike,
    name: str,
    *,
    versions: str | Sequence[str] = (VISION_ONLY,),
) -> list[Item]:
    """MathVerse items of the selected problem versions (default: vision-only) from a file,
    directory or glob in `LAYOUTS` (module docstring).

    Args:
      versions: problem_version names to keep, or "all".

    Raises:
      DataError: a file in another layout, a bad row, or no row of the selected versions
        (naming the versions the data has).
    """
    wanted = None if versions == "all" else {_version_key(v) for v in _as_list(versions)}
    selected = []  # (file, where, row) of the kept versions
    options: dict[str, list[str]] = {}  # problem_index -> options some version lists
    seen_versions: set[str] = set()
    for file, where, _, row in keyed_rows(path):
        version = str(need(row, "problem_version", where, LAYOUTS)).strip()
        seen_versions.add(version)
        problem = str(need(row, "problem_index", where, LAYOUTS)).strip()
        if problem not in options:
            for text in (row.get("question"), row.get("question_for_eval")):
                parsed = split_options(str(text or ""))
                if parsed:
                    options[problem] = parsed[1]
                    break
        if wanted is None or _version_key(version) in wanted:
            selected.append((file, where, row))
    if not selected:
        raise DataError(
            f"no MathVerse rows of version(s) {_as_list(versions)} in {os.fspath(path)} "
            f"(it has {sorted(seen_versions) or 'no rows'}); expected {LAYOUTS}",
            reason=records.BAD_FIELD,
        )
    several = len({_version_key(str(r["problem_version"])) for _, _, r in selected}) > 1
    return unique(
        [_item(row, file, where, name, options, several) for file, where, row in selected]
    )


def _as_list(versions: str | Sequence[str]) -> list[str]:
    return [versions] if isinstance(versions, str) else list(versions)


def _version_key(version: str) -> str:
    return re.sub(r"[\s_-]+", " ", version).strip().lower()


def _item(
    row: Mapping[str, Any],
    file: str,
    where: str,
    name: str,
    options: Mapping[str, Sequence[str]],
    several_versions: bool,
) -> Item:
    sample = str(need(row, "sample_index", where, LAYOUTS)).strip()
    qtype = str(need(row, "question_type", where, LAYOUTS)).strip()
    answer = str(need(row, "answer", where, LAYOUTS)).strip()
    if not answer:
        raise DataError(f"{where}: empty answer", reason=records.MISSING_ANSWER)
    question = str(row.get("question") or "").strip()
    images = row_image(row, ("image", "decoded_image"), file, where)

    own = split_options(question) if question and qtype == "multi-choice" else None
    if not question:
        text = VISION_ONLY_PROMPT
    elif own:
        text = (own[0] + "\n" if own[0] else "") + "Choices:\n" + items.options_text(own[1])
    else:
        text = question
    choices: tuple[str, ...] = ()
    if qtype == "multi-choice":
        found = own[1] if own else None
        if found is None:
            parsed = split_options(str(row.get("question_for_eval") or ""))
            found = parsed[1] if parsed else options.get(str(row["problem_index"]).strip())
        kind, answer, choices = _choice(answer, found)
    elif qtype == "free-form":
        kind = INTEGER if _INTEGER.fullmatch(answer) else EXPRESSION
        if kind == EXPRESSION:
            answer = _value(answer)
    else:
        raise DataError(
            f"{where}: question_type {qtype!r} is neither multi-choice nor free-form",
            reason=records.BAD_FIELD,
        )
    metadata = row.get("metadata") if isinstance(row.get("metadata"), Mapping) else {}
    difficulty = str(row["problem_version"]) if several_versions else metadata.get("subject")
    return Item(
        benchmark=name,
        id=sample,
        question=items.with_images(text, len(images)),
        answer=answer,
        kind=kind,
        images=images,
        choices=choices,
        difficulty=str(difficulty or "").strip(),
        origin=where,
    )


def _value(answer: str) -> str:
    """A free-form gold without a leading word label ("Area $=113.1 \\mathrm{~cm}^{2}$" ->
    "113.1 \\mathrm{~cm}^{2}"), and then without trailing plain words ("15.5 Litres"), which
    math-verify would read as products of symbols."""
    m = _LABEL.match(answer)
    if not m:
        return answer
    value = answer[m.end() :]
    if m.group(1):  # the label opened a "$...$": drop its dollars
        value = value.replace("$", "")
    value = _TRAILING_WORDS.sub("", value).strip()
    return value or answer


def _choice(answer: str, options: Sequence[str] | None) -> tuple[str, str, tuple[str, ...]]:
    """(kind, gold, choices) of a multi-choice row (module docstring)."""
    m = _ONE_LETTER.fullmatch(answer)
    if m:
        index = LETTERS.index(m.group(1))
        if options is None or index >= len(options):
            # The options are only in the image (or were not parsed): the letters stand for them.
            options = list(LETTERS[: max(5, index + 1)])
        return CHOICE, m.group(1), tuple(options)
    if options and (index := option_index(answer, options)) is not None:
        return CHOICE, LETTERS[index], tuple(options)
    if _LETTERS.fullmatch(answer + " "):
        return TEXT, ", ".join(re.findall(r"[A-Z]", answer)), ()
    return TEXT, answer, ()


# Option lists as the benchmarks write them: a "Choices:" / "Choice:" / "Options:" header, then
# options as "A:40°" / "A. Ten" / "(A) yes" / "A) x", one a line or inline.
_HEADER = re.compile(r"(?i)(?:^|(?<=[\s.?:)]))(?:choices?|options?)\s*[:：]")
_AT_LINE_START = re.compile(r"(?m)^[ \t]*\(?([A-H])\s*(?:[.:：)]|\)\s*)[ \t]*")
_PARENTHESISED = re.compile(r"\(([A-H])\)\s*")
_INLINE = re.compile(r"(?:^|(?<=\s))\(?([A-H])(?:[.:：]|\))\s+")


def split_options(text: str) -> tuple[str, list[str]] | None:
    """(stem, option texts) of a question that lists its options (A, B, ... in order, at least
    two), or None. The options are looked for after the last "Choices:"-like header, else at
    line starts ("A. x"), else as "(A) x" anywhere; an empty option (a drawing: "(A) (B)")
    reads as its letter."""
    headers = list(_HEADER.finditer(text))
    if headers:
        body = text[headers[-1].end() :]
        for pattern in (_AT_LINE_START, _PARENTHESISED, _INLINE):
            found = _options(body, pattern)
            if found and not found[0].strip():
                return text[: headers[-1].start()].rstrip(), found[1]
    for pattern in (_AT_LINE_START, _PARENTHESISED):
        found = _options(text, pattern)
        if found:
            return found[0].rstrip(), found[1]
    return None


def _options(text: str, pattern: re.Pattern) -> tuple[str, list[str]] | None:
    """(text before, options) of the last run of markers A, B, C, ... `pattern` finds."""
    marks = list(pattern.finditer(text))
    best = None
    for i, first in enumerate(marks):
        if first.group(1) != "A":
            continue
        run = [first]
        for m in marks[i + 1 :]:
            if m.group(1) == chr(ord(run[-1].group(1)) + 1) and m.start() >= run[-1].end():
                run.append(m)
        if len(run) >= 2:
            best = run
    if best is None:
        return None
    ends = [m.start() for m in best[1:]] + [len(text)]
    found = [text[m.end() : end].strip() or m.group(1) for m, end in zip(best, ends, strict=True)]
    return text[: best[0].start()], found
