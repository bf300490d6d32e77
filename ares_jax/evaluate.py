"""Evaluation: accuracy and mean response length per benchmark and per difficulty.

`evaluate` samples each problem once (or n times) with the project's sampler, checks the last
\\boxed{} answer with math-verify, and reports accuracy and mean response length (tokens) overall,
per data source (benchmark file) and per difficulty level: the layout of the paper's Table 4
(METHOD.md 7.3). It also returns the rollouts' entropies, from which the AEPO stage seeds its
threshold (METHOD.md 2.3 item 3).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from ares_jax.aepo.batch import encode_prompts, sampler_inputs
from ares_jax.rewards import answers
from ares_jax.sampling import SamplingParams, generate


@dataclasses.dataclass
class EvalResult:
    metrics: dict[str, float]  # eval/accuracy, eval/response_len, eval/<group>/<key>/...
    correct: np.ndarray  # [N] bool, per response
    lengths: np.ndarray  # [N] int
    entropy: np.ndarray  # [N, T] exact entropy per generated position
    mask: np.ndarray  # [N, T]
    groups: dict[str, dict[str, tuple[float, float, int]]]  # by -> key -> (acc, len, count)


def _difficulty(e) -> str:
    return "all" if e.difficulty is None else str(e.difficulty)


def evaluate(
    graphdef,
    params,
    examples: Sequence,
    tokenizer,
    cfg,
    *,
    sampling: SamplingParams,
    template: str,
    min_pixels: int,
    max_pixels: int,
    prompt_len_buckets: Sequence[int],
    batch_size: int,
    key: jax.Array,
    mesh=None,
    progress=None,
) -> EvalResult:
    """Generates for every example (in batches of `batch_size` prompts) and scores the answers."""
    correct, lengths, entropy, mask, owners = [], [], [], [], []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        size = len(chunk)
        if size < batch_size:  # pad the last batch to the static size; padding rows are dropped
            chunk = chunk + [chunk[-1]] * (batch_size - size)
        prompts = encode_prompts(
            [e.question for e in chunk],
            [e.images for e in chunk],
            tokenizer,
            cfg,
            template=template,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            length_buckets=prompt_len_buckets,
        )
        out = generate(
            graphdef,
            params,
            inputs=sampler_inputs(prompts, cfg),
            sampling=sampling,
            key=jax.random.fold_in(key, start),
            mesh=mesh,
            cache_len=max(prompt_len_buckets) + sampling.max_new_tokens,
        )
        keep = out.prompt_index < size
        texts = [
            tokenizer.decode(out.tokens[r, : out.lengths[r]], skip_special_tokens=True)
            for r in np.flatnonzero(keep)
        ]
        golds = [chunk[p].answer for p in out.prompt_index[keep]]
        scores = answers.score_responses(texts, golds)
        correct.append(scores.correct)
        lengths.append(out.lengths[keep])
        entropy.append(out.entropy[keep])
        mask.append(out.mask[keep])
        owners.extend(chunk[p] for p in out.prompt_index[keep])
        if progress is not None:
            progress.update(size)
    correct = np.concatenate(correct)
    lengths = np.concatenate(lengths)
    metrics = {
        "eval/accuracy": float(correct.mean()),
        "eval/response_len": float(lengths.mean()),
        "eval/count": float(len(correct)),
    }
    groups: dict[str, dict[str, tuple[float, float, int]]] = {}
    for by, key_fn in (("source", lambda e: e.source or "all"), ("difficulty", _difficulty)):
        table = collections.defaultdict(list)
        for i, e in enumerate(owners):
            table[key_fn(e)].append(i)
        groups[by] = {}
        for k, idx in sorted(table.items()):
            acc, ln = float(correct[idx].mean()), float(lengths[idx].mean())
            groups[by][k] = (acc, ln, len(idx))
            metrics[f"eval/{by}/{k}/accuracy"] = acc
            metrics[f"eval/{by}/{k}/response_len"] = ln
    return EvalResult(
        metrics=metrics,
        correct=correct,
        lengths=lengths,
        entropy=np.concatenate(entropy),
        mask=np.concatenate(mask),
        groups=groups,
    )


def table4(results: dict[str, EvalResult], by: str = "difficulty") -> str:
    """A Markdown table like the paper's Table 4: rows are models, columns (Acc, Len) per group."""
    keys = sorted({k for r in results.values() for k in r.groups[by]}, key=_sort_key)
    head = "| model | " + " | ".join(f"{by} {k} acc | len" for k in keys) + " | all acc | len |"
    sep = "|---" * (2 * len(keys) + 3) + "|"
    lines = [head, sep]
    for name, r in results.items():
        cells = []
        for k in keys:
            acc, ln, _ = r.groups[by].get(k, (float("nan"), float("nan"), 0))
            cells += [f"{100 * acc:.1f}", f"{ln:.1f}"]
        cells += [
            f"{100 * r.metrics['eval/accuracy']:.1f}",
            f"{r.metrics['eval/response_len']:.1f}",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sort_key(k: str):
    return (0, int(k)) if k.isdigit() else (1, k)
