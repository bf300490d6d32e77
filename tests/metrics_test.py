"""Tests for ares_jax/metrics.py: JSONL rows, config.json, TensorBoard, truncation, guards."""

import io
import json
import math
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ares_jax import metrics


def test_rows_parse_back(tmp_path):
    writer = metrics.MetricWriter(tmp_path, tensorboard=False, enabled=True)
    writer.write(
        1,
        {
            "train/loss": 0.5,
            "kl/beta/hard": np.float32(0.25),
            "rollout/n": 3,
            "time/step_s": np.array([1.5]),
            "x/jax": jnp.asarray(2.0),
        },
    )
    writer.measure("train/loss", 0.125)
    writer.write(2, {"rollout/entropy_mean": np.float64(1.0)})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert list(first) == sorted(first)
    assert first == {
        "step": 1,
        "train/loss": 0.5,
        "kl/beta/hard": 0.25,
        "rollout/n": 3.0,
        "time/step_s": 1.5,
        "x/jax": 2.0,
    }
    assert isinstance(first["step"], int) and isinstance(first["rollout/n"], float)
    assert json.loads(lines[1]) == {"step": 2, "train/loss": 0.125, "rollout/entropy_mean": 1.0}


def test_non_finite_values_are_strict_json(tmp_path):
    writer = metrics.MetricWriter(tmp_path, tensorboard=False, enabled=True)
    writer.write(1, {"a": float("nan"), "b": np.inf, "c": -np.inf, "d": 1.0})
    writer.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    row = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert row == {"step": 1, "a": "nan", "b": "inf", "c": "-inf", "d": 1.0}
    (back,) = metrics.read_metrics(tmp_path / "metrics.jsonl")
    assert math.isnan(back["a"]) and back["b"] == math.inf and back["c"] == -math.inf


def test_bad_values_raise(tmp_path):
    writer = metrics.MetricWriter(tmp_path, tensorboard=False, enabled=True)
    with pytest.raises(ValueError, match="'train/v' must be a scalar"):
        writer.write(1, {"train/v": np.zeros(3)})
    with pytest.raises(ValueError, match="reserved"):
        writer.write(1, {"step": 1})


def test_config_json(tmp_path):
    writer = metrics.MetricWriter(tmp_path / "run", enabled=True)
    config = ml_collections.ConfigDict(
        {"lr": 1e-6, "model": {"name": "tiny"}, "dtype": jnp.float32}
    )
    writer.write_config(config)
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written["lr"] == 1e-6 and written["model"] == {"name": "tiny"}
    assert "float32" in written["dtype"]


def test_tensorboard_event_file(tmp_path):
    writer = metrics.MetricWriter(tmp_path, enabled=True)
    writer.write(1, {"train/loss": 1.0})
    writer.write(2, {"train/loss": 0.5})
    writer.close()
    events = os.listdir(tmp_path / "tb")
    assert any(name.startswith("events.out.tfevents") for name in events)
    assert all(os.path.getsize(tmp_path / "tb" / name) > 0 for name in events)


def test_disabled_writes_nothing(tmp_path):
    writer = metrics.MetricWriter(tmp_path / "run", enabled=False)
    writer.write_config({"a": 1})
    writer.measure("a", 1.0)
    writer.write(1, {"a": 1.0})
    assert writer.truncate_after(0) == 0
    writer.close()
    assert not (tmp_path / "run").exists()


def test_truncate_after_and_append_on_resume(tmp_path):
    writer = metrics.MetricWriter(tmp_path, enabled=True)
    for step in range(1, 6):
        writer.write(step, {"train/loss": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # a row cut by a crash
    resumed = metrics.MetricWriter(tmp_path, enabled=True)
    assert resumed.truncate_after(3) == 3
    for step in range(4, 6):
        resumed.write(step, {"train/loss": 10.0 * step})
    resumed.close()
    rows = metrics.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["train/loss"] for r in rows] == [1.0, 2.0, 3.0, 40.0, 50.0]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "tra')  # cut again; a writer that does not truncate starts a new line
    appender = metrics.MetricWriter(tmp_path, tensorboard=False, enabled=True)
    appender.write(6, {"train/loss": 6.0})
    appender.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[-2] == '{"step": 6, "tra' and json.loads(lines[-1])["step"] == 6
    assert metrics.MetricWriter(tmp_path, enabled=True).truncate_after(-1) == 7
    assert (tmp_path / "metrics.jsonl").read_text() == ""


# ---------------------------------------------------------------------------------------------
# NonFiniteGuard


def test_guard_counts_consecutive_steps():
    guard = metrics.NonFiniteGuard(max_in_a_row=2)
    assert guard.check(1, {"train/loss": 1.0, "train/grad_norm": np.float32(2.0)})
    assert not guard.check(2, {"train/loss": np.nan, "train/grad_norm": 1.0})
    assert not guard.check(3, {"train/loss": 1.0, "train/grad_norm": np.inf})
    assert guard.in_a_row == 2
    with pytest.raises(metrics.NonFiniteError) as info:
        guard.check(4, {"train/loss": np.array([1.0, np.nan]), "train/grad_norm": 1.0})
    message = str(info.value)
    assert "steps 2-4" in message and "train/grad_norm" in message and "train/loss" in message


def test_guard_resets_on_finite_step():
    guard = metrics.NonFiniteGuard(max_in_a_row=1)
    for step in range(10):
        assert not guard.check(2 * step, {"loss": np.nan})
        assert guard.check(2 * step + 1, {"loss": 0.0})
    assert guard.in_a_row == 0


def test_guard_zero_stops_at_first():
    guard = metrics.NonFiniteGuard(max_in_a_row=0)
    assert guard.check(1, {"loss": 1.0})
    with pytest.raises(metrics.NonFiniteError, match=r"at step 7 .*: loss"):
        guard.check(7, {"loss": -np.inf})


# ---------------------------------------------------------------------------------------------
# Progress


def test_progress_disabled_prints_nothing(capsys):
    stream = io.StringIO()  # not a TTY: off by default
    bar = metrics.Progress(10, desc="train", file=stream)
    assert not bar.enabled
    for _ in range(10):
        bar.update(1, loss=0.5)
    bar.close()
    assert stream.getvalue() == ""
    bar = metrics.Progress(10, desc="train", enabled=False)
    bar.update(3)
    bar.close()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_forced_on_writes_the_line():
    stream = io.StringIO()
    bar = metrics.Progress(4, desc="train", enabled=True, file=stream)
    bar.update(2, loss=0.123456)
    bar.close()
    text = stream.getvalue()
    assert "train" in text and "2/4" in text and "loss=0.1235" in text


def test_metrics_file_removed_mid_run_is_recreated_with_a_warning(tmp_path, caplog):
    w = metrics.MetricWriter(tmp_path, tensorboard=False, enabled=True)
    w.write(1, {"a": 1.0})
    os.remove(w.path)  # a user cleaning up, a log rotator
    with caplog.at_level("WARNING"):
        w.write(2, {"a": 2.0})
    w.close()
    assert [r["step"] for r in metrics.read_metrics(w.path)] == [2]
    assert "was removed during the run" in caplog.text
    # Moved away (rotated): the new rows go to a new file at the path, the old file keeps its own.
    with metrics.MetricWriter(tmp_path, tensorboard=False, enabled=True) as w:
        w.write(3, {"a": 3.0})
        os.rename(w.path, tmp_path / "old.jsonl")
        w.write(4, {"a": 4.0})
    assert [r["step"] for r in metrics.read_metrics(w.path)] == [4]
    assert [r["step"] for r in metrics.read_metrics(tmp_path / "old.jsonl")] == [2, 3]
