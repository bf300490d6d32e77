"""MMMU adapter: the HF parquet layout read field by field, and every answer kind graded."""

import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ares_jax.data.records import DataError
from ares_jax.suite import grading, registry
from ares_jax.suite.adapters import mmmu
from ares_jax.suite.items import CHOICE, FLOAT, TEXT

_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="PNG")
    return buf.getvalue()


RED, GREEN, BLUE = _png("red"), _png("green"), _png("blue")


def _row(id_, question, options, answer, qtype, images=(), difficulty="Medium"):
    row = {
        "id": id_,
        "question": question,
        "options": options,
        "explanation": "",
        "img_type": "['Diagrams']",
        "answer": answer,
        "topic_difficulty": difficulty,
        "question_type": qtype,
        "subfield": "Testing",
    }
    for k in range(1, 8):
        data = images[k - 1] if k <= len(images) else None
        row[f"image_{k}"] = None if data is None else {"bytes": data, "path": f"{id_}_{k}.png"}
    return row


def _write(path, rows):
    columns = {}
    for name in rows[0]:
        values = [r[name] for r in rows]
        columns[name] = pa.array(values, type=_IMAGE if name.startswith("image_") else None)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


ROWS = [
    _row(
        "validation_Art_1",
        "Which painting <image 1> matches <image 2>?",
        "['<image 3>', 'Monet', 'Manet']",
        "B",
        "multiple-choice",
        (RED, GREEN, BLUE),
        "Easy",
    ),
    _row("validation_Art_2", "What is shown?", "['cat', 'dog']", "A", "multiple-choice", (RED,)),
    _row(
        "validation_Math_15",
        "Compare <image 2> with <image 1>; is <image 2> larger? Give the ratio.",
        "[]",
        "['24/7', '3.429']",
        "open",
        (RED, GREEN),
        "Hard",
    ),
    _row("validation_Chemistry_25", "Mass in g? <image 1>", "[]", "24.32", "open", (BLUE,)),
    _row("validation_Finance_10", "Value? <image 1>", "[]", "2000000", "open", (BLUE,)),
    _row("validation_Psychology_20", "Which stage? <image 1>", "[]", "embryonic", "open", (RED,)),
    _row("validation_Chemistry_30", "Formula? <image 1>", "[]", "['$MgS$', 'MgS']", "open", (RED,)),
    _row("validation_Physics_21", "Which arrow? <image 1>", "[]", "A", "open", (GREEN,)),
]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmmu")
    _write(str(root / "Art" / "validation-00000-of-00001.parquet"), ROWS[:2])
    _write(str(root / "Science" / "validation-00000-of-00001.parquet"), ROWS[2:])
    # The snapshot's other splits, which a directory load leaves out.
    _write(
        str(root / "Art" / "dev-00000-of-00001.parquet"),
        [_row("dev_Art_1", "q", "[]", "x", "open")],
    )
    test_row = _row("test_Art_1", "q <image 1>", "['a', 'b']", "?", "multiple-choice", (RED,))
    _write(str(root / "Art" / "test-00000-of-00001.parquet"), [test_row])
    return root, {it.id: it for it in mmmu.load(str(root), "mmmu")}


def test_loads_the_validation_split_of_a_snapshot(loaded):
    _, items = loaded
    assert sorted(items) == sorted(r["id"] for r in ROWS)
    assert all(it.benchmark == "mmmu" for it in items.values())
    assert registry.get("mmmu").adapter() is mmmu


def test_multiple_choice_with_images_in_the_options(loaded):
    it = loaded[1]["validation_Art_1"]
    assert it.kind == CHOICE and it.answer == "B"
    assert it.question == "Which painting <image> matches <image>?\nA. <image>\nB. Monet\nC. Manet"
    assert it.images == (RED, GREEN, BLUE)
    assert it.choices == ("<image 3>", "Monet", "Manet")
    assert it.difficulty == "Easy"
    assert it.origin.endswith("validation-00000-of-00001.parquet, row 0")


