"""A small ViRL39K-layout data directory for tests (tests/data, tests/adacs, tests/configs).

The released ViRL39K: `39Krelease.parquet` with columns `qid`, `question` (with `<image>`
markers), `answer`, `PassRate_32BTrained`, `PassRate_7BBase`, `category`, `source` and `image`
(a list of paths relative to the release directory, `images/...`), next to an `images/` folder.
`write_virl39k` writes that, with real PNG and JPEG files of mixed sizes, and optionally a second
parquet whose `image` column holds HF `datasets` Image structs `{"bytes", "path"}`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq

# (file name, size (w, h), PIL mode, format)
IMAGES = (
    ("geo_0.png", (40, 30), "RGB", "PNG"),
    ("chart_1.jpg", (64, 20), "RGB", "JPEG"),
    ("grey_2.png", (17, 93), "L", "PNG"),
    ("wide_3.png", (120, 36), "RGBA", "PNG"),
)

# One row per problem: (qid, question, answer, PassRate_32BTrained, PassRate_7BBase, images)
ROWS = (
    ("q0", "<image>What is x?", "\\boxed{3}", 0.75, 0.25, ("geo_0.png",)),
    ("q1", "Compare <image> and <image>.", "B", 0.5, None, ("chart_1.jpg", "grey_2.png")),
    ("q2", "How wide is the bar?", "12", None, 1.0, ("wide_3.png",)),
)


def image_bytes(name: str, size, mode: str, fmt: str, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = PIL.Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def write_images(directory: Path) -> dict[str, bytes]:
    """Writes IMAGES under directory/images; returns {relative path: the file's bytes}."""
    (directory / "images").mkdir(parents=True, exist_ok=True)
    out = {}
    for i, (name, size, mode, fmt) in enumerate(IMAGES):
        data = image_bytes(name, size, mode, fmt, seed=i)
        (directory / "images" / name).write_bytes(data)
        out[f"images/{name}"] = data
    return out


def write_virl39k(
    directory: Path,
    *,
    name: str = "39Krelease.parquet",
    structs: bool = False,
    traces: bool = False,
) -> tuple[Path, dict[str, bytes]]:
    """Writes a ViRL39K-layout parquet (and its images) into `directory`.

    Args:
      structs: the `image` column holds HF Image structs instead of relative paths: the first
        image of each row with its bytes, the others with `bytes` null and the relative path.
      traces: add a `traces` column (one correct boxed trace per row), which ViRL39K lacks.

    Returns:
      (the parquet path, {relative image path: bytes}).
    """
    directory.mkdir(parents=True, exist_ok=True)
    files = write_images(directory)
    table = {
        "qid": [r[0] for r in ROWS],
        "question": [r[1] for r in ROWS],
        "answer": [r[2] for r in ROWS],
        "PassRate_32BTrained": pa.array([r[3] for r in ROWS], pa.float64()),
        "PassRate_7BBase": pa.array([r[4] for r in ROWS], pa.float64()),
        "category": ["math", "chart", "chart"],
        "source": ["geoqa", "chartqa", "chartqa"],
    }
    if structs:
        struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        table["image"] = pa.array(
            [
                [
                    {"bytes": files[f"images/{n}"] if j == 0 else None, "path": f"images/{n}"}
                    for j, n in enumerate(r[5])
                ]
                for r in ROWS
            ],
            pa.list_(struct),
        )
    else:
        table["image"] = [[f"images/{n}" for n in r[5]] for r in ROWS]
    if traces:
        table["traces"] = [[f"Working it out. \\boxed{{{r[2]}}}"] for r in ROWS]
    path = directory / name
    pq.write_table(pa.table(table), path)
    return path, files
