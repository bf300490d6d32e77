"""The whole pipeline (warm-up, AdaCS, AEPO, evaluation) on its smoke preset, and the charts."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ares_jax import plots
from tests.cpu_env import stage_env

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_stops_on_sigterm_then_restart_produces_every_artefact(tmp_path):
    env = stage_env()
    cmd = [
        sys.executable,
        "-m",
        "ares_jax.main",
        "--config=configs/aepo.py:pipeline_smoke",  # the default command at smoke sizes
        f"--workdir={tmp_path}",
    ]
    # SIGTERM during the warm-up: before, AdaCS and AEPO then ran on a 1-step base model, a
    # report was written, the exit code was 0, and a restart took every stage as finished.
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (tmp_path / "base" / ".lock").exists():
        assert first.poll() is None and time.time() < deadline, "the warm-up never started"
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=300)
    stderr = stderr.decode()
    assert first.returncode == 143, stderr[-3000:]
    assert "preempted: AdaCS preempted (SIGTERM) at step 1" in stderr
    assert (tmp_path / "base" / "checkpoints" / "1").is_dir()
    assert not (tmp_path / "base" / "export").exists()
    assert not (tmp_path / "base" / "complete.json").exists()
    assert not (tmp_path / "adacs").exists() and not (tmp_path / "aepo").exists()
    assert not (tmp_path / "report.md").exists()

    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "adacs: resumed from workdir checkpoint at step 1" in proc.stderr
    for stage in ("base", "adacs", "aepo"):
        assert (tmp_path / stage / "export" / "model.safetensors").is_file(), stage
        assert (tmp_path / stage / "complete.json").is_file(), stage
    assert (tmp_path / "adacs" / "curation" / "report.md").is_file()
    report = (tmp_path / "report.md").read_text()
    rows = [
        line for line in report.splitlines() if line.startswith(("| base", "| AdaCS", "| AEPO"))
    ]
    assert len(rows) == 3
    # Each cell is computed from real generations: lengths are positive token counts.
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        lengths = [float(x) for x in cells[1::2]]
        assert all(0 < x <= 16 for x in lengths)
    for name in (
        "reward",
        "accuracy",
        "response_len",
        "hwe_count",
        "kl",
        "beta",
        "models_accuracy",
        "models_length",
    ):
        assert Image.open(tmp_path / "plots" / f"{name}.png").size == (640, 400)


def test_line_chart_draws_the_series(tmp_path):
    path = plots.line_chart(tmp_path / "c.png", {"a": ([0, 1, 2], [0.0, 1.0, 0.5])}, title="t")
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape == (400, 640, 3)
    rgb = tuple(int(plots.series_colors(["a"])["a"][i : i + 2], 16) for i in (1, 3, 5))
    assert np.all(pixels == rgb, axis=-1).sum() > 100  # the line and markers in its colour
