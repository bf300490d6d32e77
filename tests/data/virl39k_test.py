"""The ViRL39K layout through records.py and pipeline.py: pass-rate columns, images by relative
path and by bytes struct, directories and globs as data paths, the `columns` mapping."""

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ml_collections import config_dict

from ares_jax.data import pipeline, records
from ares_jax.data.records import DataError
from tests.data.virl39k import ROWS, write_virl39k


@pytest.fixture
def virl(tmp_path):
    directory = tmp_path / "virl39k"
    path, files = write_virl39k(directory)
    return directory, path, files


def test_virl39k_parquet_reads_questions_answers_pass_rates_and_images(virl):
    directory, path, files = virl
    examples, stats = records.read_examples(path)
    assert [e.id for e in examples] == ["q0", "q1", "q2"]
    assert [e.question for e in examples] == [r[1] for r in ROWS]
    assert [e.answer for e in examples] == ["3", "B", "12"]  # \boxed{3} reduced
    assert [e.source for e in examples] == ["geoqa", "chartqa", "chartqa"]
    # PassRate_7BBase wins; a row whose 7B rate is null takes PassRate_32BTrained.
    assert [e.pass_rate for e in examples] == [0.25, 0.5, 1.0]
    assert stats.columns["pass_rate"] == {"PassRate_7BBase": 2, "PassRate_32BTrained": 1}
    assert stats.columns["images"] == {"image": 3} and stats.columns["id"] == {"qid": 3}
    assert "traces" not in stats.columns and all(e.traces == () for e in examples)
    # Images by relative path, resolved against the data file's directory, bytes as on disk.
    assert examples[0].images == (files["images/geo_0.png"],)
    assert examples[1].images == (files["images/chart_1.jpg"], files["images/grey_2.png"])
    assert examples[2].images == (files["images/wide_3.png"],)


def test_pass_rate_column_can_be_chosen(virl):
    _, path, _ = virl
    examples, stats = records.read_examples(path, columns={"pass_rate": "PassRate_32BTrained"})
    assert [e.pass_rate for e in examples] == [0.75, 0.5, None]
    assert stats.columns["pass_rate"] == {"PassRate_32BTrained": 2}


def test_hf_image_structs_with_bytes_and_with_paths(tmp_path):
    path, files = write_virl39k(tmp_path / "hf", structs=True)
    examples, _ = records.read_examples(path)
    assert examples[0].images == (files["images/geo_0.png"],)  # bytes
    # First struct with bytes, the second with bytes null: read from its relative path.
    assert examples[1].images == (files["images/chart_1.jpg"], files["images/grey_2.png"])


def test_image_root_resolves_relative_paths(tmp_path):
    path, files = write_virl39k(tmp_path / "data")
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (tmp_path / "data" / "images").rename(moved / "images")
    with pytest.raises(DataError, match="does not exist"):
        records.read_examples(path)
    examples, _ = records.read_examples(path, image_root=moved)
    assert examples[0].images == (files["images/geo_0.png"],)


def test_image_list_written_as_a_string(tmp_path):
    write_virl39k(tmp_path)
    table = pa.table(
        {
            "question": ["<image>x?", "<image><image>y?"],
            "answer": ["1", "2"],
            "image": ["['images/geo_0.png']", '["images/geo_0.png", "images/grey_2.png"]'],
        }
    )
    pq.write_table(table, tmp_path / "s.parquet")
    examples, _ = records.read_examples(tmp_path / "s.parquet")
    assert [len(e.images) for e in examples] == [1, 2]


def test_directory_means_its_data_files_sorted(tmp_path):
    directory = tmp_path / "virl39k"
    write_virl39k(directory, name="b.parquet")
    write_virl39k(directory, name="a.parquet", structs=True)
    (directory / "README.md").write_text("not data")
    (directory / ".hidden.jsonl").write_text("{}\n")
    nested = directory / "extra"
    nested.mkdir()
    write_virl39k(nested, name="c.parquet")
    assert records.expand_paths(directory) == [
        str(directory / "a.parquet"),
        str(directory / "b.parquet"),
    ]
    examples, stats = records.read_many(str(directory))
    assert len(examples) == 6 and stats.files == 2
    assert [e.origin.split(",")[0] for e in examples[::3]] == [
        str(directory / "a.parquet"),
        str(directory / "b.parquet"),
    ]
    # The pipeline's files source takes the directory too.
    source = pipeline.example_source({"kind": "files", "paths": str(directory)})
    assert len(source) == 6
    # Nested files: a ** glob.
    assert records.expand_paths(str(directory / "**" / "*.parquet")) == [
        str(directory / "a.parquet"),
        str(directory / "b.parquet"),
        str(nested / "c.parquet"),
    ]


def test_patterns_and_directories_without_data_are_named(tmp_path):
    pattern = str(tmp_path / "missing-*.parquet")
    with pytest.raises(DataError, match=re.escape(f"no data file matches {pattern}")):
        records.expand_paths(pattern)
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    with pytest.raises(
        DataError, match=re.escape(f"directory {empty} holds no .jsonl, .json, .parquet")
    ):
        records.read_many(str(empty))


def test_columns_mapping_from_a_config_dict(tmp_path):
    """`data.columns` is a ConfigDict of field -> column (None = default lookup)."""
    write_virl39k(tmp_path)
    table = pa.table({"problem_text": ["<image>x?"], "gt": ["4"], "image": [["images/geo_0.png"]]})
    pq.write_table(table, tmp_path / "renamed.parquet")
    columns = config_dict.ConfigDict(
        {"question": "problem_text", "answer": "gt", "traces": config_dict.placeholder(str)}
    )
    spec = pipeline.FilesSpec(paths=(str(tmp_path / "renamed.parquet"),), columns=columns)
    assert spec.columns == (("answer", "gt"), ("question", "problem_text"))
    source = pipeline.example_source(spec)
    assert (source[0].question, source[0].answer) == ("<image>x?", "4")
    assert source.read_stats.columns["question"] == {"problem_text": 1}


def test_unknown_field_in_columns_is_named():
    with pytest.raises(ValueError, match=r"unknown field 'prompt_text'.*known fields: answer"):
        pipeline.FilesSpec(paths=("x.jsonl",), columns={"prompt_text": "q"})
    with pytest.raises(ValueError, match=r"columns\['answer'\] must be a column name"):
        records.column_overrides({"answer": 3})
    assert records.column_names("traces", {"traces": "cot_text"}) == ("cot_text",)


def test_file_columns_reads_no_rows(virl, tmp_path):
    _, path, _ = virl
    assert "PassRate_7BBase" in records.file_columns(path)
    (tmp_path / "a.jsonl").write_text('{"question": "q", "answer": "1", "cot": "x"}\n')
    assert records.file_columns(tmp_path / "a.jsonl") == ("question", "answer", "cot")
