"""High-window-entropy (HWE) thresholds and counts (METHOD.md 2.3 and 2.5).

The threshold tau marks which windows count as "high entropy"; the count N_HE of a response is the
number of reasoning-critical moments it explored, the input of the entropy reward (METHOD.md 4.4).
The paper and the released code define both differently; every variant is here, selected by name:

Thresholds (`entropy.threshold` in the config):
  "code":  per response, the 95th percentile of its window means, with the released code's rule for
           the last positions (see `response_percentiles`); per batch, the median over responses;
           smoothed across steps by an EMA with decay 0.99 that starts from the first training
           batch's value (`update_threshold`); a validation value only serves the first step.
  "paper": per response, the 95th percentile of its token entropies; the batch mean; recomputed
           every batch, no smoothing.

Counts (`entropy.hwe_count`):
  "code":         positions holding a trigger word, followed by a complete window whose mean is
                  >= tau (valid); below tau they are invalid triggers; the soft cost adds
                  max(0, mean - tau) over triggers with complete windows.
  "paper_token":  paper App. H: trigger word and token entropy >= tau.
  "paper_window": paper Algorithm 1: every complete window with mean >= tau, no vocabulary.

All functions take the per-token entropy [B, T] (nats) and a response mask [B, T] (True at
response tokens, a contiguous run starting at each row's first response token).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ares_jax.ops import checks
from ares_jax.ops.entropy import check_entropy_inputs, window_entropy

_F32 = jnp.float32


def masked_percentile(x: jax.Array, valid: jax.Array, q: float) -> tuple[jax.Array, jax.Array]:
    """Per-row q-th percentile over the valid entries, with linear interpolation (NumPy default).

    Args:
      x: [B, T] float.
      valid: [B, T] bool.
      q: percentile in [0, 100], a Python number.

    Returns:
      (value, has_any): [B] float32 percentile (0 for rows with no valid entry, as the released
      code does) and [B] bool, True where the row had at least one valid entry.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"masked_percentile: q must be in [0, 100], got {q!r}.")
    x = jnp.where(valid, x.astype(_F32), jnp.inf)
    xs = jnp.sort(x, axis=-1)
    n = jnp.sum(valid, axis=-1)
    pos = (q / 100.0) * jnp.maximum(n - 1, 0).astype(_F32)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
    frac = pos - lo.astype(_F32)
    a = jnp.take_along_axis(xs, lo[:, None], axis=-1)[:, 0]
    b = jnp.take_along_axis(xs, hi[:, None], axis=-1)[:, 0]
    # NumPy's lerp form, exact at both ends.
    value = jnp.where(frac >= 0.5, b - (b - a) * (1.0 - frac), a + (b - a) * frac)
    has_any = n > 0
    return jnp.where(has_any, value, 0.0), has_any


