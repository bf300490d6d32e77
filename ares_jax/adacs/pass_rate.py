"""Pass-rate estimation for AdaCS: K samples per problem, graded with math-verify (METHOD.md 3.1).

`estimate_pass_rates` samples `samples` (K, default 8) responses per problem from a given model
with the project's sampler (one prefill per problem, n = K rows), grades each with
`answers.score_responses` (last `\\boxed{}` + math-verify), and appends one JSON line per problem
to this host's shard file. K = 8 gives the 9 pass-rate brackets 0/8 .. 8/8 that curation samples
uniformly from. `merge_pass_rates` reads every shard back; `attach_pass_rates` and
`write_pass_rate_dataset` turn the rates into a data set that `records.read_examples` reads back.

Output layout. `out_path` is a directory. Host `i` of `n` owns

    <out_path>/shard-0000i-of-0000n.jsonl      one line per finished problem
    <out_path>/shard-0000i-of-0000n.meta.json  the settings the shard was started with

A line holds: `id`, `source`, `pass_rate` (= num_correct / samples), `num_correct`, `samples`,
`mean_length` (mean response length in tokens, the stop token included), `lengths` and
`correct` (per sample), `num_truncated` (samples that hit `max_new_tokens`) and, with
`keep_responses=True`, `responses` (the decoded texts).

Sharding. Host `shard_index` takes `problems[shard_index::shard_count]`. Every host generates on
its own devices (`mesh=None`, or a mesh of this process's devices only): hosts hold different
numbers of unfinished problems after a resume, so they cannot take part in one collective
generate call. A mesh that spans other processes is rejected. After all hosts finish (a barrier
is the caller's job), `merge_pass_rates(out_path)` reads all shards.

Determinism (design). The sampler draws all rows of a generate call from one key, and a row's
draws depend on its position in the call; prompt padding (the length bucket) also depends on the
batch. So per-problem keys cannot be honoured inside a mixed batch. Instead batch composition is
fixed: this host's problems, in the given order, are cut into consecutive batches of
`batch_size` problems (the last one padded with copies of its last problem, dropped afterwards),
and batch b is sampled with `batch_key(key, ids of batch b)`: `key` folded with a stable
(SHA-256) hash of the batch's ids. A batch's samples therefore depend only on (key, the batch's
ids, the settings), never on what ran before it or on how many runs it took. With
`batch_size=1` each problem's samples depend only on (key, its id).

Resume. On start the shard file is read; its finished ids are skipped. The file is append-only:
each batch's lines are written together, flushed and fsync'd before the next batch starts, so a
SIGKILL loses at most the batch in flight. Trailing garbage (a partially written last line, or
a line without its newline) is detected and truncated away; a malformed line followed by good
lines is an error (the file was edited). A batch runs again only if some of its ids are missing
from the file; then the whole batch is regenerated (same key, same composition, hence the same
samples) and only the missing lines are appended: nothing is written twice, nothing is lost,
and a resumed run writes exactly the records of an uninterrupted one. The only recomputation is
of the batch in flight at the crash (including, after a write torn mid-batch, its problems whose
lines had reached the disk; their regenerated results are identical and discarded). The
`.meta.json` file pins the settings that determine the samples (K, batch size, sampling
parameters, prompt template and image sizes, length buckets, key, shard, and a hash of the
shard's ordered ids); resuming with different ones raises `ValueError` instead of silently
mixing two runs. The model parameters are not fingerprinted: resume with the same model.

Grading is deterministic except for the bound on one response's grading (answers.GRADE_TIMEOUT_S),
which a pathologically slow expression on a loaded machine could hit in one run and not another.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ares_jax.batching import encode_examples, sampler_inputs
from ares_jax.data import records
from ares_jax.data.records import Example
from ares_jax.models.qwen2_5_vl.processor import IMAGE_MEAN, IMAGE_STD
from ares_jax.rewards import answers
from ares_jax.sampling import SamplingParams, generate
from ares_jax.sampling.sampler import LENGTH

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 8  # K (METHOD.md 3.1): 9 brackets 0/8 .. 8/8
DEFAULT_MAX_NEW_TOKENS = 4096  # not stated by the paper; configs override it
_SHARD_RE = re.compile(r"shard-(\d{5})-of-(\d{5})\.jsonl$")


@dataclasses.dataclass
class PassRateResult:
    """What one `estimate_pass_rates` call saw for this host's shard.

    Attributes:
      rates: id -> pass rate, for every problem of the shard that is finished (those resumed from
        the shard file included).
      num_correct: id -> correct samples, same keys.
      mean_lengths: id -> mean response length in tokens, same keys.
      samples: K, samples per problem.
      computed: problems generated and written by this call.
      resumed: problems found already finished in the shard file.
      generate_calls: generate calls made by this call.
      tokens_generated: response tokens generated for this call's problems (padding rows of the
        last batch and discarded rows of a regenerated torn batch not counted).
      seconds: wall time of this call.
      path: the shard file.
      stopped: the `stop` callback ended the call before every problem was done.
    """

    rates: dict[str, float]
    num_correct: dict[str, int]
    mean_lengths: dict[str, float]
    samples: int
    computed: int
    resumed: int
    generate_calls: int
    tokens_generated: int
    seconds: float
    path: str
    stopped: bool = False


# ---------------------------------------------------------------------------------------------
# Layout, keys, batches
# ---------------------------------------------------------------------------------------------


def shard_file(out_path: str | os.PathLike, shard_index: int, shard_count: int) -> str:
    """`<out_path>/shard-IIIII-of-NNNNN.jsonl`, the file of host `shard_index`."""
    return os.path.join(os.fspath(out_path), f"shard-{shard_index:05d}-of-{shard_count:05d}.jsonl")


def _meta_file(shard_path: str) -> str:
    return shard_path[: -len(".jsonl")] + ".meta.json"


def _hash31(text: str) -> tuple[int, int]:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return (
        int.from_bytes(digest[:4], "little") & 0x7FFFFFFF,
        int.from_bytes(digest[4:8], "little") & 0x7FFFFFFF,
    )


def batch_key(key: jax.Array, ids: Sequence[str]) -> jax.Array:
    """The key of the batch of problems `ids` (in order): `key` folded with a stable 62-bit hash
    of the ids. Independent of the batch's position, the host and the process."""
    a, b = _hash31(json.dumps(list(ids), ensure_ascii=False))
    return jax.random.fold_in(jax.random.fold_in(key, a), b)


