"""The suite's core: answer extraction and its fallbacks, comparison by answer kind, the
metrics, and the resumable run with its audit file and report."""

import json

import pytest

from ares_jax.suite import grading, metrics, run
from ares_jax.suite.items import CHOICE, EXPRESSION, FLOAT, INTEGER, TEXT, Item
from ares_jax.suite.registry import BENCHMARKS, get


def _item(kind, answer, **kw):
    return Item(benchmark="t", id=kw.pop("id", "1"), question="Q?", answer=answer, kind=kind, **kw)


@pytest.mark.parametrize(
    "response, want",
    [
        ("<think>try \\boxed{1}</think> so \\boxed{2}", ("2", "boxed")),
        ("< think >a</ think > \\boxed{ 7 }", ("7", "boxed")),  # normalised tags, stripped
        ("<think>it is \\boxed{5}</think> The end.", ("5", "boxed_in_reasoning")),
        ("no tags, \\boxed{x+1} at last", ("x+1", "boxed")),
        ("<think>hm</think>The answer is 42.", ("42", "answer_phrase")),
        ("<think>hm</think>Final answer: $3.5$", ("3.5", "answer_phrase")),
        ("<think>answer is 9</think> nothing after", (None, "none")),
        ("", (None, "none")),
    ],
)
def test_extraction_order(response, want):
    assert grading.extract_answer(response) == want


def test_a_lone_letter_on_the_last_line_is_a_choice_answer_only_for_choice_items():
    text = "<think>compare them</think>\nSo it must be\n(B)"
    assert grading.extract_answer(text, choice=True) == ("B", "last_line")
    assert grading.extract_answer(text) == (None, "none")
    assert grading.extract_answer("<think>x</think>\nBecause", choice=True) == (None, "none")


def test_choice_by_letter_text_or_value():
    item = _item(CHOICE, "B", choices=("12 cm", "\\frac{1}{2}", "30"))
    for pred in ("B", "(B)", "B.", "b", "B: \\frac{1}{2}", "\\text{B}", "\\frac{1}{2}"):
        assert grading.compare(pred, item) == (True, "B"), pred
    assert grading.compare("A", item) == (False, "A")
    assert grading.compare("B: 12 cm", item) == (False, None)  # letter and text disagree
    assert grading.compare("12 cm", item) == (False, "A")
    assert grading.compare("30.0", _item(CHOICE, "C", choices=("1", "2", "30"))) == (True, "C")
    assert grading.compare("Z", item) == (False, None)
    drawn = _item(CHOICE, "B", choices=("A", "B", "C"))  # options only in the image
    assert grading.compare("B: 60^\\circ", drawn) == (True, "B")
    v = grading.grade(item, "<think>..</think>\\boxed{B}")
    assert v == grading.Verdict("B", "boxed", True, "B")


def test_numbers_with_units_precision_and_tolerance():
    assert grading.compare("1,234", _item(INTEGER, "1234"))[0]
    assert grading.compare("12 \\text{ cm}", _item(INTEGER, "12", unit="cm"))[0]
    assert grading.compare("12.0", _item(INTEGER, "12"))[0]
    assert not grading.compare("12.5", _item(INTEGER, "12"))[0]
    assert grading.compare("45^\\circ", _item(INTEGER, "45"))[0]
    assert grading.compare("\\frac{24}{2}", _item(INTEGER, "12"))[0]  # math-verify fallback
    assert grading.compare("3.14", _item(FLOAT, "3.1416", precision=2))[0]
    assert not grading.compare("3.15", _item(FLOAT, "3.1416", precision=2))[0]
    assert grading.compare("50\\%", _item(FLOAT, "50", precision=1))[0]
    assert grading.compare("0.3333333", _item(FLOAT, "0.33333334"))[0]
    assert not grading.compare("0.3334", _item(FLOAT, "0.33333334"))[0]


def test_expressions_and_texts():
    assert grading.compare("\\frac{1}{2}", _item(EXPRESSION, "0.5"))[0]
    assert grading.compare("x = 3", _item(EXPRESSION, "3"))[0]
    assert not grading.compare("\\sqrt{2}", _item(EXPRESSION, "2"))[0]
    assert grading.compare("\\text{Yes}.", _item(TEXT, "yes"))[0]
    assert not grading.compare("no", _item(TEXT, "yes"))[0]


def test_item_checks_name_the_item():
    with pytest.raises(ValueError, match="gold 'D' is not one of the letters of its 3"):
        _item(CHOICE, "D", choices=("a", "b", "c"))
    with pytest.raises(ValueError, match="1 <image> markers for 0 images"):
        Item(benchmark="t", id="1", question="<image>Q", answer="1", kind=INTEGER)
    with pytest.raises(ValueError, match="kind 'number'"):
        _item("number", "1")


