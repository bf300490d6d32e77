"""Readers of JSONL, JSON and parquet files (ares_jax/data/records.py)."""

import base64
import io
import json
import os

import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ares_jax.data import records
from ares_jax.data.records import DataError, Example


def png(color=(255, 0, 0), size=(8, 6)) -> bytes:
    buf = io.BytesIO()
    PIL.Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_lines(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    (d / "a.png").write_bytes(png((255, 0, 0)))
    (d / "b.png").write_bytes(png((0, 255, 0)))
    (d / "broken.png").write_bytes(b"this is not an image")
    return d


def test_jsonl_virl_layout_with_relative_paths(tmp_path, image_dir):
    path = write_lines(
        tmp_path / "virl.jsonl",
        [
            {"qid": "q1", "question": "<image>What is x?", "answer": 3, "image": ["images/a.png"]},
            "",
            {
                "problem": "Compare <image> and <image>.",
                "solution": "The left one is longer, so \\boxed{left}.",
                "images": ["images/a.png", str(image_dir / "b.png")],
                "source": "geoqa",
            },
            {"question": "Text only?", "answer": "1/2", "global_id": 77},
        ],
    )
    examples, stats = records.read_examples(path)
    assert examples == [
        Example("q1", "<image>What is x?", "3", (png((255, 0, 0)),)),
        Example(
            "virl.jsonl:3",
            "Compare <image> and <image>.",
            "left",
            (png((255, 0, 0)), png((0, 255, 0))),
            source="geoqa",
        ),
        Example("77", "Text only?", "1/2"),
    ]
    assert (stats.files, stats.rows, stats.examples, stats.skipped) == (1, 3, 3, {})


def test_jsonl_cold_start_layout(tmp_path, image_dir):
    path = write_lines(
        tmp_path / "cold.jsonl",
        [
            {
                "id": "c0",
                "question": "Q?",
                "answer": "2",
                "images": ["images/a.png"],
                "response": "<think> one </think> \\boxed{2}",
                "data_source": "mavis",
                "pass_rate": 0.375,
            },
            {
                "id": "c1",
                "question": "Q2?",
                "answer": "5",
                "traces": ["short \\boxed{5}", "long trace \\boxed{5}"],
                "acc": "1.0",
                "difficulty": 3,
            },
        ],
    )
    examples, _ = records.read_examples(path)
    assert examples[0].traces == ("<think> one </think> \\boxed{2}",)
    assert (examples[0].source, examples[0].pass_rate) == ("mavis", 0.375)
    assert examples[1].traces == ("short \\boxed{5}", "long trace \\boxed{5}")
    assert (examples[1].pass_rate, examples[1].difficulty) == (1.0, 3)


def test_chat_layouts_and_json_array(tmp_path, image_dir):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "<image>How many?"},
                {"role": "assistant", "content": "<think> count </think> \\boxed{\\frac{1}{2}}"},
            ],
            "images": ["images/a.png"],
        },
        {
            "conversations": [
                {"from": "human", "value": "Sum?"},
                {"from": "gpt", "value": "\\boxed{4}"},
            ],
            "answer": "4",
        },
        {
            "prompt": [{"role": "user", "content": "verl question"}],
            "reward_model": {"style": "rule", "ground_truth": "7"},
            "data_source": "verl",
        },
    ]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows))
    examples, _ = records.read_examples(path)
    assert examples[0].question == "<image>How many?"
    assert examples[0].answer == "\\frac{1}{2}"
    assert examples[0].traces == ("<think> count </think> \\boxed{\\frac{1}{2}}",)
    assert examples[0].id == "chat.json:0"
    assert (examples[1].question, examples[1].answer, examples[1].traces) == (
        "Sum?",
        "4",
        ("\\boxed{4}",),
    )
    assert (examples[2].question, examples[2].answer, examples[2].source) == (
        "verl question",
        "7",
        "verl",
    )


