"""`python -m ares_jax.evaluate --benchmark=...` end to end on a tiny random checkpoint: two
benchmarks in their released layouts (GSM8K's JSONL, MMStar's parquet with image bytes), every
response recorded with its verdict, the report in the paper's layout, a rerun that generates
nothing (resumed from the records), and the report rebuilt without a model."""

import io
import json
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.cpu_env import stage_env
from tests.own_model_and_data_test import _checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _png(color) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


def _data(tmp_path: Path) -> tuple[Path, Path]:
    gsm8k = tmp_path / "gsm8k" / "test.jsonl"
    gsm8k.parent.mkdir()
    rows = [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=7\n#### 7"},
        {"question": "What is 1,000 + 234?", "answer": "#### 1,234"},
    ]
    gsm8k.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mmstar = tmp_path / "mmstar.parquet"
    rows = [
        {
            "index": i,
            "question": f"Which color is shown?\nOptions: A: red, B: green, C: {c}",
            "image": {"bytes": _png(color), "path": None},
            "answer": "A",
            "category": "coarse perception",
            "l2_category": "image color",
            "meta_info": {"source": "test"},
        }
        for i, (color, c) in enumerate([((255, 0, 0), "blue"), ((0, 255, 0), "gray")])
    ]
    pq.write_table(pa.Table.from_pylist(rows), mmstar)
    return gsm8k.parent, mmstar


def _evaluate(*args):
    env = stage_env()
    return subprocess.run(
        [sys.executable, "-m", "ares_jax.evaluate", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_benchmarks_from_the_command_line_resume_and_regrade(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    gsm8k, mmstar = _data(tmp_path)
    out = tmp_path / "eval"
    args = (
        "--benchmark=gsm8k,mmstar",
        f"--data={gsm8k},{mmstar}",
        f"--output_dir={out}",
        "--max_new_tokens=6",
        "--prompt_len=256",
        "--temperature=0",
    )
    r = _evaluate(f"--model={ckpt}", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| GSM8K | " in r.stdout and "| MMStar | " in r.stdout
    assert "| ARES-7B (paper) | 65.3 | 65.3 |" in r.stdout  # MMStar alone in Table 2's layout
    lines = [json.loads(x) for x in (out / "responses" / "gsm8k.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["test-0", "test-1"]
    assert [x["answer"] for x in lines] == ["7", "1234"]
    assert all({"response", "extracted", "how", "correct", "length"} <= set(x) for x in lines)
    assert all(0 < x["length"] <= 6 for x in lines)
    report = json.loads((out / "report.json").read_text())
    assert report["benchmarks"]["mmstar"]["items"] == 2
    assert report["benchmarks"]["gsm8k"]["paper"] == {"ARES-7B": 95.7}

    # Everything is recorded: the rerun generates nothing and reports the same.
    before = (out / "responses" / "mmstar.jsonl").read_text()
    r = _evaluate(f"--model={ckpt}", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 of 2 items already answered" in r.stderr
    assert "evaluate: batch" not in r.stderr
    assert (out / "responses" / "mmstar.jsonl").read_text() == before
    assert json.loads((out / "report.json").read_text()) == report

    # No model: the report from the records, regraded.
    r = _evaluate(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["benchmarks"] == report["benchmarks"]

    r = _evaluate(f"--model={ckpt}", "--benchmark=gsm8k,mmstar", f"--data={gsm8k}")
    assert r.returncode != 0 and "give one data path per benchmark" in r.stderr
    r = _evaluate(f"--model={ckpt}", "--benchmark=mmstar", f"--data={gsm8k}")
    assert r.returncode != 0 and "error: mmstar: " in r.stderr and "Traceback" not in r.stderr
