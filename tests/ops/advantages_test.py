"""Tests for ares_jax.ops.advantages against float64 NumPy loops (METHOD.md 4.5, 4.6, 4.10)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ares_jax.ops import advantages as adv_lib

# --------------------------------------------------------------------------- references


def ref_group_advantages(rewards, g, scale, eps=1e-6, lengths=None):
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    for start in range(0, len(rewards), g):
        group = rewards[start : start + g]
        mean = sum(group) / g
        if scale == "std":
            var = sum((r - mean) ** 2 for r in group) / (g - 1)
            std = var**0.5
        for j in range(g):
            i = start + j
            if all(r == group[0] for r in group):
                out[i] = 0.0
            elif scale == "std":
                out[i] = (rewards[i] - mean) / (std + eps)
            elif scale == "none":
                out[i] = rewards[i] - mean
            else:
                out[i] = (rewards[i] - mean) / float(lengths[i])
    return out


def ref_online_filter(rewards, g, low, high):
    rewards = np.asarray(rewards, np.float64)
    keep = []
    for start in range(0, len(rewards), g):
        mean = sum(rewards[start : start + g]) / g
        keep.append(low < mean < high)
    return np.array(keep)


def random_rewards(rng, groups, g):
    """Mixed rewards: accuracy in {0, 1} plus an entropy term, some groups constant."""
    rewards = rng.integers(0, 2, size=(groups, g)) + rng.uniform(-0.5, 0.6, size=(groups, g))
    rewards[0] = 1.0  # all correct, no shaping
    rewards[1] = 0.15  # all wrong with the same entropy gain
    if groups > 2:
        rewards[2] = rng.integers(0, 2, size=g)
    return rewards.reshape(-1)


# --------------------------------------------------------------------------- group_advantages


@pytest.mark.parametrize("g", [2, 4, 8])
@pytest.mark.parametrize("scale", ["std", "none", "length"])
def test_group_advantages_matches_reference(g, scale):
    rng = np.random.default_rng([g, len(scale)])
    rewards = random_rewards(rng, 6, g)
    lengths = rng.integers(1, 500, size=rewards.shape) if scale == "length" else None
    got = adv_lib.group_advantages(
        jnp.asarray(rewards, jnp.float32),
        g,
        scale=scale,
        lengths=None if lengths is None else jnp.asarray(lengths),
    )
    assert got.dtype == jnp.float32 and got.shape == rewards.shape
    want = ref_group_advantages(rewards.astype(np.float32), g, scale, lengths=lengths)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("scale", ["std", "none", "length"])
@pytest.mark.parametrize("value", [0.1, 0.3, 1.0, -0.4991, 1.2345678])
def test_constant_groups_give_exactly_zero(scale, value):
    rewards = jnp.full((16,), value, jnp.float32)
    lengths = jnp.arange(1, 17) if scale == "length" else None
    got = adv_lib.group_advantages(rewards, 8, scale=scale, lengths=lengths)
    assert np.all(np.asarray(got) == 0.0)


def test_std_is_unbiased_and_eps_is_used():
    got = adv_lib.group_advantages(jnp.array([0.0, 1.0]), 2, eps=0.5)
    std = np.sqrt(0.5)  # unbiased: ((0.5^2 + 0.5^2) / 1) ** 0.5
    np.testing.assert_allclose(np.asarray(got), [-0.5 / (std + 0.5), 0.5 / (std + 0.5)], rtol=1e-6)


def test_group_size_one():
    with pytest.raises(ValueError, match="scale='std' needs group_size >= 2"):
        adv_lib.group_advantages(jnp.ones(4), 1)
    got = adv_lib.group_advantages(jnp.arange(4.0), 1, scale="none")
    assert np.all(np.asarray(got) == 0.0)


def test_bf16_rewards_are_computed_in_float32():
    rng = np.random.default_rng(7)
    rewards = jnp.asarray(random_rewards(rng, 4, 8), jnp.bfloat16)
    got = adv_lib.group_advantages(rewards, 8)
    assert got.dtype == jnp.float32
    want = ref_group_advantages(np.asarray(rewards.astype(jnp.float32)), 8, "std")
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)
    assert np.all(np.isfinite(np.asarray(got)))


def test_jit_equals_eager():
    rng = np.random.default_rng(11)
    rewards = jnp.asarray(random_rewards(rng, 5, 8), jnp.float32)
    lengths = jnp.asarray(rng.integers(1, 100, size=rewards.shape))
    for scale, lens in (("std", None), ("none", None), ("length", lengths)):
        eager = adv_lib.group_advantages(rewards, 8, scale=scale, lengths=lens)
        jitted = jax.jit(lambda r, ln, s=scale: adv_lib.group_advantages(r, 8, scale=s, lengths=ln))
        np.testing.assert_array_equal(np.asarray(jitted(rewards, lens)), np.asarray(eager))


def _data_sharding():
    return NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))


def test_sharded_equals_single_device():
    rng = np.random.default_rng(12)
    rewards = jnp.asarray(random_rewards(rng, 16, 8), jnp.float32)  # 128 = 8 devices x 16
    lengths = jnp.asarray(rng.integers(1, 100, size=rewards.shape))
    sharding = _data_sharding()
    for scale, lens in (("std", None), ("length", lengths)):
        single = adv_lib.group_advantages(rewards, 8, scale=scale, lengths=lens)
        fn = jax.jit(lambda r, ln, s=scale: adv_lib.group_advantages(r, 8, scale=s, lengths=ln))
        lens_sh = None if lens is None else jax.device_put(lens, sharding)
        sharded = fn(jax.device_put(rewards, sharding), lens_sh)
        np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-6, atol=1e-7)
    keep = jax.jit(lambda r: adv_lib.online_filter(r, 8))(jax.device_put(rewards, sharding))
    np.testing.assert_array_equal(np.asarray(keep), np.asarray(adv_lib.online_filter(rewards, 8)))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(rewards=jnp.ones((2, 8))), ValueError, "rewards must have rank 1"),
        (dict(rewards=jnp.ones(8, jnp.int32)), TypeError, "rewards must be a floating"),
        (dict(rewards=jnp.ones(12)), ValueError, "do not split into groups of 8"),
        (dict(scale="zscore"), ValueError, "scale='zscore' is not one of 'length', 'none', 'std'"),
        (dict(scale="length"), ValueError, "scale='length' needs lengths"),
        (dict(scale="length", lengths=jnp.ones(4)), ValueError, "lengths has shape"),
        (dict(scale="length", lengths=jnp.zeros(16)), ValueError, "lengths must all be > 0"),
        (dict(scale="length", lengths=jnp.ones(16, bool)), TypeError, "lengths must be a numeric"),
        (dict(lengths=jnp.ones(16)), ValueError, "lengths is only used by scale='length'"),
        (dict(group_size=0, scale="none"), ValueError, "group_size must be an integer >= 1"),
    ],
)
def test_group_advantages_bad_inputs(kwargs, error, match):
    args = dict(rewards=jnp.ones(16), group_size=8)
    args.update(kwargs)
    rewards, group_size = args.pop("rewards"), args.pop("group_size")
    with pytest.raises(error, match=match):
        adv_lib.group_advantages(rewards, group_size, **args)


# --------------------------------------------------------------------------- online_filter


def test_online_filter_matches_reference():
    rng = np.random.default_rng(3)
    rewards = random_rewards(rng, 12, 8)
    rewards[24:32] = 0.0  # all wrong, no entropy gain: dropped
    rewards[32:40] = np.r_[np.ones(7), 0.0]  # mean 0.875: kept
    got = adv_lib.online_filter(jnp.asarray(rewards, jnp.float32), 8)
    assert got.dtype == jnp.bool_ and got.shape == (12,)
    np.testing.assert_array_equal(np.asarray(got), ref_online_filter(rewards, 8, 0.01, 0.99))
    assert not got[0] and got[1] and not got[3] and got[4]  # 1.0 dropped, 0.15 kept (METHOD 4.5)


def test_online_filter_bounds_are_strict():
    rewards = jnp.array([0.25, 0.25, 0.5, 0.5, 0.75, 0.75])
    np.testing.assert_array_equal(
        np.asarray(adv_lib.online_filter(rewards, 2, low=0.25, high=0.75)), [False, True, False]
    )
    with pytest.raises(ValueError, match="low must be < high"):
        adv_lib.online_filter(rewards, 2, low=0.5, high=0.5)
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        adv_lib.online_filter(rewards, 4)


# --------------------------------------------------------------------------- token_advantages


def test_token_advantages():
    adv = jnp.array([1.5, -2.0, 0.25], jnp.bfloat16)
    mask = jnp.array([[1, 1, 0], [0, 0, 0], [1, 1, 1]], bool)
    got = adv_lib.token_advantages(adv, mask)
    want = np.array([[1.5, 1.5, 0], [0, 0, 0], [0.25, 0.25, 0.25]])
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(ValueError, match="advantages has 2 rows but mask has 3"):
        adv_lib.token_advantages(adv[:2], mask)
    with pytest.raises(TypeError, match="mask must be a bool"):
        adv_lib.token_advantages(adv, mask.astype(jnp.float32))
