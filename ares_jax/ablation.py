"""What ARES's entropy shaping adds: `run(config, workdir)` of configs/ablation.py.

From one base and one AdaCS model (the pipeline's warm-up and AdaCS stages, on the synthetic task
with its checked traces), AEPO is trained once per arm and seed, and every final policy answers
the same held-out problems (greedy). The arms (`ARMS`) change one thing each in the AEPO config:
  aepo           AEPO as configured;
  accuracy_only  the same RL with the entropy term off (accuracy reward only: the DAPO-style
                 baseline);
  fixed_kl       AEPO with one fixed KL weight for every bucket (no per-bucket KL budget).
Arm a and arm b of one seed start from the same model with the same seed (rollout keys, data
order), so they differ only in what the arm changes.

Per difficulty level the report gives each arm's accuracy, mean response length, HWE windows per
response and the share of responses that re-check their count, as mean and standard deviation
over seeds (`aggregate`), in one table, in bar charts with error bars, and in words (`verdict`):
whether the paper's pattern (shorter on easy problems, more exploration and accuracy on hard ones)
appears against the accuracy-only arm, and by how much. HWE windows are counted with the AEPO
config's rule, window and trigger words, against one threshold for every model: the AdaCS model's
batch statistic on the same problems (`ops.hwe.batch_threshold`), so counts compare across arms.

Layout of the workdir: base/ and adacs/ (the stages, as the pipeline writes them),
runs/ARM/seedS/ (each AEPO run), eval/NAME.json (each model's evaluation with the settings it was
made with, kept so a restart does not redo it; redone where the settings differ), report.md,
report.json and plots/. Every stage and run resumes where it stopped; a complete one is not run
again. SIGTERM stops at once, as in the pipeline.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ares_jax import checkpoint as ckpt
from ares_jax import pipeline, plots, runtime
from ares_jax.aepo import train as aepo_train
from ares_jax.data import synthetic
from ares_jax.metrics import read_metrics
from ares_jax.rewards.buckets import BUCKET_NAMES

log = logging.getLogger(__name__)

# name -> (AEPO config overrides, what the arm is, its label in tables and charts)
ARMS: dict[str, tuple[dict[str, Any], str, str]] = {
    "aepo": ({}, "AEPO as configured", "AEPO"),
    "accuracy_only": (
        {"reward.variant": "none"},
        "the same RL with the entropy term off (accuracy reward only)",
        "accuracy only",
    ),
    "fixed_kl": (
        {"kl.controller": "fixed"},
        "AEPO with one fixed KL weight for every bucket (no per-bucket KL budget)",
        "fixed KL",
    ),
}
METRICS = ("accuracy", "response_len", "hwe", "rechecked")
METRIC_TITLES = {
    "accuracy": "accuracy (%)",
    "response_len": "response length (tokens)",
    "hwe": "HWE windows per response",
    "rechecked": "responses that re-check (%)",
}
EASY_LEVELS, HARD_LEVELS = ("1", "2"), ("4", "5")


def arm_config(aepo_config, arm: str, seed: int):
    """The AEPO block of `arm` at `seed`: the arm's overrides, seed and data order."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}.")
    c = copy.deepcopy(aepo_config)
    with c.unlocked():
        for key, value in ARMS[arm][0].items():
            node = c
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = value
        c.seed = int(seed)
        c.data.shuffle_seed = int(seed)
    return c


# ---------------------------------------------------------------------------------------------
# Per-model measurements
# ---------------------------------------------------------------------------------------------


