"""Clipped policy-gradient loss with a per-token KL term, carried as sums (METHOD.md 4.7, 4.8).

Per response token (i, t), with A the advantage and r = exp(clip(logp - old_logp, -c, c)):

    pg1 = -A r;  pg2 = -A clip(r, 1 - clip_low, 1 + clip_high);  clipped = max(pg1, pg2)
    pg  = min(clipped, -dual_clip A)  if A < 0 (dual clip)  else clipped
    l   = pg + kl_weight * kl

(released `compute_policy_loss`: 0.2 / 0.3 clip-higher, dual clip 3, log-ratio clamp 20).

Aggregation (`agg=`, registry `AGGREGATIONS`) returns a sum and a denominator rather than a mean, so
that a batch split into micro-batches gives exactly the full-batch loss and gradient: the loss is
sum_k loss_sum_k / sum_k denom_k. Denominators depend only on the masks, so a trainer can compute
the global one first (`loss_denominator`) and accumulate grad(loss_sum_k) / denom_total.

  "token-mean"           sum_it l_it / sum_it m_it
  "seq-mean-token-mean"  sum_i (sum_t l_it / L_i) / #{i : L_i > 0}   (paper Eq. 2, 1/G sum 1/|o_i|)
  "seq-mean-token-sum"   sum_i sum_t l_it / #{i : L_i > 0}

The released code's "token" mode takes a masked token mean per micro-batch and divides by the
number of gradient-accumulation steps; with its final setting of one sequence per device per
micro-batch that is the mean over sequences of per-sequence token means, i.e. "seq-mean-token-mean"
(the default here). Rows with no response tokens are padding: they add 0 to every sum and 0 to every
denominator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ares_jax.ops import checks


def _agg_token_mean(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.sum(values), jnp.sum(mask).astype(values.dtype)


def _agg_seq_mean_token_mean(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    length = jnp.sum(mask, axis=-1)
    per_seq = jnp.sum(values, axis=-1) / jnp.maximum(length, 1).astype(values.dtype)
    return jnp.sum(per_seq), jnp.sum(length > 0).astype(values.dtype)


def _agg_seq_mean_token_sum(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.sum(values), jnp.sum(jnp.any(mask, axis=-1)).astype(values.dtype)


# name -> fn(values [B, T], 0 where mask is False; mask [B, T] bool) -> (sum [], denominator []).
AGGREGATIONS: dict[str, Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]] = {
    "token-mean": _agg_token_mean,
    "seq-mean-token-mean": _agg_seq_mean_token_mean,
    "seq-mean-token-sum": _agg_seq_mean_token_sum,
}


def _lookup_agg(agg: str, fn: str):
    checks.check_choice(agg, AGGREGATIONS, "agg", fn)
    return AGGREGATIONS[agg]


class LossTerms(NamedTuple):
    """Sums and denominators of one (micro-)batch; add fieldwise across micro-batches.

    All fields are [] float32. loss = loss_sum / denom; a metric x = x_sum / token_count.

    loss_sum: aggregated token loss pg + kl_weight * kl (= pg_sum + kl_sum).
    denom: aggregation denominator (tokens or non-empty sequences, per `agg`).
    pg_sum: aggregated clipped policy-gradient term.
    kl_sum: aggregated weighted KL term kl_weight * kl (0 without kl).
    token_count: number of response tokens (denominator of the metrics below).
    clip_high_sum: tokens where the upper clip is active (A > 0, r > 1 + clip_high).
    clip_low_sum: tokens where the lower clip is active (A < 0, r < 1 - clip_low).
    dual_clip_sum: tokens where the dual clip is active (A < 0, r > dual_clip).
    ppo_kl_sum: sum of -log r, approximate KL(pi_old || pi_theta), nats.
    """

    loss_sum: jax.Array
    denom: jax.Array
    pg_sum: jax.Array
    kl_sum: jax.Array
    token_count: jax.Array
    clip_high_sum: jax.Array
    clip_low_sum: jax.Array
    dual_clip_sum: jax.Array
    ppo_kl_sum: jax.Array


def loss_denominator(mask: jax.Array, *, agg: str = "seq-mean-token-mean") -> jax.Array:
    """The aggregation denominator of a batch, from its mask alone (see the module docstring).

    Args:
      mask: [B, T] bool, True on response tokens.
      agg: aggregation name.

    Returns:
      [] float32: sum of mask for "token-mean", number of non-empty rows otherwise.
    """
    fn = "loss_denominator"
    agg_fn = _lookup_agg(agg, fn)
    checks.check_rank(mask, 2, "mask", fn)
    checks.check_bool(mask, "mask", fn)
    return agg_fn(jnp.zeros(np.shape(mask), jnp.float32), mask)[1]


def _check_optional(x, name: str, rows_tokens: tuple[int, int], fn: str) -> None:
    checks.check_floating(x, name, fn)
    if np.shape(x) not in (rows_tokens, rows_tokens[:1]):
        raise ValueError(
            f"{fn}: {name} must have shape {rows_tokens} or {rows_tokens[:1]}, got {np.shape(x)}."
        )


def _per_token(x, mask: jax.Array, dtype) -> jax.Array:
    """[B] or [B, T] -> [B, T] in `dtype`, 0 where mask is False (so no NaN leaks from padding)."""
    x = jnp.asarray(x, dtype)
    if x.ndim == 1:
        x = x[:, None]
    return jnp.where(mask, x, jnp.zeros((), dtype))


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    kl: jax.Array | None = None,
    kl_weight: jax.Array | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    dual_clip: float | None = 3.0,
    agg: str = "seq-mean-token-mean",
    logratio_clamp: float = 20.0,
) -> LossTerms:
    """Clipped surrogate + weighted KL, as sums and denominators (METHOD.md 4.7, 4.8).

    Differentiable with respect to `logp` (and `kl`, when it was computed from `logp`). Values at
    positions where mask is False never enter the result or its gradient, even if NaN or inf.

    Args:
      logp: [B, T] floating, log-prob of each sampled response token under the policy, nats.
      old_logp: [B, T] floating, the same under the behaviour policy pi_old, nats.
      advantages: [B] or [B, T] floating, advantage per response or per token.
      mask: [B, T] bool, True on response tokens.
      kl: optional [B, T] floating, per-token KL estimate against the reference
        (`kl.kl_divergence`), nats.
      kl_weight: optional [B] or [B, T] floating weight of `kl` (e.g. `kl.kl_token_weights`,
        kl_coef * beta_d); default 1. Requires `kl`.
      clip_low, clip_high: ratio clip bounds 1 - clip_low, 1 + clip_high (static).
      dual_clip: bound -dual_clip * A on the loss of negative-advantage tokens (> 1); None
        disables it (static).
      agg: "seq-mean-token-mean" (default), "token-mean" or "seq-mean-token-sum" (static).
      logratio_clamp: |logp - old_logp| clamp before exp (static).

    Returns:
      `LossTerms`, every field [] float32 (float64 for float64 inputs under x64).
    """
    fn = "policy_loss"
    agg_fn = _lookup_agg(agg, fn)
    for name, x in (("logp", logp), ("old_logp", old_logp)):
        checks.check_rank(x, 2, name, fn)
        checks.check_floating(x, name, fn)
    checks.check_rank(mask, 2, "mask", fn)
    checks.check_bool(mask, "mask", fn)
    checks.check_same_shape(fn, logp=logp, old_logp=old_logp, mask=mask, kl=kl)
    shape = tuple(np.shape(logp))
    _check_optional(advantages, "advantages", shape, fn)
    if kl is not None:
        checks.check_floating(kl, "kl", fn)
    if kl_weight is not None:
        if kl is None:
            raise ValueError(f"{fn}: kl_weight was given without kl.")
        _check_optional(kl_weight, "kl_weight", shape, fn)
    if not 0.0 <= clip_low < 1.0 or clip_high < 0.0:
        raise ValueError(
            f"{fn}: need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, "
            f"clip_high={clip_high}."
        )
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"{fn}: dual_clip must be > 1 or None, got {dual_clip}.")
    if logratio_clamp <= 0.0:
        raise ValueError(f"{fn}: logratio_clamp must be > 0, got {logratio_clamp}.")

    floats = [x for x in (logp, old_logp, advantages, kl, kl_weight) if x is not None]
    dtype = jnp.promote_types(jnp.result_type(*floats), jnp.float32)
    zero = jnp.zeros((), dtype)
    logratio = _per_token(logp, mask, dtype) - _per_token(old_logp, mask, dtype)
    logratio = jnp.clip(logratio, -logratio_clamp, logratio_clamp)
    ratio = jnp.exp(logratio)
    adv = _per_token(advantages, mask, dtype)

    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clipped = jnp.maximum(pg1, pg2)
    clip_active = mask & (pg2 > pg1)
    if dual_clip is None:
        pg = clipped
        dual_active = jnp.zeros(shape, jnp.bool_)
    else:
        pg3 = -dual_clip * adv
        pg = jnp.where(adv < 0, jnp.minimum(clipped, pg3), clipped)
        dual_active = mask & (adv < 0) & (clipped > pg3)
    pg = jnp.where(mask, pg, zero)

    pg_sum, denom = agg_fn(pg, mask)
    if kl is None:
        kl_sum = zero
    else:
        kl_tok = _per_token(kl, mask, dtype)
        if kl_weight is not None:
            kl_tok = kl_tok * _per_token(kl_weight, mask, dtype)
        kl_sum = agg_fn(kl_tok, mask)[0]

    def count(active):
        return jnp.sum(active).astype(dtype)

    return LossTerms(
        loss_sum=pg_sum + kl_sum,
        denom=denom,
        pg_sum=pg_sum,
        kl_sum=kl_sum,
        token_count=count(mask),
        clip_high_sum=count(clip_active & (ratio > 1.0)),
        clip_low_sum=count(clip_active & (ratio < 1.0)),
        dual_clip_sum=count(dual_active),
        ppo_kl_sum=jax.lax.stop_gradient(jnp.sum(jnp.where(mask, -logratio, zero))),
    )


def loss_metrics(terms: LossTerms) -> dict[str, jax.Array]:
    """Means from (accumulated) `LossTerms`; a zero denominator gives 0, never NaN.

    Returns:
      dict of [] arrays: loss, pg_loss, kl_loss (over `denom`); clip_frac_high, clip_frac_low,
      dual_clip_frac, ppo_kl (over `token_count`).
    """

    def ratio(num, den):
        return jnp.where(den > 0, num / jnp.maximum(den, 1e-30), jnp.zeros_like(num))

    return {
        "loss": ratio(terms.loss_sum, terms.denom),
        "pg_loss": ratio(terms.pg_sum, terms.denom),
        "kl_loss": ratio(terms.kl_sum, terms.denom),
        "clip_frac_high": ratio(terms.clip_high_sum, terms.token_count),
        "clip_frac_low": ratio(terms.clip_low_sum, terms.token_count),
        "dual_clip_frac": ratio(terms.dual_clip_sum, terms.token_count),
        "ppo_kl": ratio(terms.ppo_kl_sum, terms.token_count),
    }
