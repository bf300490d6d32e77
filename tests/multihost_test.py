"""Two JAX processes on this machine drive one mesh: the AEPO stage through the real entry point.

Each child process is started with a clean environment: the CPU platform, one CPU device
(XLA_FLAGS), and JAX_COORDINATOR_ADDRESS (a free localhost port), JAX_NUM_PROCESSES=2 and
JAX_PROCESS_ID, which `ares_jax.parallel.distributed` turns into `jax.distributed.initialize`;
cross-process collectives on the CPU go through gloo, jax's default CPU implementation. The
mesh is fsdp=2 over the devices of the two processes, so parameters, optimizer state and every
batch are sharded across the processes.

One device per process, as on real hosts: XLA's CPU runtime runs the independent collectives of
a program at the same time on a pool of one thread per core, and a gloo collective holds its
thread until every peer joins. With two devices per process on two cores, the four threads of the
two processes could all wait in collectives that their peers had not started (seen: the text
embedding's all-to-all beside the vision tower's loop of all-gathers), and the run hung.
`ares_jax.parallel.distributed` warns about that layout.

Tolerance of the 2-process vs 1-process comparison: the two runs execute the same SPMD programs
on the same global batches, so everything decided on the host (tokens, accuracy, lengths, HWE
counts, rewards, buckets, tau, evaluation) is equal exactly. The learner's reductions run over
gloo in one case and in-process in the other, in another order: those metrics agree to
rel 1e-5 (a few float32 ulps), and quantities that are mathematically 0 at the first step (loss,
policy-gradient loss, PPO KL, sampler/learner log-prob gap) are float32 rounding residues of
about 1e-8 to 1e-7, hence the absolute floor of 1e-6.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ares_jax.metrics import read_metrics
from tests.cpu_env import xla_flags
from tests.moving_reward import MOVING_REWARD

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300

# fsdp=2 over both processes; the reward differs within a group (tests/moving_reward.py).
OVERRIDES = ("--config.mesh.shape.data=1", "--config.mesh.shape.fsdp=2", *MOVING_REWARD)
EXACT_PREFIXES = ("rollout/", "reward/", "bucket/", "hwe/", "eval/", "kl/beta/", "kl/kappa/")
NEAR_ZERO = ("train/loss", "train/pg_loss", "train/ppo_kl", "rollout/logp_gap_sampler_learner")
# Variables of a surrounding cluster must not reach the children.
_DROP = ("JAX_", "XLA_", "SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "ARES_")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, cache: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP)}
    env.update(
        JAX_PLATFORMS="cpu",
        # Every run here, the one-process reference included, compiles with FAST_COMPILE.
        XLA_FLAGS=xla_flags(devices),
        # The second launch compiles the same programs again; the cache makes that a read.
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        # A process that hangs is sent SIGABRT: the Python stack of each of its threads goes
        # to its stderr, which the failure report shows.
        PYTHONFAULTHANDLER="1",
        **extra,
    )
    return env


class Launch:
    """The processes of one launch: return codes, stdout and stderr of each, in process order."""

    def __init__(self, outputs: list[tuple[int, str, str]]):
        self.returncodes = [o[0] for o in outputs]
        self.stdout = [o[1] for o in outputs]
        self.stderr = [o[2] for o in outputs]

    def lines(self, process: int, marker: str) -> list[str]:
        """The log lines of `process` holding `marker`, without the time/thread prefix."""
        return [
            line.split("] ", 1)[-1] for line in self.stderr[process].splitlines() if marker in line
        ]


def _launch(
    tmp: Path, name: str, workdir: Path, *overrides: str, processes: int = 2, devices: int = 1
) -> Launch:
    """Runs `python -m ares_jax.main` as `processes` processes of `devices` CPU devices each
    (their output goes to tmp/name.P.{out,err}) and fails the test, with every process's stderr,
    unless all exit 0 within TIMEOUT_S."""
    cmd = [
        sys.executable,
        "-m",
        "ares_jax.main",
        "--config=configs/aepo.py:smoke",
        f"--workdir={workdir}",
        *OVERRIDES,
        *overrides,
    ]
    port = _free_port()
    procs, files = [], []
    for p in range(processes):
        extra = {}
        if processes > 1:
            extra = dict(
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES=str(processes),
                JAX_PROCESS_ID=str(p),
            )
        out = open(tmp / f"{name}.{p}.out", "w+")
        err = open(tmp / f"{name}.{p}.err", "w+")
        files.append((out, err))
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=_env(devices, tmp / "jax_cache", extra), stdout=out, stderr=err
            )
        )
    start = time.monotonic()
    timed_out = False
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        timed_out = True
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    elapsed = time.monotonic() - start
    outputs = []
    for proc, (out, err) in zip(procs, files, strict=True):
        out.seek(0)
        err.seek(0)
        outputs.append((proc.returncode, out.read(), err.read()))
        out.close()
        err.close()
    launch = Launch(outputs)
    if any(rc != 0 for rc in launch.returncodes):
        report = "\n".join(
            f"--- process {p} (exit {rc}) stderr tail:\n{stderr[-12000:]}"
            for p, (rc, stderr) in enumerate(zip(launch.returncodes, launch.stderr, strict=True))
        )
        what = f"timed out after {TIMEOUT_S} s" if timed_out else f"failed after {elapsed:.0f} s"
        pytest.fail(f"{' '.join(cmd)} {what}:\n{report}")
    return launch


def _rows(workdir: Path) -> list[dict]:
    return read_metrics(workdir / "metrics.jsonl")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launch 1: two processes, one step (checkpoint 1). Launch 2: the same command with two
    steps, which restores checkpoint 1 and runs step 2. What each left behind is recorded."""
    tmp = tmp_path_factory.mktemp("multihost")
    workdir = tmp / "work"
    first = _launch(tmp, "first", workdir, "--config.train.steps=1")
    after_first = dict(
        rows=_rows(workdir),
        steps=sorted(p.name for p in (workdir / "checkpoints").iterdir()),
        ckpt_files={str(p.relative_to(workdir)) for p in (workdir / "checkpoints").rglob("*")},
        extra=json.loads((workdir / "checkpoints" / "1" / "extra" / "metadata").read_text()),
        tb=sorted(p.name for p in (workdir / "tb").iterdir()),
    )
    second = _launch(tmp, "second", workdir, "--config.train.steps=2")
    return dict(tmp=tmp, workdir=workdir, first=first, after_first=after_first, second=second)


