"""The AdaCS curation report: Markdown tables per bracket, a length plot, per-problem JSONL.

`write_report(result, directory)` writes

- `report.md`: the settings, the counts by reason, the anchors L(0) / L(1) per source (with any
  fallback), and a table per bracket (pass rate, problems, eligible, selected, median length of
  the kept traces, target length), pooled and, when there are several sources, per source;
- `lengths.png`: target length and median kept length against pass rate, with a scatter of the
  kept traces' lengths (drawn with Pillow, no plotting library);
- `records.jsonl`: one `ProblemRecord` per problem, input order.

Given a `PassRateOrigin`, the report also says where the pass rates came from: a line with the
counts given by the data files (per column, e.g. ViRL39K's `PassRate_7BBase`) and estimated by
the pass-rate model, and two more columns in every bracket table, `given` and `estimated`.

Lengths are in tokens of the tokenizer given to `curate`.
"""

from __future__ import annotations

import dataclasses
import fractions
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ares_jax.adacs.curation import ALL_SOURCES, BracketStats, CurationResult

MAX_PLOTTED_SOURCES = 6  # more sources: the plot shows the pooled series only
_SCALE = 2  # drawn at twice the size, then downsampled: smooth lines without antialiasing
_COLORS = (
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
    (23, 190, 207),
)


class ReportPaths(NamedTuple):
    markdown: str
    plot: str
    records: str


@dataclasses.dataclass(frozen=True)
class PassRateOrigin:
    """Where the problems' pass rates came from (METHOD.md 3.1).

    Attributes:
      estimated: ids of the problems whose pass rate the pass-rate model estimated; every other
        problem with a pass rate had it from the data.
      columns: data column -> rows whose pass rate it gave (`records.ReadStats.columns`).
      estimator: the model that estimated them, e.g. "the model being fine-tuned, 8 samples".
    """

    estimated: frozenset[str] = frozenset()
    columns: Mapping[str, int] = dataclasses.field(default_factory=dict)
    estimator: str = ""

    def summary(self, result: CurationResult) -> str:
        """One line: how many rates the data gave (by column) and how many were estimated."""
        rated = [r for r in result.records if r.pass_rate is not None]
        estimated = sum(r.id in self.estimated for r in rated)
        given = len(rated) - estimated
        columns = ", ".join(f"`{c}`: {n}" for c, n in sorted(self.columns.items()))
        text = f"{given} given by the data" + (
            f" (rows read per column: {columns})" if columns else ""
        )
        text += f", {estimated} estimated"
        if estimated and self.estimator:
            text += f" by {self.estimator}"
        return text


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def bracket_table(result: CurationResult, origin: PassRateOrigin | None = None) -> str:
    """Markdown: the anchors, then a table per bracket, pooled and per source when several;
    with `origin`, each table also counts the bracket's pass rates given and estimated."""
    k = result.settings.num_brackets - 1
    parts = ["## Length anchors (tokens)", "", _anchor_table(result), ""]
    several = len(result.by_source) > 1
    pooled = _table(result.brackets, k, _origin_counts(result, origin, None))
    parts += [f"## {'All sources' if several else 'Brackets'}", "", pooled]
    if several:
        for source in result.sources:
            table = _table(result.by_source[source], k, _origin_counts(result, origin, source))
            parts += ["", f"## Source `{source}`", "", table]
    return "\n".join(parts) + "\n"


def _origin_counts(
    result: CurationResult, origin: PassRateOrigin | None, source: str | None
) -> dict[int, tuple[int, int]] | None:
    """bracket -> (rates given by the data, rates estimated) of `source` (None: all)."""
    if origin is None:
        return None
    counts: dict[int, tuple[int, int]] = {}
    for r in result.records:
        if r.bracket is None or (source is not None and r.source != source):
            continue
        given, estimated = counts.get(r.bracket, (0, 0))
        if r.id in origin.estimated:
            counts[r.bracket] = (given, estimated + 1)
        else:
            counts[r.bracket] = (given + 1, estimated)
    return counts


