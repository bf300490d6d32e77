"""Tests for ares_jax/rewards/answers.py: boxed extraction, format regex, math-verify grading."""

import concurrent.futures

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