def shard_batches(
    problems: Sequence[Example], batch_size: int, shard_index: int, shard_count: int
) -> list[list[Example]]:
    """This host's problems, `problems[shard_index::shard_count]`, cut into consecutive batches
    of `batch_size` (the last may be shorter; it is padded only when generated)."""
    mine = list(problems[shard_index::shard_count])
    return [mine[s : s + batch_size] for s in range(0, len(mine), batch_size)]


def default_sampling(
    cfg,
    tokenizer,
    *,
    samples: int = DEFAULT_SAMPLES,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> SamplingParams:
    """Plain sampling for pass rates: temperature 1, no truncation, stops and suppressed ids as
    evaluation has them (`evaluate.policy_sampling`)."""
    from ares_jax.evaluate import policy_sampling

    return policy_sampling(
        cfg,
        tokenizer,
        n=samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
    )


# ---------------------------------------------------------------------------------------------
# Shard files
# ---------------------------------------------------------------------------------------------


def _scan(path: str) -> tuple[list[dict[str, Any]], int, int]:
    """(records, byte length of the good prefix, file size). Trailing lines that are not complete
    JSON objects (no newline, or unparsable) are left out; a bad line followed by a good one
    raises `records.DataError` naming the line."""
    with open(path, "rb") as f:
        data = f.read()
    rows: list[dict[str, Any]] = []
    good_end = 0
    bad: tuple[int, str] | None = None
    pos, number = 0, 0
    while pos < len(data):
        number += 1
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        raw = data[pos:end]
        pos = end
        row, problem = None, None
        if nl < 0:
            problem = "no newline at the end (partially written)"
        elif raw.strip():
            try:
                row = json.loads(raw.decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                problem = f"malformed JSON: {e}"
            else:
                if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                    row, problem = None, "not a pass-rate record (no string 'id')"
        if problem is not None:
            if bad is None:
                bad = (number, problem)
            continue
        if row is None:  # a blank line
            if bad is None:
                good_end = end
            continue
        if bad is not None:
            raise records.DataError(
                f"{path}, line {bad[0]}: {bad[1]}; later lines are intact, so the file was not "
                "just cut short by a crash. Fix or remove the line."
            )
        rows.append(row)
        good_end = end
    return rows, good_end, len(data)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _recover(path: str) -> list[dict[str, Any]]:
    """Reads this host's shard file, truncating a partially written tail (crash mid-write)."""
    if not os.path.exists(path):
        return []
    rows, good_end, size = _scan(path)
    if good_end < size:
        log.warning(
            "%s: dropping %d bytes of partially written records at the end (crash mid-write)",
            path,
            size - good_end,
        )
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return rows


def _key_data(key: jax.Array) -> list[int]:
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(jax.device_get(key)).astype(np.int64).ravel().tolist()


def _check_meta(meta_path: str, meta: dict[str, Any]) -> None:
    """Writes `meta` if the shard has none; otherwise requires it to match."""
    meta = json.loads(json.dumps(meta))  # tuples -> lists, as read back
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            old = json.load(f)
        differ = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
        if differ:
            details = "; ".join(f"{k}: was {old.get(k)!r}, now {meta.get(k)!r}" for k in differ)
            raise ValueError(
                f"{meta_path}: this shard was started with other settings ({details}). Resuming "
                "would mix samples of two runs; use the same settings or a new out_path."
            )
        return
    tmp = f"{meta_path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, meta_path)
    _fsync_dir(os.path.dirname(meta_path) or ".")


def _report(progress, n: int, **postfix: Any) -> None:
    if progress is None:
        return
    update = getattr(progress, "update", None)
    if update is not None:
        update(n, **postfix)
    else:
        progress(n)


# ---------------------------------------------------------------------------------------------
# Estimation
# ---------------------------------------------------------------------------------------------


def estimate_pass_rates(
    graphdef,
    params,
    problems: Sequence[Example],
    tokenizer,
    cfg,
    *,
    samples: int = DEFAULT_SAMPLES,
    sampling: SamplingParams | None = None,
    template: str,
    min_pixels: int,
    max_pixels: int,
    prompt_len_buckets: Sequence[int],
    image_mean: Sequence[float] = IMAGE_MEAN,
    image_std: Sequence[float] = IMAGE_STD,
    batch_size: int,
    out_path: str | os.PathLike,
    key: jax.Array,
    shard_index: int | None = None,
    shard_count: int | None = None,
    progress=None,
    mesh=None,
    keep_responses: bool = False,
    grade_workers: int = 0,
    generate_fn: Callable[..., Any] | None = None,
    stop: Callable[[], bool] | None = None,
) -> PassRateResult:
    """Estimates the pass rate of each of this host's problems from `samples` responses.

    Resumable and deterministic: see the module docstring (output layout, batches and keys,
    resume). Call it again with the same arguments after a crash.

    Args:
      graphdef, params: the model (`nnx.split`), params on `mesh` if one is given.
      problems: all problems (every host passes the same list in the same order); ids unique.
      tokenizer, cfg: the model's tokenizer and `Qwen2_5_VLConfig`.
      samples: K, responses per problem (overrides `sampling.n`).
      sampling: how to sample; default `default_sampling(cfg, tokenizer)` (temperature 1.0,
        top-p 1.0). Branching must be off.
      template: the instruction appended to each question (e.g. processor.THINK_BOXED_SUFFIX).
      min_pixels, max_pixels: image resizing bounds.
      image_mean, image_std: image normalisation (the model's image processor's).
      prompt_len_buckets: prompt length buckets; the decode loop is compiled for the largest.
      batch_size: problems per generate call (batch_size * samples rows).
      out_path: the output directory (created if needed).
      key: the PRNG key of the whole estimation.
      shard_index, shard_count: this host's shard; default `jax.process_index()` of
        `jax.process_count()`.
      progress: an object with `update(n, **postfix)` (e.g. `metrics.Progress`) or a callable
        `f(n)`, told after each batch is durably written.
      mesh: shard the rows over this mesh; it must hold only this process's devices.
      keep_responses: also store the decoded responses in each line.
      grade_workers: processes for math-verify grading (`answers.score_responses`).
      generate_fn: the sampler, `sampling.generate` by default (a test seam): called as
        `generate_fn(graphdef, params, inputs=, sampling=, key=, mesh=, cache_len=)` and returning
        a `GenerateOutput` (tokens, lengths, prompt_index and stop_reason are used).
      stop: asked after each batch is durably written; when it returns True the estimation
        ends there (e.g. `checkpoint.preempted_here` on SIGTERM) and the result is marked
        `stopped`; a call with the same arguments resumes.

    Returns:
      PassRateResult for this shard.
    """
    start_time = time.monotonic()
    shard_index = jax.process_index() if shard_index is None else int(shard_index)
    shard_count = jax.process_count() if shard_count is None else int(shard_count)
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
    if samples < 1 or batch_size < 1:
        raise ValueError(f"samples={samples} and batch_size={batch_size} must be >= 1")
    if not prompt_len_buckets:
        raise ValueError("prompt_len_buckets must not be empty")
    sampling = default_sampling(cfg, tokenizer) if sampling is None else sampling
    if sampling.branching.enabled and sampling.branching.budget > 0:
        raise ValueError("estimate_pass_rates: branching must be off (K independent samples)")
    sampling = dataclasses.replace(sampling, n=samples)
    if mesh is not None:
        me = jax.process_index()
        if any(d.process_index != me for d in np.asarray(mesh.devices).flat):
            raise ValueError(
                "estimate_pass_rates: the mesh spans other processes; each host generates its "
                "own shard, so pass a mesh of this process's devices (jax.local_devices())."
            )
    ids = [e.id for e in problems]
    if len(set(ids)) != len(ids):
        seen, dup = set(), []
        for i in ids:
            if i in seen:
                dup.append(i)
            seen.add(i)
        raise ValueError(f"estimate_pass_rates: problem ids must be unique; repeated: {dup[:5]}")
    generate_fn = generate if generate_fn is None else generate_fn

    out_dir = os.fspath(out_path)
    os.makedirs(out_dir, exist_ok=True)
    path = shard_file(out_dir, shard_index, shard_count)
    batches = shard_batches(problems, batch_size, shard_index, shard_count)
    mine = [e.id for batch in batches for e in batch]
    _check_meta(
        _meta_file(path),
        {
            "samples": samples,
            "batch_size": batch_size,
            "sampling": dataclasses.asdict(sampling),
            "template": template,
            "min_pixels": int(min_pixels),
            "max_pixels": int(max_pixels),
            "prompt_len_buckets": [int(b) for b in prompt_len_buckets],
            "key": _key_data(key),
            "shard_index": shard_index,
            "shard_count": shard_count,
            "num_problems": len(mine),
            "ids_sha256": hashlib.sha256(json.dumps(mine).encode("utf-8")).hexdigest(),
        },
    )

    known = set(mine)
    done: dict[str, dict[str, Any]] = {}
    for row in _recover(path):
        if row["id"] not in known:
            raise ValueError(f"{path}: record for id {row['id']!r}, not a problem of this shard")
        if row["id"] in done:
            raise ValueError(f"{path}: id {row['id']!r} appears twice")
        done[row["id"]] = row
    resumed = len(done)
    if resumed:
        log.info("%s: resuming, %d of %d problems already done", path, resumed, len(mine))

    cache_len = max(prompt_len_buckets) + sampling.max_new_tokens
    computed = calls = tokens = 0
    created = not os.path.exists(path)
    stopped = False
    with open(path, "ab") as f:
        if created:
            _fsync_dir(out_dir)
        for batch in batches:
            todo = [e for e in batch if e.id not in done]
            if not todo:
                continue
            size = len(batch)
            chunk = batch + [batch[-1]] * (batch_size - size)  # static shapes; padding dropped
            prompts = encode_examples(
                chunk,
                tokenizer,
                cfg,
                template=template,
                min_pixels=min_pixels,
                max_pixels=max_pixels,
                length_buckets=prompt_len_buckets,
                image_mean=image_mean,
                image_std=image_std,
            )
            out = generate_fn(
                graphdef,
                params,
                inputs=sampler_inputs(prompts, cfg),
                sampling=sampling,
                key=batch_key(key, [e.id for e in batch]),
                mesh=mesh,
                cache_len=cache_len,
            )
            calls += 1
            lines = []
            for p, e in enumerate(batch):
                if e.id in done:  # torn batch: this line reached the disk before the crash
                    continue
                rows = np.flatnonzero(np.asarray(out.prompt_index) == p)
                if len(rows) != samples:
                    raise ValueError(
                        f"generate returned {len(rows)} rows for a prompt, not {samples}"
                    )
                lengths = [int(out.lengths[r]) for r in rows]
                texts = [
                    tokenizer.decode(out.tokens[r, : out.lengths[r]], skip_special_tokens=True)
                    for r in rows
                ]
                scores = answers.score_responses(texts, [e.answer] * samples, workers=grade_workers)
                correct = [bool(c) for c in scores.correct]
                row = {
                    "id": e.id,
                    "source": e.source,
                    "pass_rate": sum(correct) / samples,
                    "num_correct": sum(correct),
                    "samples": samples,
                    "mean_length": float(np.mean(lengths)),
                    "lengths": lengths,
                    "correct": correct,
                    "num_truncated": int(sum(int(out.stop_reason[r]) == LENGTH for r in rows)),
                }
                if keep_responses:
                    row["responses"] = texts
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
                done[e.id] = row
                tokens += sum(lengths)
                computed += 1
            f.write("".join(lines).encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
            _report(
                progress,
                len(lines),
                pass_rate=float(np.mean([done[e.id]["pass_rate"] for e in todo])),
            )
            if stop is not None and stop():
                stopped = True
                break

    return PassRateResult(
        rates={i: float(done[i]["pass_rate"]) for i in mine if i in done},
        num_correct={i: int(done[i]["num_correct"]) for i in mine if i in done},
        mean_lengths={i: float(done[i]["mean_length"]) for i in mine if i in done},
        samples=samples,
        computed=computed,
        resumed=resumed,
        generate_calls=calls,
        tokens_generated=tokens,
        seconds=time.monotonic() - start_time,
        path=path,
        stopped=stopped,
    )


# ---------------------------------------------------------------------------------------------
# Reading back
# ---------------------------------------------------------------------------------------------


def read_pass_rate_records(out_path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of every shard under `out_path`, shard by shard, in file order.

    Read-only: a partially written last line (a host still running, or one that crashed) is
    ignored, not truncated. Raises `FileNotFoundError` when there is no shard file,
    `ValueError` when the shards come from runs with different shard counts or an id has two
    different records.
    """
    out_dir = os.fspath(out_path)
    files = sorted(
        p
        for p in glob.glob(os.path.join(glob.escape(out_dir), "shard-*-of-*.jsonl"))
        if _SHARD_RE.search(os.path.basename(p))
    )
    if not files:
        raise FileNotFoundError(f"no pass-rate shard files (shard-*-of-*.jsonl) in {out_dir}")
    counts = {_SHARD_RE.search(os.path.basename(p)).group(2) for p in files}
    if len(counts) > 1:
        raise ValueError(
            f"{out_dir} holds shards of runs with different shard counts ({sorted(counts)}); "
            "keep one run per directory"
        )
    rows, seen = [], {}
    for p in files:
        for row in _scan(p)[0]:
            old = seen.get(row["id"])
            if old is not None and old["pass_rate"] != row["pass_rate"]:
                raise ValueError(f"id {row['id']!r} has two different pass rates in {out_dir}")
            if old is None:
                seen[row["id"]] = row
                rows.append(row)
    return rows


def merge_pass_rates(out_path: str | os.PathLike) -> dict[str, float]:
    """id -> pass rate over all shards under `out_path` (see `read_pass_rate_records`)."""
    return {row["id"]: float(row["pass_rate"]) for row in read_pass_rate_records(out_path)}


def attach_pass_rates(problems: Sequence[Example], rates: Mapping[str, float]) -> list[Example]:
    """`problems` with `pass_rate` set from `rates`; problems without a rate are unchanged."""
    return [
        dataclasses.replace(e, pass_rate=float(rates[e.id])) if e.id in rates else e
        for e in problems
    ]


def write_pass_rate_dataset(
    problems: Sequence[Example],
    rates: Mapping[str, float] | str | os.PathLike,
    path: str | os.PathLike,
    *,
    drop_missing: bool = True,
) -> str:
    """Writes `problems` with their pass rates as JSONL (`records.write_jsonl`, atomic), which
    `records.read_examples` and curation read back.

    Args:
      problems: the problems (with their traces, if curation needs them).
      rates: id -> pass rate, or an estimation output directory to merge.
      path: the .jsonl file to write.
      drop_missing: leave out problems without an estimated rate (else write them unchanged).

    Returns:
      The path written.
    """
    if isinstance(rates, str | os.PathLike):
        rates = merge_pass_rates(rates)
    kept = [e for e in problems if e.id in rates] if drop_missing else list(problems)
    missing = len(problems) - len(kept)
    if missing:
        log.warning("write_pass_rate_dataset: %d problems have no pass rate; left out", missing)
    return records.write_jsonl(attach_pass_rates(kept, rates), path)
