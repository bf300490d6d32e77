"""Evaluating a model on the suite's benchmarks: resumable, audited, reported as the paper does.

`run_benchmark` takes a benchmark's items and a `respond` function (the model: prompts in,
responses out) and works through the items in fixed chunks. After each chunk every response is
graded (`grading.grade`) and appended, with its extracted answer, how it was found and the
verdict, to OUT/responses/<benchmark>.jsonl, flushed and fsynced: an interrupted evaluation
continues where it stopped, and the file is the audit record. A prompt longer than the largest
prompt bucket is recorded as skipped and counts as wrong in the benchmark's score (so that a
score never silently covers fewer items than the benchmark has); the report gives the count.

`regrade` rebuilds the results from that file alone (no model), with the current grader.
`report` renders the results as the paper's tables (Table 2/3: the benchmark's metric and the
averages; Table 4: accuracy and mean response length), with the paper's ARES-3B/7B numbers
beside them, and per difficulty where the data carries one; as Markdown and as JSON.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ares_jax.suite import grading, metrics
from ares_jax.suite.items import Item
from ares_jax.suite.registry import MULTIMODAL, TEXT, Benchmark

log = logging.getLogger(__name__)

RESPONSES_DIR = "responses"
SKIPPED = "skipped"


class Response(NamedTuple):
    """One response of the model to item `index` of a chunk (its `sample`-th)."""

    index: int
    sample: int
    text: str
    length: int


# respond(items, first) -> (responses, {index: why skipped}); `first` is the chunk's first item
# index in the benchmark (a stable key for its sampling).
Respond = Callable[[Sequence[Item], int], tuple[list[Response], dict[int, str]]]


@dataclasses.dataclass
class BenchmarkResult:
    benchmark: Benchmark
    score: float  # the benchmark's metric, in [0, 1]; skipped items count wrong
    accuracy: float  # mean correctness over the responses (avg@n)
    response_len: float  # mean response length in tokens
    items: int
    responses: int
    skipped: int  # items left out (prompt over the largest bucket), counted wrong
    by_difficulty: dict[str, tuple[float, float, int]]  # level -> (accuracy, length, responses)
    extraction: dict[str, int]  # how answers were found (grading.Verdict.how) -> responses
    details: dict[str, float] = dataclasses.field(default_factory=dict)  # Benchmark.details

    def as_json(self) -> dict[str, Any]:
        b = self.benchmark
        return dict(
            benchmark=b.name,
            title=b.title,
            metric=b.metric,
            score=self.score,
            accuracy=self.accuracy,
            response_len=self.response_len,
            items=self.items,
            responses=self.responses,
            skipped=self.skipped,
            by_difficulty={
                k: dict(accuracy=a, response_len=n, responses=c)
                for k, (a, n, c) in self.by_difficulty.items()
            },
            extraction=self.extraction,
            details=self.details,
            paper=dict(b.paper),
        )


def responses_path(out_dir: str | os.PathLike, benchmark: Benchmark) -> Path:
    return Path(out_dir) / RESPONSES_DIR / f"{benchmark.name}.jsonl"


def _read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: the rest of the file is lost
                log.warning("%s, line %d is incomplete; it is redone.", path, number)
                break
    return out


def _record(item: Item, response: Response, verdict: grading.Verdict) -> dict[str, Any]:
    return dict(
        id=item.id,
        sample=response.sample,
        response=response.text,
        length=response.length,
        extracted=verdict.extracted,
        how=verdict.how,
        normalised=verdict.normalised,
        correct=verdict.correct,
        answer=item.answer,
    )


def _done(records: Sequence[dict[str, Any]], samples: int) -> set[str]:
    """Ids whose every sample (or whose skip) is recorded."""
    seen: dict[str, set[int]] = collections.defaultdict(set)
    done = set()
    for r in records:
        if r.get(SKIPPED):
            done.add(r["id"])
        else:
            seen[r["id"]].add(int(r["sample"]))
    done.update(i for i, s in seen.items() if len(s) >= samples)
    return done


def run_benchmark(
    benchmark: Benchmark,
    items: Sequence[Item],
    respond: Respond,
    out_dir: str | os.PathLike,
    *,
    chunk: int = 64,
    progress: Callable[[int], Any] | None = None,
) -> BenchmarkResult:
    """Responses to every item not yet in OUT/responses/<name>.jsonl, graded and appended chunk
    by chunk (module docstring); then the result over the whole file.

    Args:
      respond: the model (`Respond`); called with at most `chunk` items, each to be answered
        `benchmark.samples` times.
      chunk: items per call; fixed, so a resumed run makes the same calls for what is left.
      progress: called with the number of items finished after each chunk.
    """
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in collections.Counter(ids).items() if c > 1)
        raise ValueError(f"{benchmark.name}: item id {dup!r} appears more than once")
    path = responses_path(out_dir, benchmark)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = _read_records(path)
    known = set(ids)
    stray = {r["id"] for r in records} - known
    if stray:
        raise ValueError(
            f"{path} holds responses to items the data does not have (e.g. {sorted(stray)[0]!r}): "
            "it belongs to other data; give another output directory or remove it."
        )
    done = _done(records, benchmark.samples)
    # Partial items (a sample missing after a crash) are redone whole: drop their records. The
    # file is replaced whole (a crash here leaves the old one), never truncated in place.
    records = [r for r in records if r["id"] in done]
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    todo = [i for i, it in enumerate(items) if it.id not in done]
    if done:
        log.info(
            "%s: %d of %d items already answered in %s; %d to go.",
            benchmark.name,
            len(done),
            len(items),
            path,
            len(todo),
        )
        if progress is not None:
            progress(len(done))
    # Chunks over the benchmark's item order, so the same item always gets the same key.
    for start in range(0, len(items), chunk):
        part = [i for i in todo if start <= i < start + chunk]
        if not part:
            continue
        batch = [items[i] for i in part]
        responses, skipped = respond(batch, start)
        lines = []
        for r in responses:
            item = batch[r.index]
            lines.append(_record(item, r, grading.grade(item, r.text)))
        for index, why in skipped.items():
            lines.append(dict(id=batch[index].id, skipped=why))
        answered = {line["id"] for line in lines}
        missing = [it.id for it in batch if it.id not in answered]
        if missing:
            raise RuntimeError(f"{benchmark.name}: no response to items {missing[:5]}")
        with open(path, "a", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if progress is not None:
            progress(len(batch))
    return regrade(benchmark, items, out_dir)


def regrade(benchmark: Benchmark, items: Sequence[Item], out_dir: str | os.PathLike):
    """The benchmark's result from its responses file, graded again with the current grader
    (no model needed)."""
    path = responses_path(out_dir, benchmark)
    by_id = {it.id: it for it in items}
    graded: list[metrics.Graded] = []
    skipped: list[Item] = []
    how: collections.Counter[str] = collections.Counter()
    for r in _read_records(path):
        item = by_id.get(r["id"])
        if item is None:
            raise ValueError(f"{path}: a response to {r['id']!r}, which the data does not have")
        if r.get(SKIPPED):
            skipped.append(item)
            continue
        verdict = grading.grade(item, r["response"])
        how[verdict.how] += 1
        graded.append(metrics.Graded(item, int(r["sample"]), verdict.correct, int(r["length"])))
    answered = {g.item.id for g in graded} | {it.id for it in skipped}
    if answered != set(by_id):
        left = len(set(by_id) - answered)
        raise ValueError(f"{path}: {left} of {len(by_id)} items have no response yet")
    # Skipped items count wrong in the score, once per sample (length 0, not in the lengths).
    as_wrong = [metrics.Graded(it, s, False, 0) for it in skipped for s in range(benchmark.samples)]
    by_level: dict[str, list[metrics.Graded]] = collections.defaultdict(list)
    for g in graded:
        if g.item.difficulty:
            by_level[g.item.difficulty].append(g)
    return BenchmarkResult(
        benchmark=benchmark,
        score=benchmark.scorer()(graded + as_wrong),
        accuracy=metrics.accuracy(graded + as_wrong),
        response_len=metrics.mean_length(graded),
        items=len(items),
        responses=len(graded),
        skipped=len(skipped),
        by_difficulty={
            k: (metrics.accuracy(v), metrics.mean_length(v), len(v))
            for k, v in sorted(by_level.items(), key=lambda kv: _level_key(kv[0]))
        },
        extraction=dict(sorted(how.items())),
        details=benchmark.details(graded + as_wrong),
    )


def _level_key(level: str):
    try:
        return (0, float(level), level)
    except ValueError:
        return (1, 0.0, level)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _avg(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def report(results: dict[str, BenchmarkResult], model: str) -> tuple[str, dict[str, Any]]:
    """(Markdown, JSON) of the results: per modality the paper's Table 2/3 layout (the
    benchmarks' metrics and their average; the paper's ARES-3B and ARES-7B rows on the
    benchmarks evaluated, and their averages over the same benchmarks), the Table 4 layout
    (accuracy and mean response length), the difficulty breakdown, and the audit counts."""
    lines: list[str] = [f"# Evaluation of {model}", ""]
    summary: dict[str, Any] = {"model": model, "benchmarks": {}, "averages": {}}
    for modality, title in ((MULTIMODAL, "Multimodal"), (TEXT, "Text")):
        group = [r for r in results.values() if r.benchmark.modality == modality]
        if not group:
            continue
        head = [r.benchmark.title for r in group]
        lines += [
            f"## {title} benchmarks (the paper's layout; scores in %)",
            "",
            "| model | " + " | ".join(head) + " | Avg. |",
            "|---|" + "---:|" * (len(head) + 1),
        ]
        ours = [r.score for r in group]
        avg = _avg(ours)
        lines.append(f"| {model} | " + " | ".join(_pct(x) for x in ours) + f" | {_pct(avg)} |")
        summary["averages"][modality] = avg
        for ref in ("ARES-3B", "ARES-7B"):
            vals = [r.benchmark.paper.get(ref) for r in group]
            have = [v for v in vals if v is not None]
            ref_avg = _avg(have) if len(have) == len(vals) else None
            cells = " | ".join("-" if v is None else f"{v:.1f}" for v in vals)
            ref_cell = "-" if ref_avg is None else f"{ref_avg:.1f}"
            lines.append(f"| {ref} (paper) | {cells} | {ref_cell} |")
        lines += [
            "",
            f"Metrics: {'; '.join(f'{r.benchmark.title} {r.benchmark.metric}' for r in group)}."
            f" Average over the {len(group)} benchmark(s) evaluated.",
            "",
        ]
    lines += [
        "## Accuracy and mean response length (the layout of the paper's Table 4)",
        "",
        "| benchmark | score % | accuracy % | mean length (tokens) | items | responses | "
        "skipped (over-long) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        lines.append(
            f"| {r.benchmark.title} | {_pct(r.score)} | {_pct(r.accuracy)} | "
            f"{r.response_len:.1f} | {r.items} | {r.responses} | {r.skipped} |"
        )
        summary["benchmarks"][r.benchmark.name] = r.as_json()
    for r in results.values():
        if r.details:
            cells = ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.details.items()
            )
            lines += ["", f"{r.benchmark.title} ({r.benchmark.metric}): {cells}."]
    levels = [r for r in results.values() if r.by_difficulty]
    if levels:
        lines += ["", "## By difficulty", ""]
        for r in levels:
            lines += [
                f"{r.benchmark.title}:",
                "",
                "| level | accuracy % | mean length | responses |",
                "|---|---:|---:|---:|",
            ]
            lines += [
                f"| {k} | {_pct(a)} | {n:.1f} | {c} |" for k, (a, n, c) in r.by_difficulty.items()
            ]
            lines.append("")
    lines += [
        "",
        "## How answers were found (grading audit; every response is in responses/)",
        "",
        "| benchmark | " + " | ".join(grading.HOW) + " |",
        "|---|" + "---:|" * len(grading.HOW),
    ]
    for r in results.values():
        lines.append(
            f"| {r.benchmark.title} | "
            + " | ".join(str(r.extraction.get(h, 0)) for h in grading.HOW)
            + " |"
        )
    return "\n".join(lines) + "\n", summary


def write_report(results: dict[str, BenchmarkResult], model: str, out_dir) -> tuple[Path, Path]:
    """OUT/report.md and OUT/report.json; returns their paths."""
    text, data = report(results, model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return out / "report.md", out / "report.json"
