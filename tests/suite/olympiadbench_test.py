"""OlympiadBench adapter: Hothan/OlympiadBench's OE_TO_maths_en_COMP parquet and the authors'
JSON, the authors' prompt without its format sentences, answer kinds by answer_type (integer,
LaTeX number, decimal with tolerance and unit, expression, equation, interval, tuple, multiple
answers), and the rejection of the other configs, images, Chinese and proofs."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ares_jax.data.records import DataError
from ares_jax.suite import grading
from ares_jax.suite.adapters import olympiadbench
from ares_jax.suite.items import EXPRESSION, FLOAT, INTEGER
from ares_jax.suite.registry import get

PREAMBLE = "The following is an open-ended problem from an International Math competition. "
REQUEST = (
    "Please calculate the answer according to the given requirements and the information "
    "provided.\n"
)


def _row(id_, question, final, answer_type, *, multiple=False, unit=None, error=None, **kw):
    row = {
        "id": id_,
        "question": question,
        "solution": ["A worked solution."],
        "final_answer": final,
        "context": None,
        "modality": "Text-only",
        "difficulty": "Competition",
        "is_multiple_answer": multiple,
        "unit": unit,
        "answer_type": answer_type,
        "error": error,
        "question_type": "Open-ended",
        "subfield": "Algebra",
        "subject": "Math",
        "language": "English",
    }
    row.update(kw)
    return row


ROWS = [
    _row(1606, "How many solutions?", ["$3$"], "Numerical", subfield="Combinatorics"),
    _row(2231, "Determine the largest constant $C>0$.", ["$\\frac{1}{2}$"], "Numerical"),
    _row(
        2300, "How long is the side?", ["$0.25$"], "Numerical", unit="$\\mathrm{~cm}$", error="1e-2"
    ),
    _row(1709, "Find all triples.", ["$(1,8,19), (2,7,13), (4,5,7)$"], "Tuple", multiple=True),
    _row(2400, "Find $a_n$ in terms of $n$.", ["$2^{n-1}$"], "Expression"),
    _row(2401, "For which $x$ does it hold?", ["$(-\\infty, 2]$"], "Interval"),
    _row(2402, "Find the line.", ["$y=2x+1$"], "Equation"),
    _row(2403, "Find all real roots.", ["$-1, 3$"], "Numerical", multiple=True),
]
_IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _write_parquet(path, rows, images=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    table = pa.table(columns)
    for n in range(1, 6):  # image_1..image_5: null in the text-only configs
        values = [(images or {}).get((i, n)) for i in range(len(rows))]
        table = table.append_column(f"image_{n}", pa.array(values, _IMAGE_TYPE))
    pq.write_table(table, path)
    return path


@pytest.fixture
def loaded(tmp_path):
    path = _write_parquet(tmp_path / "OE_TO_maths_en_COMP" / "train" / "0000.parquet", ROWS)
    return path, get("olympiadbench").load(path.parent)


def test_hub_parquet_fields_and_prompt(loaded):
    path, got = loaded
    assert [i.id for i in got] == [str(r["id"]) for r in ROWS]
    first = got[0]
    assert first.benchmark == "olympiadbench"
    assert first.question == (
        PREAMBLE
        + "The answer of The problem should be a numerical value. "
        + REQUEST
        + "How many solutions?"
    )
    assert (first.answer, first.kind, first.tolerance, first.unit) == ("3", INTEGER, None, "")
    assert (first.images, first.choices) == ((), ())
    assert first.difficulty == "Combinatorics" and got[1].difficulty == "Algebra"
    assert first.origin == f"{path}, row 0"
    kinds = [(i.answer, i.kind, i.tolerance, i.unit) for i in got[1:]]
    assert kinds == [
        ("\\frac{1}{2}", EXPRESSION, None, ""),  # a LaTeX number: math-verify
        ("0.25", FLOAT, 0.01, "cm"),  # the row's error; unit as grading sees it
        ("(1,8,19), (2,7,13), (4,5,7)", EXPRESSION, None, ""),
        ("2^{n-1}", EXPRESSION, None, ""),
        ("(-\\infty, 2]", EXPRESSION, None, ""),
        ("y=2x+1", EXPRESSION, None, ""),
        ("-1, 3", EXPRESSION, None, ""),
    ]
    sentences = {i.id: i.question[len(PREAMBLE) : i.question.index(REQUEST)] for i in got}
    assert sentences["1709"] == ""  # the authors name no type for tuples
    assert sentences["2400"] == "The answer of The problem should be an expression. "
    assert sentences["2401"] == "The answer of The problem should be an interval. "
    assert sentences["2402"] == "The answer of The problem should be an equation. "
    assert sentences["2403"] == (
        "The problem has multiple answers, each of them should be a numerical value. "
    )
    assert "boxed" not in "".join(i.question for i in got)  # no answer-format instruction


@pytest.mark.parametrize(
    "item_id, right, wrong",
    [
        ("1606", ["3", "3.0", "\\frac{6}{2}"], ["4", "3.5"]),
        ("2231", ["\\frac{1}{2}", "0.5", "\\dfrac12"], ["\\frac{1}{3}", "2"]),
        ("2300", ["0.25", "0.259 \\text{ cm}", "0.25\\,\\mathrm{cm}", "0.24"], ["0.261", "0.3"]),
        (
            "1709",
            ["(1,8,19), (2,7,13), (4,5,7)", "(4,5,7),(1,8,19),(2,7,13)"],
            ["(1,8,19), (2,7,13)", "(1,8,19), (2,7,13), (4,5,8)"],
        ),
        ("2400", ["2^{n-1}", "\\frac{2^n}{2}", "a_n = 2^{n-1}"], ["2^n", "2^{n+1}"]),
        ("2401", ["(-\\infty,2]", "(-\\infty, 2]"], ["(-\\infty,2)", "[2,\\infty)"]),
        ("2402", ["y=2x+1", "y = 1 + 2x"], ["y=2x-1"]),
        ("2403", ["-1, 3", "3, -1"], ["3", "-1, 2"]),
    ],
)
def test_grading_each_answer_type(loaded, item_id, right, wrong):
    item = next(i for i in loaded[1] if i.id == item_id)
    for pred in right:
        assert grading.grade(item, f"<think>..</think>\\boxed{{{pred}}}").correct, pred
    for pred in wrong:
        assert not grading.grade(item, f"<think>..</think>\\boxed{{{pred}}}").correct, pred


def test_authors_json_layout(tmp_path):
    # The authors' JSON has these fields only (no image_N, language, subject, ...).
    fields = "id subfield context question solution final_answer is_multiple_answer unit"
    fields += " answer_type error"
    rows = [{k: r[k] for k in fields.split()} for r in ROWS[:2]]
    rows[0]["context"] = "Let $S$ be a set."
    path = tmp_path / "data" / "OE_TO_maths_en_COMP.json"
    path.parent.mkdir()
    path.write_text(json.dumps(rows, indent=2))
    got = olympiadbench.load(path, "olympiadbench")
    assert [(i.id, i.answer, i.kind) for i in got] == [
        ("1606", "3", INTEGER),
        ("2231", "\\frac{1}{2}", EXPRESSION),
    ]
    assert got[0].question.endswith(REQUEST + "Let $S$ be a set.\nHow many solutions?")
    assert got[1].origin == f"{path}, entry 1"


def _png():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_other_sets_are_rejected_naming_the_papers_config(tmp_path):
    multimodal = _write_parquet(
        tmp_path / "OE_MM_maths_en_COMP" / "train" / "0000.parquet", ROWS[:1]
    )
    with pytest.raises(DataError, match="a file of the config OE_MM_maths_en_COMP") as e:
        olympiadbench.load(multimodal, "olympiadbench")
    assert str(multimodal) in str(e.value) and "OE_TO_maths_en_COMP" in str(e.value)
    # An image in a file whose name does not say its config.
    with_image = _write_parquet(
        tmp_path / "mixed.parquet", ROWS[:2], images={(1, 1): {"bytes": _png(), "path": None}}
    )
    with pytest.raises(
        DataError, match=r"mixed.parquet, row 1: the problem has images \(image_1\)"
    ):
        olympiadbench.load(with_image, "olympiadbench")
    marker = tmp_path / "marker.json"
    marker.write_text(json.dumps([_row(1, "See <img_3362> and find x.", ["$1$"], "Numerical")]))
    with pytest.raises(DataError, match="marker.json, entry 0: the problem has images"):
        olympiadbench.load(marker, "olympiadbench")
    chinese = tmp_path / "chinese.jsonl"
    chinese.write_text(json.dumps(_row(1, "求x", ["$1$"], "Numerical", language="Chinese")))
    with pytest.raises(
        DataError, match="chinese.jsonl, line 1: language 'Chinese'.*OE_TO_maths_en_COMP"
    ):
        olympiadbench.load(chinese, "olympiadbench")
    proof = tmp_path / "proof.jsonl"
    proof.write_text(json.dumps(_row(1, "Prove it.", None, None, question_type="Theorem proof")))
    with pytest.raises(DataError, match="proof.jsonl, line 1: a theorem-proving problem"):
        olympiadbench.load(proof, "olympiadbench")


def test_wrong_layout_names_the_file(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"problem": "Q", "answer": "3"}) + "\n")
    with pytest.raises(DataError, match=f"{path}, line 1: none of the columns") as e:
        olympiadbench.load(path, "olympiadbench")
    assert "Hothan/OlympiadBench" in str(e.value)
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"id": 1, "question": "Q", "final_answer": []}) + "\n")
    with pytest.raises(DataError, match=f"{no_answer}, line 1: no final_answer"):
        olympiadbench.load(no_answer, "olympiadbench")
