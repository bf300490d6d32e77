"""WE-MATH adapter: the released layouts, grading of its choice answers, the strict score."""

import io
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ares_jax.data.records import DataError
from ares_jax.suite import grading
from ares_jax.suite.adapters import wemath
from ares_jax.suite.items import CHOICE, Item
from ares_jax.suite.metrics import Graded


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="PNG")
    return buf.getvalue()


def _row(composite, key, number, question, option, answer, image_path):
    return {
        "ID": composite,
        "split": "testmini",
        "knowledge concept": "Area of Circles",
        "question": question,
        "option": option,
        "answer": answer,
        "image_path": image_path,
        "key": key,
        "question number": number,
        "knowledge concept description": "Area of Circles:\n1. ...",
    }


# One two-step and one three-step problem, as data/testmini.json of the release has them (real
# option strings, artefacts included).
ROWS = [
    _row(
        "2steps_1",
        "2steps_1",
        1,
        "OA = ( ) m, AB = ( ) m",
        "A. 300, 400;B. 400, 300;C. 3000, 4000;D. 4000, 3000; E. No correct answer",
        "C",
        "2steps/image/1-1.png",
    ),
    _row(
        "2steps_1",
        "2steps_2",
        361,
        "Is A rotated around O?",
        "A. Yes, A needs to be rotated 90 degrees clockwise around point ;O.;B. Yes, A needs to "
        "be rotated 45 degrees counterclockwise around point ;O.;C. No.; F. No correct answer",
        "B",
        "2steps/image/1-2.png",
    ),
    _row(
        "2steps_1",
        "2steps_multi",
        721,
        "What is the area (  ) m²?",
        "A. 45° B. 60° ;C. 120°; D. No correct answer",
        "C",
        "2steps/image/1-multi.png",
    ),
    _row(
        "3steps_165",
        "3steps_1",
        1081,
        "The radius is ( ) cm",
        "A. 1 cm;B. 1.5 cm;C. 3.14 cm;D. 6.28 cm; E. No correct answer",
        "D",
        "3steps/image/165-1.png",
    ),
    _row(
        "3steps_165",
        "3steps_2",
        1246,
        "Which angle is obtuse?",
        "A. There is an obtuse angle ∠AB;E.; B. There is an obtuse angle ∠AB;C.; C. There is "
        "no obtuse angle.; D. It cannot be determined.; E. No correct answer",
        "B",
        "3steps/image/165-2.png",
    ),
    _row(
        "3steps_165",
        "3steps_3",
        1411,
        "How many?",
        "A. 4 B. 3 C. 2 ;D. 1; E. No correct answer",
        "A",
        "3steps/image/165-3.png",
    ),
    _row(
        "3steps_165",
        "3steps_multi",
        1575,
        "Mary walked 80 steps of 0.628 cm, what is the area of the flower bed (  ) m²?(π = 3.14)",
        "A. 200.96;B. 3215.36;C. 6280;D. 32; E. No correct answer",
        "B",
        "3steps/image/165-multi.png",
    ),
]
COLORS = ["red", "green", "blue", "white", "black", "yellow", "gray"]


@pytest.fixture
def github_layout(tmp_path):
    data = tmp_path / "data"
    for row, color in zip(ROWS, COLORS, strict=True):
        image = data / row["image_path"]
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(_png(color))
    (data / "testmini.json").write_text(json.dumps(ROWS, ensure_ascii=False, indent=4))
    nodes = [{"root0": "Geometry and Figures", "root1": "Measurement", "full node": "M_U_C"}]
    (data / "knowledge_structure_nodes.json").write_text(json.dumps(nodes))
    return data / "testmini.json"