def test_checkpoint_is_written_by_both_processes(runs):
    after = runs["after_first"]
    assert after["steps"] == ["1"]
    # Orbax wrote the shards of the sharded arrays from the process that holds them.
    for p in (0, 1):
        assert f"checkpoints/1/state/ocdbt.process_{p}/manifest.ocdbt" in after["ckpt_files"], p
        assert f"checkpoints/1/state/array_metadatas/process_{p}" in after["ckpt_files"], p
    # Each process's data position is saved: one shard of the training set each.
    positions = after["extra"]["data"]
    assert [d["shard_index"] for d in positions] == [0, 1]
    assert [d["shard_count"] for d in positions] == [2, 2]
    assert [d["next_index"] for d in positions] == [1, 1]  # one prompt each per iteration


def test_second_launch_restores_and_continues(runs):
    second, workdir = runs["second"], runs["workdir"]
    for p in (0, 1):
        resumed = second.lines(p, "resumed from workdir checkpoint at step 1")
        assert resumed, second.stderr[p][-3000:]
        assert second.lines(p, "AEPO step 2:") and not second.lines(p, "AEPO step 1:")
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]  # keep=1
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[:1] == runs["after_first"]["rows"]  # the restored run only appended step 2
    for key in ("train/loss", "train/grad_norm", "rollout/accuracy", "kl/beta/hard"):
        assert np.isfinite(rows[1][key]), key
    # The export after the last step: gathered by both processes, written by process 0.
    from ares_jax.models.qwen2_5_vl import params

    exported = params.from_pretrained(workdir / "export", dtype=np.float32)
    assert exported.cfg.text.num_hidden_layers == 2


