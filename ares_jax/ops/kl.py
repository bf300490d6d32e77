"""KL to the reference policy as an actor loss, with per-bucket weights (METHOD.md 4.8).

Three pieces, all pure jnp functions (jit-compatible, shardable along the batch):

* `kl_divergence`: per-token estimators of KL(pi_theta || pi_ref) from sampled-token log-probs,
  registered in `KL_ESTIMATORS` ("k1", "k2", "k3" = the released code's `low_var_kl`).
* Two per-bucket controllers, as functions (state, observation) -> state, one call per actor
  micro-batch *before* that micro-batch's loss reads the weights:
  - code (default, `kl_mode=code_bucket_beta`): `update_beta`, a transcription of the released
    `DataParallelPPOActor._update_beta_per_bucket` (slow log-space update of beta_d), and
    `update_beta_cadence`, the same step run with the released per-rank cadence;
  - paper (`kl_mode=paper_window_rho`): `update_kappa`, Algorithm 1 step 8 / App. K Eq. 27
    (multiplicative update of kappa_d fed by the KL outside validated high-entropy windows).
* `kl_token_weights`: the per-token weight [B, T] that multiplies the estimator in the loss.

Buckets are int32: 0 easy, 1 medium, 2 hard (`NUM_BUCKETS` = 3). Sequences whose bucket is outside
0..2 are ignored by the controllers and read the medium weight, as the released code does for an
unknown difficulty string.

The paper gives no numbers for its controller (METHOD.md 10.5); `KappaControllerParams` and the
`rho` default of `kl_token_weights` are our choices: alpha_kappa 0.1, delta_d 0.01 (the released
code's target), kappa in [1e-3, 1e2] starting at 1, rho 0.5.

Differences from the released code: its beta state was kept per FSDP rank (never synchronised),
each rank stepping it once per micro-batch of its own sequences. `update_beta` keeps one state
updated from whatever batch is passed (the global micro-batch when it is sharded), so every device
holds the same beta; `update_beta_cadence` keeps R states and reproduces the released cadence for
R ranks walking micro-batches of m sequences each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ares_jax.ops import checks

NUM_BUCKETS = 3
EASY, MEDIUM, HARD = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Estimators.


def _k1(logratio: jax.Array) -> jax.Array:
    return logratio


def _k2(logratio: jax.Array) -> jax.Array:
    return 0.5 * logratio * logratio


def _k3(logratio: jax.Array) -> jax.Array:
    # Schulman's low-variance estimator with the released code's clamps (`compute_kl`,
    # kl_penalty="low_var_kl"): x = log pi_ref - log pi_theta.
    x = jnp.clip(-logratio, -20.0, 20.0)
    return jnp.clip(jnp.exp(x) - x - 1.0, -10.0, 10.0)


# name -> fn(logp - ref_logp [float32]) -> per-token estimate, same shape.
KL_ESTIMATORS: dict[str, Callable[[jax.Array], jax.Array]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_divergence(logp: jax.Array, ref_logp: jax.Array, kind: str = "k3") -> jax.Array:
    """Per-token estimate of KL(pi_theta || pi_ref) at the sampled tokens (METHOD.md 4.8).

    k1 = logp - ref_logp; k2 = (logp - ref_logp)^2 / 2; k3 = exp(x) - x - 1 with
    x = clip(ref_logp - logp, -20, 20), the result clipped to [-10, 10] (released `low_var_kl`).
    Differentiable with respect to `logp` (zero gradient where a clip is active).

    Args:
      logp: [...] floating, log-prob of the sampled token under the policy, nats.
      ref_logp: same shape, floating, log-prob under the frozen reference policy, nats.
      kind: "k1", "k2" or "k3".

    Returns:
      Same shape as `logp`, float32 (float64 for float64 inputs under x64), nats. Positions
      outside the response hold values too; mask them when reducing.
    """
    fn = "kl_divergence"
    checks.check_choice(kind, KL_ESTIMATORS, "kind", fn)
    checks.check_floating(logp, "logp", fn)
    checks.check_floating(ref_logp, "ref_logp", fn)
    checks.check_same_shape(fn, logp=logp, ref_logp=ref_logp)
    dtype = _compute_dtype(logp, ref_logp)
    logratio = jnp.asarray(logp, dtype) - jnp.asarray(ref_logp, dtype)
    return KL_ESTIMATORS[kind](logratio)


def _compute_dtype(*arrays):
    # float32 for bf16/f16/f32 inputs; float64 stays float64 (only under x64, for gradient tests).
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def sequence_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked mean over each row's response tokens, denominator max(1, tokens) (METHOD.md 4.8).

    Args:
      x: [B, T] floating, per-token values (e.g. `kl_divergence` output).
      mask: [B, T] bool, True on response tokens.

    Returns:
      [B] float32; 0 for a row with no response tokens. Values where mask is False never enter.
    """
    fn = "sequence_mean"
    _check_tokens(fn, x=x, mask=mask)
    total = jnp.sum(jnp.where(mask, jnp.asarray(x, jnp.float32), 0.0), axis=-1)
    return total / jnp.maximum(jnp.sum(mask, axis=-1), 1).astype(jnp.float32)


