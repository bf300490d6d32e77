"""How `evaluate` groups problems into generate calls: a KV-cache token budget per call.

A call's cache holds problems x rows_per_prompt x (prompt bucket + max_new_tokens) positions of
`kv_bytes_per_position` bytes each; `plan_batches` groups consecutive problems so that each
call fits the budget, with few compiled shapes (power-of-two row counts, a few prompt buckets).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from ares_jax.batching import pow2


def kv_bytes_per_position(cfg, dtype) -> int:
    """Bytes of one KV cache position of one row: 2 (K and V) x layers x KV heads x head dim x
    bytes per element (`Qwen2_5_VL.init_cache`, in the model's compute dtype)."""
    t = cfg.text
    return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * np.dtype(dtype).itemsize


def problems_per_call(
    bucket: int,
    *,
    max_new_tokens: int,
    rows_per_prompt: int = 1,
    batch_tokens: int | None,
    batch_size: int | None = None,
) -> int:
    """Problems in one generate call whose prompts fit `bucket` tokens.

    With a budget, the largest power of two of problems whose KV cache, problems x
    rows_per_prompt x (bucket + max_new_tokens) positions, fits `batch_tokens`; at least 1 (one
    problem over the budget still runs, alone). `batch_size` caps it; without a budget it is the
    count.
    """
    if batch_tokens is None and batch_size is None:
        raise ValueError("evaluate: give batch_tokens, batch_size or both.")
    if batch_tokens is None:
        return max(1, int(batch_size))
    fit = int(batch_tokens) // (rows_per_prompt * (bucket + max_new_tokens))
    fit = 1 << (fit.bit_length() - 1) if fit >= 1 else 1  # a power of two: few compiled shapes
    return fit if batch_size is None else max(1, min(fit, int(batch_size)))


@dataclasses.dataclass(frozen=True)
class Batch:
    """One generate call: problems [start, start + size) padded to `rows` prompts of `bucket`
    tokens (the padding rows are dropped); `start` keys the rows (`generate(first_prompt=)`)."""

    start: int
    size: int
    rows: int
    bucket: int  # tokens: the smallest prompt length bucket holding the batch's longest prompt


def plan_batches(
    prompt_buckets: Sequence[int | None],
    *,
    max_new_tokens: int,
    rows_per_prompt: int = 1,
    batch_tokens: int | None,
    batch_size: int | None = None,
) -> list[Batch]:
    """Consecutive problems grouped into generate calls within the token budget.

    A batch grows problem by problem while `problems_per_call` of its longest prompt's bucket
    still holds it, so that bucket bounds its size; it never spans a problem left out (None),
    so its problems' indices stay consecutive. Its row count is its size rounded up to a power
    of two, within that bound (a short last batch compiles a smaller shape rather than running
    padding rows for max_new_tokens steps).

    Args:
      prompt_buckets: per problem, its prompt length bucket in tokens, or None (left out).
      max_new_tokens, rows_per_prompt, batch_tokens, batch_size: as `problems_per_call`.
    """
    per_call = functools.cache(
        lambda b: problems_per_call(
            b,
            max_new_tokens=max_new_tokens,
            rows_per_prompt=rows_per_prompt,
            batch_tokens=batch_tokens,
            batch_size=batch_size,
        )
    )
    plan, n, start = [], len(prompt_buckets), 0
    while start < n:
        if prompt_buckets[start] is None:
            start += 1
            continue
        end, top = start + 1, prompt_buckets[start]
        while end < n and prompt_buckets[end] is not None:
            bucket = max(top, prompt_buckets[end])
            if per_call(bucket) < end + 1 - start:
                break
            top, end = bucket, end + 1
        size = end - start
        plan.append(Batch(start, size, min(pow2(size), per_call(top)), top))
        start = end
    return plan


def cli_prompt_buckets(prompt_len: int, *, smallest: int = 256) -> tuple[int, ...]:
    """The command line's prompt length buckets: prompt_len and its quarters down to `smallest`
    (4096: 256, 1024, 4096), few enough to compile few shapes."""
    buckets = [int(prompt_len)]
    while buckets[0] // 4 >= smallest:
        buckets.insert(0, buckets[0] // 4)
    return tuple(buckets)
