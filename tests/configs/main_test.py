"""Tests for ares_jax/main.py, run as a subprocess the way a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_main(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "ares_jax.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_smoke_prints_config_and_stage(tmp_path):
    # --dry_run: the stage itself runs end to end in tests/aepo/train_test.py.
    r = run_main("--config=configs/aepo.py:smoke", f"--workdir={tmp_path}", "--dry_run")
    assert r.returncode == 0, r.stderr
    assert "stage: aepo" in r.stdout and "clip_high: 0.3" in r.stdout
    assert "# stage 'aepo':" in r.stdout and "ares_jax.aepo.train.run(config" in r.stdout
    assert "--dry_run" in r.stdout


def test_adacs_config_validates_and_names_bad_keys(tmp_path):
    r = run_main("--config=configs/adacs.py:smoke", f"--workdir={tmp_path}", "--dry_run")
    assert r.returncode == 0, r.stderr
    assert "stage: adacs" in r.stdout and "ares_jax.adacs.train.run(config" in r.stdout
    r = run_main("--config=configs/adacs.py", "--config.sft.schedule=linear", "--dry_run")
    assert r.returncode == 2 and "config.sft.schedule='linear' must be one of" in r.stderr
    r = run_main("--config=configs/adacs.py", "--config.sft.micro_batch_size=5", "--dry_run")
    assert r.returncode == 2 and "sft.micro_batch_size" in r.stderr
    r = run_main("--config=configs/adacs.py:paper_7b", "--dry_run")
    assert r.returncode == 2 and "model.path" in r.stderr


def test_dry_run_runs_nothing():
    r = run_main("--config=configs/aepo.py:stage", "--dry_run", "--config.rollout.top_k=5")
    assert r.returncode == 0, r.stderr
    assert "top_k: 5" in r.stdout and "not run (--dry_run)" in r.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["--config.nonexistent=1"], ["unknown config key 'nonexistent'", "keys under config"]),
        (["--config.loss.nokey=1"], ["'loss.nokey'", "clip_low"]),
        (["--config.loss.clip_low=abc"], ["--config.loss.clip_low=abc", "abc"]),
        (["--config.entropy.threshold=median"], ["config.entropy.threshold='median'", "'paper'"]),
        (["--config.entropy.window_offset=2"], ["config.entropy.window_offset=2", "0, 1"]),
        (["--config.kl.controller=pid"], ["config.kl.controller='pid'"]),
    ],
)
def test_user_errors_are_one_sentence(args, words):
    r = run_main("--config=configs/aepo.py:smoke", *args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: ")
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize(
    "config, words",
    [
        ("configs/aepo.py:paper_13b", ["unknown preset 'paper_13b'"]),
        ("configs/aepo.py:preset=smoke,hosts=4", ["unknown key 'hosts'", "preset"]),
        ("configs/aepo.py:paper_7b", ["config.model.path: is required"]),
        ("configs/nonexistent.py", ["nonexistent.py"]),
    ],
)
def test_bad_config_argument(config, words):
    r = run_main(f"--config={config}")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()[-1]
    for w in words:
        assert w in err, (w, err)


def test_usr2_prints_every_thread_stack_and_the_run_goes_on():
    code = (
        "import os, threading, time\n"
        "from ares_jax import main\n"
        "main.dump_stacks_on_signal()\n"
        "def parked(): time.sleep(30)\n"
        "threading.Thread(target=parked, daemon=True).start()\n"
        "time.sleep(0.2)\n"
        "os.kill(os.getpid(), main.STACK_DUMP_SIGNAL)\n"
        "time.sleep(0.5)\n"
        "print('still running')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "still running"
    # The parked thread, then the current (main) thread.
    other, current = r.stderr.split("Current thread 0x")
    assert "Thread 0x" in other and "line 4 in parked" in other
    assert 'File "<string>", line 7 in <module>' in current


def test_unwritable_workdir_is_one_sentence_before_the_model_loads(tmp_path):
    # Before: a 17-line traceback once the model had loaded.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    r = run_main("--config=configs/aepo.py:smoke", f"--workdir={blocker / 'run'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith(f"error: cannot write to the workdir {blocker / 'run'}: "), err
    assert "starting from" not in r.stderr  # nothing was loaded


def _printed_config(stdout: str) -> dict:
    """The config main prints (YAML between '# config (...):' and '# workdir')."""
    import yaml

    text = stdout.split("\n", 1)[1].split("# workdir")[0]
    return yaml.safe_load(text)


def test_image_settings_follow_the_checkpoint_unless_set(tmp_path):
    """With model.path, data.min_pixels/max_pixels left at the config file's CPU defaults and
    data.image_mean/image_std left None come from the checkpoint's image processor
    (transformers 5 layout here); command-line values stay. The pipeline config does it for
    every stage block from the warm-up's model.path."""
    import json

    mean, std = [0.5, 0.25, 0.125], [0.2, 0.3, 0.4]
    (tmp_path / "processor_config.json").write_text(
        json.dumps(
            {
                "image_processor": {
                    "min_pixels": 50176,
                    "max_pixels": 200704,
                    "image_mean": mean,
                    "image_std": std,
                }
            }
        )
    )
    args = ("--config=configs/aepo.py:stage", f"--config.model.path={tmp_path}", "--dry_run")
    r = run_main(*args)
    assert r.returncode == 0, r.stderr
    data = _printed_config(r.stdout)["data"]
    assert (data["min_pixels"], data["max_pixels"]) == (50176, 200704)
    assert (data["image_mean"], data["image_std"]) == (mean, std)
    assert "normalised with mean (0.5, 0.25, 0.125), std (0.2, 0.3, 0.4)" in r.stderr
    r = run_main(*args, "--config.data.max_pixels=100352", "--config.data.image_std=(0.1,0.1,0.1)")
    assert r.returncode == 0, r.stderr
    data = _printed_config(r.stdout)["data"]
    assert (data["min_pixels"], data["max_pixels"]) == (50176, 100352)
    assert (data["image_mean"], data["image_std"]) == (mean, [0.1, 0.1, 0.1])
    r = run_main(*args, "--config.data.image_std=(0.1,0,0.1)")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: config.data.image_std="), r.stderr
    r = run_main("--config=configs/aepo.py:stage", "--dry_run")  # no checkpoint: as configured
    data = _printed_config(r.stdout)["data"]
    assert (data["min_pixels"], data["max_pixels"], data["image_mean"]) == (3136, 12544, None)
    r = run_main("--config=configs/aepo.py", f"--config.warmup.model.path={tmp_path}", "--dry_run")
    assert r.returncode == 0, r.stderr
    printed = _printed_config(r.stdout)
    for block in ("warmup", "adacs", "aepo"):
        data = printed[block]["data"]
        assert (data["min_pixels"], data["max_pixels"]) == (50176, 200704), block
        assert (data["image_mean"], data["image_std"]) == (mean, std), block