def control_kl(kld: jax.Array, mask: jax.Array, window_mask: jax.Array) -> jax.Array:
    """Per-sequence KL outside validated windows, (1/L_i) sum_t 1[m_it = 0] kld_it (METHOD.md 4.8).

    The paper's controller signal (Algorithm 1 step 8): L_i is the full response length (window
    tokens count in the denominator, not in the numerator).

    Args:
      kld: [B, T] floating, per-token KL estimate, nats.
      mask: [B, T] bool, True on response tokens; L_i = max(1, sum_t mask).
      window_mask: [B, T] bool, m_it, True inside validated high-window-entropy windows.

    Returns:
      [B] float32, nats.
    """
    fn = "control_kl"
    _check_tokens(fn, kld=kld, mask=mask, window_mask=window_mask)
    return sequence_mean(jnp.where(window_mask, 0.0, jnp.asarray(kld, jnp.float32)), mask)


def _check_tokens(fn: str, **arrays) -> None:
    for name, a in arrays.items():
        checks.check_rank(a, 2, name, fn)
        if "mask" in name:
            checks.check_bool(a, name, fn)
        else:
            checks.check_floating(a, name, fn)
    checks.check_same_shape(fn, **arrays)


def _check_per_sequence(fn: str, values: jax.Array, bucket: jax.Array, valid, name: str) -> None:
    checks.check_rank(values, 1, name, fn)
    checks.check_floating(values, name, fn)
    checks.check_rank(bucket, 1, "bucket", fn)
    checks.check_integer(bucket, "bucket", fn)
    if valid is not None:
        checks.check_rank(valid, 1, "valid", fn)
        checks.check_bool(valid, "valid", fn)
    checks.check_same_shape(fn, **{name: values, "bucket": bucket, "valid": valid})


def _bucket_means(values: jax.Array, bucket: jax.Array, valid: jax.Array | None):
    """Mean of `values` [n] per bucket -> (mean [3] float32, present [3] bool)."""
    member = jax.nn.one_hot(bucket, NUM_BUCKETS, dtype=jnp.bool_)  # [n, 3]; out of range: none
    if valid is not None:
        member = member & valid[:, None]
    # Elementwise sums (not a matmul) keep full float32 precision on every backend.
    total = jnp.sum(jnp.where(member, jnp.asarray(values, jnp.float32)[:, None], 0.0), axis=0)
    count = jnp.sum(member, axis=0)
    return total / jnp.maximum(count, 1).astype(jnp.float32), count > 0


def _per_bucket(values: jax.Array, bucket: jax.Array) -> jax.Array:
    """values [3] -> values[bucket] [n]; buckets outside 0..2 read the medium entry."""
    inside = (bucket >= 0) & (bucket < NUM_BUCKETS)
    return jnp.asarray(values, jnp.float32)[jnp.where(inside, bucket, MEDIUM)]