def _anchor_table(result: CurationResult) -> str:
    lines = [
        "| source | L(0) | L(1) | traces at L(0) | traces at L(1) | fallback |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for source, a in result.anchors.items():
        lines.append(
            f"| {source or '(none)'} | {_num(a.l0)} | {_num(a.l1)} | {a.l0_traces} | "
            f"{a.l1_traces} | {a.note or '-'} |"
        )
    return "\n".join(lines)


def _table(
    rows: Sequence[BracketStats], k: int, origin: Mapping[int, tuple[int, int]] | None = None
) -> str:
    extra = origin is not None
    lines = [
        "| bracket | pass rate | problems | eligible | selected | median kept length "
        "| target length |" + (" given | estimated |" if extra else ""),
        "|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if extra else ""),
    ]
    for r in rows:
        line = (
            f"| {r.bracket} | {_rate(r.bracket, k)} | {r.problems} | {r.eligible} | "
            f"{r.selected} | {_num(r.median_length)} | {_num(r.target)} |"
        )
        if extra:
            given, estimated = origin.get(r.bracket, (0, 0))
            line += f" {given} | {estimated} |"
        lines.append(line)
    total = sum(r.selected for r in rows)
    line = (
        f"| all | | {sum(r.problems for r in rows)} | {sum(r.eligible for r in rows)} | "
        f"{total} | | |"
    )
    if extra:
        given = sum(g for g, _ in origin.values())
        line += f" {given} | {sum(e for _, e in origin.values())} |"
    lines.append(line)
    return "\n".join(lines)


def _rate(bracket: int, k: int) -> str:
    return str(fractions.Fraction(bracket, k))


def _num(x: float | None) -> str:
    """A length: "-" when unknown, else rounded to 0.1 with a trailing ".0" dropped."""
    if x is None or math.isnan(x):
        return "-"
    text = f"{x:.1f}"
    return text[:-2] if text.endswith(".0") else text


# ---------------------------------------------------------------------------------------------
# Plot (Pillow)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Series:
    label: str
    color: tuple[int, int, int]
    rows: Sequence[BracketStats]
    points: list[tuple[float, float]]  # (pass rate, kept length) of the selected problems


def plot(result: CurationResult, path: str | os.PathLike, *, size: tuple[int, int] = (960, 600)):
    """Writes a PNG: target and median kept length against pass rate, kept lengths as dots.

    With 2 to MAX_PLOTTED_SOURCES sources each source is a colour; otherwise the pooled series.
    Returns the path written.
    """
    series = _series(result)
    k = result.settings.num_brackets - 1
    width, height = size[0] * _SCALE, size[1] * _SCALE
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(13 * _SCALE), _font(11 * _SCALE)

    legend_w = 220 * _SCALE
    left, right = 80 * _SCALE, width - legend_w
    top, bottom = 44 * _SCALE, height - 62 * _SCALE
    values = [v for s in series for r in s.rows for v in (r.target, r.median_length)]
    values += [y for s in series for _, y in s.points]
    ticks = _nice_ticks(max((v for v in values if not math.isnan(v)), default=1000.0))
    y_max = ticks[-1]
    x_lo, x_hi = -0.04, 1.04

    def xy(p: float, length: float) -> tuple[float, float]:
        x = left + (p - x_lo) / (x_hi - x_lo) * (right - left)
        return x, bottom - length / y_max * (bottom - top)

    # Axes, grid, ticks.
    grid, axis = (225, 225, 225), (40, 40, 40)
    for t in ticks:
        _, y = xy(0, t)
        draw.line([(left, y), (right, y)], fill=grid, width=_SCALE)
        draw.line([(left - 6 * _SCALE, y), (left, y)], fill=axis, width=_SCALE)
        label = f"{t:g}"
        tw = draw.textlength(label, font=small)
        draw.text((left - 9 * _SCALE - tw, y), label, fill=axis, font=small, anchor="lm")
    for b in range(k + 1):
        x, _ = xy(b / k, 0)
        draw.line([(x, top), (x, bottom)], fill=grid, width=_SCALE)
        draw.line([(x, bottom), (x, bottom + 6 * _SCALE)], fill=axis, width=_SCALE)
        draw.text((x, bottom + 9 * _SCALE), _rate(b, k), fill=axis, font=small, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline=axis, width=_SCALE)
    draw.text(((left + right) / 2, height - 14 * _SCALE), "pass rate p", fill=axis, font=font,
              anchor="mb")  # fmt: skip
    _vertical_text(image, "trace length (tokens)", (20 * _SCALE, (top + bottom) / 2), font, axis)
    title = "AdaCS curation: trace length against pass rate"
    if result.settings.vanilla:
        title += " (vanilla: lengths ignored)"
    draw.text(((left + right) / 2, 14 * _SCALE), title, fill=axis, font=font, anchor="mt")

    # Data: dots, then target (dashed) and median kept length (solid, circles).
    rng = np.random.default_rng(0)  # horizontal jitter of the dots, deterministic
    r_dot = 2 * _SCALE
    for s in series:
        light = tuple(int(c + (255 - c) * 0.6) for c in s.color)
        for p, length in s.points:
            x, y = xy(p + rng.uniform(-0.012, 0.012), length)
            draw.ellipse([x - r_dot, y - r_dot, x + r_dot, y + r_dot], fill=light)
    for s in series:
        targets = [xy(r.pass_rate, r.target) for r in s.rows if not math.isnan(r.target)]
        _dashed(draw, targets, s.color, 2 * _SCALE)
        for x, y in targets:
            m = 3 * _SCALE
            draw.rectangle([x - m, y - m, x + m, y + m], outline=s.color, width=_SCALE)
        medians = [r for r in s.rows if not math.isnan(r.median_length)]
        pts = [xy(r.pass_rate, r.median_length) for r in medians]
        for a, b, ra, rb in zip(pts, pts[1:], medians, medians[1:], strict=False):
            if rb.bracket == ra.bracket + 1:  # a bracket without selections breaks the line
                draw.line([a, b], fill=s.color, width=3 * _SCALE)
        for x, y in pts:
            m = 4 * _SCALE
            draw.ellipse([x - m, y - m, x + m, y + m], fill=s.color)

    # Legend.
    lx, ly = right + 16 * _SCALE, top
    line_h = 20 * _SCALE
    entries = []
    for s in series:
        prefix = f"{s.label}: " if s.label else ""
        entries += [
            ("dash", s.color, f"{prefix}target L(p)"),
            ("line", s.color, f"{prefix}median kept length"),
            ("dot", tuple(int(c + (255 - c) * 0.6) for c in s.color), f"{prefix}kept traces"),
        ]
    for kind, color, label in entries:
        y = ly + line_h / 2
        x0, x1 = lx, lx + 28 * _SCALE
        if kind == "dash":
            _dashed(draw, [(x0, y), (x1, y)], color, 2 * _SCALE)
        elif kind == "line":
            draw.line([(x0, y), (x1, y)], fill=color, width=3 * _SCALE)
            m = 4 * _SCALE
            xm = (x0 + x1) / 2
            draw.ellipse([xm - m, y - m, xm + m, y + m], fill=color)
        else:
            xm = (x0 + x1) / 2
            draw.ellipse([xm - r_dot, y - r_dot, xm + r_dot, y + r_dot], fill=color)
        draw.text((x1 + 8 * _SCALE, y), _fit(draw, label, small, legend_w - 60 * _SCALE),
                  fill=axis, font=small, anchor="lm")  # fmt: skip
        ly += line_h

    image = image.resize(size, Image.Resampling.LANCZOS)
    path = os.fspath(path)
    image.save(path, format="PNG")
    return path


def _series(result: CurationResult) -> list[_Series]:
    k = result.settings.num_brackets - 1
    points: dict[str, list[tuple[float, float]]] = {}
    for r in result.records:
        if r.selected:
            # The bracket's pass rate, so dots line up with the bracket medians.
            points.setdefault(r.source, []).append((r.bracket / k, float(r.chosen_length)))
    if 1 < len(result.by_source) <= MAX_PLOTTED_SOURCES:
        return [
            _Series(
                src or "(none)",
                _COLORS[i % len(_COLORS)],
                result.by_source[src],
                points.get(src, []),
            )  # fmt: skip
            for i, src in enumerate(result.sources)
        ]
    label = "all sources" if len(result.by_source) > 1 else ""
    pooled = [pt for pts in points.values() for pt in pts]
    return [_Series(label, _COLORS[0], result.brackets, pooled)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _nice_ticks(top: float) -> list[float]:
    """0, step, ..., a multiple of step >= top, with step 1, 2 or 5 times a power of ten."""
    top = max(top, 1.0)
    raw = top / 6
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    n = math.ceil(top * 1.05 / step)
    return [i * step for i in range(n + 1)]


def _dashed(draw: ImageDraw.ImageDraw, points, color, width: int, dash: float = 9.0 * _SCALE):
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        seg = math.hypot(x1 - x0, y1 - y0)
        pos = 0.0
        while pos < seg:
            end = min(pos + dash, seg)
            a, b = pos / seg, end / seg
            draw.line(
                [
                    (x0 + a * (x1 - x0), y0 + a * (y1 - y0)),
                    (x0 + b * (x1 - x0), y0 + b * (y1 - y0)),
                ],
                fill=color,
                width=width,
            )
            pos += 2 * dash


def _vertical_text(image: Image.Image, text: str, center, font, color) -> None:
    probe = ImageDraw.Draw(image)
    w = int(probe.textlength(text, font=font)) + 4
    h = int(font.size * 1.4) if hasattr(font, "size") else 16
    label = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(label).text((2, h / 2), text, fill=color, font=font, anchor="lm")
    label = label.rotate(90, expand=True)
    image.paste(label, (int(center[0] - label.width / 2), int(center[1] - label.height / 2)))


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def write_report(
    result: CurationResult,
    directory: str | os.PathLike,
    *,
    origin: PassRateOrigin | None = None,
) -> ReportPaths:
    """Writes report.md, lengths.png and records.jsonl into `directory` (created if missing);
    `origin` adds where the pass rates came from (module docstring)."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    paths = ReportPaths(
        markdown=os.path.join(directory, "report.md"),
        plot=os.path.join(directory, "lengths.png"),
        records=os.path.join(directory, "records.jsonl"),
    )
    plot(result, paths.plot)
    s = result.settings
    quota = ", ".join(
        f"{'all sources' if key == ALL_SOURCES else key}: {n}" for key, n in result.quota.items()
    )
    reasons = result.reasons()
    n_sel = reasons.pop("", 0)
    header = [
        "# AdaCS curation report",
        "",
        "Lengths are in tokens. Target L(p) = (1 - p) L(0) + p L(1) per source (METHOD.md 3.2).",
        "",
        f"- settings: {_settings_text(s)}",
        f"- per-bracket quota: {quota or '-'}",
        f"- problems: {len(result.records)}, selected: {n_sel}",
        "- not selected: "
        + (", ".join(f"{why}: {n}" for why, n in sorted(reasons.items())) or "-"),
    ]
    if origin is not None:
        header.append(f"- pass rates: {origin.summary(result)}")
    header.append("")
    text = "\n".join(header) + bracket_table(result, origin)
    text += f"\n![trace length against pass rate]({os.path.basename(paths.plot)})\n"
    with open(paths.markdown, "w", encoding="utf-8") as f:
        f.write(text)
    with open(paths.records, "w", encoding="utf-8") as f:
        for r in result.records:
            f.write(json.dumps(dataclasses.asdict(r), ensure_ascii=False) + "\n")
    return paths


def _settings_text(s) -> str:
    return ", ".join(f"{f.name}={getattr(s, f.name)}" for f in dataclasses.fields(s))
