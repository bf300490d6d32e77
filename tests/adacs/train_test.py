"""The AdaCS stage end to end on the `smoke` preset, and its resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ares_jax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def _cmd(workdir, *overrides):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    cmd = [
        sys.executable,
        "-m",
        "ares_jax.main",
        "--config=configs/adacs.py:smoke",
        f"--workdir={workdir}",
        *overrides,
    ]
    return cmd, env


def _run(workdir, *overrides):
    cmd, env = _cmd(workdir, *overrides)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


ARGS = (
    "--config.data.synthetic_train_size=32",
    "--config.sft.global_batch=8",
    "--config.sft.epochs=2",
)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("adacs")
    proc = _run(workdir, *ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_smoke_artefacts(smoke_run):
    shards = list((smoke_run / "pass_rates").glob("shard-*.jsonl"))
    lines = [json.loads(x) for s in shards for x in s.read_text().splitlines()]
    assert len(lines) == 32 and all(0.0 <= x["pass_rate"] <= 1.0 for x in lines)
    assert (smoke_run / "curation" / "report.md").is_file()
    assert (smoke_run / "curation" / "lengths.png").is_file()
    curated = (smoke_run / "curation" / "curated.jsonl").read_text().splitlines()
    rows = [r for r in read_metrics(smoke_run / "metrics.jsonl") if "train/loss" in r]
    steps = -(-len(curated) * 2 // 8)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(r["train/skipped"] == 0 for r in rows)
    assert (smoke_run / "export" / "model.safetensors").is_file()


def test_sigkill_then_resume_equals_uninterrupted(smoke_run, tmp_path):
    cmd, env = _cmd(tmp_path, *ARGS)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if (tmp_path / "checkpoints" / "1").is_dir():  # step 1's checkpoint is complete
            break
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be killed")
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = _run(tmp_path, *ARGS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from workdir checkpoint" in resumed.stderr

    def rows(path):
        return {
            r["step"]: {
                k: v for k, v in r.items() if not k.startswith("time/") and "per_s" not in k
            }
            for r in read_metrics(path)
            if "train/loss" in r
        }

    got, want = rows(metrics), rows(smoke_run / "metrics.jsonl")
    assert sorted(got) == sorted(want)
    for step in sorted(want)[1:]:
        assert got[step] == want[step], step


def test_sigterm_in_the_pass_rates_saves_them_exits_143_and_the_restart_completes(tmp_path):
    cmd, env = _cmd(tmp_path, *ARGS)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (tmp_path / ".lock").exists():  # the handler is on before the lock is taken
        assert proc.poll() is None and time.time() < deadline, "the run ended or never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    stderr = stderr.decode()
    assert proc.returncode == 143, stderr[-3000:]
    assert "preempted: AdaCS (pass rates) preempted (SIGTERM)" in stderr
    assert "Traceback" not in stderr
    shards = list((tmp_path / "pass_rates").glob("shard-*.jsonl"))
    done = sum(len(s.read_text().splitlines()) for s in shards)
    assert 0 < done < 32  # one batch written, the rest left for the restart
    for later in ("curation", "checkpoints", "export", "complete.json"):
        assert not (tmp_path / later).exists(), later
    resumed = _run(tmp_path, *ARGS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"({32 - done} computed now)" in resumed.stderr
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "complete.json").read_text())["stage"] == "AdaCS"


def test_overlong_prompt_names_file_and_line_before_pass_rates(tmp_path):
    """An over-long prompt used to stop the pass-rate sampling that drew it, naming no file;
    now `_problems` measures every prompt when the stage reads its data."""
    data = tmp_path / "cold.jsonl"
    rows = [
        {"question": "What is 1 + 1?", "answer": "2", "response": "\\boxed{2}"},
        {"question": "long " * 400, "answer": "1", "response": "\\boxed{1}"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    work = tmp_path / "work"
    proc = _run(
        work,
        "--config.data.source=files",
        f"--config.data.train_files={data}",
        "--config.data.drop_overlong_prompts=False",
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cold.jsonl, line 2: the prompt has" in proc.stderr and "Traceback" not in proc.stderr
    assert not (work / "pass_rates").exists()
