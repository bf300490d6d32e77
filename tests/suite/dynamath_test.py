"""DynaMath adapter: the HF per-variant parquet files and the GitHub dataset.json layout, items
grouped by seed question, options parsed from the question, grading of letters, option texts,
floats within DynaMath's 0.001 and text answers, and the worst-case metric against
hand-computed values."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ares_jax.data.records import DataError
from ares_jax.suite import grading, metrics, registry
from ares_jax.suite.adapters import dynamath
from ares_jax.suite.items import CHOICE, FLOAT, TEXT
from ares_jax.suite.metrics import Graded


def _png(seed, variant):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 40, variant * 20, 90)).save(buf, format="PNG")
    return buf.getvalue()


# 3 seeds x 3 variants, as the real seeds 1, 13 and 132 look.
def _seed_rows(variant):
    return [
        dict(
            id="1",
            question="What is the period of this function y = a*sin(b*x)? Answer the question "
            "with a floating-point number.",
            ground_truth=["2.0944", "3.1416", "1.5708"][variant - 1],
            answer_type="float",
            subject="analytic geometry",
            knowledge_level="high school",
        ),
        dict(
            id="13",
            question="Is this a periodic function? Choices: (A) Yes (B) No",
            ground_truth=["A", "B", "A"][variant - 1],
            answer_type="multiple choice",
            subject="algebra",
            knowledge_level="undergraduate",
        ),
        dict(
            id="132",
            question="If the black point is reflected in x-axis, what are the coordinates of its "
            "image? Please answer in the form (_, _)",
            ground_truth=["(0, 6)", "(2, -3)", "(-1, 4)"][variant - 1],
            answer_type="text",
            subject="analytic geometry",
            knowledge_level="elementary school",
        ),
    ]


SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("image", pa.string()),
        ("decoded_image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("ground_truth", pa.string()),
        ("answer_type", pa.string()),
        ("subject", pa.string()),
        ("knowledge_level", pa.string()),
    ]
)


@pytest.fixture
def hf_dir(tmp_path):
    data = tmp_path / "DynaMath_Sample" / "data"
    data.mkdir(parents=True)
    for v in (1, 2, 3):
        rows = [
            dict(r, image=f"image{r['id']}.png",
                 decoded_image={"bytes": _png(int(r["id"]) % 7, v), "path": None})
            for r in _seed_rows(v)
        ]  # fmt: skip
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        pq.write_table(table, data / f"sample_variant{v}-00000-of-00001.parquet")
    return data


@pytest.fixture
def github_trials(tmp_path):
    root = tmp_path / "10trials"
    for v in (1, 2, 3):
        trial = root / f"trial{v}"
        (trial / "image").mkdir(parents=True)
        rows = {}
        for r in _seed_rows(v):
            image = f"image/image{r['id']}.png"
            (trial / image).write_bytes(_png(int(r["id"]) % 7, v))
            rows[r["id"]] = dict(
                question=r["question"],
                answer=r["ground_truth"],
                image=image,
                answer_type=r["answer_type"],
                subject=r["subject"],
                level=r["knowledge_level"],
            )
        (trial / "dataset.json").write_text(json.dumps(rows, indent=4))
    return root


IDS = [f"{s}_v{v}" for v in (1, 2, 3) for s in ("1", "13", "132")]


def _by_id(items):
    return {i.id: i for i in items}


def test_both_layouts_give_the_same_items(hf_dir, github_trials):
    a = _by_id(dynamath.load(hf_dir, "dynamath"))
    b = _by_id(dynamath.load(str(github_trials / "trial*" / "dataset.json"), "dynamath"))
    assert list(a) == IDS and list(b) == IDS
    for key in IDS:
        assert a[key] == b[key]
        seed, variant = key.split("_v")
        assert a[key].group == seed
        assert a[key].images == (_png(int(seed) % 7, int(variant)),)
        assert a[key].benchmark == "dynamath"
    assert "sample_variant2-00000-of-00001.parquet, row 1" in a["13_v2"].origin
    assert "trial2/dataset.json, entry 13" in b["13_v2"].origin

    fl = a["1_v1"]
    assert (fl.kind, fl.answer, fl.tolerance, fl.precision) == (FLOAT, "2.0944", 0.001, None)
    assert fl.question.startswith("<image>\nWhat is the period")
    assert fl.difficulty == "high school"
    mc = a["13_v2"]
    assert (mc.kind, mc.answer, mc.choices) == (CHOICE, "B", ("Yes", "No"))
    assert mc.question == "<image>\nIs this a periodic function?\nChoices:\nA. Yes\nB. No"
    tx = a["132_v1"]
    assert (tx.kind, tx.answer, tx.difficulty) == (TEXT, "(0, 6)", "elementary school")


def test_variants_in_one_file_are_numbered_by_recurrence(tmp_path):
    rows = [
        dict(r, image="", decoded_image={"bytes": _png(1, v), "path": None})
        for v in (1, 2)
        for r in _seed_rows(v)
    ]
    path = tmp_path / "sample_all-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    items = dynamath.load(path, "dynamath")
    assert [i.id for i in items] == ["1_v1", "13_v1", "132_v1", "1_v2", "13_v2", "132_v2"]
    assert [i.answer for i in items if i.group == "13"] == ["A", "B"]


def _box(answer):
    return f"<think>reason</think> \\boxed{{{answer}}}"


@pytest.mark.parametrize(
    "key, response, correct",
    [
        ("1_v1", "2.094", True),  # the three decimals DynaMath asks for
        ("1_v1", "2.0944", True),
        ("1_v1", "2.095", True),  # |2.095 - 2.0944| = 0.0006 <= 0.001
        ("1_v1", "2.0934", True),  # at the bound
        ("1_v1", "2.096", False),  # 0.0016
        ("1_v1", "2.09", False),
        ("1_v2", "3.142", True),
        ("13_v1", "A", True),
        ("13_v1", "(A) Yes", True),
        ("13_v1", "Yes", True),  # the option's text
        ("13_v1", "B", False),
        ("13_v1", "No", False),
        ("132_v1", "(0, 6)", True),
        ("132_v1", "(0,6)", True),
        ("132_v1", "(6, 0)", False),
    ],
)
def test_grading(hf_dir, key, response, correct):
    item = _by_id(dynamath.load(hf_dir, "dynamath"))[key]
    verdict = grading.grade(item, _box(response))
    assert verdict.correct is correct, verdict


def test_worst_case_is_the_metric_and_matches_hand_computed_values(hf_dir):
    benchmark = registry.get("dynamath")
    assert benchmark.scorer() is metrics.worst_case
    items = _by_id(benchmark.load(hf_dir))
    # Sample 0: seed 1 right in all 3 variants, seed 13 wrong in variant 2, seed 132 right in
    # all: 8 of 9 responses right (average 8/9), 2 of 3 seeds right in every variant (2/3).
    wrong0 = {"13_v2"}
    # Sample 1: seed 1 wrong in variant 3, seed 13 wrong in variant 1: 1 of 3 seeds (1/3).
    wrong1 = {"1_v3", "13_v1"}
    graded = [Graded(items[k], 0, k not in wrong0, 100) for k in IDS]
    assert metrics.accuracy(graded) == pytest.approx(8 / 9)
    assert dynamath.score(graded) == pytest.approx(2 / 3)
    graded += [Graded(items[k], 1, k not in wrong1, 100) for k in IDS]
    assert dynamath.score(graded) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert metrics.accuracy(graded) == pytest.approx(15 / 18)


def test_shards_of_one_variant_are_one_variant(tmp_path):
    rows = [dict(r, image="", decoded_image={"bytes": _png(1, 1)}) for r in _seed_rows(1)]
    for shard, part in enumerate((rows[:2], rows[2:])):
        path = tmp_path / f"sample1-0000{shard}-of-00002.parquet"
        pq.write_table(pa.Table.from_pylist(part, schema=SCHEMA), path)
    items = dynamath.load(tmp_path, "dynamath")
    assert [i.id for i in items] == ["1_v1", "13_v1", "132_v1"]


def test_variant_files_whose_ids_are_not_seeds_are_refused(tmp_path):
    for v in (1, 2):
        rows = [
            dict(r, id=f"{r['id']}-{v}", image="", decoded_image={"bytes": _png(1, v)})
            for r in _seed_rows(v)
        ]
        path = tmp_path / f"sample_variant{v}-00000-of-00001.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    with pytest.raises(DataError, match="share no seed question id"):
        dynamath.load(tmp_path, "dynamath")


def test_a_file_in_another_layout_is_refused_naming_it(tmp_path):
    path = tmp_path / "mathvista.parquet"
    pq.write_table(pa.Table.from_pylist([{"pid": "1", "question": "Q", "answer": "2"}]), path)
    with pytest.raises(DataError, match=f"{path}, row 0: no 'id' column.*DynaMath"):
        dynamath.load(path, "dynamath")
