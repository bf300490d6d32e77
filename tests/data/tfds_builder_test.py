"""ArrayRecord builds through tensorflow-datasets, without TensorFlow (tfds_builder.py)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import tensorflow_datasets as tfds

from ares_jax.data import records, synthetic
from ares_jax.data.records import DataError, Example
from ares_jax.data.tfds_builder import TfdsExamples, build_tfds


def test_tensorflow_is_not_installed():
    assert importlib.util.find_spec("tensorflow") is None


def write_jsonl_with_images(tmp_path):
    examples = synthetic.make_examples(6, seed=11)
    (tmp_path / "img").mkdir()
    rows = []
    for i, ex in enumerate(examples):
        (tmp_path / "img" / f"{i}.png").write_bytes(ex.images[0])
        rows.append(
            {
                "id": ex.id,
                "question": ex.question,
                "answer": ex.answer,
                "images": [f"img/{i}.png"],
                "responses": list(ex.traces),
                "pass_rate": i / 8 if i % 2 else None,
            }
        )
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_round_trip_from_files_without_tensorflow(tmp_path):
    path = write_jsonl_with_images(tmp_path)
    expected, _ = records.read_examples(path)
    build = build_tfds("mini", path, tmp_path / "tfds")
    assert build.path == str(tmp_path / "tfds" / "ares_examples" / "mini" / "1.0.0")
    assert build.num_examples == {"train": 6}
    assert build.read_stats["train"].examples == 6
    source = TfdsExamples(build.path)
    assert len(source) == 6
    assert [source[i] for i in range(6)] == expected  # input order kept
    assert source[1].pass_rate == 1 / 8 and source[0].pass_rate is None
    assert "tensorflow" not in sys.modules

    by_name = TfdsExamples("mini", data_dir=str(tmp_path / "tfds"))
    assert by_name[5] == expected[5]
    raw = tfds.data_source("ares_examples/mini", data_dir=str(tmp_path / "tfds"), split="train")
    assert raw[2]["images"][0] == expected[2].images[0]
    shards = [f for f in os.listdir(build.path) if ".array_record" in f]
    assert shards == ["ares_examples-train.array_record-00000-of-00001"]


def test_splits_from_examples_and_reuse(tmp_path):
    train = [Example("a", "q", "1", (b"\x89PNG raw",), "s", ("t",), 0.5, 2), Example("b", "q", "2")]
    val = [Example("c", "q3", "3", difficulty=5)]
    build = build_tfds("mem", {"train": train, "val": val}, tmp_path)
    assert build.num_examples == {"train": 2, "val": 1}
    assert [TfdsExamples(build.path)[i] for i in range(2)] == train
    assert TfdsExamples(build.path, split="val")[0] == val[0]
    with open(os.path.join(build.path, "metadata.json")) as f:
        assert json.load(f)["format_version"] == "1.0.0"

    reused = build_tfds("mem", {"train": train[:1]}, tmp_path)
    assert reused.num_examples == {"train": 2, "val": 1} and reused.read_stats == {}
    rebuilt = build_tfds("mem", {"train": train[:1]}, tmp_path, overwrite=True)
    assert rebuilt.num_examples == {"train": 1}
    with pytest.raises(DataError, match="has no split 'val'"):
        TfdsExamples(rebuilt.path, split="val")


def test_bad_row_raises_and_leaves_no_build(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n{"question": "q"}\n')
    out = tmp_path / "tfds"
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: row has no answer"):
        build_tfds("bad", str(path), out)
    leftovers = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files]
    assert leftovers == []
    with pytest.raises(DataError, match="is not a tfds build directory"):
        TfdsExamples(out / "ares_examples" / "bad" / "1.0.0")

    build = build_tfds("bad", str(path), out, on_error="skip")
    assert build.num_examples == {"train": 1}
    assert build.read_stats["train"].skipped == {"missing_answer": 1}
    with open(os.path.join(build.path, "metadata.json")) as f:
        assert json.load(f)["read_stats/train"]["skipped"] == {"missing_answer": 1}


def test_name_is_validated(tmp_path):
    with pytest.raises(ValueError, match="data set name"):
        build_tfds("bad/name", [Example("a", "q", "1")], tmp_path)


def test_read_in_a_fresh_process(tmp_path):
    build = build_tfds("fresh", synthetic.make_examples(3, seed=0), tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        import tensorflow_datasets as tfds
        ds = tfds.data_source("ares_examples/fresh", data_dir={str(tmp_path)!r}, split="train")
        print(len(ds), ds[2]["id"].decode(), "tensorflow" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3", "synthetic-train-s0-2", "False"]
    assert os.path.isdir(build.path)