def test_only_process_zero_writes(runs):
    first, second, workdir = runs["first"], runs["second"], runs["workdir"]
    # One writer: one row per step (a second writer would repeat each row) and one TensorBoard
    # event file per launch.
    assert [r["step"] for r in runs["after_first"]["rows"]] == [1]
    assert len(runs["after_first"]["tb"]) == 1
    assert len(list((workdir / "tb").iterdir())) == 2
    assert json.loads((workdir / "config.json").read_text())["stage"] == "aepo"
    for launch in (first, second):
        assert "# config (configs/aepo.py:smoke)" in launch.stdout[0]
        assert "# config" not in launch.stdout[1]


def test_processes_agree(runs):
    # The stage checks every step that the processes' host-side metrics are equal (it would have
    # stopped otherwise); their per-step log lines agree too.
    first, second = runs["first"], runs["second"]
    for launch, marker in ((first, "AEPO step 1:"), (second, "AEPO step 2:")):
        assert launch.lines(0, marker) and launch.lines(0, marker) == launch.lines(1, marker)
    for launch in (first, second):
        for p in (0, 1):
            assert launch.lines(p, f"jax.distributed ready: process {p} of 2, 1 local / 2 global")


def test_two_processes_equal_one_process(runs):
    single = runs["tmp"] / "single"
    _launch(runs["tmp"], "single", single, "--config.train.steps=1", processes=1, devices=2)
    got = {r["step"]: r for r in runs["after_first"]["rows"]}
    want = {r["step"]: r for r in _rows(single)}
    assert sorted(got) == sorted(want) == [1]
    got, want = got[1], want[1]
    assert want["train/grad_norm"] > 1e-3  # a real update, not rounding noise
    keys = {k for k in want if not k.startswith("time/") and "per_s" not in k}
    assert keys == {k for k in got if not k.startswith("time/") and "per_s" not in k}
    for key in sorted(keys):
        if key.startswith(EXACT_PREFIXES) and key not in NEAR_ZERO:
            assert got[key] == want[key], key
        else:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


MULTIHOST_CHILD = r"""
import sys
import jax, numpy as np
from ares_jax.parallel import distributed, multihost, mesh as M
assert distributed.maybe_initialize()
p = jax.process_index()
assert jax.process_count() == 2 and jax.device_count() == 4
assert multihost.allgather_objects({"p": p, "s": "x" * (p + 1)}) == [
    {"p": 0, "s": "x"}, {"p": 1, "s": "xx"}]
assert multihost.spread(lambda xs: [x * 10 + p for x in xs], list(range(5))) == [
    0, 11, 20, 31, 40]
m = M.make_mesh({"data": 4, "fsdp": 1, "tensor": 1})
host = np.arange(24.0).reshape(8, 3)
x = multihost.put(host, jax.sharding.NamedSharding(m, jax.sharding.PartitionSpec("data")))
assert not x.is_fully_addressable and len(x.addressable_shards) == 2
np.testing.assert_array_equal(multihost.fetch(x * 2), host * 2)
multihost.check_agreement("same", {"a": 1.0, "b": float("nan")})
try:
    multihost.check_agreement("step 7", {"a": 1.0, "b": float(p)})
except RuntimeError as e:
    print("DISAGREE:", e)
else:
    sys.exit("check_agreement accepted different values")
"""


def test_multihost_primitives(tmp_path):
    port = _free_port()
    procs = []
    for p in range(2):
        extra = dict(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(p),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", MULTIHOST_CHILD],
                cwd=ROOT,
                env=_env(2, tmp_path / "jax_cache", extra),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        outputs = [proc.communicate(timeout=120) for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        outputs = [proc.communicate() for proc in procs]
    for p, (proc, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {p}:\n{err[-3000:]}"
        assert "2 CPU devices in this process" in err  # distributed.CPU_DEVICES_WARNING
        want = "DISAGREE: processes disagree on 'b' at step 7 (process 0: 0.0, process 1: 1.0)"
        assert want in out
