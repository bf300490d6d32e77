"""Tests for ares_jax/rewards/answers.py: boxed extraction, format regex, math-verify grading."""

import concurrent.futures
import random
import re
import signal
import threading
import time

import numpy as np
import pytest

from ares_jax.rewards import answers


def wrap(answer: str) -> str:
    return f"<think>reasoning</think> The answer is \\boxed{{{answer}}}."


# ---------------------------------------------------------------------------------------------
# extract_boxed


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\boxed{42}", "42"),
        ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        ("\\boxed{\\sqrt{\\frac{a}{b^{2}}}}", "\\sqrt{\\frac{a}{b^{2}}}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{ x = 3 }", " x = 3 "),
        ("\\boxed{}", ""),
        ("no box here", None),
        ("\\boxed{1} and \\boxed{2", None),  # the last box is unbalanced
        ("\\boxed{\\frac{1}{2}", None),
        ("\\boxed 3", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert answers.extract_boxed(text) == expected


def test_extract_boxed_non_string():
    assert answers.extract_boxed(None) is None


# ---------------------------------------------------------------------------------------------
# normalize_response / format_ok


def test_normalize_response_matches_released_regex():
    assert answers.normalize_response("< think > a </ think >") == "<think>a</think>"
    assert answers.normalize_response("1 / 2") == "1/2"
    assert answers.normalize_response("a  b") == "a  b"


@pytest.mark.parametrize(
    "text",
    [
        "<think>x</think>\\boxed{1}",
        "<think>\nmulti\nline\n</think>\nSo the answer is \\boxed{\\frac{1}{2}}.\n",
        "< think >spaces< / think > \\boxed{3}",  # normalised first
        "<think>a</think>\\boxed{1} and \\boxed{2}",
    ],
)
def test_format_ok_positive(text):
    assert answers.format_ok(text)


@pytest.mark.parametrize(
    "text",
    [
        "\\boxed{1}",  # no think block
        "<think>x</think> the answer is 1",  # no box
        "<think>x\\boxed{1}",  # think never closed
        "preamble <think>x</think>\\boxed{1}",  # must start with <think>
        "<think>x</think>\\boxed{1",  # box not closed
        "",
    ],
)
def test_format_ok_negative(text):
    assert not answers.format_ok(text)


# ---------------------------------------------------------------------------------------------
# is_correct


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("42", "42"),
        ("0.5", "\\frac{1}{2}"),
        ("\\frac{1}{2}", "0.5"),
        ("\\frac12", "1/2"),
        ("2.0", "2"),
        ("x=3", "3"),  # math-verify drops the variable of a simple assignment
        ("3", "x=3"),
        ("\\sqrt{8}", "2\\sqrt{2}"),
        ("1,000", "1000"),
        ("10\\%", "0.1"),
        ("30^{\\circ}", "30"),
        ("\\{2,1\\}", "\\{1,2\\}"),
        ("\\text{A}", "A"),
        (" 7 ", "7"),
    ],
)
def test_is_correct_equivalences(pred, gold):
    assert answers.is_correct(wrap(pred), gold)


@pytest.mark.parametrize(
    "pred, gold",
    [("43", "42"), ("-7", "7"), ("\\frac{1}{3}", "0.5"), ("A", "B"), ("", "1"), ("1", "")],
)
def test_is_correct_mismatches(pred, gold):
    assert not answers.is_correct(wrap(pred), gold)


def test_is_correct_synthetic_integers():
    for n in (0, 1, 7, 12, 99, 123456, -5):
        assert answers.is_correct(wrap(str(n)), str(n))
        assert not answers.is_correct(wrap(str(n + 1)), str(n))


@pytest.mark.parametrize(
    "gold", ["\\boxed{\\frac{1}{2}}", "$\\frac{1}{2}$", " $0.5$ ", "\\frac{1}{2}"]
)
def test_is_correct_unwraps_gold(gold):
    assert answers.is_correct(wrap("0.5"), gold)
    assert not answers.is_correct(wrap("0.25"), gold)


def test_is_correct_uses_the_last_box_of_the_normalised_response():
    assert answers.is_correct("\\boxed{1} no wait \\boxed{2}", "2")
    assert not answers.is_correct("\\boxed{1} no wait \\boxed{2}", "1")
    assert answers.is_correct("\\boxed{1 / 2}", "\\frac{1}{2}")


@pytest.mark.parametrize(
    "response, gold",
    [
        ("no box at all", "1"),
        ("\\boxed{1", "1"),
        (None, "1"),
        ("\\boxed{1}", None),
        ("\\boxed{\\frac{}{}{}}}", "1"),
        ("\\boxed{" + "(" * 500 + "}", "1"),
        ("\\boxed{" + "1+" * 2000 + "1}", "2001"),  # longer than MAX_ANSWER_CHARS
    ],
)
def test_is_correct_never_raises(response, gold):
    assert answers.is_correct(response, gold) is False