def test_unreferenced_image_goes_first(loaded):
    it = loaded[1]["validation_Art_2"]
    assert it.question == "<image>\nWhat is shown?\nA. cat\nB. dog"
    assert it.images == (RED,)
    assert it.difficulty == "Medium"


def test_placeholders_in_order_of_appearance_repeats_repeated(loaded):
    it = loaded[1]["validation_Math_15"]
    assert it.question == "Compare <image> with <image>; is <image> larger? Give the ratio."
    assert it.images == (GREEN, RED, GREEN)
    # A list gold: its first entry, the rest accepted too.
    assert (it.kind, it.answer, it.alternatives) == (TEXT, "24/7", ("3.429",))


def test_open_kinds(loaded):
    items = loaded[1]
    assert (items["validation_Chemistry_25"].kind, items["validation_Chemistry_25"].precision) == (
        FLOAT,
        2,
    )
    assert items["validation_Chemistry_25"].answer == "24.32"
    assert items["validation_Chemistry_25"].question == "Mass in g? <image>"
    assert (items["validation_Psychology_20"].kind, items["validation_Psychology_20"].answer) == (
        TEXT,
        "embryonic",
    )
    assert (items["validation_Chemistry_30"].kind, items["validation_Chemistry_30"].answer) == (
        TEXT,
        "$MgS$",
    )
    assert (items["validation_Physics_21"].kind, items["validation_Physics_21"].answer) == (
        TEXT,
        "A",
    )


def _r(answer):
    return f"<think>Let me look at the image.</think>\nThe answer is \\boxed{{{answer}}}."


@pytest.mark.parametrize(
    "item_id, response, correct",
    [
        ("validation_Art_1", "B", True),
        ("validation_Art_1", "(B) Monet", True),
        ("validation_Art_1", "Monet", True),  # the option's text
        ("validation_Art_1", "A", False),
        ("validation_Art_1", "Manet", False),
        ("validation_Chemistry_25", "24.32", True),
        ("validation_Chemistry_25", "24.318", True),  # MMMU rounds both to 2 decimals
        ("validation_Chemistry_25", "24.33", False),
        ("validation_Chemistry_25", "24.3", False),
        ("validation_Finance_10", "2,000,000", True),
        ("validation_Finance_10", "2000000.0", True),
        ("validation_Finance_10", "200000", False),
        ("validation_Psychology_20", "Embryonic", True),
        ("validation_Psychology_20", "fetal", False),
        ("validation_Chemistry_30", "MgS", True),
        ("validation_Chemistry_30", "MgO", False),
        ("validation_Math_15", "\\frac{24}{7}", True),
        ("validation_Math_15", "7/24", False),
        ("validation_Math_15", "3.429", True),  # the list's second gold
        ("validation_Physics_21", "A", True),
        ("validation_Physics_21", "B", False),
    ],
)
def test_grading(loaded, item_id, response, correct):
    verdict = grading.grade(loaded[1][item_id], _r(response))
    assert verdict.how == "boxed"
    assert verdict.correct is correct, verdict


def test_a_test_split_row_without_answer_is_refused(loaded):
    root, _ = loaded
    path = str(root / "Art" / "test-00000-of-00001.parquet")
    with pytest.raises(DataError, match="test-00000-of-00001.parquet, row 0: no answer"):
        mmmu.load(path, "mmmu")


def test_missing_image_of_a_placeholder_is_refused(tmp_path):
    path = _write(str(tmp_path / "v.parquet"), [_row("v_1", "See <image 2>", "[]", "1", "open")])
    with pytest.raises(DataError, match=r"v.parquet, row 0: .*<image 2>"):
        mmmu.load(path, "mmmu")


def test_wrong_layout_names_the_file(tmp_path):
    path = str(tmp_path / "other.parquet")
    pq.write_table(pa.table({"problem": ["1+1?"], "solution": ["2"]}), path)
    with pytest.raises(DataError, match=r"other.parquet, row 0: not in a layout.*MMMU/MMMU"):
        mmmu.load(path, "mmmu")
