"""Group-relative advantages and the DAPO group filter (METHOD.md 4.5, 4.6).

Responses are flat [N], ordered group by group (G responses per prompt, N = number of prompts x G).
Everything here is a pure jnp function with static shapes: it runs under jit and on a batch sharded
along N.

Scalings (`scale=`), looked up in `ADVANTAGE_SCALES`:
  "std"    (R_i - mean_g R) / (std_g R + eps), unbiased std (G - 1): the released code's GRPO
           advantage (METHOD.md 4.6, `compute_grpo_outcome_advantage`). Needs G >= 2.
  "none"   R_i - mean_g R (centred only).
  "length" (R_i - mean_g R) / L_i: the paper's Algorithm 1 step 5 (METHOD.md 4.10), without its
           unspecified token-level window bonus psi. Needs `lengths`.
A group whose rewards are all equal gets advantage exactly 0 under every scaling.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ares_jax.ops import checks


def _scale_std(centred: jax.Array, lengths: jax.Array | None, eps: float) -> jax.Array:
    del lengths
    g = centred.shape[-1]
    std = jnp.sqrt(jnp.sum(centred * centred, axis=-1, keepdims=True) / (g - 1))
    return centred / (std + eps)


def _scale_none(centred: jax.Array, lengths: jax.Array | None, eps: float) -> jax.Array:
    del lengths, eps
    return centred


def _scale_length(centred: jax.Array, lengths: jax.Array | None, eps: float) -> jax.Array:
    del eps
    # Under jit a non-positive length cannot be rejected without a host call; it is read as 1.
    return centred / jnp.maximum(lengths, 1.0)


# name -> fn(centred [N/G, G] float32, lengths [N/G, G] float32 | None, eps) -> [N/G, G] float32.
ADVANTAGE_SCALES: dict[str, Callable[[jax.Array, jax.Array | None, float], jax.Array]] = {
    "std": _scale_std,
    "none": _scale_none,
    "length": _scale_length,
}


def _lookup_scale(scale: str, fn: str):
    checks.check_choice(scale, ADVANTAGE_SCALES, "scale", fn)
    return ADVANTAGE_SCALES[scale]


def _check_rewards(rewards, group_size: int, fn: str, *, minimum: int = 1) -> None:
    checks.check_rank(rewards, 1, "rewards", fn)
    checks.check_floating(rewards, "rewards", fn)
    checks.check_group_size(np.shape(rewards)[0], group_size, fn, minimum=minimum)


def _centred(rewards_ng: jax.Array) -> jax.Array:
    # Centre against the first member before taking the mean, so that a constant group gives
    # exactly 0 (a float32 mean of equal values is not always bit-equal to them).
    shifted = rewards_ng - rewards_ng[:, :1]
    return shifted - jnp.mean(shifted, axis=-1, keepdims=True)


def group_advantages(
    rewards: jax.Array,
    group_size: int,
    *,
    scale: str = "std",
    eps: float = 1e-6,
    lengths: jax.Array | None = None,
) -> jax.Array:
    """Outcome advantage of each response relative to its group (METHOD.md 4.6, 4.10 step 5).

    Args:
      rewards: [N] floating, overall reward per response, ordered group by group (N = prompts x G).
      group_size: G, responses per prompt (static). N must be a multiple of G; "std" needs G >= 2.
      scale: "std" (released code, default), "none" or "length" (paper Algorithm 1); see the
        module docstring.
      eps: added to the group std before dividing ("std" only).
      lengths: [N] int or float, response length L_i in tokens, > 0; required by "length" and
        rejected by the other scalings. Checked on concrete arrays; under jit values below 1
        are read as 1.

    Returns:
      [N] float32 advantages, one per response (broadcast to tokens with `token_advantages`).
    """
    fn = "group_advantages"
    scale_fn = _lookup_scale(scale, fn)
    if scale == "std" and isinstance(group_size, int | np.integer) and group_size < 2:
        raise ValueError(
            f"{fn}: scale='std' needs group_size >= 2 (the unbiased std of a single response is "
            f"undefined), got group_size={group_size}; use scale='none' or larger groups."
        )
    _check_rewards(rewards, group_size, fn)
    n = np.shape(rewards)[0]
    if scale == "length":
        if lengths is None:
            raise ValueError(f"{fn}: scale='length' needs lengths [N] (response lengths > 0).")
        checks.check_rank(lengths, 1, "lengths", fn)
        checks.check_same_shape(fn, rewards=rewards, lengths=lengths)
        if jnp.result_type(lengths) == jnp.bool_:
            raise TypeError(f"{fn}: lengths must be a numeric array, got dtype bool.")
        if not isinstance(lengths, jax.core.Tracer) and np.any(np.asarray(lengths) <= 0):
            raise ValueError(f"{fn}: lengths must all be > 0 for scale='length'.")
        lengths = jnp.asarray(lengths, jnp.float32).reshape(n // group_size, group_size)
    elif lengths is not None:
        raise ValueError(f"{fn}: lengths is only used by scale='length', got scale={scale!r}.")

    rewards_ng = jnp.asarray(rewards, jnp.float32).reshape(n // group_size, group_size)
    return scale_fn(_centred(rewards_ng), lengths, eps).reshape(n)


def online_filter(
    rewards: jax.Array, group_size: int, *, low: float = 0.01, high: float = 0.99
) -> jax.Array:
    """Groups kept by DAPO dynamic sampling: mean reward inside (low, high) (METHOD.md 4.5).

    Args:
      rewards: [N] floating, overall reward per response, ordered group by group.
      group_size: G, responses per prompt (static); N must be a multiple of G.
      low, high: open interval for the group mean (released code 0.01, 0.99).

    Returns:
      [N // G] bool, True for groups to keep.
    """
    fn = "online_filter"
    _check_rewards(rewards, group_size, fn)
    if not low < high:
        raise ValueError(f"{fn}: low must be < high, got low={low}, high={high}.")
    n = np.shape(rewards)[0]
    mean = jnp.mean(jnp.asarray(rewards, jnp.float32).reshape(n // group_size, group_size), axis=-1)
    return (mean > low) & (mean < high)


def token_advantages(advantages: jax.Array, mask: jax.Array) -> jax.Array:
    """Broadcasts one advantage per response to its response tokens (METHOD.md 4.6).

    Args:
      advantages: [B] floating, one per response row.
      mask: [B, T] bool, True on response tokens.

    Returns:
      [B, T] float32, advantages[b] where mask is True, 0 elsewhere.
    """
    fn = "token_advantages"
    checks.check_rank(advantages, 1, "advantages", fn)
    checks.check_floating(advantages, "advantages", fn)
    checks.check_rank(mask, 2, "mask", fn)
    checks.check_bool(mask, "mask", fn)
    if np.shape(mask)[0] != np.shape(advantages)[0]:
        raise ValueError(
            f"{fn}: advantages has {np.shape(advantages)[0]} rows but mask has "
            f"{np.shape(mask)[0]}; they must match."
        )
    return jnp.where(mask, jnp.asarray(advantages, jnp.float32)[:, None], 0.0)
