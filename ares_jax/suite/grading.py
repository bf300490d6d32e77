r"""Answer extraction and grading for the evaluation suite, by answer kind (`items.KINDS`).

Extraction, as ARES answers (the think/boxed instruction of training), with a fallback for a
response without a box, in this order; `Verdict.how` records which step found the answer:
  1. "boxed": the last `\boxed{...}` after the last `</think>` (whitespace next to `<`, `>`, `/`
     normalised as in training, `answers.normalize_response`);
  2. "boxed_in_reasoning": no box after `</think>` (or no `</think>`): the last box anywhere;
  3. "answer_phrase": the last "answer is X" / "answer: X" (case-insensitive) after the
     reasoning, up to the end of its line, a trailing period and `$` removed;
  4. "last_line" (choice items only): the last non-empty line, when it is a lone option letter
     such as `B`, `(B)` or `B.`;
  5. "none": nothing found; graded wrong.

Comparison, by the item's kind:
  - choice: the answer is an option letter (`B`, `(B)`, `B.`, `B: text`) or an option's text
    (case, space and `\text{}` folded; a numeric answer equal to exactly one numeric option also
    counts); correct when it names the gold letter;
  - integer: the numbers parsed after stripping `\text{}`, `$`, `\%`/`%`, thousands commas,
    degree signs and the item's unit are equal (2.0 is 2); an answer that does not parse is
    compared with math-verify;
  - float: within the item's absolute tolerance when it has one, else both rounded to its
    precision (decimals) and equal, else equal within 1e-6 relative; an answer that does not
    parse goes to math-verify;
  - expression: `answers.is_correct` (whitespace-free string match, then math-verify with its
    deadline);
  - text: equal after folding case, spaces, `\text{}` and surrounding punctuation, else
    math-verify.
An item's `alternatives` are accepted golds, compared the same way. Every verdict keeps the
extracted answer and how it was found, so a user can audit the grading (`run.py` writes them
per response).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

from ares_jax.rewards import answers
from ares_jax.suite.items import CHOICE, EXPRESSION, FLOAT, INTEGER, LETTERS, TEXT, Item

# Verdict.how, in the order extraction tries them.
HOW = ("boxed", "boxed_in_reasoning", "answer_phrase", "last_line", "none")

_END_THINK = "</think>"
_PHRASE = re.compile(r"answer\s*(?:is|:)\s*:?\s*([^\n]+)", re.IGNORECASE)
_LETTER = re.compile(r"^\(?\s*([A-Za-z])\s*\)?(?:\s*[.:)]\s*(.*))?$", re.DOTALL)
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_NUMBER = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?$")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


class Verdict(NamedTuple):
    extracted: str | None  # the answer taken from the response
    how: str  # boxed | boxed_in_reasoning | answer_phrase | last_line | none
    correct: bool
    normalised: str | None = None  # a choice item's letter, a number's value; else None


def extract_answer(response: str, *, choice: bool = False) -> tuple[str | None, str]:
    """(answer, how) of a response (module docstring, steps 1-5)."""
    if not isinstance(response, str):
        return None, "none"
    text = answers.normalize_response(response)
    cut = text.rfind(_END_THINK)
    after = text[cut + len(_END_THINK) :] if cut >= 0 else text
    boxed = answers.extract_boxed(after)
    if boxed is not None and boxed.strip():
        return boxed.strip(), "boxed"
    boxed = answers.extract_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip(), "boxed_in_reasoning"
    phrases = _PHRASE.findall(after)
    if phrases:
        found = phrases[-1].strip().rstrip(".").strip().strip("$").strip()
        if found:
            return found, "answer_phrase"
    if choice:
        lines = [line.strip() for line in after.splitlines() if line.strip()]
        if lines and (m := _LETTER.match(lines[-1].strip("*"))) and not m.group(2):
            return m.group(1).upper(), "last_line"
    return None, "none"


def _fold(text: str) -> str:
    text = _TEXT_WRAP.sub(r"\1", text)
    text = text.replace("$", "").replace("\\%", "%")
    text = re.sub(r"\s+", " ", text).strip().strip(".,;:!").strip()
    return text.lower()


def _number(text: str, unit: str = "") -> float | None:
    """The number an answer states, or None: `\\text{}` unwrapped, `$`, `%`, degrees, thousands
    commas and `unit` removed."""
    s = _TEXT_WRAP.sub(r"\1", text)
    for junk in ("$", "\\%", "%", "^\\circ", "^{\\circ}", "°", "\\,", "\\!", "~"):
        s = s.replace(junk, "")
    s = s.strip()
    if unit:
        s = re.sub(re.escape(unit.strip()) + r"\s*$", "", s).strip()
    s = _THOUSANDS.sub("", s).replace(" ", "")
    if s.endswith("."):
        s = s[:-1]
    if not _NUMBER.match(s):
        return None
    value = float(s)
    return value if math.isfinite(value) else None


def _choice_letter(pred: str, item: Item) -> str | None:
    """The option letter an answer names (a letter, or an option's text), or None."""
    letters = LETTERS[: len(item.choices)]
    plain = _TEXT_WRAP.sub(r"\1", pred).replace("$", "").strip()
    m = _LETTER.match(plain)
    if m and m.group(1).upper() in letters:
        rest = m.group(2)
        letter = m.group(1).upper()
        option = item.choices[letters.index(letter)]
        # Options drawn in the image (each "option" is its own letter): any text may follow.
        drawn = all(_fold(c) == _fold(x) for c, x in zip(item.choices, letters, strict=True))
        if not rest or drawn or _fold(rest) == _fold(option):
            return letter
    folded = _fold(plain)
    by_text = [letters[i] for i, c in enumerate(item.choices) if _fold(c) == folded]
    if len(by_text) == 1:
        return by_text[0]
    value = _number(plain)
    if value is not None:
        by_value = [
            letters[i]
            for i, c in enumerate(item.choices)
            if (v := _number(c, item.unit)) is not None and math.isclose(v, value, rel_tol=1e-9)
        ]
        if len(by_value) == 1:
            return by_value[0]
    return None


def _math_verify(pred: str, gold: str) -> bool:
    return answers.is_correct("\\boxed{" + pred + "}", gold)


def compare(pred: str, item: Item) -> tuple[bool, str | None]:
    """(correct, normalised) of an extracted answer against the item's gold, by its kind; an
    item's `alternatives` are accepted golds too."""
    correct, normalised = _compare(pred, item, item.answer)
    for gold in item.alternatives:
        if correct:
            break
        correct = _compare(pred, item, gold)[0]
    return correct, normalised


def _compare(pred: str, item: Item, gold_text: str) -> tuple[bool, str | None]:
    if item.kind == CHOICE:
        letter = _choice_letter(pred, item)
        return letter == gold_text, letter
    if item.kind in (INTEGER, FLOAT):
        value, gold = _number(pred, item.unit), _number(gold_text, item.unit)
        if value is None or gold is None:
            return _math_verify(pred, gold_text), None
        if item.kind == INTEGER:
            ok = value == round(value) and round(value) == round(gold)
        elif item.tolerance is not None:
            ok = abs(value - gold) <= item.tolerance * (1 + 1e-9)
        elif item.precision is not None:
            ok = round(value, item.precision) == round(gold, item.precision)
        else:
            ok = math.isclose(value, gold, rel_tol=1e-6, abs_tol=1e-12)
        return ok, repr(value)
    if item.kind == TEXT:
        if _fold(pred) == _fold(gold_text):
            return True, _fold(pred)
        return _math_verify(pred, gold_text), _fold(pred)
    assert item.kind == EXPRESSION, item.kind
    return _math_verify(pred, gold_text), None


def grade(item: Item, response: str) -> Verdict:
    """Extracts the response's answer and compares it with the item's gold (module docstring)."""
    pred, how = extract_answer(response, choice=item.kind == CHOICE)
    if pred is None:
        return Verdict(None, how, False)
    correct, normalised = compare(pred, item)
    return Verdict(pred, how, bool(correct), normalised)
