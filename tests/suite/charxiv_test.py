"""CharXiv adapter: the GitHub JSON + images/ layout and the HF parquet, all answer types graded."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ares_jax.data.records import DataError
from ares_jax.suite import grading, registry
from ares_jax.suite.adapters import charxiv
from ares_jax.suite.items import FLOAT, INTEGER, TEXT

_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _jpg(color):
    buf = io.BytesIO()
    Image.new("RGB", (10, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


# figure id: (query, answer, inst_category, qa_source)
DATA = {
    "0": ("Which model shows a greater decline in accuracy?", "Joint-CNN", 1, 1),
    "2": (
        "Identify the densest cluster; top cluster, right cluster, or bottom cluster?",
        "right cluster",
        2,
        3,
    ),
    "5": ("What is the value of the red curve at t=10?", "0.13", 3, 3),
    "7": ("What is the largest tick on the y-axis?", "40,000", 3, 2),
    "8": ("What is the smallest tick on the log-scaled x-axis?", "10^-1", 3, 3),
    "9": ("Which two x-values have equal bars?", "30, 40", 3, 3),
    "11": ("What is the mean of the two peaks?", "2.50", 4, 3),
    "12": ("How many curves cross zero?", "17", 4, 1),
    "13": (" What share does the largest slice have? ", "85.5%", 3, 3),
    "14": ("What is the highest labelled count?", "1e+06", 3, 3),
}
COLOURS = ["red", "green", "blue", "yellow", "white", "black", "gray", "purple", "orange", "pink"]
IMAGES = {fid: _jpg(c) for fid, c in zip(DATA, COLOURS, strict=True)}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("CharXiv")
    (root / "data").mkdir()
    (root / "images").mkdir()
    rows = {
        fid: {"figure_id": int(fid), "query": q, "answer": a, "inst_category": c, "qa_source": s}
        for fid, (q, a, c, s) in DATA.items()
    }
    (root / "data" / "reasoning_val.json").write_text(json.dumps(rows, indent=4))
    # The other files of data/, which a directory load leaves out.
    (root / "data" / "reasoning_test.json").write_text(json.dumps({"1": {"query": "q"}}))
    (root / "data" / "descriptive_val.json").write_text(
        json.dumps({"0": {"figure_id": 0, "qids": [1, 2, 3, 4], "answers": ["a"] * 4}}, indent=4)
    )
    for fid, data in IMAGES.items():
        (root / "images" / f"{fid}.jpg").write_bytes(data)
    return root


@pytest.fixture(scope="module")
def items(repo):
    return {it.id: it for it in charxiv.load(str(repo), "charxiv")}


def test_loads_the_github_layout_from_root_data_dir_or_file(repo, items):
    assert sorted(items) == sorted(DATA)
    for path in (repo / "data", repo / "data" / "reasoning_val.json"):
        assert {it.id: it for it in charxiv.load(str(path), "charxiv")} == items
    assert all(it.benchmark == "charxiv" for it in items.values())
    assert registry.get("charxiv").adapter() is charxiv


def test_fields(items):
    for fid, (query, _, category, _) in DATA.items():
        it = items[fid]
        assert it.images == (IMAGES[fid],)
        assert it.question.startswith(f"<image>\n{query.strip()}\n* ")
        assert it.difficulty == charxiv.ANSWER_TYPES[category]
        assert it.origin.endswith(f"reasoning_val.json, key {fid}")
    assert items["0"].question == (
        "<image>\nWhich model shows a greater decline in accuracy?\n"
        "* Your final answer must be grounded to some text that is explicitly written and "
        "relevant to the question in the chart.\n"
        "* If you need to answer multiple terms, separate them with commas.\n"
        "* Unless specified in the question (such as answering with a letter), you are required "
        "to answer the full names of subplots and/or labels by default."
    )
    assert items["11"].question.endswith(
        "mean of the two peaks?\n* Your final answer must be a number with 2 decimal places."
    )
    assert items["12"].question.endswith("?\n* Your final answer must be an exact integer.")
    assert items["2"].question.split("\n")[2].startswith("* If there are options in the question")
    assert items["5"].question.split("\n")[2].startswith("* Your final answer must be grounded")


def test_kinds(items):
    got = {fid: (it.kind, it.answer, it.precision) for fid, it in items.items()}
    assert got == {
        "0": (TEXT, "Joint-CNN", None),
        "2": (TEXT, "right cluster", None),
        "5": (FLOAT, "0.13", None),
        "7": (INTEGER, "40,000", None),
        "8": (FLOAT, "0.1", None),  # 10^-1 as its decimal value
        "9": (TEXT, "30, 40", None),
        "11": (FLOAT, "2.50", None),
        "12": (INTEGER, "17", None),
        "13": (FLOAT, "85.5%", None),
        "14": (INTEGER, "1000000", None),  # e-notation as its decimal value
    }


@pytest.mark.parametrize(
    "fid, answer, correct",
    [
        ("0", "joint-cnn", True),
        ("0", "LSTM", False),
        ("2", "Right cluster", True),
        ("2", "top cluster", False),
        ("5", "0.13", True),
        ("5", "0.130", True),
        ("5", "0.127", False),  # exact value, as the judge's rule
        ("7", "40000", True),
        ("7", "40,000", True),
        ("7", "40001", False),
        ("8", "10^{-1}", True),
        ("8", "0.1", True),
        ("8", "0.01", False),
        ("9", "30, 40", True),
        ("9", "40, 50", False),
        ("11", "2.5", True),
        ("11", "2.51", False),
        ("12", "17", True),
        ("12", "17.5", False),
        ("13", "85.5\\%", True),
        ("13", "85.5", True),
        ("13", "86", False),
        ("14", "10^6", True),
        ("14", "1e6", True),
        ("14", "1,000,000", True),
        ("14", "100000", False),
    ],
)
def test_grading(items, fid, answer, correct):
    verdict = grading.grade(items[fid], f"<think>Reading the chart.</think>\n\\boxed{{{answer}}}")
    assert verdict.how == "boxed"
    assert verdict.correct is correct, verdict


def _hf_table(rows):
    return pa.table(
        {
            "image": pa.array([{"bytes": r[1], "path": None} for r in rows], _IMAGE),
            "category": ["cs"] * len(rows),
            "year": [20] * len(rows),
            "original_figure_path": ["2004.10956_fig3.jpg"] * len(rows),
            "original_id": ["2004.10956"] * len(rows),
            "figure_path": [f"images/{r[0]}.jpg" for r in rows],
            "num_subplots": [1] * len(rows),
            "subplot_row": [None] * len(rows),
            "subplot_col": [None] * len(rows),
            "subplot_loc": [None] * len(rows),
            **{f"descriptive_q{i}": [1] * len(rows) for i in range(1, 5)},
            **{f"descriptive_a{i}": ["x"] * len(rows) for i in range(1, 5)},
            "reasoning_q": [r[2] for r in rows],
            "reasoning_q_source": [1] * len(rows),
            "reasoning_a": [r[3] for r in rows],
            "reasoning_a_type": [r[4] for r in rows],
        }
    )


def test_hf_parquet(tmp_path, items):
    rows = [(fid, IMAGES[fid], q, a, c) for fid, (q, a, c, _) in DATA.items()]
    pq.write_table(_hf_table(rows), str(tmp_path / "val.parquet"))
    test = [("1", IMAGES["0"], "q", None, 1)]
    pq.write_table(_hf_table(test), str(tmp_path / "test.parquet"))
    got = {it.id: it for it in charxiv.load(str(tmp_path), "charxiv")}
    # The same items as from the GitHub layout (Item equality leaves out the origin).
    assert got == items
    for i, fid in enumerate(DATA):
        assert got[fid].origin.endswith(f"val.parquet, row {i}")
    with pytest.raises(DataError, match=r"test.parquet, row 0: no answer"):
        charxiv.load(str(tmp_path / "test.parquet"), "charxiv")


def test_missing_chart_is_refused(tmp_path):
    (tmp_path / "reasoning_val.json").write_text(
        json.dumps({"4": {"figure_id": 4, "query": "q", "answer": "1", "inst_category": 4}})
    )
    with pytest.raises(DataError, match=r"reasoning_val.json, key 4: chart images/4.jpg"):
        charxiv.load(str(tmp_path), "charxiv")


def test_wrong_layout_names_the_file(repo):
    path = str(repo / "data" / "descriptive_val.json")
    with pytest.raises(DataError, match=r"descriptive_val.json, key 0: not in a layout.*CharXiv"):
        charxiv.load(path, "charxiv")
