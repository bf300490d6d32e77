"""MMStar adapter: the Hugging Face parquet layout, both option forms, grading of its choices."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ares_jax.data.records import DataError
from ares_jax.suite import grading
from ares_jax.suite.adapters import mmstar
from ares_jax.suite.items import CHOICE


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (9, 7), color).save(buf, format="JPEG")
    return buf.getvalue()


def _row(index, question, answer, category, l2, image):
    return {
        "index": index,
        "question": question,
        "image": image,
        "answer": answer,
        "category": category,
        "l2_category": l2,
        "meta_info": {"source": "MMBench", "split": "val", "image_path": f"images/{index}.jpg"},
    }


QUESTIONS = [
    (
        "Which option describe the object relationship in the image correctly?\nOptions: A: The "
        "suitcase is on the book., B: The suitcase is beneath the cat., C: The suitcase is "
        "beneath the bed., D: The suitcase is beneath the book.",
        "A",
        "coarse perception",
        "image scene and topic",
    ),
    (
        "What is shown?\nOptions: A: A cat, sitting on a mat., B: Two dogs, C: 3, 4, and 5, "
        "D: None",
        "C",
        "fine-grained perception",
        "recognition",
    ),
    (
        "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, "
        "D, at the end.\nQuestion: How many snowmen are there?\nChoices:\n(A) 10\n(B) 15\n(C) 12\n"
        "(D) 20",
        "B",
        "math",
        "numeric commonsense and calculation",
    ),
    (
        "Is the man wearing a hat?\nOptions: A: yes, B: no, C: nan, D: nan",
        "B",
        "instance reasoning",
        "single-instance reasoning",
    ),  # fmt: skip
    (
        "What is the value of x in the figure?\nOptions: A: 2.5, B: 3, C: 4.5, D: 6",
        "C",
        "math",
        "geometry",
    ),
]
COLORS = ["red", "green", "blue", "white", "black"]


def _parquet(path, struct=True):
    rows = []
    for i, ((question, answer, category, l2), color) in enumerate(
        zip(QUESTIONS, COLORS, strict=True)
    ):
        image = {"bytes": _jpeg(color), "path": None} if struct else _jpeg(color)
        rows.append(_row(i, question, answer, category, l2, image))
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parquet_layout_items(tmp_path):
    got = mmstar.load(_parquet(tmp_path / "mmstar.parquet"), "mmstar")
    assert [i.id for i in got] == ["0", "1", "2", "3", "4"]
    assert {i.benchmark for i in got} == {"mmstar"} and {i.kind for i in got} == {CHOICE}
    first = got[0]
    assert first.question == (
        "<image>\nWhich option describe the object relationship in the image correctly?\n"
        "A. The suitcase is on the book.\nB. The suitcase is beneath the cat.\n"
        "C. The suitcase is beneath the bed.\nD. The suitcase is beneath the book."
    )
    assert first.answer == "A" and first.images == (_jpeg("red"),)
    assert first.difficulty == "coarse perception" and first.origin.endswith("parquet, row 0")
    assert got[1].choices == ("A cat, sitting on a mat.", "Two dogs", "3, 4, and 5", "None")
    # MathVista's form: the hint goes, "Question:" goes, "(A) 10" lines become the options.
    assert got[2].question == "<image>\nHow many snowmen are there?\nA. 10\nB. 15\nC. 12\nD. 20"
    assert got[2].answer == "B" and got[2].difficulty == "math"
    assert got[3].choices == ("yes", "no")  # the "nan" padding is dropped
    assert got[3].question == "<image>\nIs the man wearing a hat?\nA. yes\nB. no"
    assert got[4].choices == ("2.5", "3", "4.5", "6") and got[4].images == (_jpeg("black"),)


def test_image_as_plain_bytes(tmp_path):
    got = mmstar.load(_parquet(tmp_path / "mmstar.parquet", struct=False), "mmstar")
    assert got[2].images == (_jpeg("blue"),)


def test_parse_question_forms():
    assert mmstar.parse_question("Q?\nOptions: A. one, B. two") == ("Q?", ["one", "two"])
    assert mmstar.parse_question("Q?\nOptions: A: x\nB: y\nC: z") == ("Q?", ["x", "y", "z"])
    assert mmstar.parse_question("no options here") is None


def test_grading(tmp_path):
    got = mmstar.load(_parquet(tmp_path / "mmstar.parquet"), "mmstar")
    suitcase, cats, snowmen, hat, value = got
    assert grading.grade(suitcase, "<think>on top</think>\\boxed{A}").correct
    assert grading.grade(suitcase, "</think>\\boxed{The suitcase is on the book.}").correct
    assert grading.grade(suitcase, "</think>The answer is (A).").correct
    assert not grading.grade(suitcase, "</think>\\boxed{D}").correct
    assert not grading.grade(suitcase, "</think>\\boxed{The suitcase is beneath the cat.}").correct
    assert grading.grade(cats, "</think>\\boxed{3, 4, and 5}").correct
    assert grading.grade(snowmen, "</think>\\boxed{B}").correct
    assert grading.grade(snowmen, "</think>\\boxed{15}").correct  # the option's value
    assert not grading.grade(snowmen, "</think>\\boxed{12}").correct
    assert grading.grade(hat, "</think>\\boxed{no}").correct
    assert not grading.grade(hat, "</think>\\boxed{C}").correct  # no such option any more
    assert grading.grade(value, "</think>\\boxed{4.5}").correct
    assert not grading.grade(value, "</think>\\boxed{3}").correct


def test_wrong_layout_raises(tmp_path):
    path = tmp_path / "mmstar.jsonl"
    path.write_text(json.dumps({"pid": 1, "query": "q", "answer": "A"}) + "\n")
    with pytest.raises(DataError, match=r"mmstar\.jsonl"):
        mmstar.load(path, "mmstar")
    rows = [_row(0, "What is it? A cat or a dog?", "A", "math", "geometry", _jpeg("red"))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet, row 0: the question holds no"):
        mmstar.load(tmp_path / "bad.parquet", "mmstar")
    rows = [_row(0, "Q?\nOptions: A: x, B: y", "C", "math", "geometry", _jpeg("red"))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="answer 'C' is not a letter of its 2 options"):
        mmstar.load(tmp_path / "bad.parquet", "mmstar")
