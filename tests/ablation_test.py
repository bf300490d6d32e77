"""The ablation (configs/ablation.py, ares_jax/ablation.py): its arithmetic, its verdict, its
config, and the whole command at smoke size."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ares_jax import ablation
from ares_jax.data import prompts, synthetic
from ares_jax.models.qwen2_5_vl import tokenizer as embedded_tokenizer
from configs import ablation as ablation_config
from configs import pipeline as pipeline_config
from tests.cpu_env import stage_env

ROOT = Path(__file__).resolve().parents[1]


def test_per_level_means_and_percentages():
    got = ablation.per_level(
        [1, 1, 2, 5],
        correct=np.array([True, False, True, True]),
        lengths=np.array([10, 20, 30, 50]),
        hwe_counts=np.array([0, 2, 1, 3]),
        rechecked=np.array([False, True, False, True]),
    )
    assert list(got) == ["1", "2", "5", "all"]
    assert got["1"] == {"accuracy": 50.0, "response_len": 15.0, "hwe": 1.0, "rechecked": 50.0}
    assert got["5"] == {"accuracy": 100.0, "response_len": 50.0, "hwe": 3.0, "rechecked": 100.0}
    assert got["all"] == {"accuracy": 75.0, "response_len": 27.5, "hwe": 1.5, "rechecked": 50.0}


def test_aggregate_is_mean_and_sample_std_over_seeds():
    seeds = [{"1": {"accuracy": a}} for a in (50.0, 60.0, 70.0)]
    agg = ablation.aggregate({"aepo": seeds, "accuracy_only": seeds[:1]})
    assert agg["aepo"]["1"]["accuracy"] == pytest.approx((60.0, 10.0))  # ddof=1
    mean, sd = agg["accuracy_only"]["1"]["accuracy"]
    assert mean == 50.0 and math.isnan(sd)  # one seed has no spread


def _arm(easy_len, hard_hwe, hard_acc, sd=1.0):
    levels = {}
    for level in ("1", "2", "3", "4", "5", "all"):
        easy, hard = level in ("1", "2"), level in ("4", "5")
        levels[level] = {
            "accuracy": (hard_acc if hard else 90.0, sd),
            "response_len": (easy_len if easy else 80.0, sd),
            "hwe": (hard_hwe if hard else 0.5, sd),
            "rechecked": (10.0, sd),
        }
    return levels


def test_verdict_reads_the_pattern_and_its_spread():
    baseline = _arm(easy_len=60.0, hard_hwe=1.0, hard_acc=70.0)
    seen = ablation.verdict({"aepo": _arm(50.0, 2.5, 80.0), "accuracy_only": baseline})
    assert seen[-1].startswith("The paper's pattern appears:")
    assert "10.00 tokens shorter, the paper's direction, beyond the spread" in seen[0]
    assert "1.50 more, the paper's direction, beyond the spread" in seen[1]
    assert "10.00 points higher, the paper's direction, beyond the spread" in seen[2]

    reversed_ = ablation.verdict({"aepo": _arm(70.0, 0.5, 60.0), "accuracy_only": baseline})
    assert reversed_[-1].startswith("The paper's pattern does not appear")
    assert "10.00 tokens longer, against the paper's direction" in reversed_[0]

    # the right direction within the spread over seeds does not count
    noisy = ablation.verdict({"aepo": _arm(50.0, 2.0, 60.0, sd=12.0), "accuracy_only": baseline})
    assert "the paper's direction, within the spread" in noisy[0]
    assert noisy[-1].startswith("The paper's pattern does not appear")
    partial = ablation.verdict({"aepo": _arm(50.0, 1.0, 70.0), "accuracy_only": baseline})
    assert partial[-1].startswith("The paper's pattern appears in part: 1 of the three")


def test_verdict_gives_the_paired_differences_seed_by_seed():
    """Hard-level accuracy of the ablation run of 2026-12-04 (levels 4 and 5 per seed): the
    paired differences are the per-seed level means' differences, and their signs are counted."""

    def seeds(acc4, acc5):
        out = []
        for a4, a5 in zip(acc4, acc5, strict=True):
            levels = {lv: {"accuracy": 90.0, "response_len": 50.0, "hwe": 1.0} for lv in "123"}
            levels["4"] = {"accuracy": a4, "response_len": 50.0, "hwe": 1.0}
            levels["5"] = {"accuracy": a5, "response_len": 50.0, "hwe": 1.0}
            out.append(levels)
        return out

    per_seed = {
        "aepo": seeds((75.0, 80.0, 48.3), (80.0, 58.3, 70.0)),
        "accuracy_only": seeds((68.3, 80.0, 43.3), (55.0, 58.3, 70.0)),
    }
    lines = ablation.verdict(ablation.aggregate(per_seed), per_seed=per_seed)
    assert "Paired by seed: +15.85, +0.00, +2.50; 2 of 3 in the paper's direction." in lines[2]
    # equal lengths and counts: no seed differs, none counts as the paper's direction
    assert "Paired by seed: +0.00, +0.00, +0.00; 0 of 3 in the paper's direction." in lines[0]
    # without per-seed values, or with unequal seed counts, the sentences have no paired part
    assert all("Paired" not in x for x in ablation.verdict(ablation.aggregate(per_seed)))
    short = {"aepo": per_seed["aepo"][:2], "accuracy_only": per_seed["accuracy_only"]}
    assert all(
        "Paired" not in x for x in ablation.verdict(ablation.aggregate(short), per_seed=short)
    )