def _per_bucket_param(value, fn: str, name: str) -> jax.Array:
    arr = jnp.asarray(value, jnp.float32)
    if arr.ndim > 1 or (arr.ndim == 1 and arr.shape[0] != NUM_BUCKETS):
        raise ValueError(f"{fn}: {name} must be a number or 3 numbers (easy, medium, hard).")
    return jnp.broadcast_to(arr, (NUM_BUCKETS,))


# ---------------------------------------------------------------------------------------------
# Released code controller: beta_d.


class BetaControllerParams(NamedTuple):
    """Constants of the released per-bucket beta controller (METHOD.md 4.8 "Code").

    Defaults are the released `DataParallelPPOActor` defaults (never overridden in its configs).
    Pass as a static (hashable) value.
    """

    target: float | tuple[float, float, float] = 0.01  # delta_d, target KL per bucket, nats
    ema_decay: float = 0.97  # smoothing of both the KL and the error EMA
    deadzone: float = 0.02  # |relative error| below this: no update
    interval: int = 100  # update beta only on micro-batches whose count is a multiple of this
    lr: float = 0.05  # step in log(beta) per unit of (clipped) smoothed error
    err_clip: float = 0.2  # clip of the smoothed error before the step
    beta_min: float = 1e-4
    beta_max: float = 1e2
    beta_init: float = 1.0


DEFAULT_BETA_PARAMS = BetaControllerParams()


class BetaState(NamedTuple):
    """State of the released beta controller; a pytree, one entry per bucket (easy, medium, hard).

    kl_ema: [3] float32, smoothed per-bucket KL (the code's "last_kl"); meaningful where has_kl.
    has_kl: [3] bool, False until the bucket was first seen.
    err_ema: [3] float32, smoothed relative error, updated only on interval micro-batches.
    beta: [3] float32, current beta_d.
    count: [] int32, micro-batches seen.
    """

    kl_ema: jax.Array
    has_kl: jax.Array
    err_ema: jax.Array
    beta: jax.Array
    count: jax.Array


def init_beta_state(params: BetaControllerParams = DEFAULT_BETA_PARAMS) -> BetaState:
    """Initial state: no KL seen, error 0, beta = params.beta_init, count 0."""
    return BetaState(  # one buffer per field: a donating step takes each field once
        kl_ema=jnp.zeros((NUM_BUCKETS,), jnp.float32),
        has_kl=jnp.zeros((NUM_BUCKETS,), jnp.bool_),
        err_ema=jnp.zeros((NUM_BUCKETS,), jnp.float32),
        beta=jnp.full((NUM_BUCKETS,), params.beta_init, jnp.float32),
        count=jnp.zeros((), jnp.int32),
    )


def update_beta(
    state: BetaState,
    seq_kl: jax.Array,
    bucket: jax.Array,
    *,
    params: BetaControllerParams = DEFAULT_BETA_PARAMS,
    valid: jax.Array | None = None,
) -> BetaState:
    """One step of the released controller `_update_beta_per_bucket` (METHOD.md 4.8 "Code").

    Call once per actor micro-batch, before that micro-batch's loss reads `beta_for_buckets`.
    count += 1; for each bucket d with at least one sequence here: cur = mean of its seq_kl;
    kl_ema_d = (1 - decay) cur + decay (kl_ema_d if seen else cur); e = kl_ema_d / max(1e-8,
    target_d) - 1; if |e| >= deadzone and count % interval == 0: err_ema_d = (1 - decay) e +
    decay err_ema_d and log beta_d = clip(log clip(beta_d, min, max) + lr clip(err_ema_d,
    -err_clip, err_clip), log min, log max).

    Args:
      state: the current `BetaState`.
      seq_kl: [n] floating, per-sequence masked-mean KL over response tokens (`sequence_mean` of
        the k3 estimator over all response tokens, no window exclusion), nats. No gradient.
      bucket: [n] int, 0 easy, 1 medium, 2 hard; other values are ignored.
      params: controller constants (static).
      valid: optional [n] bool; False rows (batch padding) are ignored. A real sequence with no
        response tokens still counts (with seq_kl 0), as in the released code.

    Returns:
      The new `BetaState`.
    """
    fn = "update_beta"
    _check_per_sequence(fn, seq_kl, bucket, valid, "seq_kl")
    decay = params.ema_decay
    cur, present = _bucket_means(jax.lax.stop_gradient(seq_kl), bucket, valid)
    count = state.count + 1
    last = jnp.where(state.has_kl, state.kl_ema, cur)
    kl_ema = (1.0 - decay) * cur + decay * last
    target = jnp.maximum(_per_bucket_param(params.target, fn, "params.target"), 1e-8)
    err = (kl_ema - target) / target  # = kl_ema / target - 1, without the cancellation
    step = present & (jnp.abs(err) >= params.deadzone) & (count % params.interval == 0)
    err_ema = (1.0 - decay) * err + decay * state.err_ema
    log_beta = jnp.log(jnp.clip(state.beta, params.beta_min, params.beta_max))
    log_beta = log_beta + params.lr * jnp.clip(err_ema, -params.err_clip, params.err_clip)
    log_beta = jnp.clip(log_beta, np.log(params.beta_min), np.log(params.beta_max))
    return BetaState(
        kl_ema=jnp.where(present, kl_ema, state.kl_ema),
        has_kl=state.has_kl | present,
        err_ema=jnp.where(step, err_ema, state.err_ema),
        beta=jnp.where(step, jnp.exp(log_beta), state.beta),
        count=count,
    )