def test_is_correct_string_fallback_for_unparsable_answers():
    # Compared with all whitespace removed before math-verify is asked.
    assert answers.is_correct(wrap("\\text{red  car}"), "\\text{red car}")
    assert answers.is_correct(wrap("red car"), "redcar")
    assert not answers.is_correct(wrap("red car"), "blue car")


def test_is_correct_from_worker_threads():
    cases = [(wrap("\\frac{1}{2}"), "0.5", True), (wrap("3"), "4", False)] * 8
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: answers.is_correct(c[0], c[1]), cases))
    assert got == [c[2] for c in cases]


# ---------------------------------------------------------------------------------------------
# score_responses


def _batch():
    responses = [wrap("0.5"), "\\boxed{2}", wrap("3"), "nothing", "<think>a</think>\\boxed{x=4}"]
    golds = ["\\frac{1}{2}", "2", "4", "1", "4"]
    return responses, golds


def test_score_responses():
    scores = answers.score_responses(*_batch())
    np.testing.assert_array_equal(scores.correct, [True, True, False, False, True])
    np.testing.assert_array_equal(scores.format_ok, [True, False, True, False, True])
    assert scores.correct.dtype == bool and scores.format_ok.dtype == bool
    assert scores.extracted == ["0.5", "2", "3", None, "x=4"]


def test_score_responses_process_pool_matches_serial():
    responses, golds = _batch()
    responses, golds = responses * 4, golds * 4
    serial = answers.score_responses(responses, golds)
    pooled = answers.score_responses(responses, golds, workers=2)
    np.testing.assert_array_equal(pooled.correct, serial.correct)
    np.testing.assert_array_equal(pooled.format_ok, serial.format_ok)
    assert pooled.extracted == serial.extracted


def test_score_responses_length_mismatch():
    with pytest.raises(ValueError, match="2 responses but 1 golds"):
        answers.score_responses(["a", "b"], ["a"])


# ---------------------------------------------------------------------------------------------
# Degenerate output: linear text steps, one deadline per response

_RELEASED_WHITESPACE = re.compile(r"\s*(<|>|/)\s*")  # the released normalisation


def _released_normalize(text: str) -> str:
    return _RELEASED_WHITESPACE.sub(r"\1", text)


def _random_strings(pieces, n, max_len, seed):
    rng = random.Random(seed)
    return ["".join(rng.choices(pieces, k=rng.randint(0, max_len))) for _ in range(n)]


def test_normalize_response_matches_released_regex_on_random_strings():
    # `\s` of Python's re on str is Unicode whitespace: ideographic and no-break spaces, the
    # information separators \x1c..\x1f and \x85 count; a zero-width space does not.
    pieces = [" ", "  ", "\n", "\t", "\r\n", "\u3000", "\xa0", "\x1c", "\x85", "\u200b"]
    pieces += ["<", ">", "/", "a", "b", "<think>", "</think>", "\\boxed{", "}"]
    for text in _random_strings(pieces, 20000, 12, seed=0):
        assert answers.normalize_response(text) == _released_normalize(text), repr(text)


def test_format_ok_matches_released_regex_on_random_strings():
    pieces = ["<think>", "</think>", "\\boxed{", "}", "{", "a", " ", "\n", "<", "/", ">", "think"]
    for text in _random_strings(pieces, 20000, 10, seed=1):
        expected = answers.FORMAT_PATTERN.fullmatch(_released_normalize(text)) is not None
        assert answers.format_ok(text) == expected, repr(text)


def _extract_boxed_reference(text):
    # The scan extract_boxed did before, one character at a time.
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 1, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


def test_extract_boxed_matches_a_plain_scan_on_random_strings():
    for text in _random_strings(["\\boxed{", "{", "}", "a", "\\frac", " "], 20000, 10, seed=2):
        assert answers.extract_boxed(text) == _extract_boxed_reference(text), repr(text)


MB = 10**6
# Before, normalising 80k characters of whitespace took 30 s and 1 MB hours; now 1 MB takes
# about 0.1 s. The bound leaves room for a loaded machine (2 s failed once with another test
# process on both cores) and still catches the quadratic behaviour by orders of magnitude.
FAST_S = 10.0


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


