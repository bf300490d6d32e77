"""The AEPO stage end to end on the `smoke` preset: artefacts, resume after SIGKILL bit for bit,
8 devices against one, bad data."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ares_jax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def _main(workdir, *overrides, env=None):
    cmd = [
        sys.executable,
        "-m",
        "ares_jax.main",
        "--config=configs/aepo.py:smoke",
        f"--workdir={workdir}",
        *overrides,
    ]
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    full_env.pop("XLA_FLAGS", None)  # one CPU device unless asked
    full_env.update(env or {})
    return cmd, full_env


def _run(workdir, *overrides, env=None, timeout=600):
    cmd, full_env = _main(workdir, *overrides, env=env)
    return subprocess.run(
        cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def _comparable(row):
    return {k: v for k, v in row.items() if not k.startswith("time/") and "per_s" not in k}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke")
    proc = _run(workdir, "--config.train.steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_smoke_writes_metrics_checkpoint_and_export(smoke_run):
    rows = read_metrics(smoke_run / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    assert steps == [0, 1, 2, 3]  # validation before training, then one row per iteration
    for row in rows[1:]:
        for key in (
            "train/loss",
            "rollout/accuracy",
            "kl/beta/easy",
            "rollout/tau_used",
            "bucket/hard/prompts",
            "time/step_s",
            "rollout/logp_gap_sampler_learner",
        ):
            assert key in row, key
            assert np.isfinite(row[key]), key
        # The sampler and the learner agree on the old policy's log-probs.
        assert row["rollout/logp_gap_sampler_learner"] < 1e-5
    assert json.loads((smoke_run / "config.json").read_text())["stage"] == "aepo"
    assert any((smoke_run / "checkpoints").iterdir())
    assert any((smoke_run / "tb").iterdir())
    from ares_jax.models.qwen2_5_vl import params

    exported = params.from_pretrained(smoke_run / "export", dtype=jax.numpy.float32)
    assert exported.cfg.text.num_hidden_layers == 2
    assert (smoke_run / "export" / "tokenizer.json").is_file()


def test_sigkill_then_resume_equals_uninterrupted(smoke_run, tmp_path):
    cmd, env = _main(tmp_path, "--config.train.steps=3")
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
    resumed = _run(tmp_path, "--config.train.steps=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from workdir checkpoint" in resumed.stderr
    got = {r["step"]: _comparable(r) for r in read_metrics(metrics)}
    want = {r["step"]: _comparable(r) for r in read_metrics(smoke_run / "metrics.jsonl")}
    assert sorted(got) == sorted(want)
    for step in (2, 3):  # steps run after the restart equal the uninterrupted run, bit for bit
        assert got[step] == want[step], step


def test_eight_devices_equal_one(smoke_run, tmp_path):
    proc = _run(
        tmp_path,
        "--config.train.steps=1",
        "--config.mesh.shape.data=2",
        "--config.mesh.shape.fsdp=2",
        "--config.mesh.shape.tensor=2",
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = {r["step"]: r for r in read_metrics(smoke_run / "metrics.jsonl")}[1]
    eight = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}[1]
    for key in (
        "rollout/response_len",
        "rollout/accuracy",
        "hwe/count",
        "reward/total",
        "rollout/tau_used",
    ):
        assert eight[key] == pytest.approx(one[key], rel=1e-6), key
    for key in ("train/loss", "train/grad_norm", "rollout/entropy_mean", "rollout/tau_next"):
        assert eight[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


def test_bad_data_file_is_named(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "no answer"}\n')
    proc = _run(
        tmp_path / "work",
        "--config.data.source=files",
        f"--config.data.train_files={data}",
        f"--config.data.val_files={data}",
    )
    assert proc.returncode == 2
    assert "train.jsonl, line 2" in proc.stderr and "Traceback" not in proc.stderr
    skipped = _run(
        tmp_path / "work2",
        "--config.data.source=files",
        f"--config.data.train_files={data}",
        f"--config.data.val_files={data}",
        "--config.data.on_error=skip",
        "--config.train.steps=1",
        "--config.rollout.prompts_per_iter=1",
        "--config.train.prompts_per_step=1",
        "--config.train.micro_batch_size=4",
        "--config.filter.enabled=False",
    )
    assert skipped.returncode == 0, skipped.stderr[-3000:]