def beta_for_buckets(state: BetaState, bucket: jax.Array) -> jax.Array:
    """beta_{d(i)} per sequence (released `_beta_for_levels`; unknown buckets read medium).

    Args:
      state: a `BetaState`.
      bucket: [n] int, 0 easy, 1 medium, 2 hard.

    Returns:
      [n] float32.
    """
    checks.check_rank(bucket, 1, "bucket", "beta_for_buckets")
    checks.check_integer(bucket, "bucket", "beta_for_buckets")
    return _per_bucket(state.beta, bucket)


def init_beta_states(
    params: BetaControllerParams = DEFAULT_BETA_PARAMS, ranks: int = 1
) -> BetaState:
    """`ranks` independent initial states stacked on a leading axis (see `init_beta_state`).

    Returns:
      A `BetaState` with kl_ema, has_kl, err_ema, beta of shape [ranks, 3] and count [ranks].
    """
    _check_ranks(ranks, "init_beta_states")
    return BetaState(  # one buffer per field: a donating step takes each field once
        kl_ema=jnp.zeros((ranks, NUM_BUCKETS), jnp.float32),
        has_kl=jnp.zeros((ranks, NUM_BUCKETS), jnp.bool_),
        err_ema=jnp.zeros((ranks, NUM_BUCKETS), jnp.float32),
        beta=jnp.full((ranks, NUM_BUCKETS), params.beta_init, jnp.float32),
        count=jnp.zeros((ranks,), jnp.int32),
    )


