"""`python -m ares_jax.evaluate --benchmark=a,b --data=PATH_A,PATH_B [--model=DIR]`.

Every benchmark's data is read (its adapter, the released layout) before the model loads, so a
wrong path or layout stops the run at once, naming the file. Each benchmark is then evaluated in
turn (`run.run_benchmark`: resumable, every response recorded with its verdict), with
`Benchmark.samples` responses per item unless --n is given (AIME: 16), the flags' decoding and the
checkpoint's chat template and image processor. Without --model the report is rebuilt from the
recorded responses, regraded with the current grader. The report (OUT/report.md, report.json) is
printed at the end.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from pathlib import Path

import numpy as np

from ares_jax.data.records import DataError
from ares_jax.suite import registry, run

log = logging.getLogger(__name__)

CHUNK = 64  # items per resumable step


def _benchmarks(f) -> list[tuple[registry.Benchmark, str]]:
    names = [n for n in f.benchmark.split(",") if n.strip()]
    paths = [p for p in f.data.split(",") if p.strip()]
    if len(names) != len(paths):
        raise SystemExit(
            f"error: --benchmark names {len(names)} benchmark(s) and --data {len(paths)} "
            "path(s); give one data path per benchmark, in the same order."
        )
    try:
        return [(registry.get(n), p) for n, p in zip(names, paths, strict=True)]
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def _load(bench: registry.Benchmark, path: str):
    try:
        items = bench.load(path)
    except (DataError, FileNotFoundError, ValueError) as e:  # adapters name their layouts
        raise SystemExit(f"error: {bench.name}: {e}") from None
    if not items:
        raise SystemExit(f"error: {bench.name}: {path} holds no items ({bench.layouts})")
    log.info("%s: %d items from %s.", bench.name, len(items), path)
    return items


def _respond(f, m, bench: registry.Benchmark, n: int):
    """The model as `run.Respond` for one benchmark."""
    import jax

    from ares_jax import evaluate as ev
    from ares_jax.models.qwen2_5_vl.processor import THINK_BOXED_SUFFIX

    sampling = ev.policy_sampling(
        m.cfg,
        m.tokenizer,
        n=n,
        max_new_tokens=f.max_new_tokens,
        temperature=f.temperature,
        top_p=f.top_p,
        stops=m.stops,
    )
    base = jax.random.fold_in(jax.random.PRNGKey(f.seed), zlib.crc32(bench.name.encode()))

    def respond(items, first):
        result = ev.evaluate(
            m.graphdef,
            m.params,
            [it.example() for it in items],
            m.tokenizer,
            m.cfg,
            sampling=sampling,
            template=THINK_BOXED_SUFFIX,
            min_pixels=m.image.min_pixels,
            max_pixels=m.image.max_pixels,
            image_mean=m.image.mean,
            image_std=m.image.std,
            prompt_len_buckets=m.buckets,
            batch_size=f.batch_size,
            batch_tokens=m.batch_tokens,
            skip_overlong=not f.strict_prompt_len,
            key=jax.random.fold_in(base, first),
            mesh=m.mesh,
            grader=lambda texts, rows: np.zeros(len(texts), bool),  # the suite grades
        )
        index = {it.id: i for i, it in enumerate(items)}
        seen: dict[str, int] = {}
        out = []
        for e, text, length in zip(result.problems, result.responses, result.lengths, strict=True):
            sample = seen.get(e.id, 0)
            seen[e.id] = sample + 1
            out.append(run.Response(index[e.id], sample, text, int(length)))
        skipped = {
            i: f"the prompt is longer than --prompt_len={f.prompt_len} tokens"
            for i, it in enumerate(items)
            if it.id not in seen
        }
        return out, skipped

    return respond


def main(f) -> None:
    from ares_jax import evaluate_cli
    from ares_jax.metrics import Progress

    tasks = [(bench, _load(bench, path)) for bench, path in _benchmarks(f)]
    if f.model:
        name = Path(f.model.rstrip("/")).name
    elif f.output_dir:
        name = Path(f.output_dir.rstrip("/")).name
    else:
        raise SystemExit("error: give --model, or --output_dir to regrade recorded responses.")
    out = Path(f.output_dir or Path("ares_eval") / name)
    results: dict[str, run.BenchmarkResult] = {}
    if not f.model:
        for bench, items in tasks:
            try:
                results[bench.name] = run.regrade(bench, items, out)
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
    else:
        m = evaluate_cli.load_for_command_line(f)
        n_given = f["n"].present
        for bench, items in tasks:
            n = f.n if n_given else bench.samples
            log.info(
                "%s: %d items x %d response(s), recorded in %s.",
                bench.name,
                len(items),
                n,
                run.responses_path(out, bench),
            )
            bar = Progress(len(items), desc=bench.name)
            try:
                results[bench.name] = run.run_benchmark(
                    dataclasses.replace(bench, samples=n),
                    items,
                    _respond(f, m, bench, n),
                    out,
                    chunk=CHUNK,
                    progress=bar.update,
                )
            except (DataError, ValueError) as e:
                raise SystemExit(f"error: {bench.name}: {e}") from None
            finally:
                bar.close()
    md, _ = run.write_report(results, name, out)
    print(md.read_text())
    print(f"Responses, verdicts and the report: {out}")