def test_table_has_a_row_per_level_and_model():
    agg = {"aepo": _arm(50.0, 2.0, 80.0), "accuracy_only": _arm(60.0, 1.0, 70.0, sd=math.nan)}
    reference = {level: {m: 1.0 for m in ablation.METRICS} for level in agg["aepo"]}
    rows = ablation.table(agg, reference).splitlines()
    assert len(rows) == 2 + 6 * 3
    assert rows[2] == "| 1 | AdaCS (start) | 1.0 | 1.0 | 1.0 | 1.0 |"
    assert rows[3] == "| 1 | AEPO | 90.0 ± 1.0 | 50.0 ± 1.0 | 0.5 ± 1.0 | 10.0 ± 1.0 |"
    assert rows[4] == "| 1 | accuracy only | 90.0 | 60.0 | 0.5 | 10.0 |"


def test_arm_config_changes_only_the_arm_and_the_seed():
    c = ablation_config.get_config()
    base = c.aepo
    off = ablation.arm_config(base, "accuracy_only", 2)
    kl = ablation.arm_config(base, "fixed_kl", 2)
    assert (off.reward.variant, off.kl.controller, off.seed, off.data.shuffle_seed) == (
        "none",
        base.kl.controller,
        2,
        2,
    )
    assert (kl.reward.variant, kl.kl.controller) == (base.reward.variant, "fixed")
    assert base.reward.variant == "code" and base.seed == 0  # the original is untouched
    with pytest.raises(ValueError, match="unknown arm 'x'"):
        ablation.arm_config(base, "x", 0)


def test_config_turns_the_checked_traces_on_and_validates_arms_and_seeds():
    c = ablation_config.get_config()
    ablation_config.validate(c)
    assert c.warmup.data.synthetic_checks and c.adacs.data.synthetic_checks
    assert c.adacs.curation.vanilla  # a random correct trace per problem, re-checks on all levels
    # Algorithm 1's count, in both presets (the smoke run exercises the same rule).
    assert c.aepo.entropy.hwe_count == "paper_window"
    assert ablation_config.get_config("smoke").aepo.entropy.hwe_count == "paper_window"
    assert tuple(c.arms) == ("aepo", "accuracy_only") and len(c.seeds) >= 3
    assert set(c.arms) <= set(ablation.ARMS) == set(ablation_config.ARM_NAMES)
    for key, value, match in (
        ("arms", ("aepo", "nope"), "config.arms has unknown or repeated arms"),
        ("arms", ("aepo", "aepo"), "config.arms has unknown or repeated arms"),
        ("seeds", (0, -1), "config.seeds must be distinct non-negative integers"),
        ("seeds", (), "config.seeds must be distinct"),
    ):
        bad = ablation_config.get_config()
        with bad.unlocked():
            bad[key] = value
        with pytest.raises(ValueError, match=match):
            ablation_config.validate(bad)
    with pytest.raises(ValueError, match="unknown preset 'x'"):
        ablation_config.get_config("x")


