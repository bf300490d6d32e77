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

Model output can be degenerate (a megabyte of spaces, thousands of unclosed braces), so every text
step (normalisation, the format check, box extraction, whitespace squeezing) is linear in the
length of the response, and a response is normalised once.

Timeouts: grading one response (its text checks and math-verify together) has one deadline,
`GRADE_TIMEOUT_S` seconds after it starts. A response that misses it is graded incorrect (its
format check and extracted answer are kept when they were done); `score_responses` logs one
warning with the number of such responses. math-verify's own timeouts (a `signal.alarm` per parse
or comparison, main thread only) are off: their `alarm(0)` would cancel the deadline. It holds
- in the main thread of a process (the training and evaluation loops, and every task of the
  `score_responses` pool): a SIGALRM timer (`signal.setitimer`) around the whole grading raises
  `_GradeTimeout` in the Python code running at the deadline, and again every `_ALARM_REPEAT_S`
  until grading has unwound, so a library that swallows one cannot hold on. A caller's SIGALRM
  handler and timer are restored afterwards (a caller's timer due sooner bounds the grading
  instead). A signal waits for a running C call to return; sympy works in Python between short C
  calls (`10^{10^{10}}` and 90 nested `\\frac`, which run for minutes, stop on time).
- in any other thread, where Python cannot take signals: the text checks run in the thread (they
  are linear) and math-verify in a spawn process pool, in that worker's main thread under the
  timer above, to the same deadline. The thread waits until the deadline plus `_KILL_GRACE_S`
  at most, then kills and replaces the pool (its worker is stuck in C code).
- in `score_responses(..., workers > 0)`, whose pool workers use the timer: the parent waits for
  the pool at most as long as its chunks would take if every response used all its time, plus one
  round; past that, it kills and replaces the pool and grades the unfinished responses incorrect.
Starting a pool (spawn, then importing sympy: a second or more) does not count against a deadline.
Answers longer than `MAX_ANSWER_CHARS` are compared as strings only.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import gc
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

# Seconds that grading one response may take (text checks and math-verify together; see above).
GRADE_TIMEOUT_S = 5.0
# Longer boxed answers (or golds) skip math-verify and are compared as strings only.
MAX_ANSWER_CHARS = 1000
# After the deadline the alarm fires again at this interval, in case a library swallowed it.
_ALARM_REPEAT_S = 0.1
# How long past the deadline a thread waits for a pool worker before killing the pool.
_KILL_GRACE_S = 1.0
# Processes of the pool that runs math-verify for callers outside the main thread.
_OFF_MAIN_WORKERS = min(4, os.cpu_count() or 1)

