"""Tests for ares_jax/rewards/entropy_shaping.py against float64 pure-Python transcriptions of
METHOD.md 4.4.1 (paper) and 4.4.2 (code)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ares_jax.rewards import entropy_shaping as es

# ---------------------------------------------------------------------------------------------
# References, one response at a time, in float64.

F = (0.15, 0.25, 0.35)
KAPPA = (2.0, 3.0, 4.0)
TEMP = (2.0, 2.5, 3.0)
CAP = (1.0, 1.0, 1.2)
GAIN = (0.6, 0.8, 1.0)


def huber(x, k):
    x = max(x, 0.0)
    return 0.5 * x * x / k if x <= k else x - 0.5 * k


def sigma(x, s):
    return 1.0 / (1.0 + math.exp(-x / s))


def ref_code(d, acc, n, target, alpha):
    """METHOD.md 4.4.2, case by case."""
    delta = n - target
    margin = max(1.0, F[d] * max(target, 1.0))
    cap = alpha * CAP[d]
    k, s = KAPPA[d], TEMP[d]
    if d == 0 and acc:
        return -min(cap, huber(max(delta - margin, 0.0), k) / (margin + k) * cap)
    if d == 1 and acc:
        return -min(cap, huber(max(abs(delta) - margin, 0.0), k) / (margin + k) * cap)
    if d in (0, 1):
        return sigma(max(delta - margin, 0.0), s) * cap * (0.6 if d == 0 else 0.8)
    if acc:
        if delta >= -margin:
            return sigma(delta + margin, s) * cap
        return -min(cap, 0.5 * huber(-delta - margin, k) / (margin + k) * cap)
    return sigma(max(delta - margin, 0.0), s) * cap


def ref_paper(bucket, correct, n_hwe, target, eps=1e-6):
    """METHOD.md 4.4.1 with batch mean / population variance per bucket."""
    out = []
    stats = {}
    for d in range(3):
        vals = [float(n) for b, n in zip(bucket, n_hwe, strict=True) if b == d]
        if vals:
            mean = sum(vals) / len(vals)
            stats[d] = (mean, sum((v - mean) ** 2 for v in vals) / len(vals))
    for d, acc, n, t in zip(bucket, correct, n_hwe, target, strict=True):
        mean, var = stats[d]
        lam = max(0.0, (mean - t) / (var + eps))
        delta = n - t
        g = max(0.0, delta) if d == 0 else abs(delta) if d == 1 else max(0.0, -delta)
        out.append(0.0 if acc else -lam * g)
    return out


def random_batch(rng, n):
    bucket = rng.integers(0, 3, n).astype(np.int32)
    correct = rng.random(n) < 0.5
    n_hwe = rng.integers(0, 150, n).astype(np.int32)
    target_d = rng.integers(0, 100, 3).astype(np.float32)
    alpha_d = rng.uniform(0.0, 2.0, 3).astype(np.float32)
    return bucket, correct, n_hwe, target_d[bucket], alpha_d[bucket]


def call(bucket, correct, n_hwe, target, alpha, **kw):
    return np.asarray(
        es.entropy_reward(
            jnp.asarray(bucket),
            jnp.asarray(correct),
            jnp.asarray(n_hwe),
            jnp.asarray(target),
            jnp.asarray(alpha),
            **kw,
        )
    )


# ---------------------------------------------------------------------------------------------
# Code variant

# (bucket, acc, N, N*) -> E at alpha = 0.5 (METHOD.md 4.4.2 test vectors).
VECTORS = [
    (0, 1, 20, 28, 0.0),
    (0, 1, 33, 28, -0.0129),
    (0, 1, 51, 28, -0.5),
    (0, 0, 20, 28, 0.15),
    (0, 0, 40, 28, 0.294),
    (1, 1, 75, 55, -0.1418),
    (1, 1, 35, 55, -0.1418),
    (1, 0, 84, 55, 0.3991),
    (1, 0, 24, 55, 0.2),
    (2, 1, 60, 60, 0.5995),
    (2, 1, 40, 60, 0.3495),
    (2, 1, 30, 60, -0.084),
    (2, 0, 30, 60, 0.3),
    (2, 0, 90, 60, 0.5715),
]


def test_method_test_vectors():
    v = np.array(VECTORS)
    got = call(v[:, 0].astype(np.int32), v[:, 1] > 0, v[:, 2].astype(np.int32), v[:, 3], [0.5] * 14)
    assert got.dtype == np.float32
    # The listed values are rounded to 4 decimals (3 for 0.294).
    np.testing.assert_allclose(got, v[:, 4], rtol=0, atol=1e-4)
    np.testing.assert_allclose([ref_code(*row[:4], 0.5) for row in VECTORS], v[:, 4], atol=1e-4)


def test_paper_case_study_values():
    medium = call([1, 1], [False, False], [84, 24], [55.0, 55.0], [0.476, 0.476])
    np.testing.assert_allclose(medium, [0.380, 0.190], atol=5e-4)
    easy = call([0, 0], [True, True], [20, 51], [28.0, 28.0], [0.5, 0.5])
    np.testing.assert_allclose(easy, [0.0, -0.5], atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_code_variant_matches_reference_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    batch = random_batch(rng, 257)
    if seed % 2:  # float counts and 0/1 float correctness are accepted too
        batch = (batch[0], batch[1].astype(np.float32), batch[2] + 0.5, *batch[3:])
    got = call(*batch)
    rows = zip(*batch, strict=True)
    ref = [ref_code(int(d), bool(a), float(n), float(t), float(al)) for d, a, n, t, al in rows]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_code_variant_ranges_at_alpha_half():
    rng = np.random.default_rng(7)
    bucket, correct, n_hwe, target, _ = random_batch(rng, 3000)
    e = call(bucket, correct, n_hwe, target, np.full(3000, 0.5, np.float32))
    lo_hi = {(0, 1): (-0.5, 0), (0, 0): (0.15, 0.3), (1, 1): (-0.5, 0), (1, 0): (0.2, 0.4)}
    lo_hi.update({(2, 1): (-0.6, 0.6), (2, 0): (0.3, 0.6)})
    for (d, acc), (lo, hi) in lo_hi.items():
        sel = (bucket == d) & (correct == bool(acc))
        assert sel.any()
        assert e[sel].min() >= lo - 1e-6 and e[sel].max() <= hi + 1e-6


def test_custom_params_are_used():
    params = es.ShapingParams(wrong_gain=(1.0, 1.0, 0.5), cap_scale=(2.0, 1.0, 1.0))
    got = call([0, 2], [False, False], [20, 30], [28.0, 60.0], [0.5, 0.5], params=params)
    # easy wrong below margin: sigma(0) * (0.5 * 2) * 1.0; hard wrong: sigma(0) * 0.5 * 0.5
    np.testing.assert_allclose(got, [0.5, 0.125], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Paper variant


def test_paper_variant_with_lagged_target_matches_reference():
    rng = np.random.default_rng(11)
    bucket, correct, n_hwe, _, alpha = random_batch(rng, 200)
    lagged = np.array([30.0, 60.0, 90.0], np.float32)[bucket]  # previous iteration's N*_d
    got = call(bucket, correct, n_hwe, lagged, alpha, variant="paper")
    ref = ref_paper(bucket.tolist(), correct.tolist(), n_hwe.tolist(), lagged.tolist())
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    assert np.any(got != 0.0)  # the batch mean differs from the lagged target
    assert np.all(got[correct] == 0.0) and np.all(got <= 0.0)


def test_paper_variant_is_zero_when_target_is_the_batch_mean():
    rng = np.random.default_rng(12)
    bucket, correct, n_hwe, _, alpha = random_batch(rng, 96)
    n_hwe = n_hwe.astype(np.int64)
    means = np.zeros(3)
    for d in range(3):  # make each bucket mean an integer so it is exact in float32
        idx = np.flatnonzero(bucket == d)
        n_hwe[idx[-1]] += (-n_hwe[idx].sum()) % len(idx)
        means[d] = n_hwe[idx].mean()
    assert np.all(means == np.round(means))
    got = call(bucket, correct, n_hwe.astype(np.int32), means[bucket], alpha, variant="paper")
    np.testing.assert_array_equal(got, np.zeros(96))


def test_unknown_variant_lists_known_names():
    with pytest.raises(ValueError, match="variant='lagrange' is not one of 'code', 'paper'"):
        call([0], [True], [1], [1.0], [0.5], variant="lagrange")
    assert sorted(es.VARIANTS) == ["code", "paper"]


# ---------------------------------------------------------------------------------------------
# total_reward


def test_total_reward():
    correct = jnp.array([True, False, True])
    e = jnp.array([-0.25, 0.3, 0.5], jnp.float32)
    np.testing.assert_allclose(es.total_reward(correct, e), [0.75, 0.3, 1.5])
    fmt = jnp.array([1.0, 1.0, 0.0])
    got = es.total_reward(correct, e, format_ok=fmt, format_weight=0.1)
    np.testing.assert_allclose(got, [0.85, 0.4, 1.5], rtol=1e-6)
    np.testing.assert_allclose(es.total_reward(correct, e, format_ok=fmt), [0.75, 0.3, 1.5])


# ---------------------------------------------------------------------------------------------
# jit and sharding


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_jit_equals_eager(variant):
    batch = [jnp.asarray(x) for x in random_batch(np.random.default_rng(5), 128)]
    eager = es.entropy_reward(*batch, variant=variant)
    fn = jax.jit(es.entropy_reward, static_argnames=("variant", "params"))
    np.testing.assert_array_equal(np.asarray(fn(*batch, variant=variant)), np.asarray(eager))
    # params may also be traced floats
    traced = jax.jit(lambda p, *b: es.entropy_reward(*b, variant=variant, params=p))
    np.testing.assert_allclose(traced(es.ShapingParams(), *batch), eager, rtol=1e-6, atol=1e-7)
    total = jax.jit(es.total_reward)(batch[1], eager)
    np.testing.assert_array_equal(total, es.total_reward(batch[1], eager))


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_sharded_equals_single_device(variant):
    batch = [jnp.asarray(x) for x in random_batch(np.random.default_rng(6), 256)]
    fn = jax.jit(es.entropy_reward, static_argnames=("variant", "params"))
    single = fn(*batch, variant=variant)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    shard = NamedSharding(mesh, P("data"))
    sharded = fn(*[jax.device_put(x, shard) for x in batch], variant=variant)
    assert len(sharded.sharding.device_set) == 8
    if variant == "code":  # elementwise: bit-identical
        np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))
    else:  # bucket sums are reduced in another order across devices
        np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# errors


def test_errors_name_the_argument():
    b, c, n, t, a = random_batch(np.random.default_rng(9), 8)
    with pytest.raises(ValueError, match="target has shape \\(7,\\) but bucket has shape \\(8,\\)"):
        call(b, c, n, t[:7], a)
    with pytest.raises(ValueError, match="alpha must have rank 1"):
        call(b, c, n, t, a[None])
    with pytest.raises(ValueError, match="bucket must have rank 1"):
        call(b[None], c, n, t, a)
    for name, pos in (("n_hwe", 2), ("target", 3), ("alpha", 4)):
        args = [b, c, n.astype(np.float32), t, a]
        args[pos] = np.asarray(args[pos], np.float32).copy()
        args[pos][3] = np.nan
        with pytest.raises(ValueError, match=f"{name} holds NaN"):
            call(*args)
    with pytest.raises(ValueError, match="bucket must hold bucket ids 0"):
        call(np.full(8, 3, np.int32), c, n, t, a)
    with pytest.raises(ValueError, match="bucket must hold bucket ids 0"):
        call(np.full(8, -1, np.int32), c, n, t, a)
    with pytest.raises(TypeError, match="bucket must be an integer array"):
        call(b.astype(np.float32), c, n, t, a)
    with pytest.raises(TypeError, match="n_hwe must be an int or float array"):
        call(b, c, n > 3, t, a)
    with pytest.raises(ValueError, match="entropy_term has shape"):
        es.total_reward(jnp.asarray(c), jnp.zeros(7))


def test_nan_under_jit_raises_when_run():
    b, c, n, t, a = (jnp.asarray(x) for x in random_batch(np.random.default_rng(9), 8))
    fn = jax.jit(es.entropy_reward)
    with pytest.raises(Exception, match="n_hwe holds NaN"):
        jax.block_until_ready(fn(b, c, n.astype(jnp.float32).at[0].set(jnp.nan), t, a))
