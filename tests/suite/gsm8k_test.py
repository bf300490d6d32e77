"""GSM8K adapter: openai/gsm8k's main/ parquet files and the authors' test.jsonl, the gold after
'####', the training file skipped, and integer grading."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ares_jax.data.records import DataError
from ares_jax.suite import grading
from ares_jax.suite.adapters import gsm8k
from ares_jax.suite.items import FLOAT, INTEGER
from ares_jax.suite.registry import get

QUESTIONS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May?",
    "A house costs $1,250 per month. How much is a year?",
    "The temperature fell by 3 degrees below zero. What is it?",
]
ANSWERS = [
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
    "altogether in April and May.\n#### 72",
    "12 * 1250 = <<12*1250=15000>>15000\n#### 15,000",
    "It is <<0-3=-3>>-3\n#### -3",
]


@pytest.fixture
def main_dir(tmp_path):
    main = tmp_path / "main"
    main.mkdir()
    pq.write_table(
        pa.table({"question": QUESTIONS, "answer": ANSWERS}), main / "test-00000-of-00001.parquet"
    )
    pq.write_table(
        pa.table({"question": ["train q"], "answer": ["#### 1"]}),
        main / "train-00000-of-00001.parquet",
    )
    return main


def test_hub_parquet_directory_skips_the_training_file(main_dir):
    got = get("gsm8k").load(main_dir)
    assert [i.id for i in got] == ["test-0", "test-1", "test-2"]
    first = got[0]
    assert first.benchmark == "gsm8k"
    assert first.question == QUESTIONS[0]
    assert first.answer == "72"
    assert first.kind == INTEGER
    assert (first.images, first.choices, first.precision, first.unit) == ((), (), None, "")
    assert first.origin == f"{main_dir / 'test-00000-of-00001.parquet'}, row 0"
    assert [i.answer for i in got] == ["72", "15000", "-3"]  # commas removed
    with pytest.raises(DataError, match="only training files"):
        gsm8k.load(main_dir / "train-00000-of-00001.parquet", "gsm8k")


def test_authors_jsonl_and_a_decimal_gold(tmp_path):
    path = tmp_path / "test.jsonl"
    rows = [
        {"question": QUESTIONS[0], "answer": ANSWERS[0]},
        {"question": "Q", "answer": "#### 2.50"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = gsm8k.load(path, "gsm8k")
    assert [(i.id, i.answer, i.kind) for i in got] == [
        ("test-0", "72", INTEGER),
        ("test-1", "2.50", FLOAT),
    ]
    assert got[1].origin == f"{path}, line 2"
    assert grading.grade(got[1], "\\boxed{2.5}").correct
    assert not grading.grade(got[1], "\\boxed{2.6}").correct


def test_integer_grading(main_dir):
    natalia, house, cold = gsm8k.load(main_dir, "gsm8k")
    right = {
        natalia: [
            "<think>24+48</think>\\boxed{72}",
            "<think>..</think>The answer is 72.",
            "\\boxed{72.0}",
        ],
        house: ["<think>..</think>\\boxed{15,000}", "\\boxed{\\$15000}", "\\boxed{15000}"],
        cold: ["\\boxed{-3}", "\\boxed{-3^\\circ}"],
    }
    wrong = {
        natalia: [
            "\\boxed{24}",
            "\\boxed{72.5}",
            "<think>\\boxed{72}</think>\\boxed{73}",
            "no answer",
        ],
        house: ["\\boxed{1250}", "\\boxed{15}"],
        cold: ["\\boxed{3}"],
    }
    for item, responses in right.items():
        for r in responses:
            assert grading.grade(item, r).correct, (item.answer, r)
    for item, responses in wrong.items():
        for r in responses:
            assert not grading.grade(item, r).correct, (item.answer, r)


def test_wrong_layout_names_the_file(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"problem": "Q", "solution": "3"}) + "\n")
    with pytest.raises(DataError, match=f"{path}, line 1: none of the columns") as e:
        gsm8k.load(path, "gsm8k")
    assert "openai/gsm8k" in str(e.value)
    no_marker = tmp_path / "no_marker.jsonl"
    no_marker.write_text(json.dumps({"question": "Q", "answer": "the answer is three"}) + "\n")
    with pytest.raises(DataError, match=f"{no_marker}, line 1: the answer does not end in '####"):
        gsm8k.load(no_marker, "gsm8k")
