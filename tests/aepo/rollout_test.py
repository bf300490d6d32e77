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
