"""Tests of ares_jax.ops.entropy against float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ares_jax.ops.entropy import (
    dense_logprobs_and_entropy,
    token_logprobs_and_entropy,
    topk_and_sampled_logprobs,
    topk_entropy,
    window_entropy,
)


def _reference(h, w, y, temperature):
    """float64 NumPy: target log-prob and entropy per position."""
    z = np.einsum("btd,dv->btv", np.asarray(h, np.float64), np.asarray(w, np.float64))
    z = z / temperature
    m = z.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
    logp_all = z - lse[..., None]
    p = np.exp(logp_all)
    entropy = -(p * logp_all).sum(-1)
    logp = np.take_along_axis(logp_all, np.asarray(y)[..., None], -1)[..., 0]
    return logp, entropy


def _inputs(seed, b=3, t=11, d=16, v=53, dtype=jnp.float32, scale=1.0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(b, t, d)) * scale, dtype)
    w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dtype)
    y = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    return h, w, y


@pytest.mark.parametrize(
    "chunk_size,vocab_chunk_size,temperature",
    [(None, None, 1.0), (4, None, 1.0), (5, 10, 0.7), (11, 53, 1.3), (1, 7, 2.0), (64, 9, 1.0)],
)
def test_values_match_float64_reference(chunk_size, vocab_chunk_size, temperature):
    h, w, y = _inputs(seed=hash((chunk_size, vocab_chunk_size)) % 1000, scale=3.0)
    logp, ent = token_logprobs_and_entropy(
        h, w, y, temperature=temperature, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size
    )
    assert logp.dtype == jnp.float32 and ent.dtype == jnp.float32
    ref_logp, ref_ent = _reference(h, w, y, temperature)
    np.testing.assert_allclose(logp, ref_logp, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=2e-5)


def test_bf16_inputs_computed_in_float32():
    h, w, y = _inputs(seed=3, dtype=jnp.bfloat16, scale=2.0)
    logp, ent = token_logprobs_and_entropy(h, w, y, chunk_size=4, vocab_chunk_size=16)
    assert logp.dtype == jnp.float32
    # Reference on the same bf16-rounded inputs: only float32 accumulation differs.
    ref_logp, ref_ent = _reference(h.astype(jnp.float32), w.astype(jnp.float32), y, 1.0)
    np.testing.assert_allclose(logp, ref_logp, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ent, ref_ent, rtol=1e-4, atol=1e-4)


def _loss(fn, h, w, y, gl, ge):
    logp, ent = fn(h, w, y)
    return jnp.sum(logp * gl) + jnp.sum(ent * ge)


@pytest.mark.parametrize("chunk_size,vocab_chunk_size,temperature", [(4, None, 1.0), (3, 8, 0.6)])
def test_gradients_match_dense_autodiff(chunk_size, vocab_chunk_size, temperature):
    h, w, y = _inputs(seed=11, scale=2.0)
    rng = np.random.default_rng(12)
    gl = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    ge = jnp.asarray(rng.normal(size=y.shape), jnp.float32)

    def chunked(h, w, y):
        return token_logprobs_and_entropy(
            h,
            w,
            y,
            temperature=temperature,
            chunk_size=chunk_size,
            vocab_chunk_size=vocab_chunk_size,
        )

    def dense(h, w, y):
        return dense_logprobs_and_entropy(h, w, y, temperature=temperature)

    g_chunk = jax.grad(_loss, argnums=(1, 2))(chunked, h, w, y, gl, ge)
    g_dense = jax.grad(_loss, argnums=(1, 2))(dense, h, w, y, gl, ge)
    for a, b in zip(g_chunk, g_dense, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_gradient_matches_float64_finite_differences():
    h, w, y = _inputs(seed=21, b=2, t=5, d=6, v=17, scale=2.0)
    rng = np.random.default_rng(22)
    gl = rng.normal(size=y.shape)
    ge = rng.normal(size=y.shape)
    temperature = 0.8

    def ref_loss(h64, w64):
        logp, ent = _reference(h64, w64, y, temperature)
        return float((logp * gl).sum() + (ent * ge).sum())

    def fn(h, w, y):
        return token_logprobs_and_entropy(
            h, w, y, temperature=temperature, chunk_size=2, vocab_chunk_size=5
        )

    dh, dw = jax.grad(_loss, argnums=(1, 2))(fn, h, w, y, jnp.asarray(gl), jnp.asarray(ge))
    h64, w64 = np.asarray(h, np.float64), np.asarray(w, np.float64)
    eps = 1e-6
    for _ in range(4):  # directional derivatives along random directions
        uh, uw = rng.normal(size=h64.shape), rng.normal(size=w64.shape)
        fd = (
            ref_loss(h64 + eps * uh, w64 + eps * uw) - ref_loss(h64 - eps * uh, w64 - eps * uw)
        ) / (2 * eps)
        ours = float(np.sum(np.asarray(dh) * uh) + np.sum(np.asarray(dw) * uw))
        assert ours == pytest.approx(fd, rel=1e-4, abs=1e-4)


def test_bf16_gradients_close_to_float32():
    h, w, y = _inputs(seed=5, scale=2.0)
    ones = jnp.ones(y.shape, jnp.float32)

    def fn(h, w, y):
        return token_logprobs_and_entropy(h, w, y, chunk_size=4)

    g32 = jax.grad(_loss, argnums=(1, 2))(fn, h, w, y, ones, ones)
    g16 = jax.grad(_loss, argnums=(1, 2))(
        fn, h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), y, ones, ones
    )
    for a, b in zip(g16, g32, strict=True):
        assert a.dtype == jnp.bfloat16
        err = np.abs(np.asarray(a, np.float32) - np.asarray(b)).max()
        assert err <= 0.05 * np.abs(np.asarray(b)).max()


def test_jit_equals_eager_and_chunking_never_materialises_full_logits():
    b, t, d, v = 2, 64, 16, 1000
    h, w, y = _inputs(seed=7, b=b, t=t, d=d, v=v)

    def f(h, w):
        logp, ent = token_logprobs_and_entropy(h, w, y, chunk_size=8, vocab_chunk_size=250)
        return jnp.sum(logp) + jnp.sum(ent)

    eager = token_logprobs_and_entropy(h, w, y, chunk_size=8, vocab_chunk_size=250)
    jitted = jax.jit(
        lambda h, w: token_logprobs_and_entropy(h, w, y, chunk_size=8, vocab_chunk_size=250)
    )(h, w)
    for a, c in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)

    # XLA's temp memory of forward+backward stays well below one [B, T, V] float32 array (it
    # holds the [D, V] gradient accumulator and one chunk of logits); the dense version needs more.
    def temp_bytes(fn):
        compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(h, w).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    def g(h, w):
        logp, ent = dense_logprobs_and_entropy(h, w, y)
        return jnp.sum(logp) + jnp.sum(ent)

    full_logits = b * t * v * 4
    assert temp_bytes(f) < full_logits / 2
    assert temp_bytes(g) > full_logits


def test_sharded_equals_single_device():
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = Mesh(devices, ("data", "tensor"))
    h, w, y = _inputs(seed=9, b=4, t=12, d=16, v=64)

    def f(h, w, y):
        logp, ent = token_logprobs_and_entropy(h, w, y, chunk_size=4)
        return (
            logp,
            ent,
            jax.grad(
                lambda h, w: jnp.sum(token_logprobs_and_entropy(h, w, y, chunk_size=4)[1]),
                argnums=(0, 1),
            )(h, w),
        )

    single = jax.jit(f)(h, w, y)
    hs = jax.device_put(h, NamedSharding(mesh, P("data", None, None)))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, "tensor")))
    ys = jax.device_put(y, NamedSharding(mesh, P("data", None)))
    sharded = jax.jit(f)(hs, ws, ys)
    for a, c in zip(jax.tree.leaves(single), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "args,match",
    [
        (dict(hidden=np.zeros((2, 3), np.float32)), "hidden must have rank 3"),
        (dict(unembed=np.zeros((4, 5, 6), np.float32)), "unembed must have rank 2"),
        (dict(targets=np.zeros((2, 3), np.float32)), "targets must be an integer"),
        (dict(hidden=np.zeros((2, 3, 4), np.int32)), "hidden must be a floating"),
        (dict(unembed=np.zeros((5, 7), np.float32)), "unembed has 5 rows"),
        (dict(targets=np.zeros((2, 4), np.int32)), r"targets has shape \(2, 4\)"),
        (dict(temperature=0.0), "temperature must be"),
    ],
)
def test_bad_inputs_fail_clearly(args, match):
    kwargs = dict(
        hidden=np.zeros((2, 3, 4), np.float32),
        unembed=np.zeros((4, 7), np.float32),
        targets=np.zeros((2, 3), np.int32),
    )
    kwargs.update(args)
    temperature = kwargs.pop("temperature", 1.0)
    with pytest.raises((ValueError, TypeError), match=match):
        token_logprobs_and_entropy(
            kwargs["hidden"], kwargs["unembed"], kwargs["targets"], temperature=temperature
        )


def test_topk_entropy_matches_released_estimators():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 40)) * 2
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = np.sort(logp, -1)[:, -10:]
    p = np.exp(top)
    raw = -(p * top).sum(-1)
    tail = np.maximum(0.0, 1.0 - p.sum(-1))
    corrected = raw - tail * np.log(np.maximum(tail, 1e-12))
    np.testing.assert_allclose(topk_entropy(jnp.asarray(top), tail=False), raw, rtol=1e-5)
    np.testing.assert_allclose(topk_entropy(jnp.asarray(top)), corrected, rtol=1e-5)
    # With the whole vocabulary the estimate is the exact entropy.
    exact = -(np.exp(logp) * logp).sum(-1)
    np.testing.assert_allclose(topk_entropy(jnp.asarray(logp)), exact, rtol=1e-5, atol=1e-6)


def _returned_set_reference(logp, token, k):
    """float64 NumPy: the log-probs vLLM returns for logprobs=k, built as an explicit id set, and
    the raw and tail-corrected estimates over it."""
    ids = list(np.argsort(-logp, kind="stable")[:k])  # lower id first on ties, like lax.top_k
    if token not in ids:
        ids.append(token)
    lp = logp[ids]
    p = np.exp(lp)
    raw = -(p * lp).sum()
    r = max(0.0, 1.0 - p.sum())
    return len(ids), raw, raw - r * np.log(max(r, 1e-12))


def test_topk_entropy_with_sampled_token_outside_and_inside():
    # Hand-computed: p = (0.4, 0.3, 0.2, 0.1), k = 2. Sampled id 3 (p = 0.1) is outside the top 2:
    # the returned set is {0.4, 0.3, 0.1}, left-over mass 0.2.
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    logp = np.log(probs)
    top, sampled, outside = topk_and_sampled_logprobs(jnp.asarray(logp, jnp.float32), 3, 2)
    assert bool(outside) and np.isclose(sampled, np.log(0.1))
    raw = -(0.4 * np.log(0.4) + 0.3 * np.log(0.3) + 0.1 * np.log(0.1))
    tail = raw - 0.2 * np.log(0.2)
    got_raw = topk_entropy(top, tail=False, extra_logprob=sampled, extra_valid=outside)
    got_tail = topk_entropy(top, extra_logprob=sampled, extra_valid=outside)
    np.testing.assert_allclose(got_raw, raw, rtol=1e-6)
    np.testing.assert_allclose(got_tail, tail, rtol=1e-6)
    assert _returned_set_reference(logp, 3, 2) == pytest.approx((3, raw, tail))
    # Sampled id 1 is inside the top 2: the old top-k-only value.
    top, sampled, outside = topk_and_sampled_logprobs(jnp.asarray(logp, jnp.float32), 1, 2)
    assert not bool(outside)
    raw_in = -(0.4 * np.log(0.4) + 0.3 * np.log(0.3))
    got = topk_entropy(top, tail=False, extra_logprob=sampled, extra_valid=outside)
    np.testing.assert_allclose(got, raw_in, rtol=1e-6)
    np.testing.assert_allclose(got, topk_entropy(top, tail=False), rtol=0)
    np.testing.assert_allclose(
        topk_entropy(top, extra_logprob=sampled, extra_valid=outside), topk_entropy(top), rtol=0
    )


def test_topk_entropy_with_sampled_token_random_rows():
    rng = np.random.default_rng(1)
    n, v, k = 64, 40, 10
    logits = rng.normal(size=(n, v)) * 2
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tokens = rng.integers(0, v, n)
    tokens[:8] = np.argsort(-logp[:8], axis=-1)[:, 3]  # some rows sample inside the top k
    top, sampled, outside = topk_and_sampled_logprobs(
        jnp.asarray(logp, jnp.float32), jnp.asarray(tokens, jnp.int32), k
    )
    refs = np.array([_returned_set_reference(logp[i], tokens[i], k) for i in range(n)])
    np.testing.assert_array_equal(np.asarray(outside), refs[:, 0] == k + 1)
    assert 0 < np.asarray(outside).sum() < n
    raw = topk_entropy(top, tail=False, extra_logprob=sampled, extra_valid=outside)
    tail = topk_entropy(top, extra_logprob=sampled, extra_valid=outside)
    np.testing.assert_allclose(raw, refs[:, 1], rtol=1e-5)
    np.testing.assert_allclose(tail, refs[:, 2], rtol=1e-5)
    # Under jit, with the invalid extra entries set to -inf: their value is ignored.
    masked = jnp.where(outside, sampled, -jnp.inf)
    fn = jax.jit(lambda t, e, m: topk_entropy(t, extra_logprob=e, extra_valid=m))
    np.testing.assert_allclose(fn(top, masked, outside), tail, rtol=1e-6)


def test_topk_entropy_tie_at_kth_value_depends_on_ids():
    # ids 1 and 2 tie at the k-th (2nd) value; top_k keeps the lower id, so sampling id 2 adds it
    # as the extra entry and sampling id 1 adds nothing.
    logp = jnp.log(jnp.asarray([[0.4, 0.2, 0.2, 0.2]] * 2))
    _, _, outside = topk_and_sampled_logprobs(logp, jnp.asarray([1, 2]), 2)
    np.testing.assert_array_equal(outside, [False, True])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(extra_logprob=jnp.zeros(3)), "together, or neither"),
        (dict(extra_valid=jnp.ones(3, bool)), "together, or neither"),
        (dict(extra_logprob=jnp.zeros(3), extra_valid=jnp.ones(3)), "extra_valid must be a bool"),
        (dict(extra_logprob=jnp.zeros(4), extra_valid=jnp.ones(4, bool)), "leading shape"),
    ],
)
def test_topk_entropy_extra_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        topk_entropy(jnp.zeros((3, 5)), **kwargs)


def test_topk_and_sampled_logprobs_errors():
    logp = jnp.zeros((3, 5))
    with pytest.raises(ValueError, match="tokens has shape"):
        topk_and_sampled_logprobs(logp, jnp.zeros(4, jnp.int32), 2)
    with pytest.raises(ValueError, match="k must be an int in"):
        topk_and_sampled_logprobs(logp, jnp.zeros(3, jnp.int32), 6)
    with pytest.raises(TypeError, match="tokens must be an integer"):
        topk_and_sampled_logprobs(logp, jnp.zeros(3), 2)


# ----------------------------------------------------------------------------------------------
# window_entropy
# ----------------------------------------------------------------------------------------------


def _window_reference(entropy, mask, window, offset):
    b, t = entropy.shape
    mean = np.zeros((b, t))
    valid = np.zeros((b, t), bool)
    for i in range(b):
        for j in range(t):
            idx = [j + offset + k for k in range(window)]
            if mask[i, j] and all(k < t and mask[i, k] for k in idx):
                valid[i, j] = True
                mean[i, j] = np.mean([entropy[i, k] for k in idx])
    return mean, valid


def _random_responses(rng, b, t, lengths=None):
    entropy = rng.gamma(1.0, 1.0, size=(b, t))
    if lengths is None:
        lengths = rng.integers(0, t + 1, size=b)
    mask = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
    entropy = np.where(mask, entropy, 123.0)  # garbage outside the mask must not matter
    return entropy, mask


@pytest.mark.parametrize("window,offset", [(4, 1), (4, 0), (1, 0), (1, 1), (8, 1), (3, 0)])
def test_window_entropy_matches_reference(window, offset):
    rng = np.random.default_rng(window * 10 + offset)
    # Lengths include empty rows, rows shorter than the window and full rows.
    entropy, mask = _random_responses(rng, 6, 20, lengths=[0, 2, window, window + 1, 13, 20])
    mean, valid = window_entropy(
        jnp.asarray(entropy, jnp.float32), jnp.asarray(mask), window=window, offset=offset
    )
    ref_mean, ref_valid = _window_reference(entropy, mask, window, offset)
    np.testing.assert_array_equal(valid, ref_valid)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=1e-6)
    # A response of length L has L - w - offset + 1 complete windows (none if shorter).
    lengths = mask.sum(1)
    np.testing.assert_array_equal(
        np.asarray(valid).sum(1), np.maximum(lengths - window - offset + 1, 0)
    )


def test_window_entropy_jit_and_bf16():
    rng = np.random.default_rng(1)
    entropy, mask = _random_responses(rng, 4, 16)
    f = jax.jit(lambda e, m: window_entropy(e, m, window=4, offset=1))
    a = f(jnp.asarray(entropy, jnp.float32), jnp.asarray(mask))
    b = window_entropy(jnp.asarray(entropy, jnp.bfloat16), jnp.asarray(mask))
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_allclose(a[0], b[0], rtol=1e-2)


def test_window_entropy_rejects_nan_at_response_tokens():
    entropy = np.ones((2, 6), np.float32)
    mask = np.ones((2, 6), bool)
    entropy[1, 3] = np.nan
    with pytest.raises(ValueError, match="entropy holds NaN"):
        window_entropy(jnp.asarray(entropy), jnp.asarray(mask))
    with pytest.raises(Exception, match="entropy holds NaN"):
        jax.block_until_ready(jax.jit(window_entropy)(jnp.asarray(entropy), jnp.asarray(mask)))
    # NaN outside the response is ignored.
    mask[1, 3:] = False
    mean, valid = window_entropy(jnp.asarray(entropy), jnp.asarray(mask))
    assert np.isfinite(np.asarray(mean)).all()


@pytest.mark.parametrize(
    "entropy,mask,kwargs,match",
    [
        (np.ones((2, 3, 1), np.float32), np.ones((2, 3, 1), bool), {}, "entropy must have rank 2"),
        (np.ones((2, 3), np.float32), np.ones((2, 3), np.int32), {}, "mask must be a bool"),
        (np.ones((2, 3), np.float32), np.ones((2, 4), bool), {}, "mask has shape"),
        (np.ones((2, 3), np.int32), np.ones((2, 3), bool), {}, "entropy must be a floating"),
        (np.ones((2, 3), np.float32), np.ones((2, 3), bool), dict(offset=2), "offset=2"),
        (np.ones((2, 3), np.float32), np.ones((2, 3), bool), dict(window=0), "window must be"),
    ],
)
def test_window_entropy_bad_inputs(entropy, mask, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        window_entropy(jnp.asarray(entropy), jnp.asarray(mask), **kwargs)