_BOXED = "\\boxed{"
_THINK, _END_THINK = "<think>", "</think>"
# A whitespace run next to `<`, `>` or `/`: the first branch starts only at the beginning of a run,
# so a run that is not followed by a tag character is tried once (linear time, unlike the released
# `\s*(<|>|/)\s*`, which retries from every position of a long run).
_WHITESPACE_NEXT_TO_TAG = re.compile(r"(?<!\s)\s+(?=[<>/])|(?<=[<>/])\s+")
_BRACES = re.compile(r"[{}]")
# EasyR1 / ARES `format_reward`: a think block, then anything that contains a boxed answer. The
# reference definition; `format_ok` decides it without backtracking.
FORMAT_PATTERN = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text`, braces balanced; None if there is none.

    Like `mathruler.grader.extract_boxed_content`: the last occurrence of the literal `\\boxed{`
    is scanned to its matching `}`, so nested braces are kept (`\\boxed{\\frac{1}{2}}` ->
    `\\frac{1}{2}`). If that last box is never closed the result is None (no earlier box is used).
    `\\boxed 3` (no braces) is not recognised. The content is returned as written, unstripped.
    One pass over the text after the last box.
    """
    if not isinstance(text, str):
        return None
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 1
    begin = start + len(_BOXED)
    for m in _BRACES.finditer(text, begin):
        if text[m.start()] == "{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return text[begin : m.start()]
    return None


def normalize_response(text: str) -> str:
    """Removes whitespace around `<`, `>` and `/` (released code: `re.sub(r"\\s*(<|>|/)\\s*",
    r"\\1", text)`, for models that write `< think >`). Applied before both checks below.

    The same result (every run of `\\s` whitespace next to a `<`, `>` or `/` is removed), in
    linear time.
    """
    return _WHITESPACE_NEXT_TO_TAG.sub("", text)


def _format_ok_normalised(text: str) -> bool:
    # FORMAT_PATTERN.fullmatch(text) without backtracking: each `.*` can be empty, so taking the
    # first `</think>` after `<think>`, then the first `\boxed{` after it, then the first `}`
    # after that decides it.
    if not text.startswith(_THINK):
        return False
    think_end = text.find(_END_THINK, len(_THINK))
    if think_end < 0:
        return False
    box = text.find(_BOXED, think_end + len(_END_THINK))
    return box >= 0 and text.find("}", box + len(_BOXED)) >= 0


def format_ok(text: str) -> bool:
    r"""True when the normalised response full-matches the released format regex (METHOD.md 4.1;
    EasyR1 / ARES `format_reward`):

        re.fullmatch(r"<think>.*</think>.*\\boxed\{.*\}.*", normalize_response(text), re.DOTALL)

    that is, a `<think>...</think>` block first, then any text that contains `\boxed{...}`. The
    braces of the box need not balance for this check. Linear time.
    """
    if not isinstance(text, str):
        return False
    return _format_ok_normalised(normalize_response(text))


def _squeeze(s: str) -> str:
    return "".join(s.split())


def _gold_answer(gold: str) -> str:
    # Some datasets store the gold as "\\boxed{...}" or "$...$": compare the inside.
    boxed = extract_boxed(gold)
    if boxed is not None:
        return boxed
    stripped = gold.strip()
    if len(stripped) > 1 and stripped[0] == "$" and stripped[-1] == "$":
        return stripped.strip("$")
    return gold


# ---------------------------------------------------------------------------------------------
# The deadline


class _GradeTimeout(BaseException):
    """Grading passed its deadline. A BaseException, so that the `except Exception` blocks of
    math-verify and sympy let it through."""


_alarm_armed = False  # the SIGALRM handler raises only while a deadline is being enforced
_alarm_fired = False


def _in_gc_callback(frame) -> bool:
    codes = [getattr(callback, "__code__", None) for callback in gc.callbacks]
    return frame is not None and frame.f_code in codes


def _on_alarm(signum, frame) -> None:
    global _alarm_fired
    _alarm_fired = True
    # Not inside a garbage-collector callback (JAX registers one), where the exception would be
    # printed and ignored; the alarm repeats, so a later one stops the grading.
    if _alarm_armed and not _in_gc_callback(frame):
        raise _GradeTimeout()


def _call_with_alarm(seconds: float, fn: Callable, *args) -> tuple[object, bool]:
    """`(fn(*args), False)`, or `(None, True)` when it runs past `seconds`. Main thread only.

    A caller's SIGALRM handler and `ITIMER_REAL` timer are restored afterwards (the timer less the
    time spent here; if it was due sooner, it bounds `fn` instead, and fires once we are done).
    """
    global _alarm_armed, _alarm_fired
    if seconds <= 0:
        return None, True
    start = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    old_delay, old_interval = signal.getitimer(signal.ITIMER_REAL)
    delay = min(seconds, old_delay) if old_delay > 0 else seconds
    try:
        _alarm_fired = False
        _alarm_armed = True
        signal.setitimer(signal.ITIMER_REAL, delay, _ALARM_REPEAT_S)
        result = fn(*args)
        return (None, True) if _alarm_fired else (result, False)
    except _GradeTimeout:
        _alarm_armed = False  # first: no eval-breaker check (hence no handler) runs before it
        return None, True
    finally:
        _alarm_armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:
            left = old_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-6), old_interval)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------------------------
# math-verify


def _import_math_verify():
    import math_verify  # lazy: sympy and latex2sympy take about a second to import
    import math_verify.grader
    import math_verify.parser

    # Their timeouts are off (see the module docstring); the warning that says so once per
    # process would only be noise, since the deadline here replaces them.
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    return math_verify


def _verify(gold: str, pred: str) -> bool:
    math_verify = _import_math_verify()
    gold_parsed = math_verify.parse("\\boxed{" + gold + "}", parsing_timeout=None)
    pred_parsed = math_verify.parse("\\boxed{" + pred + "}", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _verify_in_worker(gold: str, pred: str, deadline_wall: float) -> bool | None:
    # A task of the off-main-thread pool: runs in the worker's main thread, under the alarm, to
    # the caller's deadline (wall clock, shared between processes). None: timed out.
    try:
        result, timed_out = _call_with_alarm(deadline_wall - time.time(), _verify, gold, pred)
    except Exception:
        log.debug("math-verify failed on gold %r", gold[:100], exc_info=True)
        return False
    return None if timed_out else bool(result)


def _verify_off_main_thread(gold: str, pred: str, deadline: float) -> bool:
    """`_verify` in the pool, waiting until `deadline` (time.monotonic()); raises _GradeTimeout."""
    for _ in range(2):  # a second try only when the pool broke under the first one
        started = time.monotonic()
        pool = _pool(_OFF_MAIN_WORKERS)
        deadline += time.monotonic() - started  # starting the pool is not the response's time
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            future = pool.submit(_verify_in_worker, gold, pred, time.time() + left)
            result = future.result(timeout=left + _KILL_GRACE_S)
        except concurrent.futures.TimeoutError:
            if not future.cancel():  # running past its own alarm: stuck where no signal reaches
                _discard_pool(_OFF_MAIN_WORKERS, pool)
            break
        except (concurrent.futures.BrokenExecutor, concurrent.futures.CancelledError, RuntimeError):
            # Killed for another thread's stuck task (or a worker died): try a fresh pool.
            _discard_pool(_OFF_MAIN_WORKERS, pool)
            continue
        if result is None:
            break
        return result
    raise _GradeTimeout()


# ---------------------------------------------------------------------------------------------
# Grading one response


class _Grade:
    """One response's checks, filled in as they run (a timeout keeps those already done)."""

    __slots__ = ("correct", "format_ok", "extracted", "timed_out")

    def __init__(self):
        self.correct = False
        self.format_ok = False
        self.extracted: str | None = None
        self.timed_out = False


def _correct(pred: str | None, gold: str, verify: Callable[[str, str], bool]) -> bool:
    try:
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
        return verify(gold, pred)
    except (KeyboardInterrupt, SystemExit, _GradeTimeout):
        raise
    except BaseException:  # a grader must not stop training
        log.debug("grading failed on gold %r", gold[:100], exc_info=True)
        return False


def _check_text(g: _Grade, response) -> None:
    if isinstance(response, str):
        text = normalize_response(response)  # once per response
        g.format_ok = _format_ok_normalised(text)
        g.extracted = extract_boxed(text)


def _grade_into(g: _Grade, response, gold, verify: Callable[[str, str], bool]) -> None:
    _check_text(g, response)
    if isinstance(response, str) and isinstance(gold, str):
        g.correct = _correct(g.extracted, gold, verify)


def _grade(response, gold, timeout_s: float) -> _Grade:
    """All checks of one response, within `timeout_s` seconds (see the module docstring)."""
    g = _Grade()
    if _in_main_thread():
        with contextlib.suppress(ImportError):  # without it, math-verify fails inside (False)
            _import_math_verify()  # before the clock starts: the first import takes a second
        _, g.timed_out = _call_with_alarm(timeout_s, _grade_into, g, response, gold, _verify)
    else:
        deadline = time.monotonic() + timeout_s
        verify = lambda gold, pred: _verify_off_main_thread(gold, pred, deadline)
        try:
            _grade_into(g, response, gold, verify)
        except _GradeTimeout:
            g.timed_out = True
    if g.timed_out:
        g.correct = False
    return g


def is_correct(response: str, gold: str) -> bool:
    """Whether the last boxed answer of the (normalised) response equals `gold`.

    A gold written as `\\boxed{...}` or `$...$` is unwrapped first. The two answers match when
    they are equal with all whitespace removed (as mathruler's string check); otherwise both are
    wrapped as `\\boxed{...}`, parsed by `math_verify.parse` and compared by
    `math_verify.verify(gold, pred)` (numeric, symbolic, set and equation-aware: "0.5" equals
    "\\frac{1}{2}", "2.0" equals "2", "x=3" equals "3", "10\\%" equals "0.1"). Never raises: an
    error, a missing box, an empty answer or a non-string argument gives False, and so does
    running past `GRADE_TIMEOUT_S` (logged as a warning). Safe to call from any thread (see the
    module docstring for the deadline).
    """
    g = _grade(response, gold, GRADE_TIMEOUT_S)
    if g.timed_out:
        log.warning("is_correct: grading timed out after %s s; graded incorrect.", GRADE_TIMEOUT_S)
    return g.correct


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


_Row = tuple[bool, bool, "str | None", bool]  # correct, format_ok, extracted, timed_out


def _row(g: _Grade) -> _Row:
    return g.correct, g.format_ok, g.extracted, g.timed_out


def _score_one(item: tuple[str, str], timeout_s: float) -> _Row:
    return _row(_grade(*item, timeout_s))


def _lost(item: tuple[str, str]) -> _Row:
    # A response whose pool worker overran (or died): incorrect, its text checks redone here.
    g = _Grade()
    _check_text(g, item[0])
    g.timed_out = True
    return _row(g)


def _score_chunk(items: list[tuple[str, str]], timeout_s: float) -> list[_Row]:
    # A task of the `score_responses` pool; the parent's timeout travels with it.
    return [_score_one(item, timeout_s) for item in items]


# ---------------------------------------------------------------------------------------------
# Process pools


_POOLS: dict[int, concurrent.futures.ProcessPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    # One persistent pool per size: starting workers (spawn, then importing sympy) costs about a
    # second each, paid once per process (and again after a pool is killed). "spawn" because the
    # parent usually runs JAX, whose threads make fork unsafe.
    with _POOLS_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_import_math_verify,
            )
            # Workers start on demand; start them all now (a task each, submitted before any can
            # finish) and wait until they have imported math-verify, so that no deadline pays.
            for future in [pool.submit(os.getpid) for _ in range(workers)]:
                future.result()
            _POOLS[workers] = pool
        return pool


def _discard_pool(workers: int, pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Kills the processes of `pool` (one may be stuck) and forgets it; `_pool` makes a new one."""
    with _POOLS_LOCK:
        if _POOLS.get(workers) is not pool:
            return  # already discarded by another thread
        del _POOLS[workers]
    log.warning("Grading: a worker process overran its deadline; replacing its pool.")
    # No public way to kill the workers before Python 3.14 (`terminate_workers`).
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


@atexit.register
def _shutdown_pools() -> None:
    for pool in _POOLS.values():
        pool.shutdown(wait=True, cancel_futures=True)
    _POOLS.clear()


def _score_in_pool(items: list[tuple[str, str]], workers: int, timeout_s: float) -> list[_Row]:
    pool = _pool(workers)
    chunksize = max(1, len(items) // (4 * workers))
    chunks = [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
    futures = [pool.submit(_score_chunk, chunk, timeout_s) for chunk in chunks]
    # Every response ends within `timeout_s` in its worker, so greedy scheduling of the
    # chunks finishes within (chunks per worker + 1) chunks of the slowest kind; only a worker
    # stuck where its alarm cannot reach runs past this.
    rounds = -(-len(chunks) // workers) + 1
    budget = rounds * chunksize * (timeout_s + _KILL_GRACE_S)
    concurrent.futures.wait(futures, timeout=budget)
    rows: list[_Row] = []
    broken = False
    for future, chunk in zip(futures, chunks, strict=True):
        if future.done() and not future.cancelled() and future.exception() is None:
            rows.extend(future.result())
        else:
            broken = True
            rows.extend(_lost(item) for item in chunk)
    if broken:
        _discard_pool(workers, pool)
    return rows


def score_responses(
    responses: Sequence[str], golds: Sequence[str], *, workers: int = 0
) -> AnswerScores:
    """Grades N responses against their gold answers (METHOD.md 4.1).

    Each response is graded within `GRADE_TIMEOUT_S`; one that is not is graded incorrect (and
    its format and extraction kept when they were done), and one warning gives their number.

    Args:
      responses: N decoded responses (flat, group by group).
      golds: N gold answers (repeat each prompt's answer G times).
      workers: 0 grades in this thread (outside the main thread, math-verify then runs in a
        small process pool, see the module docstring); > 0 spreads the work over a persistent
        process pool of that many workers, spawned on first use (a couple of seconds each) and
        reused. Grading is CPU-bound sympy work (about 7 ms a response on the CPU this was
        written on) with no per-item overhead in the pool, so it pays from a few hundred
        responses when free cores exist; it cannot help on a machine whose cores are already busy.

    Returns:
      AnswerScores with correct [N] bool, format_ok [N] bool and the extracted answers.
    """
    if len(responses) != len(golds):
        raise ValueError(f"score_responses: {len(responses)} responses but {len(golds)} golds.")
    items = list(zip(responses, golds, strict=True))
    timeout_s = GRADE_TIMEOUT_S
    if workers > 0 and len(items) > 1:
        rows = _score_in_pool(items, workers, timeout_s)
    else:
        rows = [_score_one(item, timeout_s) for item in items]
    timed_out = sum(r[3] for r in rows)
    if timed_out:
        log.warning(
            "score_responses: %d of %d responses ran past GRADE_TIMEOUT_S = %s s; graded "
            "incorrect.",
            timed_out,
            len(rows),
            timeout_s,
        )
    return AnswerScores(
        correct=np.array([r[0] for r in rows], dtype=bool),
        format_ok=np.array([r[1] for r in rows], dtype=bool),
        extracted=[r[2] for r in rows],
    )
