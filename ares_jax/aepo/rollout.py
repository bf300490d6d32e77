"""One AEPO rollout phase: sample, check, count, shape, filter (METHOD.md 4.1-4.6, 4.11).

Per try: draw `prompts_per_iter` prompts from the stream and sample n rollouts each (with their
exact entropies). Check the last \\boxed{} answers, then:
  1. form difficulty buckets from each group's accuracy;
  2. count the HWE triggers against this step's tau, which lags one step in the code variant;
  3. compute this try's per-bucket targets and alpha (the released code's batch statistics);
  4. compute the entropy reward, so the total reward is accuracy + entropy term;
  5. keep the groups the DAPO filter passes.
Tries repeat until `prompts_per_iter` groups are kept or `max_tries` is reached. The kept groups
then get their advantages. The carried state (tau, bucket targets and alpha) advances once, from
the kept batch, as the released trainer does after its online filter.

Buckets, targets and alpha are computed before the reward. `reward_timing_quirk` reproduces the
released ordering instead: the filter and the advantage see a reward computed with default bucket
fields (easy, target 0, alpha 0.5), METHOD.md 4.4.2.

Host NumPy drives the phase; the arithmetic is the jitted kernels of `ops/` and `rewards/`.
With several processes every process runs the phase on the same global batch of prompts
(`PromptStream.next_global_batch`), gets every sampled row back, and grades its share of them
(`evaluate.grade`), so all of them hold the same rollout and state.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ares_jax.batching import Prompts, Rows, encode_examples, sampler_inputs
from ares_jax.evaluate import grade
from ares_jax.models.qwen2_5_vl.processor import IMAGE_MEAN, IMAGE_STD
from ares_jax.ops import advantages as ADV
from ares_jax.ops import hwe as H
from ares_jax.rewards import buckets as BK
from ares_jax.rewards import entropy_shaping as ES
from ares_jax.rewards import triggers as TR
from ares_jax.sampling import SamplingParams, generate
from ares_jax.sampling.engine import EngineParams
from ares_jax.sampling.layout import rollout_params


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    sampling: SamplingParams
    prompts_per_iter: int
    template: str
    min_pixels: int
    max_pixels: int
    prompt_len_buckets: tuple[int, ...]
    image_mean: tuple[float, ...] = IMAGE_MEAN
    image_std: tuple[float, ...] = IMAGE_STD
    window: int = 4
    window_offset: int = 1
    percentile: float = 95.0
    threshold: str = "code"  # 'code' | 'paper'
    threshold_ema: float = 0.99
    hwe_count: str = "code"  # 'code' | 'paper_token' | 'paper_window'
    trigger_token: str = "sampled"  # 'sampled' | 'argmax'
    estimator: str = "exact"  # 'exact' | 'topk_tail' | 'topk_code'
    reward_variant: str = "code"  # 'code' | 'paper' | 'none'
    shaping: ES.ShapingParams = ES.DEFAULT_PARAMS
    alpha_lr: float = 0.05
    alpha_min: float = 0.0
    alpha_max: float = 2.0
    target_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    accuracy_weight: float = 1.0
    format_weight: float = 0.0
    reward_timing_quirk: bool = False
    filter_enabled: bool = True
    filter_low: float = 0.01
    filter_high: float = 0.99
    max_tries: int = 20
    advantage_scale: str = "std"
    advantage_eps: float = 1e-6
    score_workers: int = 0
    decode_batch_size: int = 0  # rows per generate call (whole prompts); 0 = all at once
    # Continuous batching over a paged KV cache (sampling/engine.py; `decode_batch_size` rows at
    # once, refilled as rows end); None = the static loop, in calls of `decode_batch_size` rows.
    # Branching always runs in the static loop.
    engine: EngineParams | None = None


class RolloutState(NamedTuple):
    """What the rollout phase carries from step to step (all checkpointed)."""

    threshold: H.ThresholdState
    targets: BK.BucketTargets


class Rollout(NamedTuple):
    prompts: Prompts  # the kept prompts
    answers: list[str]  # their gold answers
    rows: Rows  # kept rows, with advantages
    sampler_logp: np.ndarray  # [N, T]
    entropy: np.ndarray  # [N, T] exact entropy
    reward: np.ndarray  # [N] total reward used by the advantage
    metrics: dict[str, float]
    state: RolloutState  # advanced by this phase


class NonFiniteRollout(ArithmeticError):
    """The sampled rollout holds NaN or inf where it counts: the policy's logits are broken.

    Attributes:
      quantity: which value, e.g. "rollout/entropy" or "rollout/sampler_logp".
      rows: how many sampled rows hold one.
    """

    def __init__(self, quantity: str, rows: int, total: int):
        self.quantity, self.rows = quantity, rows
        super().__init__(f"{quantity} is NaN or inf in {rows} of {total} sampled responses.")


def check_finite(out, entropies: dict[str, np.ndarray]) -> None:
    """Raises NonFiniteRollout when an entropy or the sampler's log-prob of a sampled token is not
    finite at a position of the responses (`out.mask`)."""
    for name, values in (*entropies.items(), ("rollout/sampler_logp", out.logp)):
        bad = ~np.isfinite(values) & out.mask
        if bad.any():
            raise NonFiniteRollout(name, int(bad.any(1).sum()), int(out.mask.shape[0]))


def threshold_and_count_entropies(out, estimator: str) -> tuple[np.ndarray, np.ndarray]:
    """(entropy for the threshold, entropy for the counts) per METHOD.md 2.1 and the switch, from
    anything with the sampler's `entropy`, `topk_entropy_tail` and `topk_entropy_raw` [N, T]."""
    if estimator == "exact":
        return out.entropy, out.entropy
    if estimator == "topk_tail":
        return out.topk_entropy_tail, out.topk_entropy_tail
    return out.topk_entropy_raw, out.topk_entropy_tail  # 'topk_code': the released mix