def update_beta_cadence(
    states: BetaState,
    seq_kl: jax.Array,
    bucket: jax.Array,
    *,
    params: BetaControllerParams = DEFAULT_BETA_PARAMS,
    ranks: int,
    rank_batch: int,
    valid: jax.Array | None = None,
) -> tuple[BetaState, jax.Array]:
    """The released controller with its per-rank cadence: R states, micro-batches of m rows each.

    The released actor keeps one unsynchronised controller per data-parallel rank and steps it once
    per micro-batch of `micro_batch_size_per_device_for_update` sequences of that rank, before the
    micro-batch's loss reads beta. Here n = ranks * k * rank_batch rows are laid out rank-major:
    rank r owns rows [r n / R, (r + 1) n / R) (how a batch sharded over a data axis lies on the
    devices) and walks them in k consecutive chunks of `rank_batch` rows; chunk j of every rank is
    stepped at sub-step j with `update_beta`, then its rows read their rank's beta.

    Padding: a chunk with at least one valid row is a micro-batch and advances its rank's count
    (even if none of its valid rows has a known bucket, as in the released code); a chunk whose
    rows are all padding leaves its rank's state unchanged, since the released code has no padding
    micro-batches. Hence ranks=1, rank_batch=n equals one `update_beta` call on the whole batch
    except when no row is valid (`update_beta` then still counts).

    Args:
      states: stacked `BetaState` from `init_beta_states(params, ranks)`: fields [ranks, 3],
        count [ranks].
      seq_kl: [n] floating, per-sequence masked-mean KL over response tokens, nats. No gradient.
      bucket: [n] int, 0 easy, 1 medium, 2 hard; other values are ignored by the update.
      params: controller constants (static).
      ranks: R >= 1, number of data-parallel ranks, each with its own state (static).
      rank_batch: m >= 1, sequences per rank micro-batch (static).
      valid: optional [n] bool; False rows (batch padding) are ignored.

    Returns:
      (new stacked states, row_beta [n] float32): row_beta[i] is the beta of row i's rank for row
      i's bucket right after the update of row i's chunk (unknown buckets read medium).
    """
    fn = "update_beta_cadence"
    _check_per_sequence(fn, seq_kl, bucket, valid, "seq_kl")
    _check_ranks(ranks, fn)
    if not _is_count(rank_batch):
        raise ValueError(f"{fn}: rank_batch must be an integer >= 1, got {rank_batch!r}.")
    n = np.shape(seq_kl)[0]
    if n == 0 or n % (ranks * rank_batch):
        raise ValueError(
            f"{fn}: seq_kl has {n} rows, which is not ranks ({ranks}) x rank_batch ({rank_batch}) "
            "x an integer k >= 1."
        )
    for name, field in zip(BetaState._fields, states, strict=True):
        want = (ranks,) if name == "count" else (ranks, NUM_BUCKETS)
        if np.shape(field) != want:
            raise ValueError(
                f"{fn}: states.{name} has shape {np.shape(field)}, expected {want} for "
                f"ranks={ranks} (use init_beta_states)."
            )
    k = n // (ranks * rank_batch)

    def chunks(x):  # [n] -> [k, R, m]: scan runs over the sub-step axis
        return jnp.swapaxes(jnp.reshape(x, (ranks, k, rank_batch)), 0, 1)

    def step_one(state, kl, bkt, ok):
        new = update_beta(state, kl, bkt, params=params, valid=ok)
        if ok is not None:
            new = jax.tree.map(lambda a, b: jnp.where(jnp.any(ok), a, b), new, state)
        return new, beta_for_buckets(new, bkt)

    def sub_step(carry, xs):
        if valid is None:
            return jax.vmap(lambda s, x, b: step_one(s, x, b, None))(carry, *xs)
        return jax.vmap(step_one)(carry, *xs)

    xs = (chunks(jax.lax.stop_gradient(seq_kl)), chunks(bucket))
    if valid is not None:
        xs = xs + (chunks(valid),)
    states, row_beta = jax.lax.scan(sub_step, states, xs)  # row_beta [k, R, m]
    return states, jnp.reshape(jnp.swapaxes(row_beta, 0, 1), (n,))


def _is_count(x) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool) and x >= 1


def _check_ranks(ranks, fn: str) -> None:
    if not _is_count(ranks):
        raise ValueError(f"{fn}: ranks must be an integer >= 1, got {ranks!r}.")


# ---------------------------------------------------------------------------------------------
# Paper controller: kappa_d.


class KappaControllerParams(NamedTuple):
    """Constants of the paper's per-bucket controller (METHOD.md 4.8 "Paper", Algorithm 1 step 8).

    The paper gives no values (METHOD.md 10.5); these defaults are ours: a gentle multiplicative
    step, the released code's target KL, and a wide clip range. Pass as a static value.
    """

    alpha: float = 0.1  # alpha_kappa, step size of the multiplicative update
    delta: float | tuple[float, float, float] = 0.01  # delta_d, target non-window KL, nats
    kappa_min: float = 1e-3
    kappa_max: float = 1e2
    kappa_init: float = 1.0


DEFAULT_KAPPA_PARAMS = KappaControllerParams()


def init_kappa(params: KappaControllerParams = DEFAULT_KAPPA_PARAMS) -> jax.Array:
    """Initial kappa: [3] float32, params.kappa_init for every bucket."""
    return jnp.full((NUM_BUCKETS,), params.kappa_init, jnp.float32)