def test_json_layout_items(github_layout):
    got = wemath.load(github_layout, "wemath")
    assert [i.id for i in got] == [
        "2steps_1/1", "2steps_1/2", "2steps_1/multi",
        "3steps_165/1", "3steps_165/2", "3steps_165/3", "3steps_165/multi",
    ]  # fmt: skip
    assert [i.group for i in got] == ["2steps_1"] * 3 + ["3steps_165"] * 4
    assert [i.role for i in got] == [
        "one-step 1", "one-step 2", "two-step",
        "one-step 1", "one-step 2", "one-step 3", "three-step",
    ]  # fmt: skip
    assert [i.difficulty for i in got] == ["one-step"] * 2 + ["two-step"] + ["one-step"] * 3 + [
        "three-step"
    ]
    assert {i.benchmark for i in got} == {"wemath"} and {i.kind for i in got} == {CHOICE}
    first = got[0]
    assert first.question == (
        "<image>\nOA = ( ) m, AB = ( ) m\nA. 300, 400\nB. 400, 300\nC. 3000, 4000\n"
        "D. 4000, 3000\nE. No correct answer"
    )
    assert first.answer == "C" and first.images == (_png("red"),)
    assert first.origin.endswith("testmini.json, entry 0")
    # ";O." artefacts undone; the skipped label F is relettered D.
    assert got[1].choices == (
        "Yes, A needs to be rotated 90 degrees clockwise around point O.",
        "Yes, A needs to be rotated 45 degrees counterclockwise around point O.",
        "No.",
        "No correct answer",
    )
    assert got[1].answer == "B"
    assert got[2].choices == ("45°", "60°", "120°", "No correct answer")
    assert got[4].choices == (
        "There is an obtuse angle ∠ABE.",
        "There is an obtuse angle ∠ABC.",
        "There is no obtuse angle.",
        "It cannot be determined.",
        "No correct answer",
    )
    assert got[5].choices == ("4", "3", "2", "1", "No correct answer")
    assert got[6].choices[1] == "3215.36" and got[6].images == (_png("gray"),)
    # The data/ folder: knowledge_structure_nodes.json beside it is not read.
    assert wemath.load(github_layout.parent, "wemath") == got


def test_parquet_layout_with_image_structs(tmp_path):
    rows = []
    for row, color in zip(ROWS, COLORS, strict=True):
        rows.append(dict(row, image_path={"bytes": _png(color), "path": row["image_path"]}))
    path = tmp_path / "testmini-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    got = wemath.load(tmp_path, "wemath")
    assert len(got) == 7 and got[3].images == (_png("white"),)
    assert got[3].origin.endswith("parquet, row 3") and got[3].id == "3steps_165/1"


def test_parse_options_skipped_label():
    assert wemath.parse_options("A. 8;B. 12;C. 16;D. 24 ;E. 48; F. No correct answer") == [
        ("A", "8"), ("B", "12"), ("C", "16"), ("D", "24"), ("E", "48"), ("F", "No correct answer")
    ]  # fmt: skip
    assert wemath.parse_options("no labels") == []


def test_grading(github_layout):
    got = {i.id: i for i in wemath.load(github_layout, "wemath")}
    multi = got["3steps_165/multi"]
    assert grading.grade(multi, "<think>80 steps</think>\\boxed{B}").correct
    assert grading.grade(multi, "</think> The answer is \\boxed{(B)}").correct
    assert grading.grade(multi, "</think>\\boxed{3215.36}").correct  # the option's text
    assert grading.grade(multi, "</think>\\boxed{B. 3215.36}").correct
    assert not grading.grade(multi, "</think>\\boxed{A}").correct
    assert not grading.grade(multi, "</think>\\boxed{200.96}").correct
    assert not grading.grade(multi, "</think>\\boxed{E}").correct
    relettered = got["2steps_1/2"]
    assert grading.grade(relettered, "</think>\\boxed{B}").correct
    v = grading.grade(relettered, "</think>\\boxed{No correct answer}")
    assert not v.correct and v.normalised == "D"
    assert grading.grade(got["2steps_1/multi"], "</think>\\boxed{120°}").correct


def _items():
    """Seven composite problems whose verdicts cover CM, IG, IK and RM, loose and strict."""
    out = []
    for name, steps in (("P1", 2), ("P2", 2), ("P3", 2), ("P4", 2), ("Q1", 3), ("Q2", 3),
                        ("Q3", 3)):  # fmt: skip
        roles = [f"one-step {k}" for k in range(1, steps + 1)] + [wemath.STEPS[steps]]
        for role in roles:
            out.append(
                Item(
                    "wemath",
                    f"{name}/{role}",
                    "<image>\nq",
                    "A",
                    CHOICE,
                    (b"x",),
                    ("a", "b"),
                    group=name,
                    role=role,
                )  # fmt: skip
            )
    return out


