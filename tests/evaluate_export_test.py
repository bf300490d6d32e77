"""Evaluating a stage's export with `python -m ares_jax.evaluate` gives what the stage's in-run
validation gave for the policy it exported: the same response to every problem, the same
accuracy and length. The source checkpoint has its own pixel limits and normalisation, and the
run overrides the pixel limits, so the test fails if either path preprocesses differently (the
export's image processor must carry the run's settings), prompts differently (chat template) or
loads other weights."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx

from ares_jax import runtime
from ares_jax.aepo import train as aepo_train
from ares_jax.data import pipeline
from ares_jax.models.qwen2_5_vl import config, hub_files, params, processor
from ares_jax.models.qwen2_5_vl.tokenizer import build_tokenizer
from configs import aepo as aepo_config
from tests.data.virl39k import write_virl39k

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not the hub's: a path using those differs


def _checkpoint(directory: Path) -> Path:
    model = params.init_model(config.preset("tiny"), seed=3)
    params.save_pretrained(model, directory, dtype="float32")
    tokenizer = build_tokenizer()
    tokenizer.chat_template = processor.QWEN2_5_VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    settings = hub_files.default_image_settings(2352, 50176)._replace(mean=MEAN, std=STD)
    hub_files.write_export_files(directory, settings=settings, tokenizer=tokenizer)
    return directory


@pytest.mark.slow
def test_evaluating_the_export_equals_the_in_run_validation(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    data_dir = tmp_path / "virl39k"
    data, _ = write_virl39k(data_dir)
    c = aepo_config.stage_config("smoke")
    with c.unlocked():
        c.model.path = str(ckpt)
        c.data.update(min_pixels=3136, max_pixels=12544)  # the run's, not the checkpoint's
        c.data.update(max_prompt_len=256, prompt_len_buckets=(256,))  # as the command line's
        c.eval.update(temperature=0.0, max_response_len=12)
    settings = runtime.run_image_settings(c)
    assert (settings.min_pixels, settings.max_pixels, settings.mean, settings.std) == (
        3136,
        12544,
        MEAN,
        STD,
    )
    mesh, model, tokenizer = runtime.load_policy(c)
    examples = list(pipeline.example_source(pipeline.FilesSpec(paths=(str(data),))))
    examples = [dataclasses.replace(e, source=e.source or data.stem) for e in examples]
    graphdef, state = nnx.split(model)
    in_run = aepo_train.evaluate_policy(
        c, graphdef, state, examples, tokenizer, model.cfg, key=jax.random.PRNGKey(0), mesh=mesh
    )
    export = tmp_path / "export"
    runtime.export_policy(c, model, export, tokenizer, stage="test")

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the same 8 CPU devices as this process
    metrics, responses = tmp_path / "metrics.json", tmp_path / "responses.jsonl"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ares_jax.evaluate",
            f"--model={export}",
            f"--data={data}",
            "--temperature=0",
            f"--max_new_tokens={c.eval.max_response_len}",
            "--prompt_len=256",
            f"--batch_size={min(len(examples), c.rollout.prompts_per_iter)}",
            "--bf16=false",  # the run computes in float32 (model.dtype)
            f"--output={metrics}",
            f"--responses={responses}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "normalised with mean (0.5, 0.4, 0.3), std (0.2, 0.25, 0.3)" in r.stderr
    lines = [json.loads(line) for line in responses.read_text().splitlines()]
    assert [x["id"] for x in lines] == [e.id for e in in_run.problems]
    assert [x["response"] for x in lines] == in_run.responses
    assert [x["length"] for x in lines] == in_run.lengths.tolist()
    # The responses differ between problems: the comparison above tests something.
    assert len(set(in_run.responses)) > 1
    got = json.loads(metrics.read_text())
    for key in ("eval/accuracy", "eval/response_len", "eval/count", "eval/skipped_overlong"):
        assert got[key] == in_run.metrics[key], key