def update_kappa(
    kappa: jax.Array,
    ctrl_kl: jax.Array,
    bucket: jax.Array,
    *,
    params: KappaControllerParams = DEFAULT_KAPPA_PARAMS,
    valid: jax.Array | None = None,
) -> jax.Array:
    """kappa_d <- clip(kappa_d (1 + alpha (KL_ctrl_d / delta_d - 1)), kappa_min, kappa_max).

    KL_ctrl_d is the mean of `ctrl_kl` over the sequences of bucket d (METHOD.md 4.8 "Paper",
    App. K Eq. 27). Buckets absent from this batch keep their kappa.

    Args:
      kappa: [3] float32, current kappa per bucket.
      ctrl_kl: [n] floating, per-sequence non-window KL from `control_kl`, nats. No gradient.
      bucket: [n] int, 0 easy, 1 medium, 2 hard; other values are ignored.
      params: controller constants (static).
      valid: optional [n] bool; False rows (batch padding) are ignored.

    Returns:
      [3] float32, the new kappa.
    """
    fn = "update_kappa"
    checks.check_rank(kappa, 1, "kappa", fn)
    if np.shape(kappa)[0] != NUM_BUCKETS:
        raise ValueError(f"{fn}: kappa must have shape (3,), got {np.shape(kappa)}.")
    _check_per_sequence(fn, ctrl_kl, bucket, valid, "ctrl_kl")
    mean, present = _bucket_means(jax.lax.stop_gradient(ctrl_kl), bucket, valid)
    delta = _per_bucket_param(params.delta, fn, "params.delta")
    kappa = jnp.asarray(kappa, jnp.float32)
    new = jnp.clip(
        kappa * (1.0 + params.alpha * (mean / delta - 1.0)), params.kappa_min, params.kappa_max
    )
    return jnp.where(present, new, kappa)


# ---------------------------------------------------------------------------------------------
# Per-token weights.


def second_chance_factor(
    bucket: jax.Array,
    correct: jax.Array,
    soft_cost: jax.Array,
    *,
    factor: float = 0.67,
    soft_cost_min: float = 0.5,
    easy_only: bool = True,
    incorrect_only: bool = True,
) -> jax.Array:
    """Per-sample "second chance" KL relaxation of the released code (METHOD.md 4.8 "Code").

    A sample's KL is multiplied by `factor` when soft_cost >= soft_cost_min, and (if easy_only) it
    is easy, and (if incorrect_only) it is incorrect. The released code never fired this (its
    inputs were not passed to the actor); the config defaults it off.

    Args:
      bucket: [n] int, 0 easy, 1 medium, 2 hard.
      correct: [n] bool, or floating accuracy (incorrect means < 0.5, as in the released code).
      soft_cost: [n] floating, reasoning soft cost of the sample.

    Returns:
      [n] float32: `factor` where the rule fires, 1 elsewhere.
    """
    fn = "second_chance_factor"
    for name, a in (("bucket", bucket), ("correct", correct), ("soft_cost", soft_cost)):
        checks.check_rank(a, 1, name, fn)
    checks.check_integer(bucket, "bucket", fn)
    checks.check_floating(soft_cost, "soft_cost", fn)
    checks.check_same_shape(fn, bucket=bucket, correct=correct, soft_cost=soft_cost)
    if jnp.result_type(correct) == jnp.bool_:
        incorrect = ~correct
    else:
        checks.check_floating(correct, "correct", fn)
        incorrect = jnp.asarray(correct, jnp.float32) < 0.5
    fire = jnp.asarray(soft_cost, jnp.float32) >= soft_cost_min
    if easy_only:
        fire = fire & (bucket == EASY)
    if incorrect_only:
        fire = fire & incorrect
    return jnp.where(fire, jnp.float32(factor), jnp.float32(1.0))


def _weights_code(bucket_weight, window_mask, rho):
    del window_mask, rho
    return bucket_weight[:, None]


def _weights_paper(bucket_weight, window_mask, rho):
    return bucket_weight[:, None] * jnp.where(window_mask, jnp.float32(rho), jnp.float32(1.0))