def _groups(prompt_index: np.ndarray, active: np.ndarray) -> list[np.ndarray]:
    """Row indices of each prompt's active rows, prompt by prompt."""
    return [np.flatnonzero((prompt_index == p) & active) for p in np.unique(prompt_index)]


# The phase's kernels compiled whole, once per shape. Run op by op on host arrays, each of their
# dozens of operations would compile on its own for every new shape (the threshold statistic
# alone took 3 s on a 2-core CPU, at every new number of kept rows).
_trigger_mask = jax.jit(TR.trigger_mask)
_hwe_counts = jax.jit(H.hwe_counts, static_argnames=("rule", "window", "offset"))
batch_threshold = jax.jit(H.batch_threshold, static_argnames=("threshold", "q", "window", "offset"))
seed_threshold = jax.jit(H.seed_threshold, static_argnames=("q", "window", "offset"))


@functools.partial(jax.jit, static_argnames=("g", "s"))
def _equal_group_ops(reward, correct, lengths, *, g: int, s: RolloutSettings):
    """Buckets, filter decisions and advantages of groups of g consecutive rows."""
    bucket = BK.difficulty_buckets(correct, g)
    keep = jnp.ones(bucket.shape, bool)
    if s.filter_enabled:
        keep = ADV.online_filter(reward, g, low=s.filter_low, high=s.filter_high)
    adv = jnp.zeros(reward.shape, jnp.float32)
    if g >= 2 or s.advantage_scale != "std":
        adv = ADV.group_advantages(
            reward,
            g,
            scale=s.advantage_scale,
            eps=s.advantage_eps,
            lengths=lengths if s.advantage_scale == "length" else None,
        )
    return bucket, keep, adv