def _first_response_value(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x at each row's first response position: [B, T] -> [B]."""
    first = jnp.argmax(mask, axis=-1)
    return jnp.take_along_axis(x, first[:, None], axis=-1)[:, 0]


def code_window_values(
    entropy: jax.Array, mask: jax.Array, *, window: int = 4, offset: int = 1
) -> jax.Array:
    """One value per response position, as the released code builds them for its threshold.

    A position with a complete following window gets its window mean. Near the end, where fewer
    than w tokens follow, the released code appends the mean of the values collected so far; since
    each appended value equals that running mean, every such position gets the mean of the
    complete windows. A response with no complete window at all gets its first token's entropy at
    every position (the first append uses the token's own entropy, the later ones the mean of
    that list).

    Returns:
      [B, T] float32, meaningful where mask is True.
    """
    win, valid = window_entropy(entropy, mask, window=window, offset=offset)
    n_full = jnp.sum(valid, axis=-1)
    mean_full = jnp.sum(win, axis=-1) / jnp.maximum(n_full, 1)
    first = _first_response_value(entropy.astype(_F32), mask)
    fill = jnp.where(n_full > 0, mean_full, first)
    return jnp.where(valid, win, fill[:, None])


STATISTICS = ("window", "token")


def response_percentiles(
    entropy: jax.Array,
    mask: jax.Array,
    *,
    statistic: str = "window",
    q: float = 95.0,
    window: int = 4,
    offset: int = 1,
) -> tuple[jax.Array, jax.Array]:
    """Per-response q-th percentile of window means ("window", code) or token entropies ("token").

    Returns:
      (p, has_tokens): [B] float32 percentile in nats (0 for empty rows) and [B] bool.
    """
    fn = "response_percentiles"
    check_entropy_inputs(fn, entropy, mask)
    checks.check_choice(statistic, STATISTICS, "statistic", fn)
    if statistic == "window":
        values = code_window_values(entropy, mask, window=window, offset=offset)
    else:
        values = entropy.astype(_F32)
    return masked_percentile(values, mask, q)


def masked_median(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Median of the valid entries of a vector (NumPy's: mean of the two middle values)."""
    value, _ = masked_percentile(x[None, :], valid[None, :], 50.0)
    return value[0]


def masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of the valid entries of a vector (0 if there are none)."""
    return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


THRESHOLDS = ("code", "paper")


def batch_threshold(
    entropy: jax.Array,
    mask: jax.Array,
    *,
    threshold: str = "code",
    q: float = 95.0,
    window: int = 4,
    offset: int = 1,
) -> jax.Array:
    """This batch's threshold statistic (METHOD.md 2.3), a float32 scalar in nats.

    "code": median over responses of the per-response percentile of window means (the value the
    EMA of `update_threshold` is fed with). "paper": mean over responses of the per-response
    percentile of token entropies (used as it is). Rows without response tokens are ignored.
    """
    checks.check_choice(threshold, THRESHOLDS, "threshold", "batch_threshold")
    statistic = "window" if threshold == "code" else "token"
    p, has = response_percentiles(
        entropy, mask, statistic=statistic, q=q, window=window, offset=offset
    )
    return masked_median(p, has) if threshold == "code" else masked_mean(p, has)


def seed_threshold(
    entropy: jax.Array, mask: jax.Array, *, q: float = 95.0, window: int = 4, offset: int = 1
) -> jax.Array:
    """The released code's tau for the first training step, from a validation pass.

    METHOD.md 2.3 item 3: before the first training step the code sets tau to the mean (not the
    median) of the per-response percentiles of window means over the validation rollouts. It is
    used for the counts of step 1 only; the EMA starts from the first training batch's median
    (`init_threshold(tau)` then `update_threshold`).
    """
    p, has = response_percentiles(
        entropy, mask, statistic="window", q=q, window=window, offset=offset
    )
    return masked_mean(p, has)


class ThresholdState(NamedTuple):
    """The threshold carried across training steps (METHOD.md 2.3)."""

    tau: jax.Array  # float32 scalar, nats: the tau the next step's counts use
    initialized: jax.Array  # bool scalar; False while tau holds no value at all
    ema_started: jax.Array  # bool scalar; False until a training batch has been observed


def init_threshold(tau: float | None = None) -> ThresholdState:
    """A threshold state before training: with `tau` (the validation value, `seed_threshold`) the
    first step counts against it; without, the caller's fallback is used. Either way the EMA
    starts from the first training batch's statistic, not from `tau`."""
    started = jnp.zeros((), bool)
    if tau is None:
        return ThresholdState(jnp.zeros((), _F32), jnp.zeros((), bool), started)
    return ThresholdState(jnp.asarray(tau, _F32), jnp.ones((), bool), started)


def update_threshold(
    state: ThresholdState, observation: jax.Array, *, decay: float = 0.99
) -> ThresholdState:
    """tau <- decay * tau + (1 - decay) * observation; the first training observation seeds tau.

    The released code updates tau after each step's rollouts, so the counts of step k use the tau
    of step k-1 (a one-step lag; METHOD.md 2.3 item 4): call this after counting. A validation
    value in `state` (from `init_threshold(tau)`) is replaced by the first observation, as the
    released trainer's EMA starts from its first training batch.
    """
    obs = jnp.asarray(observation, _F32)
    tau = jnp.where(state.ema_started, decay * state.tau + (1.0 - decay) * obs, obs)
    return ThresholdState(tau, jnp.ones((), bool), jnp.ones((), bool))


class HWECounts(NamedTuple):
    """Per-response high-window-entropy statistics."""

    count: jax.Array  # [B] int32: N_HE, the valid count the reward uses
    invalid: jax.Array  # [B] int32: triggers whose window stayed below tau (logged)
    soft_cost: jax.Array  # [B] float32: sum of max(0, mean - tau) over counted triggers, nats
    positions: jax.Array  # [B, T] bool: positions counted in N_HE (m_{i,t} of Algorithm 1)
    window_mask: jax.Array  # [B, T] bool: tokens inside a counted window (KL relaxation, 4.8)


COUNT_RULES = ("code", "paper_token", "paper_window")


def _cover(positions: jax.Array, window: int, offset: int) -> jax.Array:
    """Tokens t+offset .. t+offset+window-1 for every True position t: [B, T] -> [B, T] bool."""
    out = jnp.zeros_like(positions)
    t = positions.shape[1]
    for k in range(window):
        s = offset + k
        if s >= t:
            break
        shifted = positions if s == 0 else jnp.pad(positions[:, : t - s], ((0, 0), (s, 0)))
        out = out | shifted
    return out


def hwe_counts(
    entropy: jax.Array,
    mask: jax.Array,
    trigger: jax.Array | None,
    tau: jax.Array | float,
    *,
    rule: str = "code",
    window: int = 4,
    offset: int = 1,
) -> HWECounts:
    """Counts high-entropy reasoning moments per response (METHOD.md 2.5).

    Args:
      entropy: [B, T] float, per-token entropy in nats.
      mask: [B, T] bool, response tokens.
      trigger: [B, T] bool, True where the token is in the trigger vocabulary
        (`rewards.triggers.trigger_mask` of the sampled or arg-max ids). Not used by
        "paper_window" (may be None there).
      tau: float32 scalar threshold in nats.
      rule: "code", "paper_token" or "paper_window" (module docstring).
      window, offset: the window of `window_entropy`.

    Returns:
      HWECounts. `window_mask` covers the tokens of each counted window (for "paper_token", the
      counted token itself), the region where the paper relaxes the KL weight by rho.
    """
    fn = "hwe_counts"
    check_entropy_inputs(fn, entropy, mask)
    checks.check_choice(rule, COUNT_RULES, "rule", fn)
    if rule != "paper_window":
        if trigger is None:
            raise ValueError(f"{fn}: rule={rule!r} needs the trigger mask; got None.")
        checks.check_bool(trigger, "trigger", fn)
        checks.check_same_shape(fn, entropy=entropy, trigger=trigger)
    if np.ndim(tau) != 0:
        raise ValueError(f"{fn}: tau must be a scalar, got shape {np.shape(tau)}.")
    tau = jnp.asarray(tau, _F32)

    if rule == "paper_token":
        h = entropy.astype(_F32)
        considered = mask & trigger
        value = h
        cover_window, cover_offset = 1, 0
    else:
        value, complete = window_entropy(entropy, mask, window=window, offset=offset)
        considered = complete if rule == "paper_window" else complete & trigger
        cover_window, cover_offset = window, offset
    high = considered & (value >= tau)
    low = considered & (value < tau)
    if rule == "paper_window":
        low = jnp.zeros_like(low)  # no trigger vocabulary, so no invalid triggers
    soft = jnp.sum(jnp.where(considered, jnp.maximum(value - tau, 0.0), 0.0), axis=-1)
    return HWECounts(
        count=jnp.sum(high, axis=-1, dtype=jnp.int32),
        invalid=jnp.sum(low, axis=-1, dtype=jnp.int32),
        soft_cost=soft,
        positions=high,
        window_mask=_cover(high, cover_window, cover_offset) & mask,
    )


def mean_entropy(entropy: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-response mean token entropy [B] (logged; 0 for empty rows)."""
    check_entropy_inputs("mean_entropy", entropy, mask)
    total = jnp.sum(jnp.where(mask, entropy.astype(_F32), 0.0), axis=-1)
    return total / jnp.maximum(jnp.sum(mask, axis=-1), 1)