# Verdicts (one-step..., multi-step) and what they are:
VERDICTS = {
    "P1": (1, 1, 1),  # CM (strict and loose)
    "P2": (1, 1, 0),  # IG
    "P3": (1, 0, 0),  # IK
    "P4": (1, 0, 1),  # RM strict, CM loose
    "Q1": (0, 0, 0, 1),  # RM (strict and loose)
    "Q2": (1, 1, 1, 1),  # CM
    "Q3": (0, 1, 1, 0),  # IK
}


def _graded(verdicts, sample=0):
    out = []
    for item in _items():
        roles = [r for r in (i.role for i in _items() if i.group == item.group)]
        out.append(Graded(item, sample, bool(verdicts[item.group][roles.index(item.role)]), 10))
    return out


def test_strict_score_hand_computed():
    graded = _graded(VERDICTS)
    # N = 7: IK = 2 (P3, Q3), IG = 1 (P2), CM strict = 2 (P1, Q2), RM strict = 2 (P4, Q1);
    # loose: CM = 3 (P1, P4, Q2), RM = 1 (Q1).
    # Strict score = (525-style) (N - 0.5 IG - RM - IK) / N = (7 - 0.5 - 2 - 2) / 7 = 2.5 / 7.
    assert wemath.score(graded) == pytest.approx(2.5 / 7)
    d = wemath.dimensions(graded)
    assert (d["N"], d["IK"], d["IG"], d["CM_strict"], d["RM_strict"]) == (7, 2, 1, 2, 2)
    assert (d["CM_loose"], d["RM_loose"]) == (3, 1)
    assert d["score_loose"] == pytest.approx((7 - 0.5 - 1 - 2) / 7)
    assert d["RM_strict_rate"] == pytest.approx(2 / 4)  # RM over CM + RM, as the official rates
    assert d["RM_loose_rate"] == pytest.approx(1 / 4)
    assert d["IK_rate"] == pytest.approx(2 / 7) and d["CM_strict_rate"] == pytest.approx(2 / 7)
    # The report carries the four dimensions beside the score (registry `details`).
    from ares_jax.suite import registry

    assert registry.get("wemath").details(graded) == d


def test_strict_score_samples_and_incomplete_groups():
    all_right = {k: (1,) * len(v) for k, v in VERDICTS.items()}
    graded = _graded(VERDICTS, sample=0) + _graded(all_right, sample=1)
    assert wemath.score(graded) == pytest.approx((2.5 / 7 + 1.0) / 2)
    # A composite problem missing its multi-step row is left out: P2 (IG) goes, N = 6.
    partial = [g for g in _graded(VERDICTS) if g.item.id != "P2/two-step"]
    assert wemath.score(partial) == pytest.approx(2 / 6)
    assert math.isnan(wemath.score([]))
    with pytest.raises(ValueError, match="twice"):
        wemath.score(_graded(VERDICTS) + _graded(VERDICTS)[:1])


def test_score_of_loaded_items(github_layout):
    got = wemath.load(github_layout, "wemath")
    responses = ["C", "A", "C", "D", "B", "A", "B"]  # 2-step: one sub-problem wrong, multi right
    graded = [
        Graded(i, 0, grading.grade(i, f"</think>\\boxed{{{r}}}").correct, 5)
        for i, r in zip(got, responses, strict=True)
    ]
    # 2steps_1: RM (strict); 3steps_165: CM. (1 + 0) / 2.
    assert wemath.score(graded) == pytest.approx(0.5)


def test_wrong_layout_raises(tmp_path):
    path = tmp_path / "testmini.json"
    path.write_text(json.dumps([{"pid": "1", "question": "q", "answer": "A"}]))
    with pytest.raises(DataError, match=r"testmini\.json"):
        wemath.load(path, "wemath")
    bad_key = dict(ROWS[0], key="4steps_1")
    path.write_text(json.dumps([bad_key]))
    with pytest.raises(DataError, match="key '4steps_1'"):
        wemath.load(path, "wemath")


def test_missing_image_names_the_row(github_layout):
    (github_layout.parent / "2steps/image/1-2.png").unlink()
    with pytest.raises(DataError, match=r"testmini\.json, entry 1.*1-2\.png"):
        wemath.load(github_layout, "wemath")