def test_base64_and_data_url_images(tmp_path):
    image = png((1, 2, 3), size=(40, 40))
    b64 = base64.b64encode(image).decode()
    path = write_lines(
        tmp_path / "b64.jsonl",
        [
            {"question": "a", "answer": "1", "images": [b64]},
            {"question": "b", "answer": "1", "images": "data:image/png;base64," + b64},
            {"question": "c", "answer": "1", "images": [{"bytes": b64, "path": None}]},
        ],
    )
    examples, _ = records.read_examples(path)
    assert [ex.images for ex in examples] == [(image,)] * 3


def test_parquet_bytes_dicts_and_paths(tmp_path, image_dir):
    red, green = png((255, 0, 0)), png((0, 255, 0))
    table = pa.table(
        {
            "problem": ["p0", "p1", "p2"],
            "answer": ["1", "2", "3"],
            "images": [
                [{"bytes": red, "path": "x.png"}],
                [{"bytes": None, "path": "images/b.png"}, {"bytes": green, "path": None}],
                [],
            ],
            "qid": ["a", "b", "c"],
            "PassRate_7BBase": [0.25, None, 1.0],
        }
    )
    path = tmp_path / "virl.parquet"
    pq.write_table(table, path)
    examples, stats = records.read_examples(path, columns={"pass_rate": "PassRate_7BBase"})
    assert [ex.id for ex in examples] == ["a", "b", "c"]
    assert [ex.images for ex in examples] == [(red,), (green, green), ()]
    assert [ex.pass_rate for ex in examples] == [0.25, None, 1.0]
    assert stats.rows == 3

    binary = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"], "image": [red]}), binary)
    assert records.read_examples(binary)[0][0].images == (red,)


def test_columns_override_rejects_unknown_field(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="unknown field 'nope'"):
        records.read_examples(path, columns={"nope": "x"})


@pytest.mark.parametrize(
    "row, reason, message",
    [
        ('{"question": "q", "answer": ', "malformed_json", "malformed JSON"),
        ('["a list"]', "malformed_json", "expected a JSON object"),
        ({"answer": "1"}, "missing_question", "row has no question"),
        ({"question": "q", "answer": ""}, "missing_answer", "row has no answer"),
        (
            {"question": "q", "answer": "1", "images": ["images/nope.png"]},
            "missing_image",
            "nope.png does not exist",
        ),
        (
            {"question": "q", "answer": "1", "images": ["images/broken.png"]},
            "unreadable_image",
            "broken.png cannot be decoded",
        ),
        ({"question": "q", "answer": "1", "pass_rate": 3}, "bad_field", "outside"),
        # Markers that do not fit the images: the processor would refuse the prompt later.
        (
            {"question": "<image> vs <image>", "answer": "1", "images": ["images/a.png"]},
            "image_marker_mismatch",
            "2 <image> marker.* 1 image",
        ),
        ({"question": "<image> q", "answer": "1"}, "image_marker_mismatch", "0 image"),
        (
            {"question": "q <|image_pad|>", "answer": "1", "images": ["images/a.png"]},
            "image_marker_mismatch",
            "image token",
        ),
        # Image paths must stay in the image root (the data file's directory) ...
        (
            {"question": "q", "answer": "1", "images": ["../outside.png"]},
            "image_outside_root",
            "outside the image root",
        ),
        (
            {"question": "q", "answer": "1", "images": ["images/link.png"]},
            "image_outside_root",
            "outside.png, outside the image root",
        ),
        # ... and name regular files.
        (
            {"question": "q", "answer": "1", "images": ["images"]},
            "image_not_a_file",
            "is not a regular file",
        ),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, image_dir, row, reason, message):
    (tmp_path.parent / "outside.png").write_bytes(png())
    (image_dir / "link.png").symlink_to(tmp_path.parent / "outside.png")
    good = {"question": "fine", "answer": "1"}
    path = write_lines(tmp_path / "bad.jsonl", [good, good, row, good])
    with pytest.raises(DataError, match=rf"bad\.jsonl, line 3: .*{message}") as info:
        records.read_examples(path)
    assert info.value.reason == reason

    examples, stats = records.read_examples(path, on_error="skip")
    assert len(examples) == 3
    assert (stats.rows, stats.examples, stats.skipped) == (4, 3, {reason: 1})
    assert stats.first_errors[0].startswith(f"{path}, line 3: ")


def test_parquet_errors_name_row(tmp_path, image_dir):
    table = pa.table(
        {
            "question": ["q0", "q1", None, "q3"],
            "answer": ["1", "2", "3", "4"],
            "images": [[], ["images/missing.png"], [], ["images/broken.png"]],
        }
    )
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError, match=r"bad\.parquet, row 1: image file .*missing\.png"):
        records.read_examples(path)
    examples, stats = records.read_examples(path, on_error="skip")
    assert [ex.question for ex in examples] == ["q0"]
    assert stats.skipped == {"missing_image": 1, "missing_question": 1, "unreadable_image": 1}
    assert stats.num_skipped == 3
    assert [e.split(": ")[0] for e in stats.first_errors] == [
        f"{path}, row 1",
        f"{path}, row 2",
        f"{path}, row 3",
    ]


