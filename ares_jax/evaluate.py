"""Evaluation: accuracy and mean response length per benchmark and per difficulty.

`evaluate` samples each problem once (or n times) with the project's sampler, checks the last
\\boxed{} answer with math-verify, and reports accuracy and mean response length (tokens) overall,
per data source (benchmark file) and per difficulty level: the layout of the paper's Table 4
(METHOD.md 7.3). It also returns the rollouts' entropies, from which the AEPO stage seeds its
threshold (METHOD.md 2.3 item 3).

  python -m ares_jax.evaluate --model=CKPT_DIR --data=mathvista.jsonl,gsm8k.jsonl

Problems go to the sampler in batches sized by a token budget (`plan_batches`): the KV cache of a
call, problems x rows per problem x (prompt bucket + max_new_tokens) positions, stays within
`batch_tokens`, so a long response budget runs few problems at a time and a short one many. The
batches keep the problems' order and each row's sampling key is its problem's index
(`generate(first_prompt=...)`), so the samples do not depend on how the problems were batched.
A prompt longer than the largest bucket is skipped, named and counted (`eval/skipped_overlong`),
or, with `skip_overlong=False` (`--strict_prompt_len`), stops the evaluation before it generates.
The command line (flags, checkpoint loading, `--benchmark`) is `evaluate_cli.py`.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from absl import logging

from ares_jax.batching import encode_examples, sampler_inputs
from ares_jax.data import prompts
from ares_jax.data.records import OVERLONG_PROMPT, DataError
from ares_jax.eval_batches import (
    plan_batches,
    problems_per_call,
)
from ares_jax.models.qwen2_5_vl.processor import IMAGE_MEAN, IMAGE_STD
from ares_jax.parallel import multihost
from ares_jax.rewards import answers
from ares_jax.sampling import SamplingParams, generate

_MAX_NAMED_SKIPS = 20  # over-long prompts named one by one in the log; the rest are counted


@dataclasses.dataclass
class EvalResult:
    # eval/accuracy, eval/response_len, eval/count (responses), eval/skipped_overlong (problems
    # left out: prompt over the largest bucket), eval/<group>/<key>/...
    metrics: dict[str, float]
    correct: np.ndarray  # [N] bool, per response
    lengths: np.ndarray  # [N] int
    entropy: np.ndarray  # [N, T] exact entropy per generated position
    topk_entropy_tail: np.ndarray  # [N, T] top-k estimates, as the sampler's (0 when off)
    topk_entropy_raw: np.ndarray  # [N, T]
    mask: np.ndarray  # [N, T]
    groups: dict[str, dict[str, tuple[float, float, int]]]  # by -> key -> (acc, len, count)
    responses: list[str] = dataclasses.field(default_factory=list)  # [N] decoded, per response
    problems: list = dataclasses.field(default_factory=list)  # [N] the Example of each response
    # [N, T] int32 generated ids (pad id after each response's end), for trigger-word counts
    tokens: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.int32))


def policy_sampling(
    cfg,
    tokenizer,
    *,
    n: int = 1,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    stops: Sequence[int] = (),
) -> SamplingParams:
    """Sampling as the policy is queried outside AEPO's rollout: stop at <|im_end|>,
    <|endoftext|> or `stops` (a checkpoint's generation_config.json eos ids), never sample the
    image placeholder (-100 bias, as the released code does) or an id past the tokenizer's
    vocabulary."""
    from ares_jax.models.qwen2_5_vl import tokenizer as tok

    stops = tuple(
        sorted({int(cfg.eos_token_id), tok.special_ids(tokenizer).endoftext, *map(int, stops)})
    )
    return SamplingParams(
        n=n,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        stop_token_ids=stops,
        pad_token_id=cfg.pad_token_id,
        logit_bias=((cfg.image_token_id, -100.0),),
        vocab_limit=len(tokenizer),
    )


def grade(responses: Sequence[str], golds: Sequence[str], *, workers: int = 0):
    """`answers.score_responses` with the grading spread over the processes (response i on
    process i mod P); every process gets all N scores, so the host side of the step stays the
    same everywhere even where math-verify would time out on one host and not on another."""

    def part(pairs):
        s = answers.score_responses([r for r, _ in pairs], [g for _, g in pairs], workers=workers)
        return list(zip(s.correct.tolist(), s.format_ok.tolist(), s.extracted, strict=True))

    rows = multihost.spread(part, list(zip(responses, golds, strict=True)))
    return answers.AnswerScores(
        correct=np.array([r[0] for r in rows], dtype=bool),
        format_ok=np.array([r[1] for r in rows], dtype=bool),
        extracted=[r[2] for r in rows],
    )


def _difficulty(e) -> str:
    return "all" if e.difficulty is None else str(e.difficulty)


# ---------------------------------------------------------------------------------------------
# Batches by token budget
# ---------------------------------------------------------------------------------------------


def _prompt_buckets(examples, tokenizer, cfg, buckets, *, template, min_pixels, max_pixels):
    """Each example's prompt length bucket, or None for one longer than the largest bucket (with
    its description); raises DataError for a prompt the processor cannot encode."""
    settings = prompts.PromptSettings(
        template=template,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        max_len=max(buckets),
        patch_size=cfg.vision.patch_size,
        merge_size=cfg.vision.spatial_merge_size,
        image_token_id=cfg.image_token_id,
    )
    out, overlong = [], []
    for e, length in zip(
        examples, prompts.prompt_lengths(examples, tokenizer, settings), strict=True
    ):
        where = e.origin or f"example {e.id!r}"
        if not isinstance(length, int):
            raise DataError(f"{where}: {length[1]}", reason=length[0])
        if length > settings.max_len:
            out.append(None)
            overlong.append(
                f"{where}: the prompt has {length} tokens (text and image tokens), more than the "
                f"largest prompt length bucket ({settings.max_len})"
            )
        else:
            out.append(min(b for b in buckets if b >= length))
    return out, overlong


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
    image_mean: Sequence[float] = IMAGE_MEAN,
    image_std: Sequence[float] = IMAGE_STD,
    batch_size: int | None = None,
    batch_tokens: int | None = None,
    skip_overlong: bool = True,
    key: jax.Array,
    mesh=None,
    progress=None,
    grader: Callable[[list[str], list], np.ndarray] | None = None,
) -> EvalResult:
    """Generates for every example and scores the answers.

    Args:
      examples: the problems; problem i's rows sample with `generate`'s keys of prompt i, and
        the result's rows are the kept problems' in order, `rows_per_prompt` each.
      prompt_len_buckets: prompt lengths (tokens) a batch is padded to: its longest prompt's.
        Its KV cache holds that bucket + max_new_tokens positions, so prefill and decode
        compile once per (rows, bucket) pair the plan uses.
      batch_size: at most this many problems per generate call (without `batch_tokens`, exactly
        this many, the last batch excepted).
      batch_tokens: KV cache positions per generate call, problems x rows_per_prompt x
        (prompt bucket + max_new_tokens) (`plan_batches`); None: `batch_size` alone.
      skip_overlong: a prompt longer than the largest bucket is left out, named in a warning
        and counted in `eval/skipped_overlong`; False raises DataError naming the first one,
        before anything is generated.
      progress: an object with `update(problems)` (tqdm), called after each batch.
      grader: `grader(responses, examples) -> [N] bool`, called once per batch with the batch's
        decoded responses and the example of each; default: the last box against the example's
        answer with math-verify (`answers.score_responses`, as training grades).

    Raises:
      DataError: a prompt the processor cannot encode (naming its file and line), an over-long
        one under `skip_overlong=False`, or none left to evaluate.
    """
    buckets = sorted({int(b) for b in prompt_len_buckets})
    bucket_of, overlong = _prompt_buckets(
        examples,
        tokenizer,
        cfg,
        buckets,
        template=template,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
    )
    if overlong and not skip_overlong:
        raise DataError(overlong[0], reason=OVERLONG_PROMPT)
    for message in overlong[:_MAX_NAMED_SKIPS]:
        logging.warning("evaluate: skipped: %s.", message)
    if len(overlong) > _MAX_NAMED_SKIPS:
        logging.warning(
            "evaluate: ... %d more over-long prompts skipped.", len(overlong) - _MAX_NAMED_SKIPS
        )
    limits = dict(
        max_new_tokens=sampling.max_new_tokens,
        rows_per_prompt=sampling.rows_per_prompt,
        batch_tokens=batch_tokens,
        batch_size=batch_size,
    )
    plan = plan_batches(bucket_of, **limits)
    if not plan:
        raise DataError(
            f"evaluate: none of the {len(examples)} prompts fits the largest prompt length "
            f"bucket ({buckets[-1]}); the first: {overlong[0] if overlong else 'none given'}",
            reason=OVERLONG_PROMPT,
        )
    total = sum(b.size for b in plan)
    by_bucket = ", ".join(
        f"{bucket} tokens: {problems_per_call(bucket, **limits)} "
        f"(largest here {max(b.rows for b in plan if b.bucket == bucket)})"
        for bucket in sorted({b.bucket for b in plan})
    )
    logging.info(
        "evaluate: %d problems (%d over-long skipped) in %d generate calls; problems per call by "
        "prompt bucket: %s, with %d rows each and %d new tokens (budget %s KV cache positions%s).",
        total,
        len(overlong),
        len(plan),
        by_bucket,
        sampling.rows_per_prompt,
        sampling.max_new_tokens,
        batch_tokens,
        "" if batch_size is None else f", at most {batch_size} problems",
    )
    correct, lengths, owners, responses = [], [], [], []
    per_row = {
        k: [] for k in ("entropy", "topk_entropy_tail", "topk_entropy_raw", "mask", "tokens")
    }
    began = last_log = time.perf_counter()
    for done, batch in enumerate(plan, 1):
        chunk = list(examples[batch.start : batch.start + batch.size])
        chunk += [chunk[-1]] * (batch.rows - batch.size)  # padding rows, dropped below
        encoded = encode_examples(
            chunk,
            tokenizer,
            cfg,
            template=template,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            length_buckets=(batch.bucket,),
            image_mean=image_mean,
            image_std=image_std,
        )
        out = generate(
            graphdef,
            params,
            inputs=sampler_inputs(encoded, cfg),
            sampling=sampling,
            key=key,
            mesh=mesh,
            cache_len=batch.bucket + sampling.max_new_tokens,
            first_prompt=batch.start,
        )
        keep = out.prompt_index < batch.size
        texts = [
            tokenizer.decode(out.tokens[i, : out.lengths[i]], skip_special_tokens=True)
            for i in np.flatnonzero(keep)
        ]
        rows = [chunk[p] for p in out.prompt_index[keep]]
        if grader is None:
            verdicts = grade(texts, [e.answer for e in rows]).correct
        else:
            verdicts = np.asarray(grader(texts, rows), dtype=bool)
        responses.extend(texts)
        correct.append(verdicts)
        lengths.append(out.lengths[keep])
        for k, parts in per_row.items():
            parts.append(getattr(out, k)[keep])
        owners.extend(chunk[p] for p in out.prompt_index[keep])
        if progress is not None:
            progress.update(batch.size)
        now = time.perf_counter()
        if done in (1, len(plan)) or now - last_log >= 30:
            solved = sum(b.size for b in plan[:done])
            logging.info(
                "evaluate: batch %d/%d, %d/%d problems, %.2f problems/s, %.0f s elapsed.",
                done,
                len(plan),
                solved,
                total,
                solved / max(now - began, 1e-9),
                now - began,
            )
            last_log = now
    correct = np.concatenate(correct)
    lengths = np.concatenate(lengths)
    metrics = {
        "eval/accuracy": float(correct.mean()),
        "eval/response_len": float(lengths.mean()),
        "eval/count": float(len(correct)),
        "eval/skipped_overlong": float(len(overlong)),
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
        **{k: np.concatenate(parts) for k, parts in per_row.items()},
        groups=groups,
        responses=responses,
        problems=owners,
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


if __name__ == "__main__":
    from absl import app

    from ares_jax import evaluate_cli

    evaluate_cli.define_flags()
    app.run(evaluate_cli.main)
