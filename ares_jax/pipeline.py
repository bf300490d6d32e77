"""The whole ARES pipeline on the embedded task: `run(config, workdir)` (configs/pipeline.py).

Warm-up (plain fine-tuning of the random small model), AdaCS from its export, AEPO from the
AdaCS export, then all three on held-out problems. Each stage writes its own workdir
(DIR/base, DIR/adacs, DIR/aepo) and resumes there on restart; a stage whose workdir holds its
completion record (`complete.json`, written after its export) is not run again. SIGTERM stops the
pipeline at once: the running stage saves and raises `checkpoint.Preempted`, no later stage
starts, and no report is written. DIR/report.md holds the table of accuracy and response length
per difficulty (the paper's Table 4 layout) and the stage times; DIR/plots/ holds the AEPO curves
and bar charts of accuracy and response length per difficulty for the three models.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import jax
from flax import nnx

from ares_jax import checkpoint as ckpt
from ares_jax import evaluate as ev
from ares_jax import plots, runtime
from ares_jax.adacs import train as adacs_train
from ares_jax.aepo import train as aepo_train
from ares_jax.data import synthetic
from ares_jax.metrics import read_metrics
from ares_jax.rewards.buckets import BUCKET_NAMES

log = logging.getLogger(__name__)


def with_model(config, path: Path | None):
    """A copy of a stage's config starting from the checkpoint at `path` (None: as it is)."""
    c = copy.deepcopy(config)
    if path is not None:
        with c.unlocked():
            c.model.path = str(path)
    return c


def evaluate_export(c, export: Path, examples):
    """The exported policy at `export` on `examples` with the config's evaluation settings
    (c.eval, the AEPO block's prompts and images). Returns (EvalResult, tokenizer, model config).
    """
    a = c.aepo
    policy = runtime.load_policy(with_model(a, export))
    cfg, tokenizer = policy.model.cfg, policy.tokenizer
    graphdef, params = nnx.split(policy.model)
    sampling = ev.policy_sampling(
        cfg, tokenizer, max_new_tokens=c.eval.max_response_len, temperature=c.eval.temperature
    )
    result = ev.evaluate(
        graphdef,
        params,
        examples,
        tokenizer,
        cfg,
        sampling=sampling,
        template=a.data.prompt_template,
        **runtime.image_kwargs(with_model(a, export)),
        prompt_len_buckets=tuple(a.data.prompt_len_buckets),
        batch_size=min(16, len(examples)),
        key=jax.random.PRNGKey(c.seed),
        mesh=policy.mesh,
    )
    return result, tokenizer, cfg


def _plots(metrics_path: Path, out: Path) -> list[Path]:
    rows = [r for r in read_metrics(metrics_path) if "train/loss" in r]
    out.mkdir(parents=True, exist_ok=True)
    steps = [r["step"] for r in rows]

    def series(key_fn):
        return {n: (steps, [r.get(key_fn(n), float("nan")) for r in rows]) for n in BUCKET_NAMES}

    made = [
        plots.line_chart(
            out / "reward.png",
            {
                "total": (steps, [r["reward/total"] for r in rows]),
                "entropy term": (steps, [r["reward/entropy_term"] for r in rows]),
                "accuracy": (steps, [r["reward/accuracy"] for r in rows]),
            },
            title="AEPO reward",
            ylabel="mean reward",
        ),
        plots.line_chart(
            out / "accuracy.png",
            series(lambda n: f"bucket/{n}/accuracy"),
            title="AEPO rollout accuracy per bucket",
            ylabel="accuracy (fraction correct)",
        ),
        plots.line_chart(
            out / "response_len.png",
            series(lambda n: f"bucket/{n}/response_len"),
            title="AEPO response length per bucket",
            ylabel="response length (tokens)",
        ),
        plots.line_chart(
            out / "hwe_count.png",
            series(lambda n: f"bucket/{n}/hwe_count"),
            title="AEPO HWE count per bucket",
            ylabel="HWE count per response",
        ),
        plots.line_chart(
            out / "kl.png",
            series(lambda n: f"kl/ref_mean/{n}"),
            title="AEPO KL to the reference per bucket",
            ylabel="KL per token",
        ),
        plots.line_chart(
            out / "beta.png",
            series(lambda n: f"kl/beta/{n}"),
            title="AEPO KL weight beta per bucket",
            ylabel="beta",
        ),
    ]
    return made


