"""MathVerse adapter: the HF testmini parquet and JSON layouts, the vision-only selection (and
other versions on request), the choices a vision-only problem is graded with (from
question_for_eval, from another version of the problem, else the letters), and grading of
letters, option texts, integers and expressions."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ares_jax.data.records import DataError
from ares_jax.suite import grading, metrics, registry
from ares_jax.suite.adapters import mathverse
from ares_jax.suite.items import CHOICE, EXPRESSION, INTEGER, TEXT


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (5, 5), color).save(buf, format="PNG")
    return buf.getvalue()


GEO = "As shown in the figure, angle A = 80.0, then the size of angle CED is ()"
GEO_FULL = GEO + "\nChoices:\nA:40°\nB:60°\nC:120°\nD:140°"
COT_MC = (
    "According to the question shown in the image, please first conduct reasoning, and then "
    "answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
)
COT_FF = (
    "According to the question shown in the image, please first conduct reasoning, and then "
    "answer the question and provide the final value, e.g., 1, 2.5, 300, at the end."
)


def _row(sample, problem, version, question, answer, qtype, qfe=None, subject="Plane Geometry"):
    folder = "images_version_6" if version == "Vision Only" else "images_version_1-4"
    return {
        "sample_index": str(sample),
        "problem_index": str(problem),
        "problem_version": version,
        "question": question,
        "image": f"{folder}/image_{sample}.png",
        "answer": answer,
        "question_type": qtype,
        "metadata": {"split": "testmini", "source": "GeoQA", "subject": subject,
                     "subfield": "Angle"},
        "query_wo": "...",
        "query_cot": COT_MC if qtype == "multi-choice" else COT_FF,
        "question_for_eval": qfe,
    }  # fmt: skip


ROWS = [
    # Problem 1: text-dominant and vision-only; the vision-only row carries question_for_eval.
    _row(1, 1, "Text Dominant", GEO_FULL, "D", "multi-choice", GEO_FULL),
    _row(5, 1, "Vision Only", "", "D", "multi-choice", GEO_FULL),
    # Problem 2: free-form integer.
    _row(10, 2, "Vision Only", "", "14", "free-form", "Find L.", "Solid Geometry"),
    # Problem 3: free-form with a word label and units in the gold.
    _row(15, 3, "Vision Only", "", "Area $=9 \\pi \\mathrm{cm}^{2}$", "free-form",
         "Find the area."),
    # Problem 4: vision-only without question_for_eval; its Text Lite version lists the options.
    _row(20, 4, "Vision Only", "", "(B)", "multi-choice"),
    _row(17, 4, "Text Lite", "Find x.\nChoices:\nA. Ten\nB. Nine\nC. Eight", "(B)", "multi-choice"),
    # Problem 5: vision-only, its options nowhere in text: the letters stand for them.
    _row(25, 5, "Vision Only", "", "C", "multi-choice"),
    # Problem 6: two letters expected.
    _row(30, 6, "Vision Only", "", "C\nD", "multi-choice",
         "Which two?\nChoices:\nA:a\nB:b\nC:c\nD:d"),
]  # fmt: skip
VISION = ["5", "10", "15", "20", "25", "30"]
PROMPT = "<image>\n" + mathverse.VISION_ONLY_PROMPT


@pytest.fixture
def parquet(tmp_path):
    rows = []
    for r in ROWS:
        r = dict(r, image={"bytes": _png(int(r["sample_index"])), "path": r["image"]})
        rows.append(r)
    path = tmp_path / "testmini.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def json_file(tmp_path):
    root = tmp_path / "MathVerse"
    for r in ROWS:
        (root / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        (root / r["image"]).write_bytes(_png(int(r["sample_index"])))
    path = root / "testmini.json"
    path.write_text(json.dumps(ROWS, ensure_ascii=False))
    return path


def _by_id(items):
    return {i.id: i for i in items}


def test_vision_only_items_in_both_layouts(parquet, json_file):
    a = _by_id(mathverse.load(parquet, "mathverse"))
    b = _by_id(mathverse.load(json_file, "mathverse"))
    assert list(a) == VISION and list(b) == VISION
    for sample in VISION:
        assert a[sample] == b[sample]
        assert a[sample].images == (_png(int(sample)),)
        assert a[sample].question == PROMPT
        assert str(parquet) in a[sample].origin and str(json_file) in b[sample].origin

    mc = a["5"]  # options from its question_for_eval
    assert (mc.kind, mc.answer, mc.choices) == (CHOICE, "D", ("40°", "60°", "120°", "140°"))
    assert mc.difficulty == "Plane Geometry" and mc.benchmark == "mathverse"
    assert (a["10"].kind, a["10"].answer, a["10"].difficulty) == (INTEGER, "14", "Solid Geometry")
    assert (a["15"].kind, a["15"].answer) == (EXPRESSION, "9 \\pi \\mathrm{cm}^{2}")
    # Options from the problem's Text Lite version; "(B)" read as B.
    assert (a["20"].answer, a["20"].choices) == ("B", ("Ten", "Nine", "Eight"))
    assert (a["25"].answer, a["25"].choices) == ("C", ("A", "B", "C", "D", "E"))
    assert (a["30"].kind, a["30"].answer) == (TEXT, "C, D")


def test_other_versions_on_request(parquet):
    (text,) = mathverse.load(parquet, "mathverse", versions=("text_dominant",))
    assert text.id == "1"
    assert text.question == ("<image>\n" + GEO + "\nChoices:\nA. 40°\nB. 60°\nC. 120°\nD. 140°")
    assert (text.answer, text.choices) == ("D", ("40°", "60°", "120°", "140°"))
    everything = mathverse.load(parquet, "mathverse", versions="all")
    assert len(everything) == len(ROWS)
    assert {i.difficulty for i in everything} == {"Text Dominant", "Vision Only", "Text Lite"}


def test_a_file_without_the_version_names_the_versions_it_has(tmp_path):
    path = tmp_path / "testmini_text_lite.parquet"
    row = dict(ROWS[5], image={"bytes": _png(1), "path": "x.png"})
    pq.write_table(pa.Table.from_pylist([row]), path)
    with pytest.raises(DataError, match=r"version\(s\) \['Vision Only'\].*has \['Text Lite'\]"):
        mathverse.load(path, "mathverse")


def _box(answer):
    return f"<think>look at the figure</think> \\boxed{{{answer}}}"


@pytest.mark.parametrize(
    "sample, response, correct",
    [
        ("5", "D", True),
        ("5", "(D)", True),
        ("5", "140°", True),  # the option's text, known from question_for_eval
        ("5", "D: 140°", True),
        ("5", "B", False),
        ("5", "60°", False),
        ("20", "B", True),
        ("20", "Nine", True),
        ("20", "Ten", False),
        ("25", "C", True),
        ("25", "B", False),
        ("25", "C: 120°", True),  # options only in the image: the letter counts, text aside
        ("10", "14", True),
        ("10", "14.0", True),
        ("10", "13", False),
        ("15", "9\\pi", True),
        ("15", "9 \\pi \\text{ cm}^2", True),
        ("15", "3\\pi", False),
        ("30", "C, D", True),
        ("30", "C", False),
    ],
)
def test_grading(parquet, sample, response, correct):
    item = _by_id(mathverse.load(parquet, "mathverse"))[sample]
    verdict = grading.grade(item, _box(response))
    assert verdict.correct is correct, verdict


def test_registry_uses_accuracy():
    assert registry.get("mathverse").scorer() is metrics.accuracy


def test_a_file_in_another_layout_is_refused_naming_it(tmp_path):
    path = tmp_path / "mathvista.jsonl"
    path.write_text(json.dumps({"pid": "1", "question": "Q", "answer": "1"}) + "\n")
    with pytest.raises(DataError, match=f"{path}.*no 'problem_version' column.*MathVerse"):
        mathverse.load(path, "mathverse")


@pytest.mark.parametrize(
    "text, want",
    [
        ("Q?\nChoices:\nA:40°\nB:60°", ("Q?", ["40°", "60°"])),
        ("Q? Choices: (A) yes (B) no", ("Q?", ["yes", "no"])),
        ("Q? choice: (A) (B) (C)", ("Q?", ["A", "B", "C"])),  # drawn options
        ("Which? (A) heap (B) stack (C) tree", ("Which?", ["heap", "stack", "tree"])),
        ("Which group?\nA. Group 1\nB. Group 2", ("Which group?", ["Group 1", "Group 2"])),
        ("Points A, B and C. Find AB.", None),
    ],
)
def test_split_options(text, want):
    assert mathverse.split_options(text) == want


def test_the_json_and_parquet_copies_side_by_side_are_refused(parquet, tmp_path):
    (tmp_path / "testmini.json").write_text(json.dumps(ROWS[1:2]))
    (tmp_path / "images_version_6").mkdir()
    (tmp_path / "images_version_6" / "image_5.png").write_bytes(_png(5))
    with pytest.raises(DataError, match=r"id '5' again \(first at .*testmini.json, entry 0\)"):
        mathverse.load(tmp_path, "mathverse")
