"""The rollout's refusal of broken sampler output (NaN or inf entropies or log-probs)."""

from types import SimpleNamespace

import numpy as np
import pytest

from ares_jax.aepo import rollout as RO


def _out(entropy, logp, mask):
    return SimpleNamespace(entropy=entropy, logp=logp, mask=mask)


def test_non_finite_entropy_or_logp_inside_the_responses_is_named():
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    entropy = np.ones((2, 3), np.float32)
    logp = -np.ones((2, 3), np.float32)
    entropy[0, 2] = logp[1, 1] = np.nan  # past the ends: padding, ignored
    RO.check_finite(_out(entropy, logp, mask), {"rollout/entropy": entropy})
    entropy[1, 0] = np.inf
    with pytest.raises(RO.NonFiniteRollout, match=r"rollout/entropy is NaN or inf in 1 of 2"):
        RO.check_finite(_out(entropy, logp, mask), {"rollout/entropy": entropy})
    entropy[1, 0] = 1.0
    logp[0, 1] = np.nan
    with pytest.raises(RO.NonFiniteRollout) as e:
        RO.check_finite(_out(entropy, logp, mask), {"rollout/entropy": entropy})
    assert e.value.quantity == "rollout/sampler_logp" and e.value.rows == 1


def test_kept_groups_and_rows_are_padded_to_one_shape_with_the_same_results():
    """The online filter keeps a varying number of groups; the bucket targets and the threshold
    statistic see them padded to a multiple of prompts_per_iter groups (rows) and must not move."""
    from ares_jax.ops import hwe as H
    from ares_jax.rewards import buckets as BK

    s = SimpleNamespace(
        prompts_per_iter=8, alpha_lr=0.05, alpha_min=0.0, alpha_max=2.0, target_scale=(1, 1, 1)
    )
    rng = np.random.default_rng(0)
    state = BK.BucketTargets(
        target=np.asarray([3.0, 4.0, 5.0], np.float32), alpha=np.full(3, 0.5, np.float32)
    )
    for kept in (3, 5, 8, 11):  # 11: past one multiple (groups of a second try)
        groups = [np.arange(4 * i, 4 * i + 4) for i in range(kept)]
        bucket = rng.integers(0, 3, kept).astype(np.int32)
        n_hwe = rng.integers(0, 9, 4 * kept).astype(np.float32)
        got, _ = RO._targets(state, bucket, n_hwe, groups, s)
        means = n_hwe.reshape(kept, 4).mean(1)
        want, _ = BK.update_bucket_targets(state, bucket, means, 1)
        np.testing.assert_array_equal(np.asarray(got.target), np.asarray(want.target))
        np.testing.assert_allclose(np.asarray(got.alpha), np.asarray(want.alpha), rtol=1e-6)
        assert RO._fixed_size(kept, 8) == (8 if kept <= 8 else 16)

        entropy = rng.random((4 * kept, 12)).astype(np.float32)
        mask = np.arange(12)[None] < rng.integers(1, 13, (4 * kept, 1))
        size = RO._fixed_size(4 * kept, 32)
        padded = H.batch_threshold(RO._padded(entropy, size), RO._padded(mask, size))
        assert float(padded) == float(H.batch_threshold(entropy, mask))
