"""Tests of ares_jax.ops.hwe against loop transcriptions of METHOD.md 2.3 and 2.5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ares_jax.ops import hwe


def _responses(seed, lengths, t=24):
    rng = np.random.default_rng(seed)
    entropy = rng.gamma(1.2, 1.0, size=(len(lengths), t))
    mask = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    trigger = (rng.random((len(lengths), t)) < 0.3) & mask
    return np.where(mask, entropy, 77.0), mask, trigger


def _ref_code_percentile(h, q=95.0, w=4):
    """The released code's per-response statistic on one response (a list of entropies)."""
    values = []
    for i in range(len(h)):
        if len(h) - i - 1 >= w:
            values.append(float(np.mean(h[i + 1 : i + 1 + w])))
        elif values:
            values.append(float(np.mean(values)))
        else:
            values.append(float(h[i]))
    return float(np.percentile(values, q)) if values else 0.0


def _ref_code_counts(h, trig, tau, w=4):
    valid = invalid = 0
    soft = 0.0
    for i in range(len(h)):
        if trig[i] and len(h) - i - 1 >= w:
            m = float(np.mean(h[i + 1 : i + 1 + w]))
            soft += max(0.0, m - tau)
            if m >= tau:
                valid += 1
            else:
                invalid += 1
    return valid, invalid, soft


LENGTHS = [0, 1, 3, 4, 5, 9, 17, 24]


def test_code_percentile_matches_released_loop():
    entropy, mask, _ = _responses(0, LENGTHS)
    p, has = hwe.response_percentiles(jnp.asarray(entropy, jnp.float32), jnp.asarray(mask))
    for row, length in enumerate(LENGTHS):
        assert bool(has[row]) == (length > 0)
        ref = _ref_code_percentile(entropy[row, :length])
        assert float(p[row]) == pytest.approx(ref, rel=1e-5, abs=1e-6), row


@pytest.mark.parametrize("q", [0.0, 50.0, 95.0, 100.0, 37.5])
def test_masked_percentile_equals_numpy(q):
    rng = np.random.default_rng(int(q))
    x = rng.normal(size=(6, 15))
    valid = rng.random((6, 15)) < 0.6
    valid[0] = False
    valid[1, :] = False
    valid[1, 4] = True
    value, has = hwe.masked_percentile(jnp.asarray(x, jnp.float32), jnp.asarray(valid), q)
    for r in range(6):
        expected = np.percentile(x[r][valid[r]], q) if valid[r].any() else 0.0
        assert float(value[r]) == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert bool(has[r]) == valid[r].any()


def test_batch_thresholds_and_seed():
    entropy, mask, _ = _responses(1, LENGTHS)
    e, m = jnp.asarray(entropy, jnp.float32), jnp.asarray(mask)
    code_p = [_ref_code_percentile(entropy[r, :n]) for r, n in enumerate(LENGTHS) if n]
    paper_p = [np.percentile(entropy[r, :n], 95) for r, n in enumerate(LENGTHS) if n]
    assert float(hwe.batch_threshold(e, m, threshold="code")) == pytest.approx(
        np.median(code_p), rel=1e-5
    )
    assert float(hwe.batch_threshold(e, m, threshold="paper")) == pytest.approx(
        np.mean(paper_p), rel=1e-5
    )
    assert float(hwe.seed_threshold(e, m)) == pytest.approx(np.mean(code_p), rel=1e-5)


def test_threshold_ema_seeded_by_first_training_batch():
    obs = [2.0, 1.0, 3.0, 0.5]
    state = hwe.init_threshold()
    tau = None
    for o in obs:
        state = hwe.update_threshold(state, o, decay=0.99)
        tau = o if tau is None else 0.99 * tau + 0.01 * o
        assert float(state.tau) == pytest.approx(tau, rel=1e-6)
    # A validation value (METHOD.md 2.3) serves the first step's counts only: the EMA starts
    # from the first training batch, then smooths from there.
    validation = hwe.init_threshold(1.5)
    assert float(validation.tau) == 1.5 and bool(validation.initialized)
    assert not bool(validation.ema_started)
    seeded = hwe.update_threshold(validation, 2.5)
    assert float(seeded.tau) == 2.5 and bool(seeded.ema_started)
    seeded = hwe.update_threshold(seeded, 0.5)
    assert float(seeded.tau) == pytest.approx(0.99 * 2.5 + 0.01 * 0.5)
    jitted = jax.jit(hwe.update_threshold)(hwe.init_threshold(), jnp.float32(4.0))
    assert float(jitted.tau) == 4.0 and bool(jitted.initialized)