def test_ablation_smoke_end_to_end_and_resume(tmp_path):
    """The command at smoke size: shared stages once, one AEPO run per arm and seed, every model
    evaluated, the report with its table, verdict and charts; a second run redoes nothing."""
    env = stage_env()
    cmd = [
        sys.executable,
        "-m",
        "ares_jax.main",
        "--config=configs/ablation.py:smoke",
        f"--workdir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = ablation_config.get_config("smoke")
    for arm in c.arms:
        for seed in c.seeds:
            run = tmp_path / "runs" / arm / f"seed{seed}"
            assert (run / "complete.json").is_file() and (run / "export").is_dir()
            saved = json.loads((run / "config.json").read_text())
            assert saved["seed"] == seed
            assert saved["reward"]["variant"] == ("none" if arm == "accuracy_only" else "code")
            assert (tmp_path / "eval" / f"{arm}_seed{seed}.json").is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["seeds"] == list(c.seeds) and report["tau"] > 0
    for arm in c.arms:
        assert len(report["per_seed"][arm]) == len(c.seeds)
        for level, stats in report["aggregate"][arm].items():
            acc, sd = stats["accuracy"]
            values = [s[level]["accuracy"] for s in report["per_seed"][arm]]
            assert acc == pytest.approx(np.mean(values)) and sd == pytest.approx(
                np.std(values, ddof=1)
            )
            assert 0 < stats["response_len"][0] <= c.eval.max_response_len
    assert report["verdict"][-1].startswith("The paper's pattern")
    text = (tmp_path / "report.md").read_text()
    assert "| level | model |" in text and report["verdict"][-1] in text
    for metric in ablation.METRICS:
        assert Image.open(tmp_path / "plots" / f"{metric}.png").size == (640, 400)
    for arm in c.arms:
        assert (tmp_path / "plots" / f"{arm}_hwe_count.png").is_file()

    # Again with fewer held-out problems: no stage or run again, every evaluation redone.
    again = subprocess.run(
        [*cmd, "--config.eval.test_size=5"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("is complete") == 2 + len(c.arms) * len(c.seeds)
    for path in (tmp_path / "eval").glob("*.json"):
        assert json.loads(path.read_text())["settings"]["test_size"] == 5, path.name
    assert "5 held-out problems" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("config", [pipeline_config, ablation_config], ids=["pipeline", "ablation"])
def test_prompts_fill_their_bucket_and_none_is_dropped(config):
    """The embedded prompts (chat format, 16 image tokens, the question and the short
    instruction) are 76 or 91 tokens, with or without the checked traces: all fit the one bucket
    of 96, so no stage drops one."""
    c = config.get_config()
    d = c.aepo.data
    assert d.prompt_template == pipeline_config.EMBEDDED_PROMPT_SUFFIX
    settings = prompts.PromptSettings(
        template=d.prompt_template,
        min_pixels=d.min_pixels,
        max_pixels=d.max_pixels,
        max_len=d.max_prompt_len,
    )
    examples = synthetic.make_examples(20, seed=0, checks=c.adacs.data.synthetic_checks)
    lengths = prompts.prompt_lengths(examples, embedded_tokenizer.build_tokenizer(), settings)
    assert sorted(set(lengths)) == [76, 91]
    for block in (c.warmup, c.adacs, c.aepo):
        assert block.data.prompt_template == d.prompt_template
        assert block.data.prompt_len_buckets == (96,) and block.data.max_prompt_len == 96
