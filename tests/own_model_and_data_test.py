"""The README's "Your own model and data" commands, end to end at smoke size: a checkpoint
directory in the hub's layout (weights, config.json, tokenizer with its chat template,
preprocessor_config.json, generation_config.json) and ViRL39K-layout data in a directory. AEPO
runs from them with paths only (plus smoke sizes), its export loads in transformers'
image-processor and generation-config classes, and `evaluate` runs on the export."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ares_jax.models.qwen2_5_vl import config, hub_files, params, processor
from ares_jax.models.qwen2_5_vl.tokenizer import build_tokenizer
from tests.cpu_env import stage_env
from tests.data.virl39k import write_virl39k

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(directory: Path) -> Path:
    model = params.init_model(config.preset("tiny"), seed=0)
    params.save_pretrained(model, directory, dtype="bfloat16")
    tokenizer = build_tokenizer()
    tokenizer.chat_template = processor.QWEN2_5_VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    hub_files.write_export_files(
        directory, settings=hub_files.default_image_settings(2352, 12544), tokenizer=tokenizer
    )
    return directory


def _run(*args, timeout=900):
    env = stage_env()
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_aepo_from_a_checkpoint_directory_and_virl39k_then_evaluate(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    data = tmp_path / "virl39k"
    write_virl39k(data)
    work = tmp_path / "aepo"
    r = _run(
        "ares_jax.main",
        "--config=configs/aepo.py:smoke",
        f"--workdir={work}",
        f"--config.model.path={ckpt}",
        f"--config.data.train_files={data}",
        f"--config.data.val_files={data}",
        "--config.train.steps=1",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data.source='files'" in r.stderr  # implied by the paths
    assert "prompts with its chat template" in r.stderr
    printed = json.loads((work / "config.json").read_text())
    # The checkpoint's lower limit; the smoke preset sets the upper one itself.
    assert (printed["data"]["min_pixels"], printed["data"]["max_pixels"]) == (2352, 3136)
    export = work / "export"
    assert hub_files.source_dtype(export) == "bfloat16"  # the source's dtype
    assert (export / "chat_template.jinja").is_file() or json.loads(
        (export / "tokenizer_config.json").read_text()
    ).get("chat_template")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    image = transformers.AutoImageProcessor.from_pretrained(export, local_files_only=True)
    assert (image.size["shortest_edge"], image.size["longest_edge"]) == (2352, 3136)
    transformers.GenerationConfig.from_pretrained(export, local_files_only=True)
    transformers.AutoTokenizer.from_pretrained(export, local_files_only=True)
    out = tmp_path / "eval.json"
    r = _run(
        "ares_jax.evaluate",
        f"--model={export}",
        f"--data={data / '39Krelease.parquet'}",
        "--max_new_tokens=8",
        "--prompt_len=256",
        f"--output={out}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert metrics["eval/skipped_overlong"] == 0 and 0.0 <= metrics["eval/accuracy"] <= 1.0
