"""MATH-Vision adapter: the HF parquet and the GitHub JSONL layouts give the same items; listed
options, options drawn in the image, integer and expression answers (with the release's
artefacts cleaned) are graded as the authors' evaluate.py counts them."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ares_jax.data.records import DataError
from ares_jax.suite import grading, metrics, registry
from ares_jax.suite.adapters import mathvision
from ares_jax.suite.items import CHOICE, EXPRESSION, INTEGER


def _png(seed):
    buf = io.BytesIO()
    Image.new("RGB", (4, 7), (seed * 20 % 256, 10, 200)).save(buf, format="PNG")
    return buf.getvalue()


DAYS = ["Wednesday", "Thursday", "Friday", "Tuesday", "Sunday"]
# The real rows' shapes (ids 1, 2, 59, 1000-ish), shortened.
ROWS = [
    dict(id="1", question="Which number should be written in place of the question mark?\n<image1>",
         options=[], answer="60", level=2, subject="arithmetic"),
    dict(id="2", question="Which bike is most expensive?\n<image1>",
         options=["A", "B", "C", "D", "E"], answer="A", level=2, subject="arithmetic"),
    dict(id="7", question="On which day was the party?\n<image1>", options=DAYS, answer="B",
         level=3, subject="logic"),
    dict(id="59", question="<image1>\nWhich side is opposite to <image3>?\n<image4>", options=[],
         answer="C", level=4, subject="solid geometry"),
    dict(id="900", question="Find the cosine of the angle.\n<image1>", options=[],
         answer="$\\frac{\\sqrt{6}}{6}$", level=5, subject="analytic geometry"),
    dict(id="901", question="Find the ratio.\n<image1>", options=[], answer="\x0crac{36}{13}",
         level=5, subject="algebra"),
    dict(id="902", question="Find the length.\n<image1>", options=[], answer="4.8 ", level=4,
         subject="metric geometry - length"),
]  # fmt: skip
IDS = [r["id"] for r in ROWS]


@pytest.fixture
def parquet(tmp_path):
    rows = [
        dict(r, image=f"images/{r['id']}.jpg", solution=None,
             decoded_image={"bytes": _png(int(r["id"])), "path": f"{r['id']}.jpg"})
        for r in ROWS
    ]  # fmt: skip
    path = tmp_path / "data" / "test-00000-of-00001.parquet"
    path.parent.mkdir()
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("question", pa.string()),
            ("options", pa.list_(pa.string())),
            ("image", pa.string()),
            ("decoded_image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("answer", pa.string()),
            ("solution", pa.string()),
            ("level", pa.int64()),
            ("subject", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


@pytest.fixture
def jsonl(tmp_path):
    data = tmp_path / "MATH-V" / "data"
    (data / "images").mkdir(parents=True)
    lines = []
    for r in ROWS:
        (data / "images" / f"{r['id']}.jpg").write_bytes(_png(int(r["id"])))
        lines.append(json.dumps(dict(r, image=f"images/{r['id']}.jpg", solution=None)))
    path = data / "test.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _by_id(items):
    return {i.id: i for i in items}


def test_both_layouts_give_the_same_items(parquet, jsonl):
    a = _by_id(mathvision.load(parquet, "mathvision"))
    b = _by_id(mathvision.load(jsonl, "mathvision"))
    assert list(a) == IDS and list(b) == IDS
    for i in IDS:
        assert a[i] == b[i]
        assert a[i].images == (_png(int(i)),)
        assert str(parquet) in a[i].origin and str(jsonl) in b[i].origin

    assert (a["1"].kind, a["1"].answer, a["1"].difficulty) == (INTEGER, "60", "2")
    assert a["1"].question == (
        "<image>\nWhich number should be written in place of the question mark?\n<image1>"
    )
    drawn = a["2"]  # options are the letters: not listed, graded by letter
    assert (drawn.kind, drawn.answer, drawn.choices) == (CHOICE, "A", tuple("ABCDE"))
    assert drawn.question == "<image>\nWhich bike is most expensive?\n<image1>"
    listed = a["7"]
    assert (listed.kind, listed.answer, listed.choices) == (CHOICE, "B", tuple(DAYS))
    assert listed.question == (
        "<image>\nOn which day was the party?\n<image1>\n"
        "A. Wednesday\nB. Thursday\nC. Friday\nD. Tuesday\nE. Sunday"
    )
    assert (a["59"].kind, a["59"].answer, a["59"].choices) == (CHOICE, "C", tuple("ABCDE"))
    assert (a["900"].kind, a["900"].answer) == (EXPRESSION, "\\frac{\\sqrt{6}}{6}")
    assert a["901"].answer == "\\frac{36}{13}"  # the form feed of an unescaped "\f" repaired
    assert (a["902"].kind, a["902"].answer) == (EXPRESSION, "4.8")


def _box(answer):
    return f"<think>step by step</think> \\boxed{{{answer}}}"


@pytest.mark.parametrize(
    "pid, response, correct",
    [
        ("1", "60", True),
        ("1", "60.0", True),
        ("1", "61", False),
        ("2", "A", True),
        ("2", "(A)", True),
        ("2", "B", False),
        ("7", "B", True),
        ("7", "Thursday", True),  # the option's text
        ("7", "Friday", False),
        ("59", "C", True),
        ("59", "E", False),
        ("900", "\\frac{1}{\\sqrt{6}}", True),  # an equal expression
        ("900", "\\sqrt{6}", False),
        ("901", "\\frac{36}{13}", True),
        ("901", "\\frac{13}{36}", False),
        ("902", "4.80", True),
        ("902", "4.9", False),
    ],
)
def test_grading(parquet, jsonl, pid, response, correct):
    for path in (parquet, jsonl):
        item = _by_id(mathvision.load(path, "mathvision"))[pid]
        verdict = grading.grade(item, _box(response))
        assert verdict.correct is correct, (path, verdict)


def test_registry_uses_accuracy():
    assert registry.get("mathvision").scorer() is metrics.accuracy


def test_a_file_in_another_layout_is_refused_naming_it(tmp_path):
    path = tmp_path / "dynamath.parquet"
    pq.write_table(pa.Table.from_pylist([{"pid": "1", "question": "Q", "ground_truth": "2"}]), path)
    with pytest.raises(DataError, match=f"{path}, row 0: no 'id' column.*MATH-Vision"):
        mathvision.load(path, "mathvision")


def test_a_choice_answer_naming_no_option_is_refused(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(dict(ROWS[2], answer="F", image="")) + "\n")
    with pytest.raises(DataError, match=r"line 1: answer 'F' names none of its options"):
        mathvision.load(path, "mathvision")


def test_two_splits_at_once_are_refused(parquet):
    testmini = parquet.parent / "testmini-00000-of-00001.parquet"
    testmini.write_bytes(parquet.read_bytes())
    with pytest.raises(DataError, match=r"testmini-00000-of-00001.parquet, row 0: id '1' again"):
        mathvision.load(parquet.parent, "mathvision")
