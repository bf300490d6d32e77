"""MATH-500 adapter: HuggingFaceH4/MATH-500's test.jsonl (and parquet), integer and expression
golds, levels, and the grading of each answer form."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ares_jax.data.records import DataError
from ares_jax.suite import grading
from ares_jax.suite.adapters import math500
from ares_jax.suite.items import EXPRESSION, INTEGER
from ares_jax.suite.registry import get

ROWS = [
    {
        "problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.",
        "solution": "We have $r = 3$ ... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
        "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
        "subject": "Precalculus",
        "level": 2,
        "unique_id": "test/precalculus/807.json",
    },
    {
        "problem": "What is $\\frac{9}{2}+\\frac{1}{6}$?",
        "solution": "... $\\boxed{\\frac{14}{3}}$",
        "answer": "\\frac{14}{3}",
        "subject": "Prealgebra",
        "level": 1,
        "unique_id": "test/prealgebra/1.json",
    },
    {
        "problem": "How many vertical asymptotes does $y=\\frac{2}{x^2+x-6}$ have?",
        "solution": "... $\\boxed{2}$",
        "answer": "2",
        "subject": "Algebra",
        "level": 3,
        "unique_id": "test/algebra/1.json",
    },
    {
        "problem": "Which is largest? (A) ... (E) ...",
        "solution": "... $\\boxed{\\text{(C)}}$",
        "answer": "\\text{(C)}",
        "subject": "Algebra",
        "level": 5,
        "unique_id": "test/algebra/2.json",
    },
    {
        "problem": "How many dollars?",
        "solution": "... so $\\boxed{10,\\!000}$ dollars.",
        "answer": "10,\\!000",
        "subject": "Algebra",
        "level": 4,
        "unique_id": "test/algebra/3.json",
    },
]


@pytest.fixture
def loaded(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path, get("math500").load(path)


def test_fields(loaded):
    path, got = loaded
    assert [i.id for i in got] == [r["unique_id"] for r in ROWS]
    first = got[0]
    assert first.benchmark == "math500"
    assert first.question == ROWS[0]["problem"]
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.kind == EXPRESSION
    assert first.difficulty == "Level 2"
    assert (first.images, first.choices, first.precision, first.unit) == ((), (), None, "")
    assert first.origin == f"{path}, line 1"
    assert [i.kind for i in got] == [EXPRESSION, EXPRESSION, INTEGER, EXPRESSION, EXPRESSION]
    assert [i.difficulty for i in got] == ["Level 2", "Level 1", "Level 3", "Level 5", "Level 4"]


def test_parquet_and_a_row_without_answer(tmp_path):
    columns = {k: [r[k] for r in ROWS[:2]] for k in ROWS[0]}
    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.table(columns), path)
    assert [i.answer for i in math500.load(path, "math500")] == [r["answer"] for r in ROWS[:2]]
    # A MATH-style row: the gold is the last box of the solution.
    plain = tmp_path / "math.jsonl"
    plain.write_text(
        json.dumps({"problem": "Q", "solution": "x $\\boxed{\\sqrt{2}}$", "level": "Level 3"})
    )
    (item,) = math500.load(plain, "math500")
    assert (item.id, item.answer, item.kind, item.difficulty) == (
        "1",
        "\\sqrt{2}",
        EXPRESSION,
        "Level 3",
    )


@pytest.mark.parametrize(
    "index, right, wrong",
    [
        (0, ["(3, \\frac{\\pi}{2})", "\\left(3,\\frac{\\pi}{2}\\right)"], ["(3, \\pi)", "3"]),
        (1, ["\\frac{14}{3}", "\\dfrac{14}{3}", "14/3"], ["\\frac{13}{3}", "4.6"]),
        (2, ["2", "2.0", "\\frac{4}{2}", "x = 2"], ["3", "2.5"]),
        (3, ["\\text{(C)}", "(C)"], ["\\text{(A)}"]),
        (4, ["10000", "10,000", "10,\\!000"], ["1000", "100000"]),
    ],
)
def test_grading_each_answer_form(loaded, index, right, wrong):
    item = loaded[1][index]
    for pred in right:
        assert grading.grade(item, f"<think>..</think>\\boxed{{{pred}}}").correct, pred
    for pred in wrong:
        assert not grading.grade(item, f"<think>..</think>\\boxed{{{pred}}}").correct, pred


def test_wrong_layout_names_the_file(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({"query": "Q", "label": "3"}) + "\n")
    with pytest.raises(DataError, match=f"{path}, line 1: none of the columns") as e:
        math500.load(path, "math500")
    assert "HuggingFaceH4/MATH-500" in str(e.value)
    no_box = tmp_path / "nobox.jsonl"
    no_box.write_text(json.dumps({"problem": "Q", "solution": "it is 3"}) + "\n")
    with pytest.raises(DataError, match=f"{no_box}, line 1: no answer column"):
        math500.load(no_box, "math500")
