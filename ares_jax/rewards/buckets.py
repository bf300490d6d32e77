"""Online difficulty buckets and the per-bucket HWE targets N*_d and weights alpha_d.

Every iteration the G rollouts of each prompt are graded; the number of correct ones puts the prompt
in a bucket (METHOD.md 4.2), and the bucket means of the HWE counts set the targets N*_d and nudge
the adaptive weights alpha_d used by the entropy reward (METHOD.md 4.4.2, "Targets and weights in
code"). Everything here is a pure jnp function of arrays with static shapes: it jits, and with the
response axis N sharded it runs as plain elementwise and segment sums.

Bucket encoding everywhere (int32): 0 = easy, 1 = medium, 2 = hard. Responses are flat [N], ordered
group by group, N = num_prompts * G.

Not implemented: the released trainer also keeps a dual-ascent multiplier lambda_d on the soft HWE
cost (lr 0.01, clip [0, 10], budget N*_d), but the reward branch that would read it is commented out
in the released code, so it never affects training (METHOD.md 4.4.2, section 9 item 6).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ares_jax.ops import checks

EASY = 0
MEDIUM = 1
HARD = 2
NUM_BUCKETS = 3
BUCKET_NAMES = ("easy", "medium", "hard")


class BucketTargets(NamedTuple):
    """Per-bucket state carried across iterations (a pytree).

    Attributes:
      target: [3] float32, tokens; N*_d, the HWE-count target per bucket (easy, medium, hard).
      alpha: [3] float32; alpha_d, the adaptive reward weight per bucket (cap = alpha_d * c_d).
    """

    target: jax.Array
    alpha: jax.Array


class BucketStats(NamedTuple):
    """What one `update_bucket_targets` call saw, for logging.

    Attributes:
      count: [3] int32; prompts in each bucket this batch.
      mean: [3] float32, tokens; bucket mean of the per-prompt mean HWE count (0 if count is 0).
    """

    count: jax.Array
    mean: jax.Array


def _raise_if_out_of_range(bad, message: str) -> None:
    if bool(np.asarray(bad)):
        raise ValueError(message)


def check_bucket_values(bucket: jax.Array, name: str, fn: str) -> None:
    """Raises ValueError if an entry of the int array `bucket` is not 0, 1 or 2.

    Like `checks.assert_finite`: on concrete arrays it raises now; under a transformation it is
    compiled in as a host callback that raises when the computation runs, so an out-of-range bucket
    never silently indexes a clamped per-bucket constant.
    """
    checks.check_integer(bucket, name, fn)
    bucket = jnp.asarray(bucket)
    bad = jnp.any((bucket < 0) | (bucket >= NUM_BUCKETS))
    message = f"{fn}: {name} must hold bucket ids 0 (easy), 1 (medium) or 2 (hard)."
    if isinstance(bad, jax.core.Tracer):
        jax.debug.callback(_raise_if_out_of_range, bad, message)
    else:
        _raise_if_out_of_range(bad, message)


def _dtype(x) -> np.dtype:
    """dtype of an array, tracer or nested list, without converting to a JAX array."""
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def as_correct_mask(correct: jax.Array, name: str, fn: str) -> jax.Array:
    """bool, or 0/1 numbers (read as correct when > 0.5) -> bool array of the same shape."""
    dtype = _dtype(correct)
    if dtype == np.bool_:
        return jnp.asarray(correct)
    if not np.issubdtype(dtype, np.number):
        raise TypeError(f"{fn}: {name} must be bool or 0/1 numbers, got dtype {dtype}.")
    return jnp.asarray(correct) > 0.5


def difficulty_buckets(correct: jax.Array, group_size: int) -> jax.Array:
    """Difficulty bucket of each prompt from its group's pass count (METHOD.md 4.2).

    With c correct rollouts out of G: easy if 3c >= 2G, medium if 3c >= G, else hard. This is the
    released code's acc_rate >= 2/3 / >= 1/3 rule in exact integer arithmetic; for G = 8 it is the
    paper's c >= 6 easy, 3 <= c <= 5 medium, c <= 2 hard.

    Args:
      correct: [N] bool, or [N] 0/1 int/float (> 0.5 = correct); responses group by group.
      group_size: G, rollouts per prompt (static); N must be a multiple of G.

    Returns:
      [N // G] int32 bucket per prompt (0 easy, 1 medium, 2 hard).
    """
    fn = "difficulty_buckets"
    checks.check_rank(correct, 1, "correct", fn)
    checks.check_group_size(np.shape(correct)[0], group_size, fn)
    c = as_correct_mask(correct, "correct", fn).astype(jnp.int32)
    c = c.reshape(-1, group_size).sum(axis=1)  # [N // G] correct rollouts per prompt
    return jnp.where(
        3 * c >= 2 * group_size, EASY, jnp.where(3 * c >= group_size, MEDIUM, HARD)
    ).astype(jnp.int32)


def per_response(bucket_per_group: jax.Array, group_size: int) -> jax.Array:
    """Broadcasts a per-prompt value to the prompt's G responses.

    Args:
      bucket_per_group: [N // G] any dtype (buckets, or a per-prompt value).
      group_size: G (static).

    Returns:
      [N] same dtype; response i gets the value of prompt i // G.
    """
    checks.check_rank(bucket_per_group, 1, "bucket_per_group", "per_response")
    checks.check_group_size(0, group_size, "per_response")
    return jnp.repeat(jnp.asarray(bucket_per_group), group_size, axis=0)


def init_bucket_targets(alpha_init: float = 0.5, target_init: float = 0.0) -> BucketTargets:
    """Initial state: all buckets share `target_init` (tokens) and `alpha_init` (METHOD.md 4.4.2).

    The released trainer starts with alpha 0.5 and no target (the reward's default is 0).
    """
    return BucketTargets(
        target=jnp.full((NUM_BUCKETS,), target_init, jnp.float32),
        alpha=jnp.full((NUM_BUCKETS,), alpha_init, jnp.float32),
    )


@functools.partial(jax.jit, static_argnums=3)
def _update(state, bucket, n_hwe, group_size, alpha_lr, alpha_min, alpha_max, scale, valid):
    """The arithmetic of `update_bucket_targets`, compiled once per shape (inlined under jit)."""
    # Integer counts are summed exactly in int32; float counts in float32.
    acc_dtype = jnp.int32 if jnp.issubdtype(n_hwe.dtype, jnp.integer) else jnp.float32
    prompt_sum = n_hwe.astype(acc_dtype).reshape(-1, group_size).sum(axis=1)  # [N // G]
    bucket = jnp.where(valid, bucket, NUM_BUCKETS)  # out of range: segment_sum drops it
    sums = jax.ops.segment_sum(prompt_sum, bucket, num_segments=NUM_BUCKETS)
    count = jax.ops.segment_sum(jnp.ones_like(bucket), bucket, num_segments=NUM_BUCKETS)
    present = count > 0
    mean = sums.astype(jnp.float32) / (group_size * jnp.maximum(count, 1)).astype(jnp.float32)
    mean = jnp.where(present, mean, 0.0)

    new_target = jnp.round(scale * mean)
    sign = jnp.asarray([1.0, 1.0, -1.0], jnp.float32)  # easy, medium: mean - N*; hard: N* - mean
    new_alpha = jnp.clip(state.alpha + alpha_lr * sign * (mean - new_target), alpha_min, alpha_max)
    new_state = BucketTargets(
        target=jnp.where(present, new_target, state.target).astype(jnp.float32),
        alpha=jnp.where(present, new_alpha, state.alpha).astype(jnp.float32),
    )
    return new_state, BucketStats(count=count.astype(jnp.int32), mean=mean)


def update_bucket_targets(
    state: BucketTargets,
    bucket_per_group: jax.Array,
    n_hwe: jax.Array,
    group_size: int,
    *,
    alpha_lr: float = 0.05,
    alpha_min: float = 0.0,
    alpha_max: float = 2.0,
    target_scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
    valid: jax.Array | None = None,
) -> tuple[BucketTargets, BucketStats]:
    """New N*_d and alpha_d from this batch's HWE counts (METHOD.md 4.4.2, "Targets and weights").

    Transcribes the released trainer: for each bucket d with at least one prompt,

        mean_d  = mean over prompts in d of (mean N_HE over the prompt's G rollouts)
        N*_d    = round(target_scale_d * mean_d)            (half to even, like Python's round)
        alpha_d += alpha_lr * (mean_d - N*_d)   for easy and medium
        alpha_d += alpha_lr * (N*_d - mean_d)   for hard
        alpha_d  = clip(alpha_d, alpha_min, alpha_max)

    A bucket with no prompt this batch keeps its previous target and alpha. Because every prompt has
    exactly G rollouts, mean_d is computed as (sum of N_HE over the bucket's responses) / (G *
    count_d): one division, so exact .5 ties round like the reference. With target_scale 1 the alpha
    update only sees the rounding residual (|.| <= 0.5), which is why alpha stays near 0.5.

    Args:
      state: the previous BucketTargets.
      bucket_per_group: [N // G] int; bucket per prompt (from `difficulty_buckets`).
      n_hwe: [N] int or float, tokens; HWE count per response (METHOD.md 2.5).
      group_size: G (static).
      alpha_lr, alpha_min, alpha_max: alpha step size and clip range (released: 0.05, 0, 2).
      target_scale: per-bucket factor on the bucket mean (released: all 1.0).
      valid: [N // G] bool or None (all); groups marked False are padding and count nowhere, so
        that a caller can pad a varying number of groups to one shape (one compilation).

    Returns:
      (new_state, stats): new_state a BucketTargets; stats a BucketStats (prompt count and mean per
      bucket) for logging.
    """
    fn = "update_bucket_targets"
    checks.check_rank(bucket_per_group, 1, "bucket_per_group", fn)
    checks.check_rank(n_hwe, 1, "n_hwe", fn)
    check_bucket_values(bucket_per_group, "bucket_per_group", fn)
    checks.check_rank(state.target, 1, "state.target", fn)
    checks.check_same_shape(fn, **{"state.target": state.target, "state.alpha": state.alpha})
    if state.target.shape[0] != NUM_BUCKETS:
        raise ValueError(f"{fn}: state.target must have shape (3,), got {state.target.shape}.")
    if len(target_scale) != NUM_BUCKETS:
        raise ValueError(f"{fn}: target_scale must have 3 entries, got {target_scale!r}.")
    n_hwe = jnp.asarray(n_hwe)
    checks.check_group_size(n_hwe.shape[0], group_size, fn)
    num_prompts = n_hwe.shape[0] // group_size
    if np.shape(bucket_per_group)[0] != num_prompts:
        raise ValueError(
            f"{fn}: bucket_per_group has {np.shape(bucket_per_group)[0]} prompts but n_hwe has "
            f"{n_hwe.shape[0]} responses = {num_prompts} groups of {group_size}."
        )
    if not jnp.issubdtype(n_hwe.dtype, jnp.integer):
        checks.check_floating(n_hwe, "n_hwe", fn)
        checks.assert_finite(n_hwe, "n_hwe", fn)

    scale = jnp.asarray(target_scale, jnp.float32)
    bucket = jnp.asarray(bucket_per_group, jnp.int32)
    if valid is None:
        valid = jnp.ones(bucket.shape, bool)
    else:
        checks.check_bool(valid, "valid", fn)
        checks.check_same_shape(fn, bucket_per_group=bucket, valid=valid)
    return _update(state, bucket, n_hwe, group_size, alpha_lr, alpha_min, alpha_max, scale, valid)
