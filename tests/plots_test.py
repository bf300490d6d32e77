"""Tests for ares_jax/plots.py: PNG sizes, gaps in lines, bar heights and error bars, colors."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.container import BarContainer
from matplotlib.path import Path as MplPath
from PIL import Image

from ares_jax import plots

ROOT = Path(__file__).resolve().parents[1]

GROUPS = {
    "easy": {"base": (0.8, 0.05), "AEPO": (0.9, None), "AdaCS": (0.85, 0.02)},
    "medium": {"base": (0.5, 0.1), "AEPO": (0.7, math.nan), "AdaCS": (0.6, None)},
    "hard": {"base": (0.2, 0.0), "AEPO": (0.4, None)},  # AdaCS has no value here
}


def _bars(fig) -> dict[str, BarContainer]:
    (ax,) = fig.axes
    return {c.get_label(): c for c in ax.containers if isinstance(c, BarContainer)}


def _legend(fig) -> list[str]:
    (legend,) = fig.legends
    return [t.get_text() for t in legend.get_texts()]


@pytest.mark.parametrize("size, pixels", [(None, (640, 400)), ((3.2, 2.4), (320, 240))])
def test_each_chart_writes_a_png_of_size_times_dpi(tmp_path, size, pixels):
    kw = {} if size is None else {"size": size}
    assert plots.DPI == 100
    line = plots.line_chart(
        tmp_path / "line.png", {"a": ([0, 1, 2], [0.0, 1.0, 0.5])}, title="t", ylabel="y", **kw
    )
    bar = plots.bar_chart(tmp_path / "bar.png", GROUPS, title="t", ylabel="accuracy", **kw)
    assert line == tmp_path / "line.png" and bar == tmp_path / "bar.png"
    for path in (line, bar):
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size == pixels


def test_line_chart_draws_each_series_in_its_color(tmp_path):
    path = plots.line_chart(tmp_path / "c.png", {"hard": ([0, 1, 2], [0.0, 1.0, 0.5])}, title="t")
    pixels = np.asarray(Image.open(path).convert("RGB"))
    rgb = tuple(int(plots.series_colors(["hard"])["hard"][i : i + 2], 16) for i in (1, 3, 5))
    assert np.all(pixels == rgb, axis=-1).sum() > 100  # the line and its markers


def test_a_missing_value_breaks_the_line_and_is_kept_as_nan():
    fig = plots.line_figure(
        {
            "gaps": ([0, 1, 2, 3, 4, 5], [0.0, 1.0, float("nan"), 2.0, None, 3.0]),
            "inf": ([0, 1, 2], [1.0, float("inf"), 2.0]),
        },
        title="t",
        ylabel="y",
    )
    (ax,) = fig.axes
    gaps, inf = ax.get_lines()
    assert len(ax.get_lines()) == 2
    np.testing.assert_array_equal(gaps.get_xdata(), [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(gaps.get_ydata(), [0.0, 1.0, np.nan, 2.0, np.nan, 3.0])
    np.testing.assert_array_equal(inf.get_ydata(), [1.0, np.nan, 2.0])  # a gap, not off the axes
    # What is drawn: a new stroke (MOVETO) after each gap, so no point is drawn as 0 or joined
    # across a gap; 3.0 stands alone between a gap and the end (its marker shows it).
    drawn = gaps.get_path().cleaned(remove_nans=True)
    codes = [c for _, c in drawn.iter_segments(simplify=False)]
    assert codes.count(MplPath.MOVETO) == 3
    points = [tuple(v) for v, c in drawn.iter_segments(simplify=False) if c != MplPath.STOP]
    assert points == [(0, 0), (1, 1), (3, 2), (5, 3)]
    assert gaps.get_marker() == "o"
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("step", "y", "t")
    assert _legend(fig) == ["gaps", "inf"]


def test_line_chart_rejects_xs_and_ys_of_different_lengths(tmp_path):
    with pytest.raises(ValueError, match="3 xs but 2 ys"):
        plots.line_chart(tmp_path / "c.png", {"a": ([0, 1, 2], [0.0, 1.0])}, title="t")


def test_bar_heights_and_error_bars_equal_the_inputs():
    fig = plots.bar_figure(GROUPS, title="per difficulty", ylabel="accuracy", xlabel="difficulty")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["easy", "medium", "hard"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("difficulty", "accuracy")
    assert _legend(fig) == ["base", "AEPO", "AdaCS"]  # by first appearance
    bars = _bars(fig)
    assert list(bars) == ["base", "AEPO", "AdaCS"]
    heights = {arm: [r.get_height() for r in c] for arm, c in bars.items()}
    assert heights["base"] == pytest.approx([0.8, 0.5, 0.2])
    assert heights["AEPO"] == pytest.approx([0.9, 0.7, 0.4])
    assert heights["AdaCS"][:2] == pytest.approx([0.85, 0.6])
    assert math.isnan(heights["AdaCS"][2])  # no value: no bar

    def error_bars(arm):
        """[n, 3]: (x, low, high) of each error bar drawn for the arm."""
        (lines,) = bars[arm].errorbar.lines[2]
        return np.array([(s[0][0], s[0][1], s[1][1]) for s in lines.get_segments() if len(s)])

    centers = {arm: [r.get_x() + r.get_width() / 2 for r in c] for arm, c in bars.items()}
    np.testing.assert_allclose(
        error_bars("base"), np.c_[centers["base"], [0.75, 0.4, 0.2], [0.85, 0.6, 0.2]]
    )
    assert bars["AEPO"].errorbar is None  # None and NaN spreads: no error bar at all
    # One spread given, one None, one missing cell: one error bar.
    np.testing.assert_allclose(error_bars("AdaCS"), [(centers["AdaCS"][0], 0.83, 0.87)])
    # The groups are apart: each arm's bars stay inside their category's slot and do not overlap.
    width = bars["base"][0].get_width()
    for i in range(3):
        xs = sorted(c[i].get_x() for c in bars.values())
        assert np.diff(xs) == pytest.approx([width, width])
        assert i - 0.5 < xs[0] and xs[-1] + width < i + 0.5


def test_a_series_keeps_its_color_across_charts():
    def line_colors(names):
        fig = plots.line_figure({n: ([0, 1], [0.0, 1.0]) for n in names}, title="t")
        return {line.get_label(): to_hex(line.get_color()) for line in fig.axes[0].get_lines()}

    def bar_colors(groups):
        fig = plots.bar_figure(groups, title="t", ylabel="y")
        return {arm: to_hex(c[0].get_facecolor()) for arm, c in _bars(fig).items()}

    one = line_colors(["easy", "medium", "hard"])
    two = line_colors(["hard", "medium"])
    assert one["hard"] == two["hard"] and one["medium"] == two["medium"]
    assert len(set(one.values())) == 3
    arms = bar_colors(GROUPS)
    again = bar_colors({"all": {"AEPO": (1.0, None), "AdaCS": (2.0, None), "x": (3.0, None)}})
    assert arms["AEPO"] == again["AEPO"] and arms["AdaCS"] == again["AdaCS"]
    assert line_colors(["AEPO"])["AEPO"] == arms["AEPO"]  # one name, one color, any chart kind
    assert len(set(arms.values())) == 3


def test_names_that_hash_to_one_color_get_different_colors():
    names = [f"arm {i}" for i in range(40)]
    alone = {n: plots.series_colors([n])[n] for n in names}
    a, b = next((a, b) for a in names for b in names if a < b and alone[a] == alone[b])
    together = plots.series_colors([a, b])
    assert together[a] == alone[a] and together[b] != alone[a]
    assert len(set(plots.series_colors(names[:9]).values())) == 9  # the whole palette first


def test_drawing_leaves_the_program_s_matplotlib_state_alone(tmp_path):
    # No pyplot: a user's backend choice and figure registry are untouched, even with no display.
    code = (
        "import sys\n"
        "from ares_jax import plots\n"
        f"plots.line_chart({str(tmp_path / 'c.png')!r}, {{'a': ([0, 1], [0.0, 1.0])}}, title='t')\n"
        f"plots.bar_chart({str(tmp_path / 'b.png')!r}, {{'x': {{'a': (1.0, 0.1)}}}}, "
        "title='t', ylabel='y')\n"
        "print('matplotlib.pyplot' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MPLBACKEND", "DISPLAY")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False"]
    assert (tmp_path / "c.png").is_file() and (tmp_path / "b.png").is_file()


def test_the_projects_series_have_fixed_colors():
    colors = plots.series_colors(["hard", "easy", "medium", "AEPO"])
    assert colors == {k: plots.KNOWN_COLORS[k] for k in ("hard", "easy", "medium", "AEPO")}