def _group_ops(reward, correct, lengths, groups, s: RolloutSettings):
    """Buckets per group, filter decisions and advantages, for groups of any size."""
    bucket = np.zeros(len(groups), np.int32)
    keep = np.ones(len(groups), bool)
    adv = np.zeros(reward.shape[0], np.float32)
    sizes = {len(g) for g in groups}
    if len(sizes) == 1:  # equal groups: one vectorised call each
        g = sizes.pop()
        order = np.concatenate(groups)
        bucket, keep, a = jax.device_get(
            _equal_group_ops(reward[order], correct[order], lengths[order], g=g, s=s)
        )
        adv[order] = a
        return bucket, keep, adv
    for i, rows in enumerate(groups):  # branching: groups of different sizes
        g = len(rows)
        bucket[i] = int(np.asarray(BK.difficulty_buckets(correct[rows], g))[0])
        if s.filter_enabled:
            keep[i] = bool(
                np.asarray(
                    ADV.online_filter(reward[rows], g, low=s.filter_low, high=s.filter_high)
                )[0]
            )
        if g >= 2:
            adv[rows] = np.asarray(
                ADV.group_advantages(
                    reward[rows],
                    g,
                    scale=s.advantage_scale,
                    eps=s.advantage_eps,
                    lengths=lengths[rows] if s.advantage_scale == "length" else None,
                )
            )
    return bucket, keep, adv


def _prompt_means(values: np.ndarray, groups) -> np.ndarray:
    return np.asarray([values[g].mean() if len(g) else 0.0 for g in groups], np.float32)