def difficulty_bars(results: dict[str, ev.EvalResult], out: Path) -> list[Path]:
    """Accuracy and mean response length per difficulty level, a bar per model (one run each,
    so no error bars)."""
    levels = sorted({k for r in results.values() for k in r.groups["difficulty"]}, key=str)
    charts = (
        ("accuracy", "Accuracy", "accuracy (%)", lambda acc, length: 100.0 * acc),
        ("length", "Mean response length", "response length (tokens)", lambda acc, length: length),
    )
    made = []
    for name, title, ylabel, value in charts:
        groups = {
            f"level {k}": {
                model: (value(*r.groups["difficulty"][k][:2]), None)
                for model, r in results.items()
                if k in r.groups["difficulty"]
            }
            for k in levels
        }
        made.append(
            plots.bar_chart(
                out / f"models_{name}.png",
                groups,
                title=f"{title} per difficulty on held-out problems",
                ylabel=ylabel,
                xlabel="difficulty",
            )
        )
    return made


def run_stage(name: str, run_fn, config, stage_dir: Path, seconds: dict[str, float]) -> None:
    """Runs one stage unless its workdir records it complete; stops the pipeline on SIGTERM."""
    done = runtime.is_complete(stage_dir)
    if done is not None:
        log.info("Pipeline: %s is complete (%s); not run again.", name, stage_dir)
    else:
        t0 = time.perf_counter()
        run_fn(config, str(stage_dir))
        seconds[name] = time.perf_counter() - t0
    ckpt.stop_preempted(f"Pipeline (after {name})")  # a SIGTERM during the export, say


def cold_start(c, work: Path, seconds: dict[str, float]) -> Path:
    """The warm-up (work/base) and AdaCS from its export (work/adacs), each unless complete;
    returns the AdaCS export."""
    run_stage("warm-up", adacs_train.run, with_model(c.warmup, None), work / "base", seconds)
    run_stage(
        "AdaCS",
        adacs_train.run,
        with_model(c.adacs, work / "base" / "export"),
        work / "adacs",
        seconds,
    )
    return work / "adacs" / "export"


def run(config, workdir: str) -> dict[str, float]:
    """Runs the stages that are not complete, then the evaluation and the report.

    Raises:
      runtime.WorkdirError: the workdir is not writable or another run holds it.
      checkpoint.Preempted: SIGTERM arrived; the running stage saved, nothing later ran.
    """
    with ckpt.preemption_handler(), runtime.lock_workdir(workdir):
        return _run(config, Path(workdir))


def _run(config, work: Path) -> dict[str, float]:
    c = config
    seconds: dict[str, float] = {}
    cold_start(c, work, seconds)
    run_stage(
        "AEPO",
        aepo_train.run,
        with_model(c.aepo, work / "adacs" / "export"),
        work / "aepo",
        seconds,
    )

    t0 = time.perf_counter()
    test = synthetic.make_examples(c.eval.test_size, seed=c.seed, split="test")
    results = {
        name: evaluate_export(c, work / stage / "export", test)[0]
        for name, stage in (("base", "base"), ("AdaCS", "adacs"), ("AEPO", "aepo"))
    }
    seconds["evaluation"] = time.perf_counter() - t0
    table = ev.table4(results, by="difficulty")
    made = _plots(work / "aepo" / "metrics.jsonl", work / "plots")
    made += difficulty_bars(results, work / "plots")
    lines = [
        "# ARES on the embedded synthetic task",
        "",
        f"{c.eval.test_size} held-out problems, temperature {c.eval.temperature}; accuracy (%) "
        "and mean response length (tokens) per difficulty level.",
        "",
        table,
        "",
        "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()),
        "",
        *[f"![{p.stem}](plots/{p.name})" for p in made],
    ]
    (work / "report.md").write_text("\n".join(lines) + "\n")
    print(table)
    print("Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print(f"Report: {work / 'report.md'}")
    return {f"{name}/accuracy": r.metrics["eval/accuracy"] for name, r in results.items()}