def hwe_counter(aepo_config, tokenizer, vocab_size: int):
    """fn(entropy [N, T], mask [N, T], tokens [N, T], tau) -> [N] HWE counts, with the AEPO
    config's count rule, window and trigger words (sampled tokens)."""
    import jax.numpy as jnp

    from ares_jax.ops import hwe
    from ares_jax.rewards import triggers

    e = aepo_config.entropy
    table = triggers.trigger_table(
        tokenizer, triggers.load_trigger_words(e.trigger_words), vocab_size=vocab_size
    )

    def count(entropy, mask, tokens, tau) -> np.ndarray:
        trig = triggers.trigger_mask(jnp.asarray(tokens), table) & jnp.asarray(mask)
        out = hwe.hwe_counts(
            jnp.asarray(entropy),
            jnp.asarray(mask),
            trig,
            float(tau),
            rule=e.hwe_count,
            window=e.window,
            offset=e.window_offset,
        )
        return np.asarray(out.count)

    return count


def threshold(aepo_config, entropy, mask) -> float:
    """The batch statistic of the AEPO config's threshold rule over these responses."""
    import jax.numpy as jnp

    from ares_jax.ops import hwe

    e = aepo_config.entropy
    return float(
        hwe.batch_threshold(
            jnp.asarray(entropy),
            jnp.asarray(mask),
            threshold=e.threshold,
            q=e.percentile,
            window=e.window,
            offset=e.window_offset,
        )
    )


def per_level(
    difficulties: Sequence[int],
    correct: np.ndarray,
    lengths: np.ndarray,
    hwe_counts: np.ndarray,
    rechecked: np.ndarray,
) -> dict[str, dict[str, float]]:
    """level ("1".."5", "all") -> metric -> value (accuracy and rechecked in %)."""
    levels = np.asarray(difficulties)
    values = {
        "accuracy": 100.0 * np.asarray(correct, float),
        "response_len": np.asarray(lengths, float),
        "hwe": np.asarray(hwe_counts, float),
        "rechecked": 100.0 * np.asarray(rechecked, float),
    }
    out = {}
    for level in [*sorted(set(levels.tolist())), "all"]:
        rows = np.ones(len(levels), bool) if level == "all" else levels == level
        out[str(level)] = {k: float(v[rows].mean()) for k, v in values.items()}
    return out


def measure(result, count_fn, tau: float) -> dict[str, dict[str, float]]:
    """`per_level` of an `evaluate.EvalResult` (its problems carry their difficulty)."""
    hwe_counts = count_fn(result.entropy, result.mask, result.tokens, tau)
    return per_level(
        [e.difficulty for e in result.problems],
        result.correct,
        result.lengths,
        hwe_counts,
        np.array([synthetic.rechecks(t) for t in result.responses]),
    )


# ---------------------------------------------------------------------------------------------
# Aggregation over seeds and the verdict
# ---------------------------------------------------------------------------------------------


def aggregate(
    runs: Mapping[str, Sequence[Mapping[str, Mapping[str, float]]]],
) -> dict[str, dict[str, dict[str, tuple[float, float]]]]:
    """arm -> [per seed: level -> metric -> value] to arm -> level -> metric -> (mean, std): the
    standard deviation over seeds with ddof=1 (NaN for one seed)."""
    out = {}
    for arm, seeds in runs.items():
        out[arm] = {}
        for level in seeds[0]:
            out[arm][level] = {}
            for metric in seeds[0][level]:
                xs = np.array([s[level][metric] for s in seeds], float)
                sd = float(xs.std(ddof=1)) if len(xs) > 1 else math.nan
                out[arm][level][metric] = (float(xs.mean()), sd)
    return out


def _levels_mean(stats, levels: Sequence[str], metric: str) -> tuple[float, float]:
    """Mean over `levels` of the arm's means, and the mean of their spreads."""
    means = [stats[lv][metric][0] for lv in levels if lv in stats]
    sds = [stats[lv][metric][1] for lv in levels if lv in stats]
    if not means:
        return math.nan, math.nan
    return float(np.mean(means)), float(np.mean(sds))


def _diff(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, bool]:
    """a's mean minus b's, and whether it exceeds their spread (the larger of the two)."""
    d = a[0] - b[0]
    spread = max(x for x in (a[1], b[1], 0.0) if not math.isnan(x))
    return d, abs(d) > spread