def test_markers_place_images_or_images_come_first(tmp_path, image_dir):
    """No marker with N images is legal (the processor puts the images before the text)."""
    path = write_lines(
        tmp_path / "m.jsonl",
        [
            {"question": "Two pictures.", "answer": "1", "images": ["images/a.png"] * 2},
            {"question": "<image> then <image>", "answer": "1", "images": ["images/a.png"] * 2},
        ],
    )
    examples, _ = records.read_examples(path)
    assert [len(ex.images) for ex in examples] == [2, 2]


def test_examples_carry_their_origin(tmp_path, image_dir):
    path = write_lines(tmp_path / "o.jsonl", ["", {"question": "q", "answer": "1"}])
    (example,) = records.read_examples(path)[0]
    assert example.origin == f"{path}, line 2"
    assert example == Example("o.jsonl:2", "q", "1")  # not part of equality
    table = tmp_path / "o.parquet"
    pq.write_table(pa.table({"question": ["a", "b"], "answer": ["1", "2"]}), table)
    assert records.read_examples(table)[0][1].origin == f"{table}, row 1"


def test_absolute_and_escaping_image_paths(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "in.png").write_bytes(png((1, 1, 1)))
    (tmp_path / "elsewhere").mkdir()
    outside = tmp_path / "elsewhere" / "out.png"
    outside.write_bytes(png((2, 2, 2)))
    (data / "images" / "link.png").symlink_to(outside)
    rows = [
        {"question": "in, absolute", "answer": "1", "images": [str(data / "images" / "in.png")]},
        {"question": "in, by ..", "answer": "1", "images": ["images/../images/in.png"]},
        {"question": "absolute", "answer": "1", "images": [str(outside)]},
        {"question": "dotdot", "answer": "1", "images": ["../elsewhere/out.png"]},
        {"question": "symlink", "answer": "1", "images": [{"path": "images/link.png"}]},
    ]
    path = write_lines(data / "d.jsonl", rows)
    with pytest.raises(DataError, match=r"d\.jsonl, line 3: image path .*out\.png.* outside"):
        records.read_examples(path)
    examples, stats = records.read_examples(path, on_error="skip")
    assert [ex.question for ex in examples] == ["in, absolute", "in, by .."]
    assert stats.skipped == {"image_outside_root": 3}
    allowed, _ = records.read_examples(path, allow_absolute_image_paths=True)
    assert [ex.images for ex in allowed] == [(png((1, 1, 1)),)] * 2 + [(png((2, 2, 2)),)] * 3
    # An image root elsewhere: relative paths resolve there, and must stay there.
    examples, stats = records.read_examples(
        path, image_root=tmp_path / "elsewhere", on_error="skip"
    )
    assert [ex.question for ex in examples] == ["absolute", "dotdot"]  # both inside it now
    assert stats.skipped == {"image_outside_root": 1, "missing_image": 2}
    with pytest.raises(DataError, match=r"line 1: image path .*in\.png.* outside"):
        records.read_examples(path, image_root=tmp_path / "elsewhere")


