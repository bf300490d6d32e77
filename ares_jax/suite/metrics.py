"""The benchmarks' own metrics over graded responses.

A `Graded` is one response to one item (sample `sample` of the item's n). Every metric returns
a fraction in [0, 1]:
  - `accuracy`: the mean over all responses; with n samples per item it is avg@n (AIME's
    average over 16 samples), and pass@1 with n = 1;
  - `worst_case`: DynaMath's: for each sample index, a group (the seed question of the
    variants) counts correct only when every item in it is correct; the mean over groups,
    averaged over sample indices;
  - benchmark-specific ones live with their adapter (WeMath's strict score) and take the same
    argument.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from ares_jax.suite.items import Item


class Graded(NamedTuple):
    item: Item
    sample: int  # which of the item's n responses
    correct: bool
    length: int  # response tokens


def accuracy(graded: Sequence[Graded]) -> float:
    """Mean correctness over all responses (avg@n; pass@1 for n = 1)."""
    if not graded:
        return float("nan")
    return float(np.mean([g.correct for g in graded]))


def worst_case(graded: Sequence[Graded]) -> float:
    """DynaMath's worst-case accuracy (module docstring); an item without a group is its own."""
    if not graded:
        return float("nan")
    by_sample: dict[int, dict[str, list[bool]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    for g in graded:
        by_sample[g.sample][g.item.group or g.item.id].append(g.correct)
    per_sample = [np.mean([all(v) for v in groups.values()]) for groups in by_sample.values()]
    return float(np.mean(per_sample))


def mean_length(graded: Sequence[Graded]) -> float:
    """Mean response length in tokens."""
    if not graded:
        return float("nan")
    return float(np.mean([g.length for g in graded]))
