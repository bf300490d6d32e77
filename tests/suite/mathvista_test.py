"""MathVista adapter: both released layouts (the HF parquet, the GitHub testmini.json keyed by
pid with an images/ folder) give the same items, field by field; multiple choice is graded by
letter and by option text in both; integers with a unit, floats at the row's precision and
lists are graded as MathVista's scorer compares them."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ares_jax.data.records import DataError
from ares_jax.suite import grading, registry
from ares_jax.suite.adapters import mathvista
from ares_jax.suite.items import CHOICE, EXPRESSION, FLOAT, INTEGER


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def _meta(task):
    return {"split": "testmini", "language": "english", "task": task, "skills": ["algebraic"]}


# The real rows' shapes (pids 3, 2, 1, 108, 506, 781 of testmini), shortened.
ROWS = [
    dict(pid="3", question="∠A＝110°，则∠BOC＝（）", choices=["135°", "140°", "145°", "150°"],
         unit=None, precision=None, answer="145°", question_type="multi_choice",
         answer_type="text", task="geometry problem solving"),
    dict(pid="2", question="what is the total volume of the measuring cup?", choices=None,
         unit="g", precision=None, answer="1000", question_type="free_form",
         answer_type="integer", task="visual question answering"),
    dict(pid="1", question="by what distance d is the spring compressed?", choices=None,
         unit=None, precision=1.0, answer="1.2", question_type="free_form",
         answer_type="float", task="textbook question answering"),
    dict(pid="108", question="Find the value of x.", choices=None, unit=None, precision=2.0,
         answer="51.04", question_type="free_form", answer_type="float",
         task="math word problem"),
    dict(pid="506", question="Between which two years does the line graph saw its maximum peak?",
         choices=None, unit=None, precision=None, answer="[2014, 2016]",
         question_type="free_form", answer_type="list", task="figure question answering"),
    dict(pid="781", question="Find CD.", choices=["9", "12", "18", "18"], unit=None,
         precision=None, answer="18", question_type="multi_choice", answer_type="text",
         task="geometry problem solving"),
]  # fmt: skip
COLORS = ["red", "green", "blue", "white", "black", "yellow"]


def _rows(with_decoded):
    out = []
    for r, color in zip(ROWS, COLORS, strict=True):
        row = {k: v for k, v in r.items() if k != "task"}
        row["image"] = f"images/{r['pid']}.jpg"
        row["metadata"] = _meta(r["task"])
        if with_decoded:
            row["decoded_image"] = {"bytes": _png(color), "path": f"{r['pid']}.jpg"}
            row["shot_type"] = "solution"
            row["query"] = "Hint: Please answer the question ...\nQuestion: " + r["question"]
        out.append(row)
    return out


SCHEMA = pa.schema(
    [
        ("pid", pa.string()),
        ("question", pa.string()),
        ("image", pa.string()),
        ("decoded_image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("choices", pa.list_(pa.string())),
        ("unit", pa.string()),
        ("precision", pa.float64()),
        ("answer", pa.string()),
        ("question_type", pa.string()),
        ("answer_type", pa.string()),
        ("shot_type", pa.string()),
        ("query", pa.string()),
        (
            "metadata",
            pa.struct(
                [
                    ("split", pa.string()),
                    ("language", pa.string()),
                    ("task", pa.string()),
                    ("skills", pa.list_(pa.string())),
                ]
            ),
        ),
    ]
)


@pytest.fixture
def hf_parquet(tmp_path):
    path = tmp_path / "data" / "testmini-00000-of-00001.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(_rows(True), schema=SCHEMA), path)
    return path


@pytest.fixture
def github_json(tmp_path):
    data = tmp_path / "github" / "data"
    (data / "images").mkdir(parents=True)
    for r, color in zip(ROWS, COLORS, strict=True):
        (data / "images" / f"{r['pid']}.jpg").write_bytes(_png(color))
    path = data / "testmini.json"
    path.write_text(json.dumps({r["pid"]: r for r in _rows(False)}, ensure_ascii=False, indent=4))
    return path


def _by_id(items):
    return {i.id: i for i in items}


def test_both_layouts_give_the_same_items(hf_parquet, github_json):
    hf = _by_id(mathvista.load(hf_parquet, "mathvista"))
    gh = _by_id(mathvista.load(github_json, "mathvista"))
    assert list(hf) == ["3", "2", "1", "108", "506", "781"]
    assert list(gh) == list(hf)
    for pid, color in zip(hf, COLORS, strict=True):
        a, b = hf[pid], gh[pid]
        assert a == b  # every field but origin
        assert a.images == (_png(color),)
        assert a.benchmark == "mathvista"
        assert str(hf_parquet) in a.origin and str(github_json) in b.origin

    mc = hf["3"]
    assert mc.kind == CHOICE and mc.answer == "C"
    assert mc.choices == ("135°", "140°", "145°", "150°")
    assert mc.question == (
        "<image>\n∠A＝110°，则∠BOC＝（）\nChoices:\nA. 135°\nB. 140°\nC. 145°\nD. 150°"
    )
    assert mc.difficulty == "geometry problem solving"
    assert (mc.precision, mc.unit) == (None, "")

    integer = hf["2"]
    assert (integer.kind, integer.answer, integer.unit) == (INTEGER, "1000", "g")
    assert integer.question == "<image>\nwhat is the total volume of the measuring cup? (Unit: g)"
    assert integer.choices == ()
    assert (hf["1"].kind, hf["1"].answer, hf["1"].precision) == (FLOAT, "1.2", 1)
    assert (hf["108"].kind, hf["108"].precision) == (FLOAT, 2)
    assert (hf["506"].kind, hf["506"].answer) == (EXPRESSION, "[2014, 2016]")
    # A gold listed twice (pid 781): the first copy's letter, the second's an alternative.
    assert (hf["781"].answer, hf["781"].choices) == ("C", ("9", "12", "18", "18"))
    assert hf["781"].alternatives == ("D",) and hf["3"].alternatives == ()


def _box(answer):
    return f"<think>work</think> \\boxed{{{answer}}}"


@pytest.mark.parametrize(
    "pid, response, correct",
    [
        ("3", "C", True),  # the letter
        ("3", "(C) 145°", True),
        ("3", "145°", True),  # the option's text
        ("3", "145", True),  # the one option with that value
        ("3", "B", False),
        ("3", "140°", False),
        ("2", "1000", True),
        ("2", "1000 g", True),  # the unit stripped
        ("2", "1,000", True),
        ("2", "999", False),
        ("2", "1000.5", False),
        ("1", "1.2", True),
        ("1", "1.23", True),  # rounded to the row's one decimal
        ("1", "1.3", False),
        ("108", "51.04", True),
        ("108", "51.041", True),
        ("108", "51.0", False),  # two decimals: 51.00 != 51.04
        ("506", "[2014, 2016]", True),
        ("506", "[2014,2016]", True),
        ("506", "[2016, 2014]", False),
        ("781", "C", True),
        ("781", "D", True),  # the same option text under another letter
        ("781", "A", False),
    ],
)
def test_grading_in_both_layouts(hf_parquet, github_json, pid, response, correct):
    for path in (hf_parquet, github_json):
        item = _by_id(mathvista.load(path, "mathvista"))[pid]
        verdict = grading.grade(item, _box(response))
        assert verdict.correct is correct, (path, verdict)


def test_registry_uses_accuracy():
    from ares_jax.suite import metrics

    assert registry.get("mathvista").scorer() is metrics.accuracy


def test_a_file_in_another_layout_is_refused_naming_it(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": "1+1?", "solution": "2"}]), path)
    with pytest.raises(DataError, match=f"{path}.*no 'question' column.*MathVista testmini"):
        mathvista.load(path, "mathvista")


def test_a_test_split_row_without_an_answer_is_refused(tmp_path):
    row = dict(_rows(True)[1], answer="")
    path = tmp_path / "test-00000-of-00002.parquet"
    pq.write_table(pa.Table.from_pylist([row], schema=SCHEMA), path)
    with pytest.raises(DataError, match=f"{path}, row 0: no answer .*use testmini"):
        mathvista.load(path, "mathvista")


def test_a_choice_answer_that_is_no_option_is_refused(tmp_path):
    path = tmp_path / "testmini.json"
    row = dict(_rows(False)[0], answer="146°")
    path.write_text(json.dumps({"3": row}))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "3.jpg").write_bytes(_png("red"))
    with pytest.raises(DataError, match=r"entry 3: answer '146°' is not one of its choices"):
        mathvista.load(path, "mathvista")