@pytest.mark.parametrize(
    "text, normalised",
    [
        (" " * MB, " " * MB),
        ("\n" * MB, "\n" * MB),
        (" \n\t\u3000" * (MB // 4), " \n\t\u3000" * (MB // 4)),
        ("a " * (MB // 2), "a " * (MB // 2)),
        ((" " * 999 + "<" + "\n" * 999 + "/") * 500, "</" * 500),
        ((" < think > " + " " * 1000) * 1000, "<think>" * 1000),
        ("\\boxed{" + "{" * MB, "\\boxed{" + "{" * MB),
    ],
    ids=["spaces", "newlines", "mixed", "words", "tags", "think_tags", "unbalanced_brace"],
)
def test_normalize_response_is_linear(text, normalised):
    out, seconds = _timed(answers.normalize_response, text)
    assert seconds < FAST_S
    assert out == normalised


_NESTED_FRAC = "\\frac{" * 3000 + "1" + "}{2}" * 3000  # longer than MAX_ANSWER_CHARS

# name: (response, format_ok, extracted); graded against the gold "1", all incorrect.
DEGENERATE = {
    "spaces": (" " * MB, False, None),
    "newlines": ("\n" * MB, False, None),
    "mixed": (" \n\t\r\u3000" * (MB // 5), False, None),
    "whitespace_around_tags": (
        ("<think>" + " " * 1000 + "</think>" + "\n" * 1000) * 500,
        False,
        None,
    ),
    "unbalanced_braces": ("\\boxed{" + "{" * MB, False, None),
    "many_open_boxes": ("\\boxed{" * 200000, False, None),
    "many_think_ends": ("<think>" + " </think> " * 100000 + "\\boxed{" * 1000, False, None),
    "nested_frac_3000": (f"<think>x</think>\\boxed{{{_NESTED_FRAC}}}", True, _NESTED_FRAC),
}


@pytest.mark.parametrize("text, formatted, extracted", DEGENERATE.values(), ids=DEGENERATE.keys())
def test_degenerate_responses_are_graded_fast(text, formatted, extracted):
    start = time.perf_counter()
    assert answers.is_correct(text, "1") is False
    assert answers.format_ok(text) is formatted
    scores = answers.score_responses([text], ["1"])
    assert time.perf_counter() - start < FAST_S
    assert not scores.correct[0] and scores.format_ok[0] == formatted
    assert scores.extracted == [extracted]


def test_megabytes_of_whitespace_around_a_correct_answer():
    text = "< think >" + " " * MB + "</think>" + "\n" * MB + "\\boxed{ 1 / 2 }" + " \n" * MB
    start = time.perf_counter()
    scores = answers.score_responses([text, text], ["0.5", "\\frac{1}{2}"])
    assert time.perf_counter() - start < FAST_S
    np.testing.assert_array_equal(scores.correct, [True, True])
    np.testing.assert_array_equal(scores.format_ok, [True, True])
    assert scores.extracted == [" 1/2 ", " 1/2 "]


def test_nested_frac_3000_levels_matches_as_a_string():
    # Longer than MAX_ANSWER_CHARS: compared as a string only, so it is fast even when equal.
    text = f"<think>x</think>\\boxed{{{_NESTED_FRAC}}}"
    assert answers.is_correct(text, _NESTED_FRAC)


# Valid answers on which math-verify (sympy) runs far past any sensible bound: 90 nested \frac
# (901 characters, under MAX_ANSWER_CHARS) parse for minutes, 10^{10^{10}} is evaluated for longer.
SLOW = {"nested_frac_90": "\\frac{" * 90 + "1" + "}{2}" * 90, "power_tower": "10^{10^{10}}"}
BOUND_S = 0.5  # GRADE_TIMEOUT_S in the tests below
# Time to unwind (and, off the main thread, answer from the pool) past the bound. Generous: on a
# loaded 2-core machine sympy's unwinding alone has taken over a second, and what these tests
# tell apart is a bounded grade from one that runs for minutes.
SLACK_S = 3.0


@pytest.fixture
def short_bound(monkeypatch):
    monkeypatch.setattr(answers, "GRADE_TIMEOUT_S", BOUND_S)


@pytest.mark.parametrize("answer", SLOW.values(), ids=SLOW.keys())
def test_slow_math_verify_is_cut_off_in_the_main_thread(short_bound, answer, caplog):
    (scores, seconds) = _timed(answers.score_responses, [wrap(answer), wrap("1")] * 2, ["1"] * 4)
    assert seconds < 2 * BOUND_S + SLACK_S
    np.testing.assert_array_equal(scores.correct, [False, True, False, True])
    np.testing.assert_array_equal(scores.format_ok, [True] * 4)  # kept from before the timeout
    assert scores.extracted == [answer, "1"] * 2
    timeouts = [r for r in caplog.records if "ran past GRADE_TIMEOUT_S" in r.getMessage()]
    assert len(timeouts) == 1 and "2 of 4 responses" in timeouts[0].getMessage()


def test_the_bound_cuts_off_a_sleeping_verify(short_bound, monkeypatch):
    monkeypatch.setattr(answers, "_verify", lambda gold, pred: time.sleep(60) or True)
    correct, seconds = _timed(answers.is_correct, wrap("0.5"), "\\frac{1}{2}")
    assert correct is False and seconds < BOUND_S + SLACK_S
    assert answers.is_correct(wrap("1"), "1")  # a string match never reaches math-verify


def test_the_bound_keeps_and_restores_a_callers_alarm(short_bound):
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert not answers.is_correct(wrap(SLOW["power_tower"]), "1")
        assert answers.is_correct(wrap("0.5"), "\\frac{1}{2}")
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < left <= 30.0 and not fired
        # A caller's timer due before the bound bounds the grading, then fires for the caller.
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        _, seconds = _timed(answers.is_correct, wrap(SLOW["power_tower"]), "1")
        assert seconds < 0.2 + SLACK_S
        time.sleep(0.05)
        assert fired == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _in_thread(fn, *args):
    out = []
    thread = threading.Thread(target=lambda: out.append(_timed(fn, *args)))
    thread.start()
    thread.join()
    return out[0]


def test_the_bound_holds_off_the_main_thread(short_bound):
    # The first call off the main thread starts the math-verify pool (outside the bound).
    assert _in_thread(answers.is_correct, wrap("0.5"), "\\frac{1}{2}")[0]
    for answer in SLOW.values():
        correct, seconds = _in_thread(answers.is_correct, wrap(answer), "1")
        assert correct is False and seconds < BOUND_S + SLACK_S
    scores, seconds = _in_thread(
        answers.score_responses, [wrap(SLOW["power_tower"])] * 2, ["1"] * 2
    )
    assert not scores.correct.any() and seconds < 2 * BOUND_S + SLACK_S
    assert _in_thread(answers.is_correct, wrap("0.5"), "\\frac{1}{2}")[0]  # the pool still works


def test_the_bound_holds_in_the_process_pool(short_bound):
    responses = [wrap(SLOW["nested_frac_90"]), wrap("0.5"), wrap(SLOW["power_tower"]), wrap("3")]
    golds = ["1", "\\frac{1}{2}", "1", "3"]
    answers.score_responses(responses[1:2] * 2, golds[1:2] * 2, workers=2)  # starts the pool
    scores, seconds = _timed(answers.score_responses, responses, golds, workers=2)
    assert seconds < 2 * BOUND_S + SLACK_S  # two workers, two slow responses
    np.testing.assert_array_equal(scores.correct, [False, True, False, True])


def _stuck(*args):
    # A pool task that its alarm cannot stop, as if in one long call into C code.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    time.sleep(60)


def test_a_stuck_worker_is_killed_off_the_main_thread(short_bound, monkeypatch):
    monkeypatch.setattr(answers, "_KILL_GRACE_S", 0.2)
    assert _in_thread(answers.is_correct, wrap("0.5"), "\\frac{1}{2}")[0]  # the pool is up
    with monkeypatch.context() as patch:
        patch.setattr(answers, "_verify_in_worker", _stuck)
        correct, seconds = _in_thread(answers.is_correct, wrap("0.5"), "\\frac{1}{2}")
    assert correct is False and seconds < BOUND_S + 0.2 + SLACK_S
    assert _in_thread(answers.is_correct, wrap("0.5"), "\\frac{1}{2}")[0]  # in a new pool


def test_a_stuck_worker_is_killed_in_the_process_pool(short_bound, monkeypatch, caplog):
    monkeypatch.setattr(answers, "_KILL_GRACE_S", 0.2)
    responses, golds = [wrap("0.5"), "\\boxed{2}"], ["\\frac{1}{2}", "2"]
    answers.score_responses(responses, golds, workers=2)  # the pool is up
    with monkeypatch.context() as patch:
        patch.setattr(answers, "_score_chunk", _stuck)
        scores, seconds = _timed(answers.score_responses, responses, golds, workers=2)
    # One response per worker: the pool is given two rounds of (bound + grace).
    assert seconds < 2 * (BOUND_S + 0.2) + SLACK_S
    np.testing.assert_array_equal(scores.correct, [False, False])
    np.testing.assert_array_equal(scores.format_ok, [True, False])  # redone in this process
    assert scores.extracted == ["0.5", "2"]
    assert "2 of 2 responses" in caplog.text
    np.testing.assert_array_equal(
        answers.score_responses(responses, golds, workers=2).correct, [True, True]
    )
