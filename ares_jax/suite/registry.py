"""The benchmarks of the paper's Tables 2-4, their adapters and reference numbers.

Each benchmark's adapter is the module `ares_jax.suite.adapters.<module>`, with
  LAYOUTS: str                  the released layouts it reads (for the README and errors);
  load(path, name) -> list[Item]  the items (Item.benchmark = name) of a file, directory or
                                glob in those layouts;
  score(graded) -> float        optional: the benchmark's metric (default `metrics.accuracy`);
  details(graded) -> dict       optional: further numbers of the benchmark's own report (WeMath's
                                four dimensions), written beside the score.
Adapters import only the standard library, NumPy, PIL, pyarrow and `ares_jax.suite`/`data`:
no JAX, so they are tested and used for grading on any machine.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Mapping, Sequence

from ares_jax.suite import metrics
from ares_jax.suite.items import Item

MULTIMODAL, TEXT = "multimodal", "text"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One benchmark of the suite.

    Attributes:
      name: the command line's name (`--benchmark=NAME`).
      title: the column name of the paper's table.
      modality: MULTIMODAL (Table 2's average) or TEXT (Table 3's).
      table: where the paper reports it.
      module: the adapter, `ares_jax.suite.adapters.<module>`.
      metric: the metric in words, for the report and the README.
      samples: responses per item (AIME: 16, the paper's average@16).
      paper: the paper's numbers in percent by model ("ARES-3B", "ARES-7B").
    """

    name: str
    title: str
    modality: str
    table: str
    module: str
    metric: str
    samples: int = 1
    paper: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def adapter(self):
        return importlib.import_module(f"ares_jax.suite.adapters.{self.module}")

    @property
    def layouts(self) -> str:
        return self.adapter().LAYOUTS

    def load(self, path: str | os.PathLike) -> list[Item]:
        """The benchmark's items from `path` (a file, directory or glob)."""
        return self.adapter().load(path, self.name)

    def scorer(self) -> Callable[[Sequence[metrics.Graded]], float]:
        return getattr(self.adapter(), "score", metrics.accuracy)

    def details(self, graded: Sequence[metrics.Graded]) -> dict[str, float]:
        """The adapter's further numbers (`details`), {} when it has none."""
        fn = getattr(self.adapter(), "details", None)
        return dict(fn(graded)) if fn is not None else {}


def _b(name, title, modality, table, metric, ares_3b, ares_7b, *, samples=1, module=None):
    paper = {k: v for k, v in (("ARES-3B", ares_3b), ("ARES-7B", ares_7b)) if v is not None}
    return Benchmark(name, title, modality, table, module or name, metric, samples, paper)


# Numbers: METHOD.md 7.1 (Table 2), 7.2 (Table 3), 7.3 (Table 4: ARES-RL-7B).
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        _b("mathverse", "MathVerse-V", MULTIMODAL, "Table 2", "accuracy (vision-only)", 48.2, 56.5),
        _b("mathvision", "MathVision", MULTIMODAL, "Table 2", "accuracy", 44.2, 51.9),
        _b("mathvista", "MathVista", MULTIMODAL, "Table 2", "accuracy (testmini)", 66.8, 74.6),
        _b("dynamath", "DynaMath-W", MULTIMODAL, "Table 2", "worst-case accuracy", 24.6, 39.7),
        _b("wemath", "WeMath", MULTIMODAL, "Table 2", "strict score", 40.8, 47.2),
        _b("logicvista", "LogicVista", MULTIMODAL, "Table 2", "accuracy", 43.5, 54.1),
        _b("mmmu", "MMMU", MULTIMODAL, "Table 2", "accuracy (validation)", 56.8, 67.9),
        _b(
            "mmmu_pro",
            "MMMU-Pro",
            MULTIMODAL,
            "Table 2",
            "accuracy (mean of standard-10 and vision)",
            45.2,
            54.8,
        ),
        _b(
            "charxiv",
            "CharXiv",
            MULTIMODAL,
            "Table 2",
            "accuracy (reasoning; rule-based, where the paper used a GPT judge)",
            34.4,
            47.0,
        ),
        _b("mmstar", "MMStar", MULTIMODAL, "Table 2", "accuracy", 56.7, 65.3),
        _b("aime24", "AIME24", TEXT, "Table 3", "avg@16", 41.5, 65.0, samples=16, module="aime"),
        _b("aime25", "AIME25", TEXT, "Table 3", "avg@16", 34.8, 61.7, samples=16, module="aime"),
        _b("math500", "MATH500", TEXT, "Table 3", "accuracy", 86.2, 95.2),
        _b("gsm8k", "GSM8K", TEXT, "Table 4", "accuracy", None, 95.7),
        _b("olympiadbench", "OlympiadBench", TEXT, "Table 4", "accuracy", None, 56.9),
    )
}


def get(name: str) -> Benchmark:
    """The benchmark called `name`; ValueError listing the known names otherwise."""
    key = name.strip().lower().replace("-", "_")
    if key not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[key]


def markdown_table() -> str:
    """The README's table of the suite: name, the paper's column, metric, layouts read and the
    paper's ARES numbers (`python -m ares_jax.suite.registry` prints it)."""
    lines = [
        "| `--benchmark` | paper | metric | layouts read | ARES-3B | ARES-7B |",
        "|---|---|---|---|---:|---:|",
    ]
    for b in BENCHMARKS.values():
        p3, p7 = (b.paper.get(k) for k in ("ARES-3B", "ARES-7B"))
        lines.append(
            f"| `{b.name}` | {b.title} ({b.table}) | {b.metric} | {b.layouts} | "
            f"{'-' if p3 is None else p3} | {'-' if p7 is None else p7} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
