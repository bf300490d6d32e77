"""LogicVista adapter: both released layouts, its answer kinds and the official set-match rule."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ares_jax.data.records import DataError
from ares_jax.suite import grading
from ares_jax.suite.adapters import logicvista
from ares_jax.suite.items import CHOICE, INTEGER, TEXT


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (7, 5), color).save(buf, format="PNG")
    return buf.getvalue()


def _row(key, question, answer, skill):
    return {
        "imagename": f"{key}.png",
        "question": question,
        "answer": answer,
        "reasoning": "Because.",
        "skill": [skill],
        "broad_capability": ["diagram"],
        "specific_capability": ["sequence pattern"],
        "imagesource": "aptitudetests",
        "sourcelink": "https://example.org/",
        "liscenced": "false",
    }


# Rows as data/dataset.json of the release has them (real questions and answers).
ROWS = {
    "v1_0": _row(
        "v1_0",
        "What choice (A, B, C, or D) should be in place of the question mark that fits the "
        "pattern?",
        "C",
        "inductive",
    ),
    "v1_1": _row(
        "v1_1",
        "Which choices in the image (A-D) belong to the green category?",
        "A, C",
        "inductive",
    ),
    "v1_4": _row("v1_4", "Who is the odd-one-out? Select answers from A-I", "G", "inductive"),
    "v1_20": _row(
        "v1_20",
        "Which is the correct answer according to the image? Select from 1-5",
        "3",
        "spatial",
    ),
    "v1_215": _row(
        "v1_215",
        "What was the percentage increase in snowfall in Whistler from November to December? "
        "Select from A, B, C, and D. (A) 30% (B) 40% (C) 50% (D) 60%",
        "C",
        "numerical",
    ),
    "v1_382": _row("v1_382", "", "", "spatial"),
    "v1_388": _row(
        "v1_388",
        "Which 3D shape can be made from the 2D net by folding it away from you?",
        "A",
        "spatial",
    ),  # fmt: skip
    "v1_421": _row(
        "v1_421",
        " The nut is very tight. The easiest scenario to losing the nut would be to: Select from "
        "(A), (B), (C), (D), (E). (A) Use a short spanner and hold it at A, (B) Use a short "
        "spanner and hold it at B, (C) Use a spanner which grips the nut very tightly, (D) Use a "
        "long spanner but hold it at A, (E) Use a long spanner but hold it at B.",
        "E",
        "mechanical",
    ),
}
COLORS = dict(
    zip(ROWS, ["red", "green", "blue", "white", "black", "gray", "yellow", "cyan"], strict=True)
)


@pytest.fixture
def github_layout(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for key in ROWS:
        (data / "images" / f"{key}.png").write_bytes(_png(COLORS[key]))
    (data / "dataset.json").write_text(json.dumps(ROWS, indent=4))
    return data


def _by_id(got):
    return {i.id: i for i in got}


def test_github_layout_items(github_layout):
    got = logicvista.load(github_layout, "logicvista")
    assert [i.id for i in got] == [k for k in ROWS if k != "v1_382"]  # the empty row is skipped
    items = _by_id(got)
    first = items["v1_0"]
    assert first.benchmark == "logicvista" and first.kind == CHOICE and first.answer == "C"
    assert first.question == (
        "<image>\nWhat choice (A, B, C, or D) should be in place of the question mark that fits "
        "the pattern?"
    )
    assert first.choices == ("A", "B", "C", "D") and first.images == (_png("red"),)
    assert first.difficulty == "inductive"
    assert first.origin.endswith("dataset.json, entry 'v1_0'")
    assert (items["v1_1"].kind, items["v1_1"].answer, items["v1_1"].choices) == (TEXT, "A, C", ())
    assert items["v1_4"].choices == tuple("ABCDEFGHI") and items["v1_4"].answer == "G"
    assert (items["v1_20"].kind, items["v1_20"].answer) == (INTEGER, "3")
    inline = items["v1_215"]
    assert inline.choices == ("30%", "40%", "50%", "60%") and inline.answer == "C"
    assert inline.question.endswith("Select from A, B, C, and D. (A) 30% (B) 40% (C) 50% (D) 60%")
    assert items["v1_388"].choices == ("A", "B", "C", "D")  # names no letters: A-D
    assert items["v1_421"].choices == (
        "Use a short spanner and hold it at A",
        "Use a short spanner and hold it at B",
        "Use a spanner which grips the nut very tightly",
        "Use a long spanner but hold it at A",
        "Use a long spanner but hold it at B.",
    )
    assert items["v1_421"].question.startswith("<image>\nThe nut is very tight.")
    assert items["v1_421"].difficulty == "mechanical"


def test_huggingface_parquet_layout(tmp_path, github_layout):
    rows = []
    for key, row in ROWS.items():
        image = {"bytes": _png(COLORS[key]), "path": f"{key}.png"}
        rows.append(dict(row, id=key, image=image))
    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    got = logicvista.load(path, "logicvista")
    assert [i.id for i in got] == [i.id for i in logicvista.load(github_layout, "logicvista")]
    items = _by_id(got)
    assert items["v1_215"].images == (_png("black"),) and items["v1_215"].origin.endswith("row 4")
    assert items["v1_1"].answer == "A, C"


def test_grading_every_answer_kind(github_layout):
    items = _by_id(logicvista.load(github_layout, "logicvista"))
    letter = items["v1_0"]
    assert grading.grade(letter, "<think>the dot</think>\\boxed{C}").correct
    assert grading.grade(letter, "</think>The answer is (C).").correct
    assert not grading.grade(letter, "</think>\\boxed{B}").correct
    assert not grading.grade(letter, "</think>\\boxed{E}").correct
    inline = items["v1_215"]
    assert grading.grade(inline, "</think>\\boxed{50\\%}").correct  # the option's text
    assert grading.grade(inline, "</think>\\boxed{(C) 50%}").correct
    assert not grading.grade(inline, "</think>\\boxed{40\\%}").correct
    # Several letters: an unordered set match, as the official scorer's sorted lists.
    several = items["v1_1"]
    for right in ("A, C", "C, A", "A,C", "A and C", "\\{A, C\\}"):
        assert grading.grade(several, f"</think>\\boxed{{{right}}}").correct, right
    for wrong in ("A", "C", "A, B", "A, C, D"):
        assert not grading.grade(several, f"</think>\\boxed{{{wrong}}}").correct, wrong
    digit = items["v1_20"]
    assert grading.grade(digit, "</think>\\boxed{3}").correct
    assert not grading.grade(digit, "</think>\\boxed{4}").correct


def test_wrong_layout_raises(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"v1_0": {"pid": 1, "query": "q"}}))
    with pytest.raises(DataError, match=r"dataset\.json"):
        logicvista.load(path, "logicvista")
    path.write_text(json.dumps({"version": 1}))
    with pytest.raises(DataError, match=r"dataset\.json.*not rows keyed by id"):
        logicvista.load(path, "logicvista")


def test_bad_rows_raise(github_layout):
    path = github_layout / "dataset.json"
    path.write_text(json.dumps({"v1_0": dict(ROWS["v1_0"], answer="")}))
    with pytest.raises(DataError, match="'v1_0'.*no answer"):
        logicvista.load(path, "logicvista")
    path.write_text(json.dumps({"v1_0": dict(ROWS["v1_0"], answer="the square")}))
    with pytest.raises(DataError, match="not option letters"):
        logicvista.load(path, "logicvista")
    path.write_text(json.dumps({"v1_9": dict(ROWS["v1_0"], imagename="v1_9.png")}))
    with pytest.raises(DataError, match=r"'v1_9'.*v1_9\.png"):
        logicvista.load(path, "logicvista")