@pytest.mark.parametrize("tau", [0.5, 1.2, 2.0])
def test_code_counts_match_released_loop(tau):
    entropy, mask, trigger = _responses(2, LENGTHS)
    out = hwe.hwe_counts(
        jnp.asarray(entropy, jnp.float32), jnp.asarray(mask), jnp.asarray(trigger), tau
    )
    for r, n in enumerate(LENGTHS):
        valid, invalid, soft = _ref_code_counts(entropy[r, :n], trigger[r, :n], tau)
        assert int(out.count[r]) == valid
        assert int(out.invalid[r]) == invalid
        assert float(out.soft_cost[r]) == pytest.approx(soft, rel=1e-5, abs=1e-5)
    assert np.asarray(out.positions).sum() == int(np.asarray(out.count).sum())
    # The relaxation region covers the w tokens after each counted trigger, inside the response.
    for r in range(len(LENGTHS)):
        expected = np.zeros(entropy.shape[1], bool)
        for i in np.flatnonzero(np.asarray(out.positions[r])):
            expected[i + 1 : i + 5] = True
        np.testing.assert_array_equal(out.window_mask[r], expected & mask[r])


def test_paper_counts():
    entropy, mask, trigger = _responses(3, LENGTHS)
    tau = 1.0
    e, m, tr = jnp.asarray(entropy, jnp.float32), jnp.asarray(mask), jnp.asarray(trigger)
    tok = hwe.hwe_counts(e, m, tr, tau, rule="paper_token")
    win = hwe.hwe_counts(e, m, None, tau, rule="paper_window", window=4, offset=0)
    for r, n in enumerate(LENGTHS):
        h, t = entropy[r, :n], trigger[r, :n]
        assert int(tok.count[r]) == sum(1 for i in range(n) if t[i] and h[i] >= tau)
        windows = [np.mean(h[i : i + 4]) for i in range(n - 3)]
        assert int(win.count[r]) == sum(1 for x in windows if x >= tau)
        assert int(win.invalid[r]) == 0


def test_counts_jit_and_sharded_equal_single_device():
    entropy, mask, trigger = _responses(4, LENGTHS)
    args = (jnp.asarray(entropy, jnp.float32), jnp.asarray(mask), jnp.asarray(trigger))

    def f(e, m, tr):
        tau = hwe.batch_threshold(e, m)
        return hwe.hwe_counts(e, m, tr, tau), tau

    single = jax.jit(f)(*args)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharded_args = [jax.device_put(a, NamedSharding(mesh, P("data", None))) for a in args]
    sharded = jax.jit(f)(*sharded_args)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6)


def test_bad_inputs():
    e = jnp.ones((2, 8), jnp.float32)
    m = jnp.ones((2, 8), bool)
    with pytest.raises(ValueError, match="rule='bogus'"):
        hwe.hwe_counts(e, m, m, 1.0, rule="bogus")
    with pytest.raises(ValueError, match="needs the trigger mask"):
        hwe.hwe_counts(e, m, None, 1.0)
    with pytest.raises(TypeError, match="trigger must be a bool"):
        hwe.hwe_counts(e, m, jnp.ones((2, 8), jnp.int32), 1.0)
    with pytest.raises(ValueError, match="tau must be a scalar"):
        hwe.hwe_counts(e, m, m, jnp.ones(2))
    with pytest.raises(ValueError, match="threshold='median'"):
        hwe.batch_threshold(e, m, threshold="median")
    with pytest.raises(ValueError, match="entropy holds NaN"):
        hwe.batch_threshold(e.at[0, 3].set(jnp.nan), m)