def _cache_line(env_update: dict[str, str], tmp_path) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.pop("ARES_JAX_COMPILATION_CACHE", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.update(env_update)
    r = subprocess.run(
        [sys.executable, "-m", "ares_jax.main", "--config=configs/aepo.py:smoke", "--dry_run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return next(line for line in r.stdout.splitlines() if line.startswith("# compilation cache"))


def test_compilation_cache_location_and_switch(tmp_path):
    default = tmp_path / "xdg" / "ares_jax" / "xla"
    assert _cache_line({}, tmp_path).startswith(f"# compilation cache: {default};")
    own = tmp_path / "mine"
    assert _cache_line({"ARES_JAX_COMPILATION_CACHE": str(own)}, tmp_path).startswith(
        f"# compilation cache: {own};"
    )
    jaxs = tmp_path / "jax_own"
    assert _cache_line({"JAX_COMPILATION_CACHE_DIR": str(jaxs)}, tmp_path).startswith(
        f"# compilation cache: {jaxs};"
    )
    assert _cache_line({"ARES_JAX_COMPILATION_CACHE": "off"}, tmp_path) == (
        "# compilation cache: off"
    )


def test_a_second_process_reads_programs_from_the_cache(tmp_path):
    """The cache as main.py configures it: a program compiled in one process is written to
    the directory, and another process with the same program reads it instead of compiling."""
    code = (
        "import jax, jax.numpy as jnp, jax.monitoring\n"
        "from ares_jax import main\n"
        "main.compilation_cache()\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)  # a toy program\n"
        "events = []\n"
        "jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))\n"
        "f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + x.sum())\n"
        "f(jnp.ones((64, 64))).block_until_ready()\n"
        "print('hits', sum(e.endswith('/compilation_cache/cache_hits') for e in events))\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", ARES_JAX_COMPILATION_CACHE=str(tmp_path / "c"))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    hits = []
    for _ in range(2):
        r = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr
        hits.append(int(r.stdout.split()[-1]))
    assert any(p.is_file() for p in (tmp_path / "c").rglob("*")), "nothing was written"
    assert hits[0] == 0 and hits[1] >= 1, hits
