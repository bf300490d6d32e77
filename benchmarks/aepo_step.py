r"""One AEPO iteration, phase by phase: rollout (generation, grading), learner (log-prob passes and
updates), at a chosen model shape with random weights on the synthetic task.

  python -m benchmarks.aepo_step --preset=cpu            # the 'small' model on this CPU
  python -m benchmarks.aepo_step --preset=gpu            # 3B shape, bf16: 64 prompts x 8, 1k new
  python -m benchmarks.aepo_step --preset=cpu --record   # also append to RESULTS.md

It runs the real stage (`ares_jax.aepo.train.run`) for three iterations and reports the last, by
which every prompt bucket has been compiled: seconds per phase and generated tokens per second
per device. The online filter is off so that each iteration samples exactly one batch. No
Hugging Face peer runs here: transformers has no RL trainer to compare with one iteration. The
sampler and the learner's forward+backward are compared with transformers in
benchmarks/sampler.py and benchmarks/model.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax
from absl import app, flags

from ares_jax.aepo import train
from ares_jax.metrics import read_metrics
from benchmarks import report
from configs import aepo

PRESETS = {
    "cpu": dict(model="small", dtype="float32", prompts=8, n=8, new=64, step_prompts=8, micro=16),
    "gpu": dict(model="3b", dtype="bfloat16", prompts=64, n=8, new=1024, step_prompts=16, micro=16),
}

_PRESET = flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Size preset.")
_RECORD = flags.DEFINE_bool("record", False, "Append the table to benchmarks/RESULTS.md.")


def _config(p):
    c = aepo.get_config("stage")
    with c.unlocked():
        c.model.preset = p["model"]
        c.model.dtype = c.model.param_dtype = p["dtype"]
        c.model.remat = "none" if p["model"] == "small" else "full"
        c.rollout.update(
            n=p["n"],
            max_response_len=p["new"],
            length_buckets=(p["new"],),
            prompts_per_iter=p["prompts"],
            decode_batch_size=p["prompts"] * p["n"],
        )
        c.filter.enabled = False
        c.train.update(
            steps=3, prompts_per_step=p["step_prompts"], micro_batch_size=p["micro"], export=False
        )
        c.eval.update(val_before_train=False, every_steps=0)
        c.entropy.threshold_init = "first_batch"
        c.checkpoint.update(every_steps=0, keep=1)
        c.log.tensorboard = False
    aepo.validate(c)
    return c


def main(argv):
    del argv
    p = PRESETS[_PRESET.value]
    with tempfile.TemporaryDirectory() as workdir:
        train.run(_config(p), workdir)
        row = [r for r in read_metrics(Path(workdir) / "metrics.jsonl") if r["step"] == 3][0]
    devices = jax.device_count()
    tokens = row["rollout/response_len"] * row["rollout/responses"]
    lines = [
        f"model {p['model']} ({p['dtype']}), {p['prompts']} prompts x {p['n']} samples, up to "
        f"{p['new']} new tokens; {report.card()}; jax {jax.__version__}",
        "",
        "| phase | seconds |",
        "|---|---|",
        f"| generation | {row['time/generate_s']:.2f} |",
        f"| grading (math-verify) | {row['time/score_s']:.2f} |",
        f"| rollout phase, all | {row['time/rollout_s']:.2f} |",
        f"| learner: old/ref log-probs + updates | {row['time/learn_s']:.2f} |",
        f"| iteration | {row['time/step_s']:.2f} |",
        "",
        f"generated tokens {tokens:,.0f} (mean length {row['rollout/response_len']:.0f}); "
        f"{tokens / row['time/step_s'] / devices:,.0f} tokens/s per device over the iteration, "
        f"{row['rollout/tokens_per_s'] / devices:,.0f} tokens/s per device while generating",
    ]
    text = "\n".join(lines)
    print(text)
    if _RECORD.value:
        print(f"appended to {report.record('aepo_step', _PRESET.value, text)}")


if __name__ == "__main__":
    app.run(main)
