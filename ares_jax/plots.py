"""Line and grouped bar charts as PNG files, drawn with matplotlib.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas directly, not through pyplot:
nothing here needs a display, and importing this module never changes the backend, the rcParams
or the figure registry of the program that uses it. `line_figure` and `bar_figure` return the
Figure (for tests, or to embed it elsewhere); `line_chart` and `bar_chart` write it as a PNG.

A series (a line, or an arm of a bar chart) keeps its color across charts: the color comes from
its name, not from its position, so "hard" or "AEPO" reads the same in every chart of a report.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100  # with the default size of 6.4 x 4.0 inches: 640 x 400 pixels

# matplotlib's "tab10" without its gray, which reads as "disabled" next to the other colors.
_PALETTE = (
    "#1f77b4",  # blue
    "#ff7f0e",  # orange
    "#2ca02c",  # green
    "#d62728",  # red
    "#9467bd",  # purple
    "#8c564b",  # brown
    "#e377c2",  # pink
    "#bcbd22",  # olive
    "#17becf",  # cyan
)


# The project's recurring series: difficulty buckets on a green-to-red scale, the pipeline's
# models and the ablation's arms in fixed colors, so every chart reads the same way.
KNOWN_COLORS: dict[str, str] = {
    "easy": "#2ca02c",
    "medium": "#ff7f0e",
    "hard": "#d62728",
    "base": "#7f7f7f",
    "AdaCS": "#1f77b4",
    "AEPO": "#9467bd",
}


def series_colors(names: Iterable[str]) -> dict[str, str]:
    """Gives each name its color: `KNOWN_COLORS`, else a hash of the name picks it from the
    palette.

    crc32, unlike `hash`, is the same in every process, so a name has the same color in every
    chart and every run. Two names of one chart that hash to the same color would be told apart
    by nothing, so the later one takes the next free color; only then does a color depend on the
    other names of the chart. Beyond the palette's size, colors repeat.

    Args:
      names: the series of one chart, in drawing order.

    Returns:
      name -> color (a hex string).
    """
    out: dict[str, str] = {}
    for name in names:
        if name in KNOWN_COLORS and KNOWN_COLORS[name] not in out.values():
            out[name] = KNOWN_COLORS[name]
            continue
        start = zlib.crc32(name.encode()) % len(_PALETTE)
        turn = [_PALETTE[(start + i) % len(_PALETTE)] for i in range(len(_PALETTE))]
        out[name] = next((c for c in turn if c not in out.values()), turn[0])
    return out


def _figure(size: tuple[float, float], title: str, xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    # Constrained layout is matplotlib's tight layout that also makes room for a legend outside
    # the axes, without changing the figure's size in pixels (as bbox_inches="tight" would).
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself to the figure: savefig renders with Agg
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=12)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_axisbelow(True)  # the grid stays behind lines and bars
    return fig, ax


def _legend(fig: Figure, ax: Axes) -> None:
    # Outside the axes, so that it never hides data, whatever the curves do.
    if ax.get_legend_handles_labels()[0]:
        fig.legend(loc="outside right upper", frameon=False)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def line_figure(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str = "step",
    ylabel: str = "",
    size: tuple[float, float] = (6.4, 4.0),
) -> Figure:
    """Builds a chart with one line (with markers) per named series.

    A missing value (NaN, None or infinite) breaks its line: the points on either side are not
    joined, and a point between two gaps shows as its marker alone.

    Args:
      series: name -> (xs, ys), drawn in this order.
      title: the chart's title.
      xlabel: the x axis label.
      ylabel: the y axis label.
      size: (width, height) in inches; the PNG has `DPI` pixels per inch.

    Returns:
      The Figure; its single Axes holds one Line2D per series, with the ys as given (NaN kept).

    Raises:
      ValueError: a series has more xs than ys or the reverse.
    """
    fig, ax = _figure(size, title, xlabel, ylabel)
    ax.grid(True, color="0.9", linewidth=0.8)
    colors = series_colors(series)
    integral_x = True
    for name, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise ValueError(f"series {name!r}: {len(xs)} xs but {len(ys)} ys")
        x = np.asarray(xs, dtype=float)
        y = np.asarray(ys, dtype=float)  # None becomes NaN
        y[~np.isfinite(y)] = np.nan  # matplotlib breaks a line at NaN but draws inf off the axes
        integral_x &= bool(np.all(x == np.round(x)))
        ax.plot(x, y, color=colors[name], label=name, linewidth=1.8, marker="o", markersize=3)
    if integral_x:  # steps: no tick at step 2.5
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(fig, ax)
    return fig


def line_chart(
    path: str | Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str = "step",
    ylabel: str = "",
    size: tuple[float, float] = (6.4, 4.0),
) -> Path:
    """Writes `line_figure(series, ...)` to `path` as a PNG; returns the path."""
    return _save(line_figure(series, title=title, xlabel=xlabel, ylabel=ylabel, size=size), path)


def _spread(value: float | None) -> float:
    return math.nan if value is None else float(value)


def bar_figure(
    groups: Mapping[str, Mapping[str, tuple[float, float | None]]],
    *,
    title: str,
    ylabel: str,
    xlabel: str = "",
    size: tuple[float, float] = (6.4, 4.0),
) -> Figure:
    """Builds a grouped bar chart with error bars: one group per category, one bar per arm.

    For an ablation, say: per difficulty level (the categories), the accuracy of each arm as its
    mean over seeds, with the standard deviation over seeds as its error bar.

    Args:
      groups: category (an x tick) -> arm name -> (mean, spread), where spread is the half-width
        of the error bar; a spread of None or NaN draws no error bar, a NaN mean or an arm
        missing from a category draws no bar. Categories keep their order; arms are ordered by
        first appearance.
      title: the chart's title.
      ylabel: the y axis label.
      xlabel: the x axis label.
      size: (width, height) in inches; the PNG has `DPI` pixels per inch.

    Returns:
      The Figure; its single Axes holds one BarContainer per arm, labelled with the arm's name,
      with one bar per category (NaN height where it has none) and, when any spread is given,
      its ErrorbarContainer as `.errorbar`.
    """
    fig, ax = _figure(size, title, xlabel, ylabel)
    ax.grid(True, axis="y", color="0.9", linewidth=0.8)
    categories = list(groups)
    arms = list(dict.fromkeys(arm for values in groups.values() for arm in values))
    colors = series_colors(arms)
    x = np.arange(len(categories), dtype=float)
    width = 0.8 / max(len(arms), 1)  # a group fills 80% of its slot; the rest parts the groups
    for i, arm in enumerate(arms):
        cells = [groups[c].get(arm, (math.nan, None)) for c in categories]
        means = np.array([float(mean) for mean, _ in cells])
        spreads = np.array([_spread(spread) for _, spread in cells])
        ax.bar(
            x + (i - (len(arms) - 1) / 2) * width,
            means,
            width,
            yerr=spreads if np.isfinite(spreads).any() else None,  # matplotlib skips NaN errors
            color=colors[arm],
            label=arm,
            capsize=3,
            error_kw={"ecolor": "0.25", "elinewidth": 1.0},
        )
    ax.set_xticks(x, categories)
    ax.tick_params(axis="x", length=0)  # the labels name groups, not points
    _legend(fig, ax)
    return fig


def bar_chart(
    path: str | Path,
    groups: Mapping[str, Mapping[str, tuple[float, float | None]]],
    *,
    title: str,
    ylabel: str,
    xlabel: str = "",
    size: tuple[float, float] = (6.4, 4.0),
) -> Path:
    """Writes `bar_figure(groups, ...)` to `path` as a PNG; returns the path."""
    return _save(bar_figure(groups, title=title, ylabel=ylabel, xlabel=xlabel, size=size), path)
