"""Evaluation: accuracy and mean response length per benchmark and per difficulty.

`evaluate` samples each problem once (or n times) with the project's sampler, checks the last
\\boxed{} answer with math-verify, and reports accuracy and mean response length (tokens) overall,
per data source (benchmark file) and per difficulty level: the layout of the paper's Table 4
(METHOD.md 7.3). It also returns the rollouts' entropies, from which the AEPO stage seeds its
threshold (METHOD.md 2.3 item 3).

  python -m ares_jax.evaluate --model=CKPT_DIR --data=mathvista.jsonl,gsm8k.jsonl
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from ares_jax.batching import encode_examples, sampler_inputs
from ares_jax.parallel import multihost
from ares_jax.rewards import answers
from ares_jax.sampling import SamplingParams, generate

# For a checkpoint without an image processor: the paper presets' data.min_pixels/max_pixels.
DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 262144, 4194304


def image_pixel_limits(model_dir, min_pixels: int | None, max_pixels: int | None):
    """(min_pixels, max_pixels) for evaluating `model_dir`: each given value, else the
    checkpoint's image processor (either layout), else ARES's defaults; logged once."""
    from absl import logging

    from ares_jax.models.qwen2_5_vl import hub_files

    found = hub_files.read_image_settings(model_dir)
    source = "the checkpoint's image processor" if found else "the defaults"
    base = (
        (found.min_pixels, found.max_pixels) if found else (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    )
    lo = base[0] if min_pixels is None else min_pixels
    hi = base[1] if max_pixels is None else max_pixels
    if lo > hi:
        raise ValueError(f"evaluate: min_pixels {lo} > max_pixels {hi}.")
    logging.info(
        "Images resized within [%d, %d] pixels (%s%s).",
        lo,
        hi,
        source,
        ", overridden by flags" if (min_pixels, max_pixels) != (None, None) else "",
    )
    return lo, hi


@dataclasses.dataclass
class EvalResult:
    metrics: dict[str, float]  # eval/accuracy, eval/response_len, eval/<group>/<key>/...
    correct: np.ndarray  # [N] bool, per response
    lengths: np.ndarray  # [N] int
    entropy: np.ndarray  # [N, T] exact entropy per generated position
    topk_entropy_tail: np.ndarray  # [N, T] top-k estimates, as the sampler's (0 when off)
    topk_entropy_raw: np.ndarray  # [N, T]
    mask: np.ndarray  # [N, T]
    groups: dict[str, dict[str, tuple[float, float, int]]]  # by -> key -> (acc, len, count)


def policy_sampling(
    cfg, tokenizer, *, n: int = 1, max_new_tokens: int, temperature: float, top_p: float = 1.0
) -> SamplingParams:
    """Sampling as the policy is queried outside AEPO's rollout: stop at <|im_end|> or
    <|endoftext|>, never sample the image placeholder (-100 bias, as the released code does) or
    an id past the tokenizer's vocabulary."""
    from ares_jax.models.qwen2_5_vl import tokenizer as tok

    stops = tuple(sorted({int(cfg.eos_token_id), tok.special_ids(tokenizer).endoftext}))
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
    correct, lengths, owners = [], [], []
    per_row = {k: [] for k in ("entropy", "topk_entropy_tail", "topk_entropy_raw", "mask")}
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        size = len(chunk)
        if size < batch_size:  # pad the last batch to the static size; padding rows are dropped
            chunk = chunk + [chunk[-1]] * (batch_size - size)
        prompts = encode_examples(
            chunk,
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
        scores = grade(texts, golds)
        correct.append(scores.correct)
        lengths.append(out.lengths[keep])
        for k, parts in per_row.items():
            parts.append(getattr(out, k)[keep])
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
        **{k: np.concatenate(parts) for k, parts in per_row.items()},
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


# ---------------------------------------------------------------------------------------------
# Command line: python -m ares_jax.evaluate --model=CKPT_DIR --data=a.jsonl,b.jsonl
# ---------------------------------------------------------------------------------------------


def main(argv):
    from pathlib import Path

    from absl import flags

    from ares_jax.data import pipeline, prompts
    from ares_jax.data.records import DataError
    from ares_jax.models.qwen2_5_vl import params as model_params
    from ares_jax.models.qwen2_5_vl import tokenizer as tok
    from ares_jax.models.qwen2_5_vl.processor import THINK_BOXED_SUFFIX
    from ares_jax.parallel.mesh import make_mesh

    del argv
    f = flags.FLAGS
    mesh = make_mesh()
    model = model_params.from_pretrained(
        f.model, dtype=jax.numpy.bfloat16 if f.bf16 else jax.numpy.float32, mesh=mesh
    )
    tokenizer = tok.load_tokenizer(f.model)
    min_pixels, max_pixels = image_pixel_limits(f.model, f.min_pixels, f.max_pixels)
    cfg = model.cfg
    examples = []
    # Every prompt is measured when read: one over --prompt_len names its file and line here
    # rather than stopping the evaluation at its batch (a benchmark is not silently shortened).
    lengths = prompts.PromptSettings(
        template=THINK_BOXED_SUFFIX,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        max_len=f.prompt_len,
        patch_size=cfg.vision.patch_size,
        merge_size=cfg.vision.spatial_merge_size,
        image_token_id=cfg.image_token_id,
    )
    try:
        for path in f.data.split(","):
            src = pipeline.example_source(pipeline.FilesSpec(paths=(path,)))
            src, _ = prompts.check_prompts(src, tokenizer, lengths, drop_overlong=False)
            stem = Path(path).stem
            examples += [
                dataclasses.replace(src[i], source=src[i].source or stem) for i in range(len(src))
            ]
    except (DataError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    sampling = policy_sampling(
        cfg,
        tokenizer,
        n=f.n,
        max_new_tokens=f.max_new_tokens,
        temperature=f.temperature,
        top_p=f.top_p,
    )
    graphdef, params = nnx.split(model)
    result = evaluate(
        graphdef,
        params,
        examples,
        tokenizer,
        cfg,
        sampling=sampling,
        template=THINK_BOXED_SUFFIX,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        prompt_len_buckets=(f.prompt_len,),
        batch_size=f.batch_size,
        key=jax.random.PRNGKey(f.seed),
        mesh=mesh,
    )
    name = Path(f.model).name
    print(table4({name: result}, by="source"))
    print()
    print(table4({name: result}, by="difficulty"))
    if f.output:
        import json

        Path(f.output).write_text(json.dumps(result.metrics, indent=2, sort_keys=True))


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Decoding of `python -m ares_jax.evaluate` by default: the authors' evaluation.

    Temperature and top-p are those of the released evaluation script (METHOD.md 6: T 0.3,
    top-p 0.95), one sample per problem (pass@1; the paper's AIME numbers average 16 samples:
    --n=16). Its 8192-token budget would cut ARES answers short (METHOD.md 7.3: 22.6k tokens on
    average on AIME25, 12.9k on OlympiadBench), so the budget is 32768 new tokens.
    """

    temperature: float = 0.3
    top_p: float = 0.95
    n: int = 1
    max_new_tokens: int = 32768
    prompt_len: int = 4096  # the paper's prompt limit (METHOD.md 4.1)


PAPER_EVAL = EvalSettings()


def define_flags(flag_values=None) -> None:
    """The command line's flags, with PAPER_EVAL's defaults."""
    from absl import flags

    fv = flag_values if flag_values is not None else flags.FLAGS
    d = PAPER_EVAL
    flags.DEFINE_string(
        "model", None, "Hugging Face checkpoint directory (with tokenizer).", flag_values=fv
    )
    flags.DEFINE_string(
        "data", None, "Comma-separated JSONL/parquet files, one per benchmark.", flag_values=fv
    )
    flags.DEFINE_float(
        "temperature", d.temperature, "Sampling temperature (0 = greedy).", flag_values=fv
    )
    flags.DEFINE_float("top_p", d.top_p, "Nucleus sampling.", flag_values=fv)
    flags.DEFINE_integer(
        "n", d.n, "Samples per problem (16 for the paper's AIME average).", flag_values=fv
    )
    flags.DEFINE_integer(
        "max_new_tokens", d.max_new_tokens, "Response length limit.", flag_values=fv
    )
    flags.DEFINE_integer(
        "prompt_len", d.prompt_len, "Prompts are padded to this many tokens.", flag_values=fv
    )
    flags.DEFINE_integer(
        "batch_size",
        16,
        "Problems per generate call; the KV cache holds batch_size x n rows.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "min_pixels",
        None,
        "Image resize lower bound; default: the checkpoint's image processor, else "
        f"{DEFAULT_MIN_PIXELS}.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "max_pixels",
        None,
        "Image resize upper bound; default: the checkpoint's image processor, else "
        f"{DEFAULT_MAX_PIXELS}.",
        flag_values=fv,
    )
    flags.DEFINE_bool("bf16", True, "Compute in bfloat16.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
    flags.DEFINE_string("output", None, "Write the metrics as JSON here.", flag_values=fv)
    flags.mark_flags_as_required(["model", "data"], flag_values=fv)


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
