"""Tests for ares_jax/rewards/buckets.py against float64 pure-Python transcriptions of METHOD.md."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ares_jax.rewards import buckets

# ---------------------------------------------------------------------------------------------
# References (METHOD.md 4.2 and 4.4.2 "Targets and weights in code"), plain Python loops.


def ref_buckets(correct, group_size):
    """acc_rate >= 2/3 easy, >= 1/3 medium, else hard; exact rationals."""
    out = []
    for start in range(0, len(correct), group_size):
        rate = Fraction(int(sum(bool(c) for c in correct[start : start + group_size])), group_size)
        out.append(0 if rate >= Fraction(2, 3) else 1 if rate >= Fraction(1, 3) else 2)
    return out


def ref_update(target, alpha, bucket_per_group, n_hwe, group_size, lr, lo, hi, scale):
    target, alpha = list(map(float, target)), list(map(float, alpha))
    prompt_means = {0: [], 1: [], 2: []}
    for p, d in enumerate(bucket_per_group):
        rollouts = [float(x) for x in n_hwe[p * group_size : (p + 1) * group_size]]
        prompt_means[int(d)].append(sum(rollouts) / group_size)
    counts, means = [], []
    for d in range(3):
        vals = prompt_means[d]
        counts.append(len(vals))
        if not vals:
            means.append(0.0)
            continue
        mean = sum(vals) / len(vals)
        means.append(mean)
        new_target = round(scale[d] * mean)  # Python round: half to even
        step = (mean - new_target) if d in (0, 1) else (new_target - mean)
        target[d] = float(new_target)
        alpha[d] = min(max(alpha[d] + lr * step, lo), hi)
    return target, alpha, counts, means


# ---------------------------------------------------------------------------------------------
# difficulty_buckets


@pytest.mark.parametrize("group_size", [1, 2, 3, 5, 8, 16])
def test_bucket_boundaries_every_pass_count(group_size):
    rng = np.random.default_rng(group_size)
    correct = []
    for c in range(group_size + 1):
        group = np.zeros(group_size, bool)
        group[rng.permutation(group_size)[:c]] = True
        correct.extend(group.tolist())
    correct = np.array(correct)
    got = buckets.difficulty_buckets(jnp.asarray(correct), group_size)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), ref_buckets(correct, group_size))
    # 0/1 floats and ints give the same buckets as bools.
    for dtype in (jnp.float32, jnp.int32):
        got_num = buckets.difficulty_buckets(jnp.asarray(correct, dtype), group_size)
        np.testing.assert_array_equal(np.asarray(got_num), np.asarray(got))


def test_group_of_eight_matches_paper_counts():
    correct = np.concatenate([np.arange(8) < c for c in range(9)])
    got = np.asarray(buckets.difficulty_buckets(jnp.asarray(correct), 8))
    expected = [2, 2, 2, 1, 1, 1, 0, 0, 0]  # c <= 2 hard, 3..5 medium, >= 6 easy (METHOD 4.2)
    np.testing.assert_array_equal(got, expected)


def test_random_groups_and_per_response():
    rng = np.random.default_rng(0)
    correct = rng.random(8 * 40) < 0.5
    got = buckets.difficulty_buckets(jnp.asarray(correct), 8)
    np.testing.assert_array_equal(np.asarray(got), ref_buckets(correct, 8))
    per = buckets.per_response(got, 8)
    assert per.shape == (320,)
    np.testing.assert_array_equal(np.asarray(per), np.repeat(np.asarray(got), 8))


def test_bucket_constants():
    assert (buckets.EASY, buckets.MEDIUM, buckets.HARD, buckets.NUM_BUCKETS) == (0, 1, 2, 3)


# ---------------------------------------------------------------------------------------------
# init_bucket_targets / update_bucket_targets


def test_init_bucket_targets():
    state = buckets.init_bucket_targets()
    np.testing.assert_array_equal(np.asarray(state.alpha), [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(np.asarray(state.target), [0.0, 0.0, 0.0])
    assert state.alpha.dtype == state.target.dtype == jnp.float32
    state = buckets.init_bucket_targets(alpha_init=0.3, target_init=12.0)
    np.testing.assert_array_equal(np.asarray(state.target), [12.0] * 3)


def _run_update(state, bpg, n_hwe, g, **kw):
    new, stats = buckets.update_bucket_targets(state, jnp.asarray(bpg), jnp.asarray(n_hwe), g, **kw)
    return new, stats


@pytest.mark.parametrize("seed", range(6))
def test_update_matches_reference_with_empty_buckets(seed):
    rng = np.random.default_rng(seed)
    g = int(rng.choice([4, 5, 8]))
    num_prompts = int(rng.integers(1, 12))
    present = rng.permutation(3)[: rng.integers(1, 4)]  # some buckets empty
    bpg = rng.choice(present, size=num_prompts).astype(np.int32)
    n_hwe = rng.integers(0, 120, size=num_prompts * g)
    if seed % 2:
        n_hwe = n_hwe + rng.random(n_hwe.shape).round(2)  # float counts too
        n_hwe = n_hwe.astype(np.float32)
    kw = dict(
        alpha_lr=float(rng.choice([0.05, 0.4])),
        alpha_min=0.0,
        alpha_max=float(rng.choice([0.6, 2.0])),
        target_scale=tuple(rng.choice([1.0, 0.8, 1.3], size=3).tolist()),
    )
    state = buckets.BucketTargets(
        target=jnp.asarray(rng.integers(0, 80, 3), jnp.float32),
        alpha=jnp.asarray(rng.uniform(0.1, 1.0, 3), jnp.float32),
    )
    new, stats = _run_update(state, bpg, n_hwe, g, **kw)
    t, a, counts, means = ref_update(
        np.asarray(state.target),
        np.asarray(state.alpha),
        bpg,
        n_hwe,
        g,
        kw["alpha_lr"],
        kw["alpha_min"],
        kw["alpha_max"],
        kw["target_scale"],
    )
    np.testing.assert_array_equal(np.asarray(stats.count), counts)
    np.testing.assert_allclose(np.asarray(stats.mean), means, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(new.target), t)
    np.testing.assert_allclose(np.asarray(new.alpha), a, rtol=1e-5, atol=1e-6)
    for d in set(range(3)) - set(present.tolist()):  # untouched buckets
        assert new.target[d] == state.target[d] and new.alpha[d] == state.alpha[d]


def test_update_rounds_half_to_even():
    # One prompt per bucket, G = 2: means 2.5 (easy), 3.5 (medium), 4.5 (hard).
    bpg = np.array([0, 1, 2], np.int32)
    n_hwe = np.array([2, 3, 3, 4, 4, 5], np.int32)
    new, stats = _run_update(buckets.init_bucket_targets(), bpg, n_hwe, 2)
    np.testing.assert_array_equal(np.asarray(stats.mean), [2.5, 3.5, 4.5])
    np.testing.assert_array_equal(np.asarray(new.target), [2.0, 4.0, 4.0])
    # easy: 0.5 + 0.05*(2.5-2); medium: 0.5 + 0.05*(3.5-4); hard: 0.5 + 0.05*(4-4.5)
    np.testing.assert_allclose(np.asarray(new.alpha), [0.525, 0.475, 0.475], rtol=1e-6)


def test_update_clips_alpha():
    bpg = np.array([0, 2], np.int32)
    n_hwe = np.array([10, 10, 10, 20], np.int32)  # easy mean 10, hard mean 15
    state = buckets.init_bucket_targets(alpha_init=0.5)
    new, _ = _run_update(state, bpg, n_hwe, 2, alpha_lr=10.0, target_scale=(0.5, 1.0, 2.0))
    # easy: 0.5 + 10*(10-5) -> clipped to 2; hard: 0.5 + 10*(30-15) -> clipped to 2.
    np.testing.assert_array_equal(np.asarray(new.alpha), [2.0, 0.5, 2.0])
    new, _ = _run_update(state, bpg, n_hwe, 2, alpha_lr=10.0, target_scale=(2.0, 1.0, 0.5))
    np.testing.assert_array_equal(np.asarray(new.alpha), [0.0, 0.5, 0.0])


def test_padding_groups_marked_invalid_count_nowhere():
    # 3 real prompts (G = 2), padded to 6 with prompts of bucket 0 and large counts.
    bpg = np.array([0, 2, 2], np.int32)
    n_hwe = np.array([4, 6, 1, 2, 3, 3], np.int32)
    state = buckets.BucketTargets(
        target=jnp.asarray([7.0, 9.0, 1.0]), alpha=jnp.asarray([0.3, 0.6, 0.9])
    )
    real, real_stats = _run_update(state, bpg, n_hwe, 2)
    padded_bpg = np.concatenate([bpg, np.zeros(3, np.int32)])
    padded_hwe = np.concatenate([n_hwe, np.full(6, 50, np.int32)])
    valid = np.arange(6) < 3
    new, stats = _run_update(state, padded_bpg, padded_hwe, 2, valid=jnp.asarray(valid))
    jax.tree.map(np.testing.assert_array_equal, (new, stats), (real, real_stats))
    np.testing.assert_array_equal(np.asarray(stats.count), [1, 0, 2])
    np.testing.assert_array_equal(np.asarray(new.target), [5.0, 9.0, 2.0])  # medium: kept
    with pytest.raises(TypeError, match="update_bucket_targets: valid must be a bool array"):
        _run_update(state, padded_bpg, padded_hwe, 2, valid=jnp.ones(6, jnp.int32))
    with pytest.raises(ValueError, match="valid has shape"):
        _run_update(state, padded_bpg, padded_hwe, 2, valid=jnp.ones(5, bool))


# ---------------------------------------------------------------------------------------------
# jit and sharding


def _inputs(seed=3, prompts=16, g=8):
    rng = np.random.default_rng(seed)
    correct = rng.random(prompts * g) < rng.random(prompts).repeat(g)
    n_hwe = rng.integers(0, 90, prompts * g).astype(np.int32)
    return jnp.asarray(correct), jnp.asarray(n_hwe)


def _pipeline(correct, n_hwe, state):
    bpg = buckets.difficulty_buckets(correct, 8)
    new, stats = buckets.update_bucket_targets(state, bpg, n_hwe, 8)
    return bpg, buckets.per_response(bpg, 8), new, stats


def test_jit_equals_eager():
    correct, n_hwe = _inputs()
    state = buckets.init_bucket_targets()
    eager = _pipeline(correct, n_hwe, state)
    jitted = jax.jit(_pipeline)(correct, n_hwe, state)
    jax.tree.map(np.testing.assert_array_equal, eager, jitted)


def test_sharded_equals_single_device():
    assert len(jax.devices()) == 8
    correct, n_hwe = _inputs(prompts=32)
    state = buckets.init_bucket_targets()
    single = jax.jit(_pipeline)(correct, n_hwe, state)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    shard = NamedSharding(mesh, P("data"))
    sharded = jax.jit(_pipeline)(
        jax.device_put(correct, shard), jax.device_put(n_hwe, shard), state
    )
    assert len(sharded[1].sharding.device_set) == 8
    jax.tree.map(np.testing.assert_array_equal, single, sharded)


# ---------------------------------------------------------------------------------------------
# errors


def test_errors_name_the_argument():
    state = buckets.init_bucket_targets()
    with pytest.raises(ValueError, match="do not split into groups of 8"):
        buckets.difficulty_buckets(jnp.ones(12, bool), 8)
    with pytest.raises(ValueError, match="group_size must be an integer >= 1"):
        buckets.difficulty_buckets(jnp.ones(8, bool), 0)
    with pytest.raises(ValueError, match="correct must have rank 1"):
        buckets.difficulty_buckets(jnp.ones((2, 8), bool), 8)
    with pytest.raises(TypeError, match="correct must be bool or 0/1 numbers"):
        buckets.difficulty_buckets(np.array(["a"] * 8), 8)
    with pytest.raises(ValueError, match="bucket_per_group has 3 prompts"):
        buckets.update_bucket_targets(state, jnp.zeros(3, jnp.int32), jnp.zeros(16), 8)
    with pytest.raises(ValueError, match="bucket_per_group must hold bucket ids"):
        buckets.update_bucket_targets(state, jnp.array([0, 3]), jnp.zeros(16), 8)
    with pytest.raises(TypeError, match="bucket_per_group must be an integer array"):
        buckets.update_bucket_targets(state, jnp.array([0.0, 1.0]), jnp.zeros(16), 8)
    with pytest.raises(ValueError, match="n_hwe holds NaN"):
        buckets.update_bucket_targets(state, jnp.array([0, 1]), jnp.zeros(16).at[3].set(jnp.nan), 8)
    with pytest.raises(ValueError, match="target_scale must have 3 entries"):
        buckets.update_bucket_targets(
            state, jnp.array([0, 1]), jnp.zeros(16), 8, target_scale=(1.0, 1.0)
        )
    with pytest.raises(ValueError, match="do not split into groups of 8"):
        buckets.update_bucket_targets(state, jnp.array([0, 1]), jnp.zeros(15), 8)
