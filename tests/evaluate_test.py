"""Evaluation: metrics computed from real generations, grouped per source and difficulty."""

import jax
import numpy as np
from flax import nnx

from ares_jax import evaluate as ev
from ares_jax import evaluate_cli
from ares_jax.data import synthetic
from ares_jax.models.qwen2_5_vl import config, params, tokenizer
from ares_jax.sampling import SamplingParams
from tests.cpu_env import stage_env


def test_evaluate_groups_real_generations():
    cfg = config.preset("tiny")
    model = params.init_model(cfg, seed=0)
    tok = tokenizer.build_tokenizer()
    examples = synthetic.make_examples(5, seed=1, split="val")
    graphdef, state = nnx.split(model)
    result = ev.evaluate(
        graphdef,
        state,
        examples,
        tok,
        cfg,
        sampling=SamplingParams(
            n=2, max_new_tokens=6, temperature=1.0, pad_token_id=cfg.pad_token_id
        ),
        template="Answer in \\boxed{}.",
        min_pixels=3136,
        max_pixels=12544,
        prompt_len_buckets=(256,),
        batch_size=2,  # 5 problems: calls of 2, 2 and 1
        key=jax.random.PRNGKey(0),
    )
    assert result.correct.shape == (10,) and result.lengths.shape == (10,)
    assert (result.lengths == 6).all()  # no stop tokens: every row runs to the limit
    assert result.metrics["eval/count"] == 10
    assert result.metrics["eval/accuracy"] == float(result.correct.mean())
    counts = [n for _, _, n in result.groups["difficulty"].values()]
    assert sum(counts) == 10
    want = sorted({str(e.difficulty) for e in examples})
    assert sorted(result.groups["difficulty"]) == want
    assert result.entropy.shape == result.mask.shape == (10, 6)
    assert (result.entropy[result.mask] > 0).all()


def test_table4_layout():
    r = ev.EvalResult(
        metrics={"eval/accuracy": 0.5, "eval/response_len": 12.0},
        correct=np.array([True, False]),
        lengths=np.array([10, 14]),
        entropy=np.zeros((2, 1)),
        topk_entropy_tail=np.zeros((2, 1)),
        topk_entropy_raw=np.zeros((2, 1)),
        mask=np.ones((2, 1), bool),
        groups={"difficulty": {"1": (1.0, 10.0, 1), "10": (0.0, 14.0, 1)}},
    )
    text = ev.table4({"base": r}, by="difficulty")
    lines = text.splitlines()
    assert lines[0].startswith("| model | difficulty 1 acc | len | difficulty 10 acc")
    assert lines[2] == "| base | 100.0 | 10.0 | 0.0 | 14.0 | 50.0 | 12.0 |"


def test_command_line_defaults_are_the_papers_evaluation():
    """pass@1 at the released evaluation script's temperature and top-p, with a budget long
    enough for ARES answers (tens of thousands of tokens on AIME), not 1024 tokens."""
    from absl import flags

    fv = flags.FlagValues()
    evaluate_cli.define_flags(fv)
    defaults = {name: fv[name].default for name in ("temperature", "top_p", "n", "max_new_tokens")}
    assert defaults == {"temperature": 0.3, "top_p": 0.95, "n": 1, "max_new_tokens": 32768}
    assert fv["prompt_len"].default == 4096
    # Batches by KV cache budget (4 GiB unless --batch_tokens), no row count; skip over-long.
    batching = ("batch_tokens", "kv_cache_gib", "batch_size", "strict_prompt_len")
    assert {name: fv[name].default for name in batching} == {
        "batch_tokens": None,
        "kv_cache_gib": 4.0,
        "batch_size": None,
        "strict_prompt_len": False,
    }


def _run_command_line(tmp_path, *extra):
    """`python -m ares_jax.evaluate` on a tiny checkpoint and a file whose line 2 holds a prompt
    over --prompt_len=128; returns (the process, the data file)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    cfg = config.preset("tiny")
    model = params.init_model(cfg, seed=0)
    params.save_pretrained(model, tmp_path / "model")
    tokenizer.build_tokenizer().save_pretrained(tmp_path / "model")
    data = tmp_path / "bench.jsonl"
    rows = [{"question": "1 + 1?", "answer": "2"}, {"question": "two " * 300, "answer": "1"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = stage_env()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ares_jax.evaluate",
            f"--model={tmp_path / 'model'}",
            f"--data={data}",
            "--prompt_len=128",
            "--max_new_tokens=4",
            "--nobf16",
            *extra,
        ],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, data


def test_command_line_skips_an_overlong_prompt_and_counts_it(tmp_path):
    import json

    proc, data = _run_command_line(tmp_path, f"--output={tmp_path / 'metrics.json'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"skipped: {data}, line 2: the prompt has " in proc.stderr, proc.stderr[-3000:]
    assert "1 over-long prompt(s) skipped" in proc.stderr
    assert "batch 1/1, 1/1 problems" in proc.stderr  # progress
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["eval/skipped_overlong"] == 1 and metrics["eval/count"] == 1


def test_command_line_strict_prompt_len_names_an_overlong_prompt_before_generating(tmp_path):
    proc, data = _run_command_line(tmp_path, "--strict_prompt_len")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "evaluate: batch" not in proc.stderr  # nothing generated
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {data}, line 2: the prompt has ") and "(128)" in last, last
    assert last.endswith("leave out --strict_prompt_len to skip such prompts"), last


def test_image_settings_from_checkpoint_flags_override(tmp_path):
    """`evaluate`'s image settings: the checkpoint's image processor (transformers 5 layout
    here, its own normalisation), a flag overriding one pixel limit, the defaults without a
    processor, and a bad pair named."""
    import json

    import pytest

    from ares_jax.models.qwen2_5_vl.processor import IMAGE_MEAN, IMAGE_STD

    mean, std = [0.5, 0.25, 0.125], [0.2, 0.3, 0.4]
    (tmp_path / "processor_config.json").write_text(
        json.dumps(
            {
                "image_processor": {
                    "min_pixels": 3136,
                    "max_pixels": 12544,
                    "image_mean": mean,
                    "image_std": std,
                }
            }
        )
    )
    got = evaluate_cli.image_settings(tmp_path, None, None)
    assert (got.min_pixels, got.max_pixels, got.mean, got.std) == (3136, 12544, (*mean,), (*std,))
    assert evaluate_cli.image_settings(tmp_path, None, 50176)[:2] == (3136, 50176)
    none = evaluate_cli.image_settings(tmp_path / "none", None, None)
    assert (none.min_pixels, none.max_pixels, none.mean, none.std) == (
        evaluate_cli.DEFAULT_MIN_PIXELS,
        evaluate_cli.DEFAULT_MAX_PIXELS,
        IMAGE_MEAN,
        IMAGE_STD,
    )
    with pytest.raises(ValueError, match="min_pixels 20000 > max_pixels 12544"):
        evaluate_cli.image_settings(tmp_path, 20000, None)