def test_special_and_huge_image_files_are_not_read(tmp_path, monkeypatch):
    """/dev/zero used to be read until memory ran out; a device is refused before reading, even
    where absolute paths are allowed, and no image file is read past the size cap."""
    path = write_lines(
        tmp_path / "dev.jsonl", [{"question": "q", "answer": "1", "images": ["/dev/zero"]}]
    )
    with pytest.raises(DataError, match=r"dev\.jsonl, line 1: image path /dev/zero is not a"):
        records.read_examples(path, allow_absolute_image_paths=True, check_images=False)
    (tmp_path / "big.png").write_bytes(png() + b"\0" * 200)
    monkeypatch.setattr(records, "MAX_IMAGE_FILE_BYTES", 100)
    path = write_lines(
        tmp_path / "big.jsonl", [{"question": "q", "answer": "1", "images": ["big.png"]}]
    )
    with pytest.raises(DataError, match=r"big\.jsonl, line 1: image file .*larger than 100") as e:
        records.read_examples(path, check_images=False)
    assert e.value.reason == "image_too_large"


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_empty_files_are_named(tmp_path, on_error):
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "none.json").write_text("[]")
    pq.write_table(pa.table({"question": pa.array([], pa.string())}), tmp_path / "none.parquet")
    for name in ("blank.jsonl", "none.json", "none.parquet"):
        with pytest.raises(DataError, match=rf"data file .*{name} is empty"):
            records.read_examples(tmp_path / name, on_error=on_error)
        with pytest.raises(DataError, match=rf"{name} is empty"):
            records.read_many([str(tmp_path / name)], on_error=on_error)


def test_a_data_set_empty_after_skipping_names_files_and_counts(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [{"question": "q"}, "{oops"])
    b = write_lines(tmp_path / "b.jsonl", [{"answer": "1"}])
    with pytest.raises(
        DataError,
        match=r"no usable example in .*a\.jsonl, .*b\.jsonl: all 3 row\(s\) were skipped "
        r"\(malformed_json: 1, missing_answer: 1, missing_question: 1\); first: .*a\.jsonl, line 1",
    ):
        records.read_many([a, b], on_error="skip")


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match=r"data file .*absent\.jsonl does not exist"):
        records.read_examples(tmp_path / "absent.jsonl")
    (tmp_path / "x.csv").write_text("question,answer\n")
    with pytest.raises(DataError, match=r"unsupported data file type '\.csv'"):
        records.read_examples(tmp_path / "x.csv")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"cannot read parquet file .*corrupt\.parquet"):
        records.read_examples(tmp_path / "corrupt.parquet")
    (tmp_path / "arr.json").write_text("[{")
    with pytest.raises(DataError, match=r"arr\.json: malformed JSON"):
        records.read_examples(tmp_path / "arr.json")
    with pytest.raises(ValueError, match="on_error"):
        records.read_examples(tmp_path / "arr.json", on_error="ignore")


def test_read_many_glob_and_list(tmp_path):
    write_lines(tmp_path / "b.jsonl", [{"question": "b", "answer": "1"}])
    write_lines(tmp_path / "a.jsonl", [{"question": "a", "answer": "1"}, "{oops"])
    examples, stats = records.read_many(str(tmp_path / "*.jsonl"), on_error="skip")
    assert [ex.question for ex in examples] == ["a", "b"]  # sorted glob
    assert (stats.files, stats.rows, stats.examples, stats.skipped) == (
        2,
        3,
        2,
        {"malformed_json": 1},
    )
    examples, _ = records.read_many(
        [tmp_path / "b.jsonl", str(tmp_path / "a.jsonl")], on_error="skip"
    )
    assert [ex.question for ex in examples] == ["b", "a"]
    with pytest.raises(DataError, match=r"no data file matches .*\*\.parquet"):
        records.read_many(str(tmp_path / "*.parquet"))


def test_write_jsonl_round_trip(tmp_path):
    examples = [
        Example("x", "q", "1", (png(), png((0, 0, 9))), "s", ("t1", "t2"), 0.5, 2),
        Example("y", "q2 ü", "-3"),
    ]
    path = records.write_jsonl(examples, tmp_path / "out.jsonl")
    assert records.read_examples(path)[0] == examples
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_example_coerces_lists_to_tuples():
    ex = Example("i", "q", "a", images=[b"x"], traces=["t"])
    assert ex.images == (b"x",) and ex.traces == ("t",)
    assert hash(ex) == hash(Example("i", "q", "a", (b"x",), traces=("t",)))