def test_worst_case_and_avg_at_k_by_hand():
    # Three seeds with two variants each, two samples: seed a right everywhere, seed b wrong
    # in one variant on sample 0, seed c wrong everywhere.
    def g(seed, variant, sample, ok):
        return metrics.Graded(_item(INTEGER, "1", id=f"{seed}{variant}", group=seed), sample, ok, 1)

    graded = [g("a", v, s, True) for v in range(2) for s in range(2)]
    graded += [g("b", 0, 0, False), g("b", 1, 0, True), g("b", 0, 1, True), g("b", 1, 1, True)]
    graded += [g("c", v, s, False) for v in range(2) for s in range(2)]
    # sample 0: a only (1/3); sample 1: a and b (2/3); mean 1/2.
    assert metrics.worst_case(graded) == pytest.approx(0.5)
    assert metrics.accuracy(graded) == pytest.approx(7 / 12)


def _respond_with(answers, calls):
    """A fake model: item id -> response text; records the calls."""

    def respond(batch, first):
        calls.append((first, [it.id for it in batch]))
        out, skipped = [], {}
        for i, it in enumerate(batch):
            if answers[it.id] is None:
                skipped[i] = "over-long"
                continue
            out.append(run.Response(i, 0, answers[it.id], len(answers[it.id])))
        return out, skipped

    return respond


def test_run_resumes_records_every_verdict_and_reports(tmp_path, monkeypatch):
    bench = get("math500")
    monkeypatch.setattr(type(bench), "scorer", lambda self: metrics.accuracy)  # no adapter needed
    items = [
        Item(benchmark="math500", id=f"q{i}", question=f"{i}+{i}?", answer=str(2 * i), kind=INTEGER)
        for i in range(5)
    ]
    answers = {
        "q0": "<think>0</think>\\boxed{0}",
        "q1": "<think>2</think>\\boxed{3}",  # wrong
        "q2": "<think>4</think>The answer is 4.",  # fallback
        "q3": None,  # over-long: skipped, counted wrong
        "q4": "<think>8</think>\\boxed{8}",
    }
    calls = []
    respond = _respond_with(answers, calls)

    def crash_on_second(batch, first):
        if first > 0:
            raise KeyboardInterrupt
        return respond(batch, first)

    with pytest.raises(KeyboardInterrupt):
        run.run_benchmark(bench, items, crash_on_second, tmp_path, chunk=2)
    path = run.responses_path(tmp_path, bench)
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["q0", "q1"]
    result = run.run_benchmark(bench, items, respond, tmp_path, chunk=2)
    assert calls == [(0, ["q0", "q1"]), (2, ["q2", "q3"]), (4, ["q4"])]  # q0, q1 not redone
    assert (result.items, result.responses, result.skipped) == (5, 4, 1)
    assert result.score == pytest.approx(3 / 5)  # q0, q2, q4 right; q1 wrong; q3 skipped
    assert result.extraction == {"answer_phrase": 1, "boxed": 3}
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    q1 = next(x for x in lines if x["id"] == "q1")
    assert (q1["extracted"], q1["how"], q1["correct"], q1["answer"]) == ("3", "boxed", False, "2")
    assert next(x for x in lines if x["id"] == "q3") == {"id": "q3", "skipped": "over-long"}
    # Without a model: the same result from the file alone.
    again = run.regrade(bench, items, tmp_path)
    assert (again.score, again.responses, again.skipped) == (result.score, 4, 1)
    md, data = run.report({"math500": result}, "my-model")
    assert "| my-model | 60.0 | 60.0 |" in md
    assert "| ARES-7B (paper) | 95.2 | 95.2 |" in md
    assert data["benchmarks"]["math500"]["skipped"] == 1
    run.run_benchmark(bench, items, respond, tmp_path, chunk=2)
    assert len(calls) == 3  # all done: no call


def test_responses_of_other_data_are_refused(tmp_path):
    bench = get("gsm8k")
    items = [Item(benchmark="gsm8k", id="a", question="?", answer="1", kind=INTEGER)]
    path = run.responses_path(tmp_path, bench)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"id": "zz", "sample": 0, "response": "", "length": 0}) + "\n")
    with pytest.raises(ValueError, match="belongs to other data"):
        run.run_benchmark(bench, items, _respond_with({"a": "1"}, []), tmp_path)


def test_registry_names_and_paper_numbers():
    assert len(BENCHMARKS) == 15
    assert get("MMMU-Pro").name == "mmmu_pro"
    assert get("aime25").samples == 16 and get("aime25").paper == {
        "ARES-3B": 34.8,
        "ARES-7B": 61.7,
    }
    with pytest.raises(ValueError, match="unknown benchmark 'mathvistaa'; known: mathverse"):
        get("mathvistaa")


def test_tolerance_and_alternative_golds():
    item = _item(FLOAT, "2.5", tolerance=0.05)
    assert grading.compare("2.549", item)[0] and grading.compare("2.45", item)[0]
    assert not grading.compare("2.56", item)[0]
    many = _item(TEXT, "Tampa", alternatives=("Florida",))
    assert grading.compare("florida", many)[0] and grading.compare("Tampa", many)[0]
    assert not grading.compare("Miami", many)[0]
    frac = _item(EXPRESSION, "24/7", alternatives=("3.429",))
    assert grading.compare("3.429", frac)[0] and grading.compare("\\frac{24}{7}", frac)[0]


def test_readme_lists_the_suite_as_the_registry_does():
    from pathlib import Path

    from ares_jax.suite.registry import markdown_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown_table() in readme
