"""Tests of ares_jax/adacs/report.py: the tables hold the hand-computed numbers, the files exist."""

import json

import numpy as np
import PIL.Image

from ares_jax.adacs import curation, report
from ares_jax.adacs.curation import CurationSettings, curate
from ares_jax.data.records import Example


def _trace(n: int, answer: str = "7") -> str:  # n whitespace words
    return "w " * (n - 1) + "\\boxed{" + answer + "}"


def _ex(id_, p, traces, source="a"):
    return Example(id=id_, question="q", answer="7", source=source, traces=traces, pass_rate=p)


def _problems():
    """Source "a": L(0) = median(100, 120) = 110, L(1) = median(40, 60) = 50,
    target(p) = 110 - 60 p. Every problem is eligible (tolerance 0.25)."""
    return [
        _ex("x0", 0.0, [_trace(100), _trace(200, "9")]),
        _ex("x1", 0.0, [_trace(120)]),
        _ex("y0", 1.0, [_trace(40)]),
        _ex("y1", 1.0, [_trace(60)]),
        _ex("z0", 0.5, [_trace(80), _trace(95)]),  # target 80
    ]


def _result(problems, **kw):
    kw.setdefault("per_bracket", 2)
    return curate(problems, CurationSettings(**kw), length_fn=curation.whitespace_length)


def test_bracket_table_single_source():
    table = report.bracket_table(_result(_problems()))
    assert "| a | 110 | 50 | 2 | 2 | - |" in table
    assert "## Brackets" in table and "## Source" not in table
    for row in (
        "| 0 | 0 | 2 | 2 | 2 | 110 | 110 |",
        "| 1 | 1/8 | 0 | 0 | 0 | - | 102.5 |",
        "| 4 | 1/2 | 1 | 1 | 1 | 80 | 80 |",
        "| 8 | 1 | 2 | 2 | 2 | 50 | 50 |",
        "| all | | 5 | 5 | 5 | | |",
    ):
        assert row in table, row


def test_bracket_table_per_source_with_fallback_note():
    problems = _problems() + [_ex("b0", 0.25, [_trace(30)], source="b")]
    table = report.bracket_table(_result(problems))
    assert "## All sources" in table
    assert "## Source `a`" in table and "## Source `b`" in table
    b_line = next(line for line in table.splitlines() if line.startswith("| b |"))
    assert b_line.startswith("| b | 30 | 30 | 1 | 1 | L(0) from bracket 2")
    b_section = table.split("## Source `b`")[1]
    assert "| 2 | 1/4 | 1 | 1 | 1 | 30 | 30 |" in b_section


def test_write_report_files(tmp_path):
    result = _result(_problems())
    paths = report.write_report(result, tmp_path / "out")
    text = open(paths.markdown, encoding="utf-8").read()
    assert "| 0 | 0 | 2 | 2 | 2 | 110 | 110 |" in text
    assert "per_bracket=2" in text and "tolerance=0.25" in text
    assert "problems: 5, selected: 5" in text
    assert "(lengths.png)" in text

    rows = [json.loads(line) for line in open(paths.records, encoding="utf-8")]
    assert [r["id"] for r in rows] == ["x0", "x1", "y0", "y1", "z0"]
    assert rows[0] == {
        "id": "x0",
        "source": "a",
        "pass_rate": 0.0,
        "bracket": 0,
        "target": 110.0,
        "num_traces": 2,
        "num_usable": 1,
        "closest_length": 100,
        "trace_index": 0,
        "chosen_length": 100,
        "eligible": True,
        "selected": True,
        "reason": "",
    }

    with PIL.Image.open(paths.plot) as image:
        assert image.format == "PNG" and image.size == (960, 600)
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn, not blank
    blue = (np.abs(pixels.astype(int) - (31, 119, 180)).sum(-1) < 40).sum()
    assert blue > 200  # the series colour


def test_plot_sizes_and_edge_cases(tmp_path):
    path = report.plot(_result(_problems(), vanilla=True), tmp_path / "v.png", size=(640, 400))
    with PIL.Image.open(path) as image:
        assert image.size == (640, 400)
    # Many sources: the pooled series only; no selection at all: axes only.
    many = [_ex(f"s{i}", i / 8, [_trace(10 + i)], source=f"src{i}") for i in range(9)]
    report.plot(_result(many), tmp_path / "many.png")
    empty = curate([], CurationSettings(), length_fn=len)
    report.plot(empty, tmp_path / "empty.png")
    assert report.bracket_table(empty).count("| - | - |") == 9
    for name in ("many.png", "empty.png"):
        with PIL.Image.open(tmp_path / name) as image:
            assert image.size == (960, 600)


def test_pass_rate_origin_in_the_brackets_and_the_header(tmp_path):
    """Rates given by the data (e.g. ViRL39K's PassRate_7BBase) and estimated ones, per bracket."""
    result = _result(_problems())
    origin = report.PassRateOrigin(
        estimated=frozenset({"x1", "z0"}),
        columns={"PassRate_7BBase": 3},
        estimator="the model being fine-tuned, 8 samples each",
    )
    table = report.bracket_table(result, origin)
    assert "| target length | given | estimated |" in table
    for row in (
        "| 0 | 0 | 2 | 2 | 2 | 110 | 110 | 1 | 1 |",
        "| 1 | 1/8 | 0 | 0 | 0 | - | 102.5 | 0 | 0 |",
        "| 4 | 1/2 | 1 | 1 | 1 | 80 | 80 | 0 | 1 |",
        "| 8 | 1 | 2 | 2 | 2 | 50 | 50 | 2 | 0 |",
        "| all | | 5 | 5 | 5 | | | 3 | 2 |",
    ):
        assert row in table, row
    text = open(report.write_report(result, tmp_path, origin=origin).markdown).read()
    assert (
        "- pass rates: 3 given by the data (rows read per column: `PassRate_7BBase`: 3), "
        "2 estimated by the model being fine-tuned, 8 samples each"
    ) in text
