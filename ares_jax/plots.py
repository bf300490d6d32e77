"""Line charts as PNG files, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.floor(lo / step) * step
    return [
        start + i * step
        for i in range(int((hi - start) / step) + 2)
        if start + i * step <= hi + 1e-12
    ]


def line_chart(
    path: str | Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str = "step",
    size: tuple[int, int] = (640, 400),
) -> Path:
    """Draws each named series (xs, ys) as a line with markers; writes a PNG to `path`."""
    w, h = size
    left, right, top, bottom = 64, 16, 36, 48
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    points = [
        (x, y)
        for xs, ys in series.values()
        for x, y in zip(xs, ys, strict=True)
        if y is not None and math.isfinite(y)
    ]
    x_lo = min((p[0] for p in points), default=0.0)
    x_hi = max((p[0] for p in points), default=1.0)
    y_lo = min((p[1] for p in points), default=0.0)
    y_hi = max((p[1] for p in points), default=1.0)
    if y_hi - y_lo < 1e-9:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    x_hi = x_hi if x_hi > x_lo else x_lo + 1

    def to_px(x, y):
        px = left + (x - x_lo) / (x_hi - x_lo) * (w - left - right)
        py = h - bottom - (y - y_lo) / (y_hi - y_lo) * (h - top - bottom)
        return px, py

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for t in _ticks(y_lo, y_hi):
        _, py = to_px(x_lo, t)
        draw.line([left - 4, py, left, py], fill="black")
        draw.line([left, py, w - right, py], fill=(230, 230, 230))
        draw.text((4, py - 6), f"{t:.3g}", fill="black", font=font)
    for t in _ticks(x_lo, x_hi):
        px, _ = to_px(t, y_lo)
        draw.line([px, h - bottom, px, h - bottom + 4], fill="black")
        draw.text((px - 8, h - bottom + 8), f"{t:.3g}", fill="black", font=font)
    draw.text((w // 2 - 20, h - 18), xlabel, fill="black", font=font)
    draw.text((left, 10), title, fill="black", font=font)
    for i, (name, (xs, ys)) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        pts = [
            to_px(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y)
        ]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for px, py in pts:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
        lx, ly = w - right - 150, top + 8 + 14 * i
        draw.line([lx, ly + 6, lx + 18, ly + 6], fill=color, width=3)
        draw.text((lx + 24, ly), name, fill="black", font=font)
    path = Path(path)
    img.save(path)
    return path