# name -> fn(per-sequence weight [B] float32, window_mask [B, T] bool | None, rho) -> [B, T] or
# [B, 1] weight before masking.
KL_WEIGHT_MODES: dict[str, Callable] = {"code": _weights_code, "paper": _weights_paper}


def kl_token_weights(
    bucket: jax.Array,
    mask: jax.Array,
    *,
    mode: str = "code",
    kl_coef: float = 0.01,
    beta: jax.Array | None = None,
    kappa: jax.Array | None = None,
    window_mask: jax.Array | None = None,
    rho: float = 0.5,
    sample_factor: jax.Array | None = None,
) -> jax.Array:
    """Per-token weight of the KL term in the loss (METHOD.md 4.7, 4.8).

    code:  w_it = kl_coef * beta_{d(i)} * f_i  (released code; all response tokens alike)
    paper: w_it = kl_coef * kappa_{d(i)} * beta_{d(i)} * rho^{m_it} * f_i  (Algorithm 1 step 6-7)
    with f_i = `sample_factor` (e.g. `second_chance_factor`, default 1).

    Args:
      bucket: [B] int, 0 easy, 1 medium, 2 hard (others read the medium entries).
      mask: [B, T] bool, True on response tokens; weights are 0 elsewhere.
      mode: "code" or "paper".
      kl_coef: global KL coefficient (released 0.01).
      beta: [3] floating per-bucket beta (the code controller's `BetaState.beta`, or the paper's
        base weights beta_d); default all 1.
      kappa: [3] floating, paper mode only (required there): the `update_kappa` state.
      window_mask: [B, T] bool, paper mode only (required there): m_it, True inside validated
        high-window-entropy windows.
      rho: relaxation inside windows, paper mode; our default 0.5 (the paper gives none).
      sample_factor: optional [B] floating per-sample multiplier.

    Returns:
      [B, T] float32 weights, 0 where mask is False. Pass as `kl_weight` to `policy_loss`.
    """
    fn = "kl_token_weights"
    checks.check_choice(mode, KL_WEIGHT_MODES, "mode", fn)
    checks.check_rank(bucket, 1, "bucket", fn)
    checks.check_integer(bucket, "bucket", fn)
    checks.check_rank(mask, 2, "mask", fn)
    checks.check_bool(mask, "mask", fn)
    rows = np.shape(mask)[0]
    if np.shape(bucket)[0] != rows:
        raise ValueError(f"{fn}: bucket has {np.shape(bucket)[0]} rows but mask has {rows}.")
    if mode == "paper":
        if kappa is None or window_mask is None:
            raise ValueError(f"{fn}: mode='paper' needs kappa [3] and window_mask [B, T].")
        checks.check_bool(window_mask, "window_mask", fn)
        checks.check_same_shape(fn, mask=mask, window_mask=window_mask)
    elif kappa is not None or window_mask is not None:
        raise ValueError(f"{fn}: kappa and window_mask are only used by mode='paper'.")

    weight = jnp.full((rows,), kl_coef, jnp.float32)
    if beta is not None:
        weight = weight * _per_bucket(_per_bucket_vector(beta, "beta", fn), bucket)
    if kappa is not None:
        weight = weight * _per_bucket(_per_bucket_vector(kappa, "kappa", fn), bucket)
    if sample_factor is not None:
        checks.check_rank(sample_factor, 1, "sample_factor", fn)
        checks.check_floating(sample_factor, "sample_factor", fn)
        checks.check_same_shape(fn, bucket=bucket, sample_factor=sample_factor)
        weight = weight * jnp.asarray(sample_factor, jnp.float32)
    per_token = KL_WEIGHT_MODES[mode](weight, window_mask, rho)
    return jnp.where(mask, per_token, 0.0)


def _per_bucket_vector(x, name: str, fn: str) -> jax.Array:
    checks.check_floating(x, name, fn)
    if np.shape(x) != (NUM_BUCKETS,):
        raise ValueError(f"{fn}: {name} must have shape (3,), got {np.shape(x)}.")
    return jnp.asarray(x, jnp.float32)