def _padded(x: np.ndarray, size: int) -> np.ndarray:
    """x with zero (False) rows appended along axis 0 up to `size` rows."""
    return np.pad(x, [(0, size - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _fixed_size(n: int, unit: int) -> int:
    """The smallest multiple of `unit` that holds n: the kept groups and rows of an iteration
    vary with the online filter, and the eager kernels that see them compile once per shape
    (seconds each on a CPU); padded to this size they compile once."""
    return unit * max(1, -(-n // unit))


def _targets(state: BK.BucketTargets, bucket, n_hwe, groups, s: RolloutSettings):
    # Per-prompt means with group size 1: the bucket mean of per-prompt means (METHOD.md 4.4.2),
    # also for groups of different sizes. Padding groups are marked invalid.
    size = _fixed_size(len(groups), s.prompts_per_iter)
    return BK.update_bucket_targets(
        state,
        _padded(np.asarray(bucket, np.int32), size),
        _padded(_prompt_means(n_hwe.astype(np.float32), groups), size),
        1,
        alpha_lr=s.alpha_lr,
        alpha_min=s.alpha_min,
        alpha_max=s.alpha_max,
        target_scale=s.target_scale,
        valid=np.arange(size) < len(groups),
    )


def _reward(correct, fmt, n_hwe, bucket_row, targets: BK.BucketTargets, s: RolloutSettings):
    """(total reward, entropy term) per row."""
    acc = correct.astype(np.float32)
    if s.reward_variant == "none":
        entropy_term = np.zeros_like(acc)
    else:
        entropy_term = np.asarray(
            ES.entropy_reward(
                bucket_row,
                correct,
                n_hwe.astype(np.float32),
                np.asarray(targets.target)[bucket_row],
                np.asarray(targets.alpha)[bucket_row],
                variant=s.reward_variant,
                params=s.shaping,
            )
        )
    total = s.accuracy_weight * acc + s.format_weight * fmt.astype(np.float32) + entropy_term
    return total.astype(np.float32), entropy_term.astype(np.float32)


def collect(
    stream,
    graphdef,
    params,
    tokenizer,
    cfg,
    s: RolloutSettings,
    state: RolloutState,
    trigger_table: np.ndarray,
    key: jax.Array,
    *,
    tau_fallback: float,
    mesh=None,
) -> Rollout:
    """Runs tries until `prompts_per_iter` groups are kept (module docstring)."""
    kept = []  # per try: dict of arrays for the kept groups
    metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    gen_seconds, score_seconds, tokens_generated, tries = 0.0, 0.0, 0, 0
    tau = float(state.threshold.tau) if bool(state.threshold.initialized) else tau_fallback
    if mesh is not None:  # once per iteration: compute dtype, no weight split over data/fsdp
        params = rollout_params(graphdef, params, mesh)
    n_kept = 0
    while n_kept < s.prompts_per_iter and tries < s.max_tries:
        tries += 1
        examples = stream.next_global_batch(s.prompts_per_iter)
        if not examples:
            break
        prompts = encode_examples(
            examples,
            tokenizer,
            cfg,
            template=s.template,
            min_pixels=s.min_pixels,
            max_pixels=s.max_pixels,
            length_buckets=s.prompt_len_buckets,
            image_mean=s.image_mean,
            image_std=s.image_std,
        )
        g0 = time.perf_counter()
        out = _generate_chunked(
            graphdef, params, prompts, cfg, s, jax.random.fold_in(key, tries), tau, mesh
        )
        gen_seconds += time.perf_counter() - g0
        tokens_generated += int(out.lengths.sum())
        ent_threshold, ent_count = threshold_and_count_entropies(out, s.estimator)
        check_finite(
            out, {"rollout/entropy": ent_count, "rollout/threshold_entropy": ent_threshold}
        )
        s0 = time.perf_counter()
        texts = [
            tokenizer.decode(out.tokens[r, : out.lengths[r]], skip_special_tokens=True)
            for r in range(out.tokens.shape[0])
        ]
        golds = [examples[p].answer for p in out.prompt_index]
        scores = grade(texts, golds, workers=s.score_workers)
        score_seconds += time.perf_counter() - s0
        correct = scores.correct & out.active
        if s.threshold == "paper":  # recomputed from this batch, used as it is
            tau = float(
                batch_threshold(
                    ent_threshold.astype(np.float32),
                    out.mask,
                    threshold="paper",
                    q=s.percentile,
                    window=s.window,
                    offset=s.window_offset,
                )
            )
        trigger_ids = out.tokens if s.trigger_token == "sampled" else out.argmax_tokens
        trigger = np.asarray(_trigger_mask(trigger_ids, trigger_table)) & out.mask
        counts = _hwe_counts(
            ent_count.astype(np.float32),
            out.mask,
            trigger if s.hwe_count != "paper_window" else None,
            np.float32(tau),
            rule=s.hwe_count,
            window=s.window,
            offset=s.window_offset,
        )
        n_hwe = np.asarray(counts.count)
        groups = _groups(out.prompt_index, out.active)
        lengths = out.lengths.astype(np.float32)
        # Buckets first: from group accuracy; targets and alpha from this try's batch.
        bucket_group, _, _ = _group_ops(
            correct.astype(np.float32),
            correct,
            lengths,
            groups,
            dataclasses.replace(s, filter_enabled=False, advantage_scale="none"),
        )
        bucket_row = np.zeros(out.tokens.shape[0], np.int32)
        for i, g in enumerate(groups):
            bucket_row[g] = bucket_group[i]
        try_targets, _ = _targets(state.targets, bucket_group, n_hwe, groups, s)
        reward_targets = state.targets if s.reward_variant == "paper" else try_targets
        reward, entropy_term = _reward(
            correct, scores.format_ok, n_hwe, bucket_row, reward_targets, s
        )
        adv_reward = reward
        if s.reward_timing_quirk:
            default = BK.BucketTargets(target=np.zeros(3, np.float32), alpha=np.full(3, 0.5))
            adv_reward, _ = _reward(
                correct, scores.format_ok, n_hwe, np.zeros_like(bucket_row), default, s
            )
        _, keep, adv = _group_ops(adv_reward, correct, lengths, groups, s)
        for i in np.flatnonzero(keep):
            if n_kept >= s.prompts_per_iter:
                break
            rows = groups[i]
            n_kept += 1
            kept.append(
                dict(
                    example=examples[int(out.prompt_index[rows[0]])],
                    prompt=(prompts, int(out.prompt_index[rows[0]])),
                    rows=rows,
                    out=out,
                    correct=correct[rows],
                    format_ok=scores.format_ok[rows],
                    n_hwe=n_hwe[rows],
                    invalid=np.asarray(counts.invalid)[rows],
                    soft_cost=np.asarray(counts.soft_cost)[rows],
                    window_mask=np.asarray(counts.window_mask)[rows],
                    ent_threshold=ent_threshold[rows],
                    reward=adv_reward[rows],
                    entropy_term=entropy_term[rows],
                    adv=adv[rows],
                    bucket=int(bucket_group[i]),
                )
            )
        metrics["rollout/groups_seen"] = metrics.get("rollout/groups_seen", 0.0) + len(groups)
    if not kept:
        raise RuntimeError(
            f"AEPO rollout: no group passed the online filter in {tries} tries "
            f"(filter.low={s.filter_low}, filter.high={s.filter_high}); every group had a mean "
            "reward outside (low, high)."
        )
    return _assemble(
        kept,
        s,
        state,
        tau,
        tries,
        metrics,
        gen_seconds,
        score_seconds,
        tokens_generated,
        time.perf_counter() - t0,
    )


def _subset(prompts: Prompts, which: list[int]) -> Prompts:
    """The prompts `which`, in that order (repeats allowed)."""
    return dataclasses.replace(
        prompts,
        ids=prompts.ids[which],
        mask=prompts.mask[which],
        positions=prompts.positions[:, which],
        next_pos=prompts.next_pos[which],
        patches=[prompts.patches[i] for i in which],
        grids=[prompts.grids[i] for i in which],
    )


def _generate_chunked(graphdef, params, prompts: Prompts, cfg, s: RolloutSettings, key, tau, mesh):
    """`generate` over chunks of at most `decode_batch_size` rows (whole prompts), concatenated;
    with the engine, one call that keeps `decode_batch_size` rows decoding. Row (prompt b, sample
    j) draws with the keys of prompt b either way (`sampler.row_keys`)."""
    sp = s.sampling
    if s.engine is not None:

        def images_of(which):  # the images of the prompts one admission prefills
            sub = sampler_inputs(_subset(prompts, which), cfg)
            return sub.image_index, sub.vision

        return generate(
            graphdef,
            params,
            inputs=sampler_inputs(prompts, cfg),
            sampling=sp,
            key=key,
            mesh=mesh,
            engine=s.engine,
            images_of=images_of if prompts.has_images else None,
            branch_threshold=tau,
        )
    per_call = prompts.size
    if s.decode_batch_size:
        per_call = max(1, s.decode_batch_size // sp.rows_per_prompt)
    outs = []
    for first in range(0, prompts.size, per_call):
        which = list(range(first, min(first + per_call, prompts.size)))
        if len(which) < per_call and first > 0:  # keep the static batch size: pad with repeats
            which += [which[-1]] * (per_call - len(which))
        out = generate(
            graphdef,
            params,
            inputs=sampler_inputs(_subset(prompts, which), cfg),
            sampling=sp,
            key=key,
            branch_threshold=tau,
            mesh=mesh,
            cache_len=max(s.prompt_len_buckets) + sp.max_new_tokens,
            first_prompt=first,
        )
        real = min(per_call, prompts.size - first) * sp.rows_per_prompt
        offset = sum(o.tokens.shape[0] for o in outs)
        out = type(out)(*[np.asarray(x)[:real] for x in out])
        outs.append(
            out._replace(
                prompt_index=out.prompt_index + first,
                parent=np.where(out.parent >= 0, out.parent + offset, -1),
            )
        )
    if len(outs) == 1:
        return outs[0]
    return type(outs[0])(*[np.concatenate(parts) for parts in zip(*outs, strict=True)])


def _concat_prompts(parts: list[tuple[Prompts, int]]) -> Prompts:
    """The kept prompts as one Prompts (re-padded to the longest prompt length)."""
    length = max(p.ids.shape[1] for p, _ in parts)

    def left_pad(x, fill, axis=-1):
        pad = length - x.shape[axis]
        if not pad:
            return x
        widths = [(0, 0)] * x.ndim
        widths[axis] = (pad, 0)
        return np.pad(x, widths, constant_values=fill)

    return Prompts(
        ids=np.stack([left_pad(p.ids[i], 0) for p, i in parts]),  # masked out
        mask=np.stack([left_pad(p.mask[i], False) for p, i in parts]),
        positions=np.stack([left_pad(p.positions[:, i], 0) for p, i in parts], axis=1),
        next_pos=np.asarray([p.next_pos[i] for p, i in parts], np.int32),
        patches=[p.patches[i] for p, i in parts],
        grids=[p.grids[i] for p, i in parts],
    )


def _assemble(kept, s, state, tau, tries, metrics, gen_s, score_s, gen_tokens, seconds):
    prompts = _concat_prompts([k["prompt"] for k in kept])
    cat = lambda key: np.concatenate([k[key] for k in kept])  # noqa: E731
    take = lambda key: np.concatenate([getattr(k["out"], key)[k["rows"]] for k in kept])  # noqa: E731
    prompt_index = np.concatenate([np.full(len(k["rows"]), i) for i, k in enumerate(kept)])
    mask = take("mask")
    rows = Rows(
        prompt=prompt_index.astype(np.int32),
        tokens=take("tokens"),
        mask=mask,
        advantages=cat("adv").astype(np.float32),
        bucket=np.concatenate([np.full(len(k["rows"]), k["bucket"]) for k in kept]).astype(
            np.int32
        ),
        correct=cat("correct"),
        soft_cost=cat("soft_cost").astype(np.float32),
        window_mask=cat("window_mask"),
    )
    groups = [np.flatnonzero(prompt_index == i) for i in range(len(kept))]
    bucket_group = np.asarray([k["bucket"] for k in kept], np.int32)
    n_hwe = cat("n_hwe")
    targets, stats = _targets(state.targets, bucket_group, n_hwe, groups, s)
    threshold = state.threshold
    observation = tau  # 'paper': this batch's statistic is the tau it used
    if s.threshold == "code":
        # Padding rows have no response tokens, which the statistic ignores.
        size = _fixed_size(len(mask), s.prompts_per_iter * s.sampling.rows_per_prompt)
        observation = batch_threshold(
            _padded(cat("ent_threshold").astype(np.float32), size),
            _padded(mask, size),
            threshold="code",
            q=s.percentile,
            window=s.window,
            offset=s.window_offset,
        )
        threshold = H.update_threshold(threshold, observation, decay=s.threshold_ema)
    else:
        threshold = H.init_threshold(tau)
    lengths = mask.sum(1)
    entropy = take("entropy")
    reward = cat("reward")
    m = {
        **metrics,
        "rollout/tries": float(tries),
        "rollout/prompts_kept": float(len(kept)),
        "rollout/responses": float(len(prompt_index)),
        "rollout/accuracy": float(rows.correct.mean()),
        "rollout/format_ok": float(cat("format_ok").mean()),
        "rollout/response_len": float(lengths.mean()),
        "rollout/entropy_mean": float(entropy[mask].mean()) if mask.any() else 0.0,
        "rollout/tau_used": float(tau),
        "rollout/tau_next": float(threshold.tau),
        "rollout/tau_batch": float(observation),  # this batch's statistic
        "reward/total": float(reward.mean()),
        "reward/entropy_term": float(cat("entropy_term").mean()),
        "reward/accuracy": float(rows.correct.mean()),
        "hwe/count": float(n_hwe.mean()),
        "hwe/invalid": float(cat("invalid").mean()),
        "time/generate_s": gen_s,
        "time/score_s": score_s,
        "time/rollout_s": seconds,
        "rollout/tokens_per_s": gen_tokens / max(gen_s, 1e-9),
    }
    for d, name in enumerate(BK.BUCKET_NAMES):
        sel = rows.bucket == d
        m[f"bucket/{name}/prompts"] = float(np.sum(bucket_group == d))
        if sel.any():
            m[f"bucket/{name}/accuracy"] = float(rows.correct[sel].mean())
            m[f"bucket/{name}/response_len"] = float(lengths[sel].mean())
            m[f"bucket/{name}/hwe_count"] = float(n_hwe[sel].mean())
            m[f"bucket/{name}/invalid_triggers"] = float(cat("invalid")[sel].mean())
            m[f"bucket/{name}/entropy_term"] = float(cat("entropy_term")[sel].mean())
        m[f"bucket/{name}/target"] = float(np.asarray(targets.target)[d])
        m[f"bucket/{name}/alpha"] = float(np.asarray(targets.alpha)[d])
    del stats
    return Rollout(
        prompts=prompts,
        answers=[k["example"].answer for k in kept],
        rows=rows,
        sampler_logp=take("logp"),
        entropy=entropy,
        reward=reward,
        metrics=m,
        state=RolloutState(threshold=threshold, targets=targets),
    )
