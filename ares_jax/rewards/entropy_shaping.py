"""Difficulty-aware entropy-shaping reward E on the HWE count of each response (METHOD.md 4.4).

Two variants, picked by name (`variant=`):

* "code" (default; METHOD.md 4.4.2): the released reward's piecewise Huber/sigmoid shaping with
  per-bucket margins, temperatures and caps scaled by the adaptive weight alpha_d. Correct easy and
  medium answers are penalised for HWE beyond the margin (medium in both directions); every wrong
  answer gets a bonus that grows with its HWE excess; correct hard answers get a bonus near or above
  the target and a penalty only far below it. It reproduces the paper's App. M case-study numbers.
* "paper" (METHOD.md 4.4.1): E = -1[acc = 0] * lambda_d * g_d(N - N*_d) with
  lambda_d = max(0, (E_batch[N | d] - N*_d) / (Var_batch[N | d] + eps)). The paper sets N*_d to the
  same batch mean, which makes lambda_d identically 0; we keep the variant alive by reading `target`
  as the LAGGED target, i.e. the previous iteration's BucketTargets.target (the caller passes the
  state from before `update_bucket_targets`). `alpha` is ignored by this variant.

Both are pure jnp functions of [N] arrays (elementwise ops plus 3-segment sums), so they jit and
run with the response axis sharded. The overall AEPO reward is `total_reward` = acc + E; the format
reward is not added by default (METHOD.md 4.1).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ares_jax.ops import checks
from ares_jax.rewards import buckets


class ShapingParams(NamedTuple):
    """Per-bucket constants of the entropy reward, each (easy, medium, hard) (METHOD.md 4.4.2).

    Defaults are the released code's. Fields:
      margin_frac: f_d; margin = max(1, f_d * max(N*_d, 1)), tokens.
      huber_kappa: kappa_d of the Huber ramp, tokens.
      sigmoid_temp: s_d of sigma_s(x) = 1 / (1 + exp(-x / s)), tokens.
      cap_scale: c_d; cap = alpha_d * c_d bounds |E|.
      wrong_gain: factor on the wrong-answer bonus (the hard bucket's 1.0 is the plain bonus).
      eps: added to the batch variance in the paper variant's lambda_d (METHOD.md 4.4.1).
    """

    margin_frac: tuple[float, float, float] = (0.15, 0.25, 0.35)
    huber_kappa: tuple[float, float, float] = (2.0, 3.0, 4.0)
    sigmoid_temp: tuple[float, float, float] = (2.0, 2.5, 3.0)
    cap_scale: tuple[float, float, float] = (1.0, 1.0, 1.2)
    wrong_gain: tuple[float, float, float] = (0.6, 0.8, 1.0)
    eps: float = 1e-6


DEFAULT_PARAMS = ShapingParams()

# Correct hard answers far below target: the Huber penalty is halved (released code, METHOD 4.4.2).
_HARD_SHORTFALL_SCALE = 0.5


def _per_bucket(values, bucket: jax.Array) -> jax.Array:
    """Gathers a (easy, medium, hard) constant for each response: [N] float32."""
    return jnp.asarray(values, jnp.float32)[bucket]


def _huber(x: jax.Array, kappa: jax.Array) -> jax.Array:
    """0.5 x^2 / kappa on [0, kappa], x - 0.5 kappa above; x clipped at 0 first."""
    x = jnp.maximum(x, 0.0)
    return jnp.where(x <= kappa, 0.5 * x * x / kappa, x - 0.5 * kappa)


def _code_reward(bucket, acc, n, target, alpha, params: ShapingParams) -> jax.Array:
    """Released piecewise reward (METHOD.md 4.4.2); all arguments [N], returns [N] float32."""
    kappa = _per_bucket(params.huber_kappa, bucket)
    temp = _per_bucket(params.sigmoid_temp, bucket)
    delta = n - target
    margin = jnp.maximum(1.0, _per_bucket(params.margin_frac, bucket) * jnp.maximum(target, 1.0))
    cap = alpha * _per_bucket(params.cap_scale, bucket)

    def penalty(excess, scale=1.0):  # -min(cap, scale * Huber(excess) / (margin + kappa) * cap)
        return -jnp.minimum(cap, scale * _huber(excess, kappa) / (margin + kappa) * cap)

    easy = penalty(delta - margin)
    medium = penalty(jnp.abs(delta) - margin)
    hard = jnp.where(
        delta >= -margin,
        jax.nn.sigmoid((delta + margin) / temp) * cap,
        penalty(-delta - margin, _HARD_SHORTFALL_SCALE),
    )
    correct_term = jnp.where(
        bucket == buckets.EASY, easy, jnp.where(bucket == buckets.MEDIUM, medium, hard)
    )
    wrong_term = (
        jax.nn.sigmoid(jnp.maximum(delta - margin, 0.0) / temp)
        * cap
        * _per_bucket(params.wrong_gain, bucket)
    )
    return jnp.where(acc, correct_term, wrong_term)


def _paper_reward(bucket, acc, n, target, alpha, params: ShapingParams) -> jax.Array:
    """Paper Lagrangian penalty (METHOD.md 4.4.1); all arguments [N], returns [N] float32.

    Batch mean and population variance (divide by the count) of N per bucket are taken over all
    responses of that bucket in this call (correct and wrong); `target` should be the lagged N*_d.
    `alpha` is unused. As in the paper's formula, a bucket whose counts are all equal has variance 0
    and lambda_d = (mean - N*_d) / eps (the formula as written).
    """
    del alpha
    ones = jnp.ones_like(n)
    count = jax.ops.segment_sum(ones, bucket, num_segments=buckets.NUM_BUCKETS)
    denom = jnp.maximum(count, 1.0)
    mean = jax.ops.segment_sum(n, bucket, num_segments=buckets.NUM_BUCKETS) / denom
    centred = n - mean[bucket]  # two passes: no cancellation for large counts
    var = jax.ops.segment_sum(centred * centred, bucket, num_segments=buckets.NUM_BUCKETS) / denom
    lam = jnp.maximum(0.0, (mean[bucket] - target) / (var[bucket] + params.eps))
    delta = n - target
    g = jnp.where(
        bucket == buckets.EASY,
        jnp.maximum(delta, 0.0),
        jnp.where(bucket == buckets.MEDIUM, jnp.abs(delta), jnp.maximum(-delta, 0.0)),
    )
    return jnp.where(acc, 0.0, -lam * g)


VARIANTS: dict[str, Callable[..., jax.Array]] = {"code": _code_reward, "paper": _paper_reward}


@functools.partial(jax.jit, static_argnums=0)
def _shape_reward(variant: str, bucket, acc, n, target, alpha, params: ShapingParams) -> jax.Array:
    """One compiled kernel per variant and shape (eager calls would dispatch op by op); inlined
    when the caller is already under jit. `params` is traced, so new constants do not recompile."""
    return reward_variant(variant)(bucket, acc, n, target, alpha, params)


def reward_variant(name: str) -> Callable[..., jax.Array]:
    """The registered reward function called `name`; raises listing the known names."""
    checks.check_choice(name, VARIANTS, "variant", "entropy_reward")
    return VARIANTS[name]


def _numeric(x, name: str, fn: str) -> jax.Array:
    """Validates an int or float [N] input, checks floats for NaN/inf, returns float32."""
    dtype = np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
    if dtype == np.bool_ or not np.issubdtype(dtype, np.number):
        raise TypeError(f"{fn}: {name} must be an int or float array, got dtype {dtype}.")
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        checks.assert_finite(x, name, fn)
    return x.astype(jnp.float32)


def entropy_reward(
    bucket: jax.Array,
    correct: jax.Array,
    n_hwe: jax.Array,
    target: jax.Array,
    alpha: jax.Array,
    *,
    variant: str = "code",
    params: ShapingParams = DEFAULT_PARAMS,
) -> jax.Array:
    """Entropy-shaping reward E per response (METHOD.md 4.4.2 "code", 4.4.1 "paper").

    Args:
      bucket: [N] int; difficulty bucket of each response's prompt, 0 easy / 1 medium / 2 hard
        (`buckets.per_response(difficulty_buckets(...), G)`).
      correct: [N] bool, or 0/1 numbers (> 0.5 = correct); the accuracy reward.
      n_hwe: [N] int or float, tokens; HWE count N_HE per response (METHOD.md 2.5).
      target: [N] int or float, tokens; N*_d of the response's bucket. For "code" the current target
        (after `update_bucket_targets`); for "paper" the lagged one (before it), else lambda_d = 0.
      alpha: [N] float; alpha_d of the response's bucket (ignored by "paper").
      variant: "code" or "paper" (static).
      params: per-bucket constants (static or traced floats).

    Returns:
      [N] float32 entropy term E; the reward is acc + E (`total_reward`).
    """
    fn = "entropy_reward"
    reward_variant(variant)  # raises on an unknown name
    for name, x in (("bucket", bucket), ("correct", correct), ("n_hwe", n_hwe)):
        checks.check_rank(x, 1, name, fn)
    checks.check_rank(target, 1, "target", fn)
    checks.check_rank(alpha, 1, "alpha", fn)
    checks.check_same_shape(
        fn, bucket=bucket, correct=correct, n_hwe=n_hwe, target=target, alpha=alpha
    )
    buckets.check_bucket_values(bucket, "bucket", fn)
    acc = buckets.as_correct_mask(correct, "correct", fn)
    n = _numeric(n_hwe, "n_hwe", fn)
    target = _numeric(target, "target", fn)
    alpha = _numeric(alpha, "alpha", fn)
    bucket = jnp.asarray(bucket, jnp.int32)
    return _shape_reward(variant, bucket, acc, n, target, alpha, params)


def total_reward(
    correct: jax.Array,
    entropy_term: jax.Array,
    *,
    format_ok: jax.Array | None = None,
    format_weight: float = 0.0,
) -> jax.Array:
    """Overall AEPO reward R = acc + E (+ format_weight * format) (METHOD.md 4.1, 4.4.2).

    Args:
      correct: [N] bool or 0/1 numbers; acc.
      entropy_term: [N] float32; E from `entropy_reward`.
      format_ok: optional [N] bool or 0/1; the format check. AEPO does not add it (weight 0).
      format_weight: weight of the format reward.

    Returns:
      [N] float32 reward.
    """
    fn = "total_reward"
    checks.check_rank(correct, 1, "correct", fn)
    checks.check_rank(entropy_term, 1, "entropy_term", fn)
    checks.check_same_shape(fn, correct=correct, entropy_term=entropy_term, format_ok=format_ok)
    checks.check_floating(entropy_term, "entropy_term", fn)
    reward = buckets.as_correct_mask(correct, "correct", fn).astype(jnp.float32)
    reward = reward + jnp.asarray(entropy_term, jnp.float32)
    if format_ok is not None:
        fmt = buckets.as_correct_mask(format_ok, "format_ok", fn).astype(jnp.float32)
        reward = reward + format_weight * fmt
    return reward
