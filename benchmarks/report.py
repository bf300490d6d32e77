"""What every benchmark prints and records: the card, sizes, and its entry in RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import jax


def card() -> str:
    """The device the numbers come from: the accelerator's kind, or the CPU and its cores."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return f"CPU {platform.machine()}, {os.cpu_count()} cores"
    return f"{jax.device_count()} x {getattr(dev, 'device_kind', dev.platform)}"


def gib(x) -> str:
    return "n/a" if x is None else f"{x / 2**30:.2f} GiB"


def record(name: str, preset: str, text: str) -> Path:
    """Appends a result table to benchmarks/RESULTS.md with the date, git commit and command."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    entry = (
        f"\n## {name}, {datetime.date.today()}, git {commit}\n\n"
        f"Command: `python -m benchmarks.{name} --preset={preset}`\n\n{text}\n"
    )
    path = Path(__file__).with_name("RESULTS.md")
    with path.open("a") as f:
        f.write(entry)
    return path
