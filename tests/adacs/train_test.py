"""The AdaCS stage end to end on the `smoke` preset, and its resume after SIGKILL."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ares_jax import runtime
from ares_jax.adacs import pass_rate as PR
from ares_jax.adacs import train as adacs_train
from ares_jax.data import records
from ares_jax.metrics import read_metrics
from configs import adacs as adacs_config
from tests.cpu_env import stage_env
from tests.data.virl39k import write_virl39k

ROOT = Path(__file__).resolve().parents[2]


def _cmd(workdir, *overrides):
    env = stage_env()
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
    # Length-grouped batches, windows of 2: the SIGKILL test resumes in the middle of one.
    "--config.sft.length_group_batches=2",
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
    now the stage measures every prompt right after the model loads (adacs/train.py `_measure`)."""
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


# --- ViRL39K-layout data: traces checked up front, provided pass rates used ---------------------


def _virl_config(directory, **data):
    c = adacs_config.get_config("smoke")
    c.data.source = "files"
    c.data.train_files = str(directory)
    for key, value in data.items():
        c.data[key] = value
    adacs_config.validate(c)
    return c


@pytest.fixture
def no_model_work(monkeypatch):
    """Fails the test if the stage loads a model or estimates a pass rate."""
    calls = []

    def forbidden(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} ran")

        return call

    monkeypatch.setattr(runtime, "load_policy", forbidden("load_policy"))
    monkeypatch.setattr(PR, "estimate_pass_rates", forbidden("estimate_pass_rates"))
    return calls


def test_virl39k_without_traces_stops_before_any_model_work(tmp_path, no_model_work):
    directory = tmp_path / "virl39k"
    path, _ = write_virl39k(directory)
    work = tmp_path / "work"
    with pytest.raises(records.DataError) as e:
        adacs_train.run(_virl_config(directory), str(work))
    message = str(e.value)
    assert message.startswith(
        f"AdaCS fine-tunes on teacher reasoning traces, but no trace column was found in {path}:"
    )
    assert "in a column named one of traces, trace, responses, response, reasoning" in message
    assert "generated by external teacher models" in message and "must supply them" in message
    assert "\n" not in message
    assert no_model_work == [] and not (work / "pass_rates").exists()


def test_a_traces_column_without_values_stops_before_any_model_work(tmp_path, no_model_work):
    directory = tmp_path / "virl39k"
    path, _ = write_virl39k(directory)
    table = pq.read_table(path)
    table = table.append_column("traces", pa.array([None] * table.num_rows, pa.list_(pa.string())))
    pq.write_table(table, path)
    with pytest.raises(
        records.DataError, match=r"none of the 3 training rows read from .*39Krelease"
    ):
        adacs_train.run(_virl_config(directory), str(tmp_path / "work"))
    # A trace column of another name, mapped with data.columns, is accepted.
    table = pq.read_table(path).drop_columns(["traces"])
    table = table.append_column("teacher_cot", pa.array([["\\boxed{3}"]] * 3))
    pq.write_table(table, path)
    c = _virl_config(directory, columns={"traces": "teacher_cot"})
    with pytest.raises(AssertionError, match="load_policy ran"):  # past the check
        adacs_train.run(c, str(tmp_path / "work2"))


def test_rows_without_traces_are_left_out():
    c = adacs_config.get_config("smoke")
    problems = [
        records.Example("a", "q", "1", traces=("\\boxed{1}",)),
        records.Example("b", "q", "2", origin="x.jsonl, line 2"),
    ]
    assert [p.id for p in adacs_train.with_traces(c, problems, None)] == ["a"]


@pytest.mark.slow
def test_virl39k_with_traces_uses_the_given_pass_rates(tmp_path, monkeypatch):
    """ViRL39K rows plus a traces column: the 7B base pass rates are used, nothing is estimated,
    and the report's brackets say the rates were given by the data."""
    directory = tmp_path / "virl39k"
    write_virl39k(directory, traces=True)

    def forbidden(*args, **kwargs):
        raise AssertionError("estimate_pass_rates ran")

    monkeypatch.setattr(PR, "estimate_pass_rates", forbidden)
    work = tmp_path / "work"
    adacs_train.run(_virl_config(directory), str(work))
    assert not (work / "pass_rates").exists()
    text = (work / "curation" / "report.md").read_text()
    assert (
        "- pass rates: 3 given by the data (rows read per column: `PassRate_32BTrained`: 1, "
        in text
    )
    assert "`PassRate_7BBase`: 2), 0 estimated" in text
    assert "| 2 | 1/4 | 1 | 1 | 1 |" in text and text.count(" 1 | 0 |\n") >= 3
    rows = [json.loads(x) for x in (work / "curation" / "records.jsonl").read_text().splitlines()]
    assert {r["id"]: r["pass_rate"] for r in rows} == {"q0": 0.25, "q1": 0.5, "q2": 1.0}
    assert (work / "export" / "model.safetensors").is_file()