def _paired(per_seed, arm: str, baseline: str, levels: Sequence[str], metric: str):
    """Per seed, `arm`'s mean over `levels` minus `baseline`'s for the same seed (the arms of one
    seed share the AdaCS model, the rollout keys and the data order); None when the two arms do
    not have the same number of seeds."""
    if per_seed is None or len(per_seed.get(arm, ())) != len(per_seed.get(baseline, ())):
        return None

    def level_mean(levels_of_seed):
        return float(np.mean([levels_of_seed[lv][metric] for lv in levels if lv in levels_of_seed]))

    return [
        level_mean(x) - level_mean(y)
        for x, y in zip(per_seed[arm], per_seed[baseline], strict=True)
    ]


def verdict(agg, arm: str = "aepo", baseline: str = "accuracy_only", per_seed=None) -> list[str]:
    """Plain sentences: does `arm` show the paper's pattern against `baseline`?

    The pattern: on easy problems (levels 1-2) shorter responses; on hard ones (levels 4-5) more
    exploration (HWE windows per response) and higher accuracy. A difference counts as seen when
    it has the right sign and exceeds the spread over seeds (the larger of the two arms').

    With `per_seed` (arm -> [per seed: level -> metric -> value], the seeds in the same order for
    every arm), each sentence also gives the paired differences seed by seed and how many of
    them have the paper's direction: the arms of one seed differ only by the arm."""
    if arm not in agg or baseline not in agg:
        return [f"The verdict needs the arms {arm!r} and {baseline!r}."]
    a, b = agg[arm], agg[baseline]
    name, base = ARMS[arm][2], ARMS[baseline][2]
    checks = (
        ("easy", EASY_LEVELS, "response_len", -1, "tokens shorter", "tokens longer"),
        ("hard", HARD_LEVELS, "hwe", +1, "more", "fewer"),
        ("hard", HARD_LEVELS, "accuracy", +1, "points higher", "points lower"),
    )
    lines, seen = [], []
    for which, levels, metric, sign, good, bad in checks:
        x, y = _levels_mean(a, levels, metric), _levels_mean(b, levels, metric)
        d, beyond = _diff(x, y)
        word = good if d * sign > 0 else bad
        ok = d * sign > 0 and beyond
        seen.append(ok)
        direction = "the paper's direction" if d * sign > 0 else "against the paper's direction"
        said = (
            f"{abs(d):.2f} {word}, {direction}, "
            + ("beyond the spread." if beyond else "within the spread.")
            if d
            else "no difference."
        )
        paired = _paired(per_seed, arm, baseline, levels, metric)
        if paired:
            agree = sum(p * sign > 0 for p in paired)
            said += (
                " Paired by seed: "
                + ", ".join(f"{p:+.2f}" for p in paired)
                + f"; {agree} of {len(paired)} in the paper's direction."
            )
        lines.append(
            f"On {which} problems (levels {levels[0]}-{levels[-1]}), {METRIC_TITLES[metric]}: "
            f"{name} {x[0]:.2f}, {base} {y[0]:.2f} (standard deviation over seeds {x[1]:.2f} "
            f"and {y[1]:.2f}); {said}"
        )
    count = sum(seen)
    summary = {
        3: "The paper's pattern appears: all three differences have its direction beyond the "
        "spread over seeds.",
        0: "The paper's pattern does not appear: none of the three differences has its direction "
        "beyond the spread over seeds.",
    }.get(
        count,
        f"The paper's pattern appears in part: {count} of the three differences have its "
        "direction beyond the spread over seeds.",
    )
    return [*lines, summary]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _cell(mean: float, sd: float) -> str:
    return f"{mean:.1f}" if math.isnan(sd) else f"{mean:.1f} ± {sd:.1f}"


