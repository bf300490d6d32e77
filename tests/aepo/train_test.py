"""The AEPO stage end to end on the `smoke` preset: artefacts, resume after SIGKILL bit for bit,
8 devices against one, bad data."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from ares_jax.metrics import read_metrics
from tests.cpu_env import stage_env, xla_flags
from tests.moving_reward import MOVING_REWARD

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
    return cmd, stage_env(**(env or {}))  # one CPU device unless asked


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
    # tau (METHOD.md 2.3): step 1 counts against the validation value; the EMA starts from the
    # first training batch's statistic, not from the validation value, then smooths by 0.99.
    first, second = rows[1], rows[2]
    assert first["rollout/tau_used"] != pytest.approx(first["rollout/tau_batch"], abs=1e-3)
    assert first["rollout/tau_next"] == pytest.approx(first["rollout/tau_batch"], rel=1e-6)
    assert second["rollout/tau_used"] == pytest.approx(first["rollout/tau_next"], rel=1e-6)
    assert second["rollout/tau_next"] == pytest.approx(
        0.99 * first["rollout/tau_next"] + 0.01 * second["rollout/tau_batch"], rel=1e-5
    )
    assert json.loads((smoke_run / "config.json").read_text())["stage"] == "aepo"
    assert any((smoke_run / "checkpoints").iterdir())
    assert any((smoke_run / "tb").iterdir())
    from ares_jax.models.qwen2_5_vl import params

    exported = params.from_pretrained(smoke_run / "export", dtype=jax.numpy.float32)
    assert exported.cfg.text.num_hidden_layers == 2
    assert (smoke_run / "export" / "tokenizer.json").is_file()
    # The export's image processor has the run's pixel limits (what `evaluate --model=EXPORT`
    # reads back), and a generation config comes from the tokenizer's special tokens.
    from ares_jax.models.qwen2_5_vl import processor

    data = json.loads((smoke_run / "config.json").read_text())["data"]
    settings = processor.load_image_settings(smoke_run / "export")
    assert (settings.min_pixels, settings.max_pixels) == (data["min_pixels"], data["max_pixels"])
    generation = json.loads((smoke_run / "export" / "generation_config.json").read_text())
    assert generation["eos_token_id"] and "pad_token_id" in generation


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


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (code {proc.returncode}) before {path} appeared")
        if time.time() > deadline:
            pytest.fail(f"{path} did not appear in {timeout} s")
        time.sleep(0.1)


def test_second_run_refused_then_sigterm_saves_exits_143_and_restart_completes(tmp_path):
    from ares_jax.checkpoint import PREEMPTED_EXIT_CODE

    cmd, env = _main(tmp_path, "--config.train.steps=8")
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(tmp_path / ".lock", first)
    # A second run on the same workdir is refused in one sentence, before it loads anything.
    second = _run(tmp_path, "--config.train.steps=8", timeout=120)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the workdir {tmp_path} is in use by another run (pid ")
    assert f"pid {first.pid} " in last
    # SIGTERM: the step in flight is saved, nothing is exported, the code says "requeue me".
    _wait_for(tmp_path / "checkpoints" / "1", first)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    stderr = stderr.decode()
    assert first.returncode == PREEMPTED_EXIT_CODE == 143, stderr[-3000:]
    assert "preempted: AEPO preempted (SIGTERM) at step" in stderr
    assert "Traceback" not in stderr
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < 8
    assert not (tmp_path / "export").exists()
    assert not (tmp_path / "complete.json").exists()
    # The restart resumes at the saved step, runs the rest once, exports and records completion.
    resumed = _run(tmp_path, "--config.train.steps=8")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from workdir checkpoint at step {saved[-1]}" in resumed.stderr
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == list(range(9))
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "complete.json").read_text())["step"] == 8


def test_sigterm_during_the_start_up_stops_before_the_first_step(tmp_path):
    cmd, env = _main(tmp_path, "--config.train.steps=8")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(tmp_path / ".lock", proc)  # the handler is on before the lock is taken
    proc.send_signal(signal.SIGTERM)  # while the model loads and validation runs
    _, stderr = proc.communicate(timeout=300)
    stderr = stderr.decode()
    assert proc.returncode == 143, stderr[-3000:]
    assert (
        stderr.strip().splitlines()[-1] == "preempted: AEPO preempted (SIGTERM); restart to resume."
    )
    assert not any(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0]


def test_divergence_stops_in_one_sentence_with_a_complete_last_checkpoint(tmp_path):
    # optim.lr=1e6: the loss and gradient stay finite while the logits break; the rollout's
    # entropies turn NaN. Before, hwe_counts raised with a traceback and the save in flight was
    # lost; now the step is counted by the guard and the run stops naming step and quantity.
    proc = _run(tmp_path, "--config.optim.lr=1e6", "--config.train.steps=8")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    m = re.fullmatch(
        r"error: Non-finite values at step (\d+) \(1 in a row, more than the 0 allowed\): "
        r"rollout/entropy\. The last checkpoint: step (\d+) in (.+)\.",
        last,
    )
    assert m, last
    bad, good = int(m.group(1)), int(m.group(2))
    assert good == bad - 1 and Path(m.group(3)) == tmp_path / "checkpoints"
    from ares_jax import checkpoint

    with checkpoint.Checkpointer(m.group(3), every_steps=1, keep=1, read_only=True) as ckpt:
        assert ckpt.all_steps() == [good]
        restored = ckpt._manager.restore(good)  # every item complete and readable
    assert int(np.asarray(restored["state"]["train"]["step"])) > 0
    assert not (tmp_path / "export").exists() and not (tmp_path / "complete.json").exists()


def test_eight_devices_equal_one(smoke_run, tmp_path):
    proc = _run(
        tmp_path,
        "--config.train.steps=1",
        "--config.mesh.shape.data=2",
        "--config.mesh.shape.fsdp=2",
        "--config.mesh.shape.tensor=2",
        env={"XLA_FLAGS": xla_flags(8)},
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


def test_sampler_old_logp_skips_the_learner_pass_and_matches(smoke_run, tmp_path):
    """old_logp_source='sampler' takes the old policy's log-probs from the rollout, so the
    learner's extra forward pass (and the gap metric it feeds) is gone; with one update per
    iteration the two sources give the same training run up to the gap (< 1e-5)."""
    proc = _run(tmp_path, "--config.train.steps=1", "--config.train.old_logp_source=sampler")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = {r["step"]: r for r in read_metrics(smoke_run / "metrics.jsonl")}[1]
    got = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}[1]
    assert "rollout/logp_gap_sampler_learner" not in got
    for key in ("rollout/accuracy", "reward/total", "rollout/response_len"):
        assert got[key] == want[key], key
    for key in ("train/loss", "train/grad_norm", "train/pg_loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


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


def test_overlong_prompt_is_dropped_and_counted_or_names_file_and_line(tmp_path):
    """A prompt longer than the largest bucket used to pass the reader and stop the first rollout
    that drew it, with a traceback naming no file. Now every prompt is measured at start-up:
    drop_overlong_prompts=False stops the run there naming file and line, before any rollout;
    True drops and counts it, and the run trains on the rest."""
    data = tmp_path / "train.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(4)]
    rows.insert(2, {"question": "long " * 400, "answer": "1"})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = (
        "--config.data.source=files",
        f"--config.data.train_files={data}",
        f"--config.data.val_files={data}",
        "--config.eval.val_before_train=False",
        "--config.entropy.threshold_init=first_batch",
        "--config.eval.every_steps=0",
        "--config.train.steps=1",
        "--config.rollout.prompts_per_iter=4",
        "--config.train.prompts_per_step=4",
        "--config.train.micro_batch_size=4",
        "--config.filter.enabled=False",
        "--config.train.export=False",
    )
    strict = _run(tmp_path / "strict", *args, "--config.data.drop_overlong_prompts=False")
    assert strict.returncode == 2, strict.stderr[-3000:]
    assert "train.jsonl, line 3: the prompt has" in strict.stderr
    assert "largest prompt length bucket (256)" in strict.stderr
    assert "Traceback" not in strict.stderr and "AEPO step" not in strict.stderr
    metrics = tmp_path / "strict" / "metrics.jsonl"
    assert not metrics.exists() or not read_metrics(metrics)

    dropped = _run(tmp_path / "drop", *args)
    assert dropped.returncode == 0, dropped.stderr[-3000:]
    assert "skipped 1 training records: overlong_prompt: 1 (first: " in dropped.stderr
    assert "train.jsonl, line 3: the prompt has" in dropped.stderr
    assert "AEPO: 4 training problems" in dropped.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "drop" / "metrics.jsonl")] == [1]


# One iteration whose reward differs within a group (tests/moving_reward.py).
_MOVING = ("--config.train.steps=1", *MOVING_REWARD)
# Unoptimised CPU code generation compiles in about half the time; both runs use it.
# Decided on the host from sampled tokens: equal exactly when the sharded run samples the same.
_EXACT = ("rollout/", "reward/", "bucket/", "hwe/", "kl/beta/", "kl/kappa/")
# Computed on the device from the sampler's logits: a sharded prefill (the blockwise attention's
# per-shard blocks) rounds them differently, by a float32 ulp or so.
_ROUNDED = ("rollout/entropy",)
# Mathematically 0 at the first step (ratio 1, policy = reference): float32 rounding residues.
_NEAR_ZERO = ("train/loss", "train/pg_loss", "train/ppo_kl", "rollout/logp_gap_sampler_learner")


def _exported(workdir) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(workdir / "export" / "model.safetensors"))


@pytest.fixture(scope="module")
def one_device_iteration(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_device")
    one = _run(workdir, *_MOVING)
    assert one.returncode == 0, one.stderr[-3000:]
    return workdir


@pytest.mark.parametrize(
    "attention,pack_tokens", [("xla", 0), ("blockwise", 0), ("blockwise", 1024)]
)
def test_fsdp_by_tensor_mesh_equals_one_device(
    one_device_iteration, tmp_path, attention, pack_tokens
):
    """One AEPO iteration on a data=1 x fsdp=4 x tensor=2 mesh of 8 devices against one device
    (with the blockwise attention and padded rows; the sharded run also with the XLA attention,
    and with packed rows: micro-batches of a 1024-token budget, each of the 4 devices of the
    batch axes packing its sequences into one row of at most 1024 tokens).

    Tolerances. Metrics decided on the host (tokens, lengths, HWE counts, rewards, buckets, tau,
    controllers) are equal exactly. The learner's sums run in another order when sharded: its
    metrics agree to rel 1e-5 (a few float32 ulps), with an absolute floor of 1e-6 for the
    quantities that are 0 up to rounding at the first step. Parameters (exported in float32):
    Adam's first step moves each weight by lr * g / (|g| + eps), about +-lr (1e-5) wherever
    |g| >> eps = 1e-8, so reduction-order rounding only shows where |g| is near eps (measured:
    at most 1.1e-7, root mean square 4e-10). Each weight must agree within 0.2 * lr and the root
    mean square difference be below 1e-3 * lr; a missing or doubled gradient shard would change
    the moves of many weights by up to 2 * lr.
    """
    eight = _run(
        tmp_path / "eight",
        *_MOVING,
        f"--config.model.attention={attention}",
        f"--config.train.pack_tokens={pack_tokens}",
        "--config.mesh.shape.data=1",
        "--config.mesh.shape.fsdp=4",
        "--config.mesh.shape.tensor=2",
        env={"XLA_FLAGS": xla_flags(8)},
    )
    assert eight.returncode == 0, eight.stderr[-3000:]
    (want,) = read_metrics(one_device_iteration / "metrics.jsonl")
    (got,) = read_metrics(tmp_path / "eight" / "metrics.jsonl")
    assert want["train/grad_norm"] > 1e-3  # a real update, not rounding noise
    if pack_tokens:
        assert 0 < got.pop("learner/pack_len") <= 1024 and 0 < got.pop("learner/pack_fill") <= 1
        assert got.pop("learner/micro_batches") >= 1
    assert _comparable(got).keys() == _comparable(want).keys()
    for key in sorted(_comparable(want)):
        if key.startswith(_EXACT) and key not in _NEAR_ZERO and not key.startswith(_ROUNDED):
            assert got[key] == want[key], key
        else:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    lr = 1e-5  # configs/aepo.py optim.lr
    p1, p8 = _exported(one_device_iteration), _exported(tmp_path / "eight")
    assert sorted(p1) == sorted(p8)
    squares, count = 0.0, 0
    for name in sorted(p1):
        diff = np.abs(p1[name].astype(np.float64) - p8[name].astype(np.float64))
        assert diff.max() <= 0.2 * lr, (name, diff.max())
        squares, count = squares + float(np.sum(diff**2)), count + diff.size
    assert np.sqrt(squares / count) <= 1e-3 * lr


def test_old_logprobs_come_from_the_rollout_policy_for_every_minibatch(tmp_path):
    """Two mini-batches per iteration: the second one's old log-probs are the rollout policy's,
    not the parameters after the first step (the released trainer takes them before any update).
    Before, the learner recomputed them after the first step: the gap to the sampler was 0.14.
    The run uses the paper's kappa controller, which is fed from every mini-batch."""
    proc = _run(
        tmp_path,
        "--config.kl.controller=paper",
        "--config.rollout.prompts_per_iter=4",
        "--config.train.prompts_per_step=2",
        "--config.optim.lr=1e-2",
        "--config.train.old_logp_source=learner",
        "--config.eval.val_before_train=False",
        "--config.entropy.threshold_init=first_batch",
        "--config.eval.every_steps=0",
        "--config.train.export=False",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["rollout/logp_gap_sampler_learner"] < 1e-4
    # The policy moved after the first step of iteration 2 (lr 1e-2), so the second mini-batch's
    # ratio is not 1: the importance correction acts (mean of the two steps' PPO KL).
    assert rows[1]["train/ppo_kl"] > 1e-3
    assert any(rows[-1][f"kl/kappa/{b}"] != 1.0 for b in ("easy", "medium", "hard"))


def test_the_released_switches_run_end_to_end(tmp_path):
    """The smoke run with every behaviour switch at paper_3b's released value (the authors' word
    list, arg-max triggers, top-10 entropies, the reward-timing quirk, 8 beta states stepping per
    sequence, bfloat16 master weights and AdamW)."""
    from configs import aepo, common

    paper = aepo.get_config("paper_3b")
    overrides = [
        f"--config.{key}={common.get_path(paper, key)}"
        for key in aepo.RELEASED_SWITCHES
        if common.get_path(paper, key) is not None
    ]
    proc = _run(tmp_path, *overrides, "--config.train.steps=2", "--config.train.export=False")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["kl"]["beta_cadence"] == {"ranks": 8, "micro_batch": 1}
    assert config["entropy"]["estimator"] == "topk_code"
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert np.isfinite(row["train/loss"]) and np.isfinite(row["kl/beta/easy"])
        assert row["rollout/tau_used"] > 0
    # The validation seed of step 1 is the same top-10 estimate as the training batches' (about
    # 0.2 nats here), not the exact entropy (about 6.3 nats for the random tiny model).
    first = rows[1]
    assert 0.5 < first["rollout/tau_used"] / first["rollout/tau_batch"] < 2.0
    assert first["rollout/tau_used"] < 0.25 * first["rollout/entropy_mean"]
