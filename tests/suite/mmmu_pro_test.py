"""MMMU-Pro adapter: the standard (10 options) and vision configs, grading, the overall score."""

import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ares_jax.data.records import DataError
from ares_jax.suite import grading, metrics, registry
from ares_jax.suite.adapters import mmmu_pro
from ares_jax.suite.items import CHOICE

_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
OPTIONS = [f"{v} m" for v in (10, 12, 15, 18, 20, 22, 25, 28, 30, 35)]


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format="PNG")
    return buf.getvalue()


RED, GREEN, SHOT = _png("red"), _png("green"), _png("white")


def _standard_row(id_, question, options, answer, images=()):
    row = {
        "id": id_,
        "question": question,
        "options": str(options),
        "explanation": "",
        "img_type": "['Diagrams']",
        "answer": answer,
        "topic_difficulty": "Hard",
        "subject": "Physics",
    }
    for k in range(1, 8):
        data = images[k - 1] if k <= len(images) else None
        row[f"image_{k}"] = None if data is None else {"bytes": data, "path": None}
    return row


def _write_standard(path, rows):
    columns = {
        name: pa.array([r[name] for r in rows], type=_IMAGE if name.startswith("image_") else None)
        for name in rows[0]
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(columns), path)


def _write_vision(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = pa.table(
        {
            "id": [r[0] for r in rows],
            "image": pa.array([{"bytes": SHOT, "path": f"{r[0]}.png"} for r in rows], _IMAGE),
            "options": pa.array([r[1] for r in rows], pa.list_(pa.string())),
            "answer": [r[2] for r in rows],
            "subject": ["Physics" for _ in rows],
        }
    )
    pq.write_table(table, path)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmmu_pro")
    _write_standard(
        str(root / "standard (10 options)" / "test-00000-of-00002.parquet"),
        [
            _standard_row("test_Physics_1", "How far? <image 1>", OPTIONS, "C", (RED,)),
            _standard_row(
                "test_Art_2",
                "Which one matches <image 1>?",
                ["<image 3>", "<image 2>", "none"],
                "B",
                (RED, GREEN, SHOT),
            ),
        ],
    )
    _write_vision(
        str(root / "vision" / "test-00000-of-00004.parquet"),
        [("test_Physics_1", OPTIONS, "C"), ("test_Art_2", ["x", "y", "none"], "B")],
    )
    # The 4-option config, which a directory load leaves out.
    _write_standard(
        str(root / "standard (4 options)" / "test-00000-of-00001.parquet"),
        [_standard_row("test_Physics_1", "How far? <image 1>", OPTIONS[:4], "C", (RED,))],
    )
    return root


@pytest.fixture(scope="module")
def items(snapshot):
    return {it.id: it for it in mmmu_pro.load(str(snapshot), "mmmu_pro")}


def test_loads_both_configs_of_a_snapshot(items):
    assert sorted(items) == [
        "standard10/test_Art_2",
        "standard10/test_Physics_1",
        "vision/test_Art_2",
        "vision/test_Physics_1",
    ]
    assert all(it.benchmark == "mmmu_pro" and it.kind == CHOICE for it in items.values())
    assert registry.get("mmmu-pro").adapter() is mmmu_pro


def test_standard_item(items):
    it = items["standard10/test_Physics_1"]
    letters = "ABCDEFGHIJ"
    assert it.question == "How far? <image>\n" + "\n".join(
        f"{letters[i]}. {o}" for i, o in enumerate(OPTIONS)
    )
    assert it.images == (RED,)
    assert (it.answer, it.choices) == ("C", tuple(OPTIONS))
    assert (it.group, it.difficulty) == ("standard (10 options)", "Hard")


def test_standard_images_follow_shuffled_placeholders(items):
    it = items["standard10/test_Art_2"]
    assert it.question == "Which one matches <image>?\nA. <image>\nB. <image>\nC. none"
    # image_k is the one its placeholder names, whatever the shuffled order of the options.
    assert it.images == (RED, SHOT, GREEN)


def test_vision_item(items):
    it = items["vision/test_Physics_1"]
    assert it.question == "<image>\n" + mmmu_pro.VISION_PROMPT
    assert it.images == (SHOT,)
    assert (it.answer, it.choices) == ("C", tuple(OPTIONS))
    assert (it.group, it.difficulty) == ("vision", "")


def test_four_option_config_is_told_by_its_path(snapshot):
    path = str(snapshot / "standard (4 options)" / "test-00000-of-00001.parquet")
    (it,) = mmmu_pro.load(path, "mmmu_pro")
    assert (it.id, it.group, it.choices) == (
        "standard4/test_Physics_1",
        "standard (4 options)",
        tuple(OPTIONS[:4]),
    )


@pytest.mark.parametrize(
    "item_id, answer, correct",
    [
        ("standard10/test_Physics_1", "C", True),
        ("standard10/test_Physics_1", "15 m", True),  # the option's text
        ("standard10/test_Physics_1", "J", False),
        ("standard10/test_Physics_1", "12 m", False),
        ("vision/test_Physics_1", "(C)", True),
        ("vision/test_Physics_1", "D", False),
        ("vision/test_Art_2", "B", True),
        ("vision/test_Art_2", "none", False),
    ],
)
def test_grading(items, item_id, answer, correct):
    verdict = grading.grade(items[item_id], f"<think>...</think>\n\\boxed{{{answer}}}")
    assert verdict.how == "boxed"
    assert verdict.correct is correct, verdict


def test_score_is_the_mean_over_settings(items):
    def g(item_id, correct, sample=0):
        return metrics.Graded(items[item_id], sample, correct, 10)

    graded = [
        g("standard10/test_Physics_1", True),
        g("standard10/test_Art_2", True),
        g("vision/test_Physics_1", True),
        g("vision/test_Art_2", False),
    ]
    assert mmmu_pro.score(graded) == pytest.approx((1.0 + 0.5) / 2)
    assert metrics.accuracy(graded) == pytest.approx(0.75)
    # One setting alone: its accuracy.
    assert mmmu_pro.score(graded[2:]) == pytest.approx(0.5)
    assert registry.get("mmmu_pro").scorer() is mmmu_pro.score


def test_wrong_layout_names_the_file(tmp_path):
    path = str(tmp_path / "mmmu_like.parquet")
    pq.write_table(pa.table({"id": ["1"], "prompt": ["q"], "label": ["A"]}), path)
    with pytest.raises(DataError, match=r"mmmu_like.parquet, row 0: not in a layout.*MMMU_Pro"):
        mmmu_pro.load(path, "mmmu_pro")


def test_gold_outside_the_options_is_refused(tmp_path):
    path = str(tmp_path / "standard (10 options)" / "bad.parquet")
    _write_standard(path, [_standard_row("t_1", "q <image 1>", ["a", "b"], "E", (RED,))])
    with pytest.raises(DataError, match=r"bad.parquet, row 0: .*gold 'E'"):
        mmmu_pro.load(path, "mmmu_pro")