def table(agg, reference: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """One Markdown table: a row per level and arm (and the reference model, without spread)."""
    head = "| level | model | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |"
    lines = [head, "|---" * (len(METRICS) + 2) + "|"]
    levels = list(next(iter(agg.values())))
    for level in levels:
        if reference is not None and level in reference:
            cells = [f"{reference[level][m]:.1f}" for m in METRICS]
            lines.append(f"| {level} | AdaCS (start) | " + " | ".join(cells) + " |")
        for arm, stats in agg.items():
            cells = [_cell(*stats[level][m]) for m in METRICS]
            lines.append(f"| {level} | {ARMS[arm][2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bar_charts(agg, out: Path) -> list[Path]:
    """Per metric, a bar per arm and level, the standard deviation over seeds as error bar."""
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for metric in METRICS:
        groups = {
            f"level {level}" if level != "all" else "all": {
                ARMS[arm][2]: stats[level][metric] for arm, stats in agg.items()
            }
            for level in next(iter(agg.values()))
        }
        made.append(
            plots.bar_chart(
                out / f"{metric}.png",
                groups,
                title=f"{METRIC_TITLES[metric].split(' (')[0].capitalize()} per difficulty",
                ylabel=METRIC_TITLES[metric],
                xlabel="difficulty (mean over seeds; error bars: standard deviation)",
            )
        )
    return made


def curve_charts(metrics_files: Mapping[str, Sequence[Path]], out: Path) -> list[Path]:
    """Per arm, response length and HWE count per bucket over iterations, mean over seeds."""
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for arm, files in metrics_files.items():
        runs = [[r for r in read_metrics(f) if "train/loss" in r] for f in files if f.exists()]
        if not runs:
            continue
        steps = [r["step"] for r in runs[0]]
        n = min(len(r) for r in runs)
        for key, title in (("response_len", "response length"), ("hwe_count", "HWE count")):
            series = {}
            for bucket in BUCKET_NAMES:
                k = f"bucket/{bucket}/{key}"
                ys = np.array([[r[i].get(k, np.nan) for i in range(n)] for r in runs], float)
                with warnings.catch_warnings():  # an iteration no seed has the bucket in: NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean = np.nanmean(ys, axis=0)
                series[bucket] = (steps[:n], mean.tolist())
            made.append(
                plots.line_chart(
                    out / f"{arm}_{key}.png",
                    series,
                    title=f"{ARMS[arm][2]}: rollout {title} per bucket (mean over seeds)",
                    ylabel=title,
                    xlabel="iteration",
                )
            )
    return made


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _save_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _load_json(path: Path):
    """The file's JSON, or None where it is missing or cut short."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def run(config, workdir: str) -> dict[str, Any]:
    """Runs what is not complete, then the report.

    Raises:
      runtime.WorkdirError: the workdir is not writable or another run holds it.
      checkpoint.Preempted: SIGTERM arrived; the running stage saved, nothing later ran.
    """
    with ckpt.preemption_handler(), runtime.lock_workdir(workdir):
        return _run(config, Path(workdir))


def _run(c, work: Path) -> dict[str, Any]:
    began = time.perf_counter()
    seconds: dict[str, float] = {}
    adacs_export = pipeline.cold_start(c, work, seconds)
    runs = [(arm, seed) for seed in c.seeds for arm in c.arms]
    for i, (arm, seed) in enumerate(runs, 1):
        log.info("Ablation: AEPO run %d/%d, arm %s, seed %d.", i, len(runs), arm, seed)
        pipeline.run_stage(
            f"{arm}/seed{seed}",
            aepo_train.run,
            pipeline.with_model(arm_config(c.aepo, arm, seed), adacs_export),
            work / "runs" / arm / f"seed{seed}",
            seconds,
        )

    t0 = time.perf_counter()
    test = synthetic.make_examples(c.eval.test_size, seed=c.seed, split="test")
    evals = work / "eval"
    evals.mkdir(parents=True, exist_ok=True)
    # An evaluation is kept with what it depends on; one made with other settings is redone.
    settings = {"seed": c.seed, **{k: c.eval[k] for k in ("test_size", "temperature")}}
    settings["max_response_len"] = c.eval.max_response_len
    reference_file = evals / "adacs.json"
    saved = _load_json(reference_file)
    count_fn = None
    if saved is not None and saved.get("settings") == settings:
        tau, reference = saved["tau"], saved["levels"]
    else:
        result, tokenizer, cfg = pipeline.evaluate_export(c, adacs_export, test)
        count_fn = hwe_counter(c.aepo, tokenizer, cfg.text.vocab_size)
        tau = threshold(c.aepo, result.entropy, result.mask)
        reference = measure(result, count_fn, tau)
        _save_json(reference_file, {"settings": settings, "tau": tau, "levels": reference})
    settings = {**settings, "tau": tau}
    per_seed: dict[str, list] = {arm: [] for arm in c.arms}
    for arm, seed in sorted(runs, key=lambda r: (c.arms.index(r[0]), r[1])):
        path = evals / f"{arm}_seed{seed}.json"
        saved = _load_json(path)
        if saved is None or saved.get("settings") != settings:
            export = work / "runs" / arm / f"seed{seed}" / "export"
            result, tokenizer, cfg = pipeline.evaluate_export(c, export, test)
            if count_fn is None:
                count_fn = hwe_counter(c.aepo, tokenizer, cfg.text.vocab_size)
            saved = {"settings": settings, "levels": measure(result, count_fn, tau)}
            _save_json(path, saved)
            ckpt.stop_preempted(f"Ablation (after evaluating {arm} seed {seed})")
        per_seed[arm].append(saved["levels"])
    seconds["evaluation"] = time.perf_counter() - t0

    agg = aggregate(per_seed)
    words = verdict(agg, per_seed=per_seed)
    plot_dir = work / "plots"
    made = bar_charts(agg, plot_dir) + curve_charts(
        {
            arm: [work / "runs" / arm / f"seed{s}" / "metrics.jsonl" for s in c.seeds]
            for arm in c.arms
        },
        plot_dir,
    )
    total = time.perf_counter() - began
    text = report(c, agg, reference, tau, words, seconds, total, made)
    (work / "report.md").write_text(text)
    _save_json(
        work / "report.json",
        {
            "arms": list(c.arms),
            "seeds": list(c.seeds),
            "tau": tau,
            "reference": reference,
            "per_seed": per_seed,
            "aggregate": agg,
            "verdict": words,
            "seconds": seconds,
        },
    )
    print(table(agg, reference))
    print("\n".join(words))
    print(f"Report: {work / 'report.md'}")
    return {"aggregate": agg, "verdict": words, "tau": tau}


def report(c, agg, reference, tau, words, seconds, total, made) -> str:
    arms = "\n".join(f"- {ARMS[a][2]} (`{a}`): {ARMS[a][1]}." for a in c.arms)
    return "\n".join(
        [
            "# What the entropy shaping adds: the ablation on the embedded task",
            "",
            f"From one AdaCS model, AEPO trained {c.aepo.train.steps} iterations per run, "
            f"seeds {', '.join(map(str, c.seeds))} for each arm:",
            arms,
            "",
            f"{c.eval.test_size} held-out problems, greedy. Mean ± standard deviation over seeds. "
            f"HWE windows are counted against one threshold for every model, tau = {tau:.4f} "
            "nats (the AdaCS model's batch statistic on the same problems); a response "
            're-checks when it says "Let me check".',
            "",
            table(agg, reference),
            "",
            *words,
            "",
            "Seconds: "
            + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
            + f"; {total:.0f} in all (this invocation).",
            "",
            *[f"![{p.stem}](plots/{p.name})" for p in made],
            "",
        ]
    )
