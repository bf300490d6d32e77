"""AIME 2024/2025 adapter: the hub's layouts (HuggingFaceH4, Maxwell-Jia, math-ai, AI-MO,
opencompass, MathArena), the year filter, integer grading and avg@16."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ares_jax.data.records import DataError
from ares_jax.suite import grading, metrics
from ares_jax.suite.adapters import aime
from ares_jax.suite.items import INTEGER
from ares_jax.suite.registry import get


def _parquet(path, columns):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_huggingfaceh4_aime_2024_parquet(tmp_path):
    path = _parquet(
        tmp_path / "data" / "train-00000-of-00001.parquet",
        {
            "id": pa.array([60, 61], pa.int64()),
            "problem": ["Find $x$ such that $x+1=34$.", " How many ways? "],
            "solution": ["Clearly $\\boxed{033}$.", "Count them: $\\boxed{204}$"],
            "answer": ["033", "204"],
            "url": [
                "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_1",
                "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_2",
            ],
            "year": ["2024", "2024"],
        },
    )
    got = get("aime24").load(tmp_path / "data")
    assert [i.id for i in got] == ["60", "61"]
    first = got[0]
    assert first.benchmark == "aime24"
    assert first.question == "Find $x$ such that $x+1=34$."
    assert first.answer == "33"  # "033" as a number
    assert first.kind == INTEGER
    assert (first.images, first.choices, first.precision, first.unit) == ((), (), None, "")
    assert first.origin == f"{path}, row 0"
    assert got[1].question == "How many ways?" and got[1].answer == "204"


def test_maxwell_jia_and_math_ai_layouts(tmp_path):
    maxwell = _parquet(
        tmp_path / "aime_2024_problems.parquet",
        {
            "ID": ["2024-I-1", "2024-II-4"],
            "Problem": ["P one", "P two"],
            "Solution": ["...", "..."],
            "Answer": pa.array([204, 33], pa.int64()),
        },
    )
    got = aime.load(maxwell, "aime24")
    assert [(i.id, i.question, i.answer) for i in got] == [
        ("2024-I-1", "P one", "204"),
        ("2024-II-4", "P two", "33"),
    ]
    # math-ai/aime24: no answer column, the boxed answer in `solution`.
    math_ai = _parquet(
        tmp_path / "test-00000-of-00001.parquet",
        {"id": [0, 1], "problem": ["A", "B"], "solution": ["\\boxed{25}", "7"], "url": ["", ""]},
    )
    assert [(i.id, i.answer) for i in aime.load(math_ai, "aime24")] == [("0", "25"), ("1", "7")]
    # math-ai/aime25: test.jsonl with string ids.
    jsonl = _jsonl(
        tmp_path / "aime25" / "test.jsonl", [{"problem": "Q", "answer": "70", "id": "0"}]
    )
    (item,) = aime.load(jsonl, "aime25")
    assert (item.benchmark, item.id, item.question, item.answer) == ("aime25", "0", "Q", "70")


def test_opencompass_aime2025_two_files_without_ids(tmp_path):
    root = tmp_path / "AIME2025"
    _jsonl(
        root / "aime2025-I.jsonl",
        [{"question": "I.1", "answer": "70"}, {"question": "I.2", "answer": "588"}],
    )
    _jsonl(root / "aime2025-II.jsonl", [{"question": "II.1", "answer": "243"}])
    got = get("aime25").load(root)
    assert [(i.id, i.question, i.answer) for i in got] == [
        ("aime2025-I-1", "I.1", "70"),
        ("aime2025-I-2", "I.2", "588"),
        ("aime2025-II-1", "II.1", "243"),
    ]
    assert got[2].origin == f"{root / 'aime2025-II.jsonl'}, line 1"


def test_repeated_ids_across_files_take_the_file_stem(tmp_path):
    # MathArena's aime_2024_I / aime_2024_II both number their problems from 1.
    for part in ("I", "II"):
        _parquet(
            tmp_path / f"aime_2024_{part}.parquet",
            {"problem_idx": [1, 2], "problem": [f"{part}a", f"{part}b"], "answer": [1, 2]},
        )
    got = aime.load(tmp_path / "*.parquet", "aime24")
    assert [i.id for i in got] == [
        "aime_2024_I-1",
        "aime_2024_I-2",
        "aime_2024_II-1",
        "aime_2024_II-2",
    ]


def test_rows_of_other_years_are_skipped(tmp_path):
    # AI-MO/aimo-validation-aime: AIME 2022-2024, the year in the url.
    url = "https://artofproblemsolving.com/wiki/index.php/{}_AIME_I_Problems/Problem_1"
    path = _parquet(
        tmp_path / "train.parquet",
        {
            "id": [0, 1, 2],
            "problem": ["old", "older", "new"],
            "solution": ["", "", ""],
            "answer": ["1", "2", "3"],
            "url": [url.format(2022), url.format(2023), url.format(2024)],
        },
    )
    assert [i.question for i in aime.load(path, "aime24")] == ["new"]
    with pytest.raises(
        DataError, match=r"no AIME 2025 problem \(its rows are from \[2022, 2023, 2024\]\)"
    ):
        aime.load(path, "aime25")


def test_wrong_layout_and_bad_answers_name_the_file(tmp_path):
    wrong = _jsonl(tmp_path / "other.jsonl", [{"prompt": "Q", "label": "3"}])
    with pytest.raises(DataError, match=f"{wrong}, line 1: none of the columns") as e:
        aime.load(wrong, "aime24")
    assert "HuggingFaceH4/aime_2024" in str(e.value)  # the accepted layouts
    bad = _jsonl(tmp_path / "bad.jsonl", [{"problem": "Q", "answer": "\\frac{1}{2}"}])
    with pytest.raises(DataError, match=f"{bad}, line 1: AIME answer .* not an integer"):
        aime.load(bad, "aime24")
    with pytest.raises(DataError, match="not an integer from 0 to 999"):
        aime.load(_jsonl(tmp_path / "big.jsonl", [{"problem": "Q", "answer": 1000}]), "aime24")


def test_integer_grading(tmp_path):
    path = _jsonl(tmp_path / "aime2025-I.jsonl", [{"question": "Q", "answer": "070"}])
    (item,) = aime.load(path, "aime25")
    for response in (
        "<think>so 70</think>\\boxed{70}",
        "<think>..</think>\\boxed{070}",
        "<think>..</think>The answer is 70.",
        "<think>..</think>\\boxed{70.0}",
        "<think>..</think>\\boxed{\\frac{140}{2}}",
    ):
        assert grading.grade(item, response).correct, response
    for response in (
        "<think>..</think>\\boxed{71}",
        "<think>..</think>\\boxed{70.5}",
        "<think>\\boxed{70}</think>\\boxed{7}",  # the box after the reasoning counts
        "<think>..</think>seventy",
    ):
        assert not grading.grade(item, response).correct, response


def test_avg_at_16_is_the_mean_over_all_samples(tmp_path):
    bench = get("aime24")
    assert bench.samples == 16 and bench.scorer() is metrics.accuracy
    assert getattr(aime, "score", None) is None  # plain accuracy over the 16 samples
    path = _jsonl(
        tmp_path / "aime.jsonl", [{"problem": "A", "answer": "1"}, {"problem": "B", "answer": "2"}]
    )
    a, b = aime.load(path, "aime24")
    # A: samples 0-11 answer 1 (right), 12-15 answer 9; B: samples 0-2 right, the rest wrong.
    graded = []
    for item, right in ((a, 12), (b, 3)):
        for s in range(16):
            answer = item.answer if s < right else "9"
            verdict = grading.grade(item, f"<think>..</think>\\boxed{{{answer}}}")
            graded.append(metrics.Graded(item, s, verdict.correct, 100))
    # avg@16 = mean over problems of (right / 16) = (12/16 + 3/16) / 2 = 15/32.
    assert bench.scorer()(graded) == pytest.approx(15 / 32)
    assert bench.scorer()(graded[:16]) == pytest.approx(0.75)
