"""Answer checking on the host: the last `\\boxed{}` answer, the format check, math-verify grading.

What the released reward function does (METHOD.md 4.1, `examples/reward_function/aepo.py`):
normalise whitespace around `<`, `>` and `/`, take the content of the last `\\boxed{...}` and grade
it against the gold answer (accuracy 1.0 / 0.0); the format check is a full-match regex, logged but
not added to the AEPO reward. The released code grades with `mathruler.grader.grade_answer`; here
the grader is string equality with all whitespace removed (mathruler's first check), then
math-verify (`math_verify.parse` + `math_verify.verify`), which also accepts numeric, symbolic,
set and equation equivalences.

Pure Python and NumPy; nothing here imports jax. The process pool of `score_responses` uses
"spawn" (the parent runs JAX threads, which make fork unsafe), so each worker re-imports the
program's main module once: it must keep its work under `if __name__ == "__main__":` (absl's
`app.run(main)` idiom does).

Timeouts: math-verify bounds each parse / comparison with `signal.alarm`, which only works in the
main thread of a process. `is_correct` turns these timeouts on (`TIMEOUT_S` seconds) when it runs
in the main thread (including in the workers of `score_responses(..., workers>0)`, whose tasks run
in each worker's main thread) and off in any other thread, where a pathological expression could
then take long: answers longer than `MAX_ANSWER_CHARS` are compared as strings only.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import multiprocessing
import re
import threading
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

# Seconds math-verify may spend on one parse or one comparison (main thread only, see above).
TIMEOUT_S = 5
# Longer boxed answers (or golds) skip math-verify and are compared as strings only.
MAX_ANSWER_CHARS = 1000

_BOXED = "\\boxed{"
_WHITESPACE_AROUND_TAGS = re.compile(r"\s*(<|>|/)\s*")
# EasyR1 / ARES `format_reward`: a think block, then anything that contains a boxed answer.
FORMAT_PATTERN = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text`, braces balanced; None if there is none.

    Like `mathruler.grader.extract_boxed_content`: the last occurrence of the literal `\\boxed{`
    is scanned to its matching `}`, so nested braces are kept (`\\boxed{\\frac{1}{2}}` ->
    `\\frac{1}{2}`). If that last box is never closed the result is None (no earlier box is used).
    `\\boxed 3` (no braces) is not recognised. The content is returned as written, unstripped.
    """
    if not isinstance(text, str):
        return None
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 1
    begin = start + len(_BOXED)
    for i in range(begin, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
    return None


def normalize_response(text: str) -> str:
    """Removes whitespace around `<`, `>` and `/` (released code: `re.sub(r"\\s*(<|>|/)\\s*",
    r"\\1", text)`, for models that write `< think >`). Applied before both checks below."""
    return _WHITESPACE_AROUND_TAGS.sub(r"\1", text)


def format_ok(text: str) -> bool:
    r"""True when the normalised response full-matches the released format regex (METHOD.md 4.1;
    EasyR1 / ARES `format_reward`):

        re.fullmatch(r"<think>.*</think>.*\\boxed\{.*\}.*", normalize_response(text), re.DOTALL)

    that is, a `<think>...</think>` block first, then any text that contains `\boxed{...}`. The
    braces of the box need not balance for this check.
    """
    if not isinstance(text, str):
        return False
    return FORMAT_PATTERN.fullmatch(normalize_response(text)) is not None


def _squeeze(s: str) -> str:
    return "".join(s.split())


def _verify(gold: str, pred: str) -> bool:
    import math_verify  # lazy: sympy and latex2sympy take about a second to import

    timeout = TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold_parsed = math_verify.parse("\\boxed{" + gold + "}", parsing_timeout=timeout)
    pred_parsed = math_verify.parse("\\boxed{" + pred + "}", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def _gold_answer(gold: str) -> str:
    # Some datasets store the gold as "\\boxed{...}" or "$...$": compare the inside.
    boxed = extract_boxed(gold)
    if boxed is not None:
        return boxed
    stripped = gold.strip()
    if len(stripped) > 1 and stripped[0] == "$" and stripped[-1] == "$":
        return stripped.strip("$")
    return gold


def is_correct(response: str, gold: str) -> bool:
    """Whether the last boxed answer of the (normalised) response equals `gold`.

    A gold written as `\\boxed{...}` or `$...$` is unwrapped first. The two answers match when
    they are equal with all whitespace removed (as mathruler's string check); otherwise both are
    wrapped as `\\boxed{...}`, parsed by `math_verify.parse` and compared by
    `math_verify.verify(gold, pred)` (numeric, symbolic, set and equation-aware: "0.5" equals
    "\\frac{1}{2}", "2.0" equals "2", "x=3" equals "3", "10\\%" equals "0.1"). Never raises: an
    error, a timeout, a missing box, an empty answer or a non-string argument gives False. Safe
    to call from any thread (see the module docstring for timeouts).
    """
    try:
        if not isinstance(response, str) or not isinstance(gold, str):
            return False
        pred = extract_boxed(normalize_response(response))
        if pred is None:
            return False
        gold = _gold_answer(gold)
        pred_s, gold_s = _squeeze(pred), _squeeze(gold)
        if not pred_s or not gold_s:
            return False
        if pred_s == gold_s:
            return True
        if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
            return False
        return _verify(gold, pred)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # a grader must not stop training; math-verify timeouts are BaseException
        log.debug("is_correct failed on gold %r", gold[:100], exc_info=True)
        return False


class AnswerScores(NamedTuple):
    """The checks of N responses.

    Attributes:
      correct: [N] bool; the last boxed answer matches the gold answer (accuracy reward).
      format_ok: [N] bool; the think/boxed format regex full-matches (logged, not rewarded).
      extracted: N strings or None; the last boxed answer of each normalised response.
    """

    correct: np.ndarray
    format_ok: np.ndarray
    extracted: list[str | None]


def _score_one(args: tuple[str, str]) -> tuple[bool, bool, str | None]:
    response, gold = args
    text = normalize_response(response) if isinstance(response, str) else None
    extracted = extract_boxed(text) if text is not None else None
    return is_correct(response, gold), format_ok(response), extracted


_POOLS: dict[int, concurrent.futures.ProcessPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    # One persistent pool per size: starting workers (spawn, then importing sympy) costs about a
    # second each, paid once per process. "spawn" because the parent usually runs JAX, whose
    # threads make fork unsafe.
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = concurrent.futures.ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn")
            )
        return _POOLS[workers]


@atexit.register
def _shutdown_pools() -> None:
    for pool in _POOLS.values():
        pool.shutdown(wait=True, cancel_futures=True)
    _POOLS.clear()


def score_responses(
    responses: Sequence[str], golds: Sequence[str], *, workers: int = 0
) -> AnswerScores:
    """Grades N responses against their gold answers (METHOD.md 4.1).

    Args:
      responses: N decoded responses (flat, group by group).
      golds: N gold answers (repeat each prompt's answer G times).
      workers: 0 grades in this thread; > 0 spreads the work over a persistent process pool of
        that many workers, spawned on first use (a couple of seconds each) and reused. Grading is
        CPU-bound sympy work (about 7 ms a response on the CPU this was written on) with no
        per-item overhead in the pool, so it pays from a few hundred responses when free cores
        exist; it cannot help on a machine whose cores are already busy.

    Returns:
      AnswerScores with correct [N] bool, format_ok [N] bool and the extracted answers.
    """
    if len(responses) != len(golds):
        raise ValueError(f"score_responses: {len(responses)} responses but {len(golds)} golds.")
    items = list(zip(responses, golds, strict=True))
    if workers > 0 and len(items) > 1:
        chunksize = max(1, len(items) // (4 * workers))
        results = list(_pool(workers).map(_score_one, items, chunksize=chunksize))
    else:
        results = [_score_one(item) for item in items]
    correct = np.array([r[0] for r in results], dtype=bool)
    formatted = np.array([r[1] for r in results], dtype=bool)
    return AnswerScores(correct=correct, format_ok=formatted, extracted=[r[2] for r in results])
