"""`python -m ares_jax.evaluate`: the command line of `evaluate.py` (flags, loading a checkpoint,
the generic data layout, `--responses`); with `--benchmark` it hands over to the paper's suite
(`ares_jax/suite/cli.py`).

  python -m ares_jax.evaluate --model=CKPT_DIR --data=a.jsonl,b.jsonl
  python -m ares_jax.evaluate --model=CKPT_DIR --benchmark=mathvista,aime25 --data=DIR_A,FILE_B

Images are preprocessed with the checkpoint's image processor settings (either layout; flags
override the pixel limits), prompts go through its chat template, and generation stops at its
generation_config.json eos ids too; decoding follows the paper's evaluation unless flags say
otherwise (`EvalSettings`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from ares_jax.data.records import OVERLONG_PROMPT, DataError
from ares_jax.eval_batches import cli_prompt_buckets, kv_bytes_per_position
from ares_jax.evaluate import EvalResult, evaluate, policy_sampling, table4
from ares_jax.models.qwen2_5_vl.processor import ImageSettings

# For a checkpoint without an image processor: the paper presets' data.min_pixels/max_pixels.
DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 262144, 4194304
# The command line's KV cache budget per generate call when --batch_tokens is not given: a few
# GiB, which a 3B or 7B model in bfloat16 leaves room for beside its weights on a 24 GB card.
DEFAULT_KV_CACHE_GIB = 4.0


def image_settings(model_dir, min_pixels: int | None, max_pixels: int | None) -> ImageSettings:
    """How images are preprocessed for evaluating `model_dir`: pixel limits each given value,
    else the checkpoint's image processor's (either layout), else ARES's defaults; normalisation
    the checkpoint's, else the hub's Qwen2.5-VL values. Logged once."""
    from ares_jax.models.qwen2_5_vl import hub_files

    found = hub_files.read_image_settings(model_dir)
    source = "the checkpoint's image processor" if found else "the defaults"
    base = found or hub_files.default_image_settings(DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
    lo = base.min_pixels if min_pixels is None else min_pixels
    hi = base.max_pixels if max_pixels is None else max_pixels
    if lo > hi:
        raise ValueError(f"evaluate: min_pixels {lo} > max_pixels {hi}.")
    logging.info(
        "Images resized within [%d, %d] pixels and normalised with mean %s, std %s (%s%s).",
        lo,
        hi,
        base.mean,
        base.std,
        source,
        ", pixel limits overridden by flags" if (min_pixels, max_pixels) != (None, None) else "",
    )
    return base._replace(min_pixels=lo, max_pixels=hi)


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A checkpoint ready to evaluate from the command line: the mesh, model (split), tokenizer,
    image settings, and the generate calls' sizes."""

    mesh: Any
    graphdef: Any
    params: Any
    tokenizer: Any
    cfg: Any
    image: ImageSettings
    batch_tokens: int
    buckets: tuple[int, ...]
    stops: tuple[int, ...]  # generation_config.json's eos ids


def load_for_command_line(f) -> Loaded:
    """The model of --model with the flags' dtype, image settings and KV-cache budget (logged)."""
    from ares_jax.models.qwen2_5_vl import params as model_params
    from ares_jax.models.qwen2_5_vl import tokenizer as tok
    from ares_jax.parallel.mesh import make_mesh

    mesh = make_mesh()
    model = model_params.from_pretrained(
        f.model, dtype=jax.numpy.bfloat16 if f.bf16 else jax.numpy.float32, mesh=mesh
    )
    tokenizer = tok.load_tokenizer(f.model)
    image = image_settings(f.model, f.min_pixels, f.max_pixels)
    cfg = model.cfg
    per_position = kv_bytes_per_position(cfg, model.dtype)
    batch_tokens = f.batch_tokens
    if batch_tokens is None:
        batch_tokens = max(1, int(f.kv_cache_gib * 2**30) // per_position)
    buckets = cli_prompt_buckets(f.prompt_len)
    logging.info(
        "KV cache: %d bytes per position (2 x %d layers x %d KV heads x %d head dim x %d bytes); "
        "budget %d positions (%.2f GiB) per generate call%s; prompt buckets %s.",
        per_position,
        cfg.text.num_hidden_layers,
        cfg.text.num_key_value_heads,
        cfg.text.head_dim,
        np.dtype(model.dtype).itemsize,
        batch_tokens,
        batch_tokens * per_position / 2**30,
        "" if f.batch_size is None else f", at most {f.batch_size} problems",
        buckets,
    )
    from ares_jax.models.qwen2_5_vl import hub_files

    stops = hub_files.generation_stops(f.model)
    logging.info(
        "Decoding: temperature %s, top-p %s, %d new tokens at most, stopping at ids %s (the "
        "model's eos, <|endoftext|> and generation_config.json's eos); generation_config.json's "
        "sampling settings are not used: the flags (default: the paper's evaluation) decide.",
        f.temperature,
        f.top_p,
        f.max_new_tokens,
        sorted({int(cfg.eos_token_id), *stops}),
    )
    graphdef, params = nnx.split(model)
    return Loaded(mesh, graphdef, params, tokenizer, cfg, image, batch_tokens, buckets, stops)


def main(argv):
    from pathlib import Path

    from absl import flags

    from ares_jax.data import pipeline
    from ares_jax.models.qwen2_5_vl.processor import THINK_BOXED_SUFFIX

    del argv
    f = flags.FLAGS
    if f.benchmark:
        from ares_jax.suite import cli

        return cli.main(f)
    if not f.model:
        raise SystemExit("error: --model is required (without --benchmark).")
    examples = []
    try:
        for path in f.data.split(","):
            src = pipeline.example_source(pipeline.FilesSpec(paths=(path,)))
            stem = Path(path).stem
            examples += [
                dataclasses.replace(src[i], source=src[i].source or stem) for i in range(len(src))
            ]
    except (DataError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    m = load_for_command_line(f)
    tokenizer, cfg, image = m.tokenizer, m.cfg, m.image
    sampling = policy_sampling(
        cfg,
        tokenizer,
        n=f.n,
        max_new_tokens=f.max_new_tokens,
        temperature=f.temperature,
        top_p=f.top_p,
        stops=m.stops,
    )
    try:
        # Every prompt is measured before anything is generated: an over-long one is named by
        # file and line, then skipped or (--strict_prompt_len) the end of the run.
        result = evaluate(
            m.graphdef,
            m.params,
            examples,
            tokenizer,
            cfg,
            sampling=sampling,
            template=THINK_BOXED_SUFFIX,
            min_pixels=image.min_pixels,
            max_pixels=image.max_pixels,
            prompt_len_buckets=m.buckets,
            image_mean=image.mean,
            image_std=image.std,
            batch_size=f.batch_size,
            batch_tokens=m.batch_tokens,
            skip_overlong=not f.strict_prompt_len,
            key=jax.random.PRNGKey(f.seed),
            mesh=m.mesh,
        )
    except DataError as e:
        hint = ""
        if e.reason == OVERLONG_PROMPT:
            hint = "; raise --prompt_len" + (
                ", or leave out --strict_prompt_len to skip such prompts"
                if f.strict_prompt_len
                else ""
            )
        raise SystemExit(f"error: {e}{hint}") from None
    skipped = int(result.metrics["eval/skipped_overlong"])
    if skipped:
        logging.warning(
            "%d over-long prompt(s) skipped (longer than --prompt_len=%d); accuracies are over "
            "the %d problems evaluated.",
            skipped,
            f.prompt_len,
            len(examples) - skipped,
        )
    name = Path(f.model).name
    print(table4({name: result}, by="source"))
    print()
    print(table4({name: result}, by="difficulty"))
    if f.output:
        Path(f.output).write_text(json.dumps(result.metrics, indent=2, sort_keys=True))
    if f.responses:
        write_responses(result, f.responses)


def write_responses(result: EvalResult, path) -> None:
    """One JSON line per response, in problem order: the problem's id, source, difficulty and
    gold answer, the response, its length in tokens and whether it was graded correct."""
    with open(path, "w") as out:
        for e, text, n, ok in zip(
            result.problems, result.responses, result.lengths, result.correct, strict=True
        ):
            line = dict(
                id=e.id,
                source=e.source,
                difficulty=e.difficulty,
                answer=e.answer,
                response=text,
                length=int(n),
                correct=bool(ok),
            )
            out.write(json.dumps(line, ensure_ascii=False) + "\n")


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
        "model",
        None,
        "Hugging Face checkpoint directory (with tokenizer). With --benchmark it may be left "
        "out: the report is then rebuilt from --output_dir's recorded responses, regraded.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "data",
        None,
        "Comma-separated data paths (files, directories, globs). Without --benchmark: JSONL/"
        "parquet in the generic layout, one per source; with it: one per benchmark, in order, "
        "in that benchmark's released layout.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "benchmark",
        None,
        "Comma-separated benchmarks of the paper's suite (ares_jax/suite/registry.py: "
        "mathverse, mathvision, mathvista, dynamath, wemath, logicvista, mmmu, mmmu_pro, "
        "charxiv, mmstar, aime24, aime25, math500, gsm8k, olympiadbench), graded with each "
        "benchmark's answer types and metric; resumable in --output_dir.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "output_dir",
        None,
        "With --benchmark: where responses (one JSON line each, with the extracted answer and "
        "verdict), report.md and report.json go; an interrupted run continues from it. "
        "Default: ares_eval/<model directory name>.",
        flag_values=fv,
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
        "prompt_len",
        d.prompt_len,
        "The longest prompt, in tokens (text and image tokens); prompts are padded to the "
        "smallest of its buckets (prompt_len / 4^k, down to 256) that holds a batch's longest.",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "strict_prompt_len",
        False,
        "Stop, naming its file and line, at a prompt longer than --prompt_len (found before "
        "generating); default: skip such prompts, each named in a warning, and report their "
        "count as eval/skipped_overlong.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "batch_tokens",
        None,
        "KV cache positions per generate call: problems x n x (prompt bucket + max_new_tokens). "
        "Each batch holds the largest power of two of problems that fits, at least one. "
        "Default: --kv_cache_gib of cache, i.e. kv_cache_gib x 2^30 / bytes per position, where "
        "bytes per position = 2 x layers x KV heads x head dim x dtype bytes (from the "
        "checkpoint's config; 57344 for 7B and 36864 for 3B in bfloat16).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "kv_cache_gib",
        DEFAULT_KV_CACHE_GIB,
        "KV cache per generate call, in GiB, when --batch_tokens is not given.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "batch_size",
        None,
        "At most this many problems per generate call: a cap on what the token budget "
        "(--batch_tokens, else --kv_cache_gib) allows, which it never raises.",
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
    flags.DEFINE_string(
        "responses",
        None,
        "Write every response here, one JSON line each (problem id, source, difficulty, gold "
        "answer, response, length, correct).",
        flag_values=fv,
    )
    flags.mark_flags_as_required(["data"], flag_values=fv)
