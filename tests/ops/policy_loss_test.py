"""Tests for ares_jax.ops.policy_loss against float64 NumPy loops (METHOD.md 4.7)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ares_jax.ops import policy_loss as pl

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]

# --------------------------------------------------------------------------- reference


def ref_policy_loss(logp, old_logp, adv, mask, kl=None, kl_weight=None, clip_low=0.2,
                    clip_high=0.3, dual_clip=3.0, agg="seq-mean-token-mean",
                    clamp=20.0):  # fmt: skip
    """Token loops transcribing METHOD.md 4.7; returns a dict like LossTerms."""
    b, t = mask.shape
    out = dict.fromkeys(pl.LossTerms._fields, 0.0)
    for i in range(b):
        length = int(sum(mask[i]))
        pg_row = kl_row = 0.0
        for j in range(t):
            if not mask[i, j]:
                continue
            a = adv[i] if adv.ndim == 1 else adv[i, j]
            logratio = min(max(logp[i, j] - old_logp[i, j], -clamp), clamp)
            r = math.exp(logratio)
            pg1 = -a * r
            pg2 = -a * min(max(r, 1.0 - clip_low), 1.0 + clip_high)
            loss = max(pg1, pg2)
            if dual_clip is not None and a < 0:
                if loss > -dual_clip * a:
                    out["dual_clip_sum"] += 1
                loss = min(loss, -dual_clip * a)
            if pg2 > pg1:
                out["clip_high_sum" if r > 1 else "clip_low_sum"] += 1
            pg_row += loss
            if kl is not None:
                w = 1.0 if kl_weight is None else (
                    kl_weight[i] if kl_weight.ndim == 1 else kl_weight[i, j])  # fmt: skip
                kl_row += w * kl[i, j]
            out["token_count"] += 1
            out["ppo_kl_sum"] += -logratio
        if agg == "token-mean":
            out["denom"] += length
        elif length > 0:
            out["denom"] += 1
        norm = max(1, length) if agg == "seq-mean-token-mean" else 1
        out["pg_sum"] += pg_row / norm
        out["kl_sum"] += kl_row / norm
    out["loss_sum"] = out["pg_sum"] + out["kl_sum"]
    return out


def random_batch(seed, b=6, t=17, adv_per_token=False):
    rng = np.random.default_rng(seed)
    old = -rng.exponential(1.5, size=(b, t))
    logp = old + rng.normal(0.0, 0.4, size=(b, t))  # ratios well outside the clip range
    logp[0, 0] = old[0, 0] + 30.0  # hits the log-ratio clamp
    adv = rng.normal(size=(b, t) if adv_per_token else b)
    lengths = rng.integers(0, t + 1, size=b)
    lengths[1], lengths[2] = 0, t  # one padding row, one full row
    mask = np.arange(t)[None, :] < lengths[:, None]
    mask[0, 0] = True
    kl = np.abs(rng.normal(0.0, 0.05, size=(b, t)))
    return logp, old, adv, mask, kl, rng


def as_f32(*xs):
    return [jnp.asarray(x, jnp.float32) if x.dtype != bool else jnp.asarray(x) for x in xs]


def assert_terms_close(got, want, rtol=1e-5, atol=1e-5):
    assert isinstance(got, pl.LossTerms)
    for name in pl.LossTerms._fields:
        np.testing.assert_allclose(float(getattr(got, name)), want[name], rtol=rtol, atol=atol,
                                   err_msg=name)  # fmt: skip


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("adv_per_token", [False, True])
def test_policy_loss_matches_reference(agg, adv_per_token):
    logp, old, adv, mask, kl, rng = random_batch(
        AGGS.index(agg) + 10 * adv_per_token, adv_per_token=adv_per_token
    )
    weight = rng.uniform(0.005, 0.02, size=logp.shape[:1] if adv_per_token else logp.shape)
    for kwargs in (
        {},
        dict(kl=kl, kl_weight=weight),
        dict(kl=kl),
        dict(dual_clip=None, clip_low=0.1, clip_high=0.15),
        dict(logratio_clamp=1.0, dual_clip=1.5),
    ):
        jkw = {k: jnp.asarray(v, jnp.float32) if isinstance(v, np.ndarray) else v
               for k, v in kwargs.items()}  # fmt: skip
        got = pl.policy_loss(*as_f32(logp, old, adv, mask), agg=agg, **jkw)
        rkw = {"clamp" if k == "logratio_clamp" else k: v for k, v in kwargs.items()}
        want = ref_policy_loss(logp, old, adv, mask, agg=agg, **rkw)
        assert_terms_close(got, want)
    assert want["clip_high_sum"] > 0 and want["clip_low_sum"] > 0 and want["dual_clip_sum"] > 0


def test_defaults_and_metrics():
    logp, old, adv, mask, kl, _ = random_batch(1)
    got = pl.policy_loss(
        *as_f32(logp, old, adv, mask), kl=jnp.asarray(kl), kl_weight=jnp.full(6, 0.01)
    )
    want = ref_policy_loss(logp, old, adv, mask, kl=kl, kl_weight=np.full(6, 0.01))
    assert_terms_close(got, want)
    metrics = pl.loss_metrics(got)
    np.testing.assert_allclose(float(metrics["loss"]), want["loss_sum"] / want["denom"], rtol=1e-5)
    np.testing.assert_allclose(
        float(metrics["clip_frac_high"]), want["clip_high_sum"] / want["token_count"], rtol=1e-6
    )
    empty = pl.policy_loss(*as_f32(logp, old, adv, np.zeros_like(mask)))
    assert all(float(v) == 0.0 for v in empty) and all(
        float(v) == 0.0 for v in pl.loss_metrics(empty).values()
    )


def test_masked_positions_never_leak_nan():
    logp, old, adv, mask, kl, _ = random_batch(2)
    bad_logp = np.where(mask, logp, np.nan)
    bad_old = np.where(mask, old, -np.inf)
    bad_kl = np.where(mask, kl, np.inf)
    args = as_f32(bad_logp, bad_old, adv, mask)

    def loss(lp):
        terms = pl.policy_loss(lp, *args[1:], kl=jnp.asarray(bad_kl, jnp.float32))
        return terms.loss_sum / terms.denom

    value, grad = jax.value_and_grad(loss)(args[0])
    want = ref_policy_loss(logp, old, adv, mask, kl=kl)
    np.testing.assert_allclose(float(value), want["loss_sum"] / want["denom"], rtol=1e-5)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(grad)[~mask] == 0.0)
    assert np.all(np.asarray(grad)[1] == 0.0)  # the fully masked row


def test_bf16_inputs_computed_in_float32():
    logp, old, adv, mask, kl, _ = random_batch(3)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (logp, old, adv, kl)]
    got = pl.policy_loss(
        bf[0], bf[1], bf[2], jnp.asarray(mask), kl=bf[3], kl_weight=bf[2] * 0 + 0.01
    )
    assert all(v.dtype == jnp.float32 for v in got)
    f = [np.asarray(x.astype(jnp.float32), np.float64) for x in bf]
    want = ref_policy_loss(
        f[0], f[1], f[2], mask, kl=f[3], kl_weight=np.full(6, float(jnp.bfloat16(0.01)))
    )
    assert_terms_close(got, want)


# --------------------------------------------------------------------------- gradients


def ref_token_grad(logp, old, adv, mask, kl_grad_weight=None, clip_low=0.2, clip_high=0.3,
                   dual_clip=3.0, clamp=20.0):  # fmt: skip
    """Analytic d(token loss)/d logp: -A r where the unclipped branch is active, else 0."""
    g = np.zeros_like(logp)
    for i, j in zip(*np.nonzero(mask), strict=True):
        a = adv[i]
        d = logp[i, j] - old[i, j]
        r = math.exp(min(max(d, -clamp), clamp))
        pg1, pg2 = -a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high)
        unclipped = pg1 >= pg2 and abs(d) < clamp
        if dual_clip is not None and a < 0 and max(pg1, pg2) > -dual_clip * a:
            unclipped = False
        g[i, j] = -a * r if unclipped else 0.0
        if kl_grad_weight is not None:
            g[i, j] += kl_grad_weight[i, j]
    return g


@pytest.mark.parametrize("agg", AGGS)
def test_gradient_analytic(agg):
    logp, old, adv, mask, kl, _ = random_batch(4 + AGGS.index(agg))
    ref_logp = logp - 0.1

    def loss(lp, use_kl):
        kw = {}
        if use_kl:
            kw = dict(kl=lp - jnp.asarray(ref_logp, jnp.float32), kl_weight=jnp.full(6, 0.05))  # k1
        terms = pl.policy_loss(lp, *as_f32(old, adv, mask), agg=agg, **kw)
        return terms.loss_sum

    lengths = mask.sum(1, keepdims=True)
    norm = np.maximum(lengths, 1) if agg == "seq-mean-token-mean" else np.ones_like(lengths)
    for use_kl in (False, True):
        got = jax.grad(loss)(jnp.asarray(logp, jnp.float32), use_kl)
        kl_w = np.full(logp.shape, 0.05) if use_kl else None
        want = ref_token_grad(logp, old, adv, mask, kl_w) / norm
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("agg", AGGS)
def test_gradient_finite_difference_float64(agg):
    logp, old, adv, mask, kl, _ = random_batch(7 + AGGS.index(agg), adv_per_token=True)
    with jax.enable_x64(True):
        old64, adv64, mask_j = jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask)
        ref64 = jnp.asarray(logp - 0.3)

        def loss(lp):
            from ares_jax.ops.kl import kl_divergence

            terms = pl.policy_loss(lp, old64, adv64, mask_j, kl=kl_divergence(lp, ref64),
                                   kl_weight=jnp.full(lp.shape, 0.1), agg=agg)  # fmt: skip
            return terms.loss_sum / terms.denom

        lp64 = jnp.asarray(logp, jnp.float64)
        grad = np.asarray(jax.grad(loss)(lp64))
        assert grad.dtype == np.float64
        h = 1e-6
        for i, j in list(zip(*np.nonzero(mask), strict=True))[::5]:
            if i == 0 and j == 0:
                continue  # at the clamp: the loss is flat, finite differences too
            e = np.zeros_like(logp)
            e[i, j] = h
            fd = (float(loss(lp64 + e)) - float(loss(lp64 - e))) / (2 * h)
            np.testing.assert_allclose(grad[i, j], fd, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("agg", AGGS)
def test_micro_batch_accumulation_is_exact(agg):
    logp, old, adv, mask, kl, rng = random_batch(20 + AGGS.index(agg), b=8)
    weight = rng.uniform(0.005, 0.02, size=8)
    lp, *rest = as_f32(logp, old, adv, mask, kl, weight)

    @jax.jit
    def step(lp, o, a, m, k, w, denom_total):
        """Terms and grad of loss_sum / denom_total, as a trainer accumulates them."""

        def scaled(x):
            terms = pl.policy_loss(x, o, a, m, kl=k, kl_weight=w, agg=agg)
            return terms.loss_sum / denom_total, terms

        return jax.grad(scaled, has_aux=True)(lp)

    full_grad, full = step(lp, *rest, pl.loss_denominator(rest[2], agg=agg))
    splits = [slice(0, 3), slice(3, 4), slice(4, 8)]
    denom_total = sum(pl.loss_denominator(rest[2][s], agg=agg) for s in splits)
    np.testing.assert_allclose(float(denom_total), float(full.denom))
    parts = [step(lp[s], *(x[s] for x in rest), denom_total) for s in splits]
    summed = jax.tree.map(lambda *xs: sum(xs), *[terms for _, terms in parts])
    grad = np.concatenate([g for g, _ in parts])
    np.testing.assert_allclose(grad, np.asarray(full_grad), rtol=1e-6, atol=1e-9)
    for name in pl.LossTerms._fields:
        np.testing.assert_allclose(float(getattr(summed, name)), float(getattr(full, name)),
                                   rtol=1e-6, atol=1e-7, err_msg=name)  # fmt: skip
    loss = pl.loss_metrics(summed)["loss"]
    np.testing.assert_allclose(float(loss), float(full.loss_sum / full.denom), rtol=1e-6)
    want = ref_policy_loss(logp, old, adv, mask, kl=kl, kl_weight=weight, agg=agg)
    np.testing.assert_allclose(float(loss), want["loss_sum"] / want["denom"], rtol=1e-5)


# --------------------------------------------------------------------------- jit and sharding


def test_jit_and_sharded_equal_eager():
    logp, old, adv, mask, kl, _ = random_batch(30, b=16, t=24)
    args = as_f32(logp, old, adv, mask, kl)

    def loss(lp, o, a, m, k):
        terms = pl.policy_loss(lp, o, a, m, kl=k, kl_weight=a * 0 + 0.01)
        return terms, jax.grad(lambda x: pl.policy_loss(x, o, a, m, kl=k).loss_sum)(lp)

    eager = loss(*args)
    jitted = jax.jit(loss)(*args)
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    sharded = jax.jit(loss)(*(jax.device_put(x, sharding) for x in args))
    for other in (jitted, sharded):
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(other), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (dict(logp=jnp.zeros((2, 3, 1))), ValueError, "logp must have rank 2"),
        (dict(logp=jnp.zeros((2, 3), jnp.int32)), TypeError, "logp must be a floating"),
        (dict(old_logp=jnp.zeros((2, 4))), ValueError, "old_logp has shape"),
        (dict(mask=jnp.ones((2, 3))), TypeError, "mask must be a bool"),
        (dict(mask=jnp.ones((3, 3), bool)), ValueError, "mask has shape"),
        (dict(advantages=jnp.zeros(3)), ValueError, "advantages must have shape"),
        (dict(advantages=jnp.zeros(2, jnp.int32)), TypeError, "advantages must be a floating"),
        (dict(kl=jnp.zeros((2, 2))), ValueError, "kl has shape"),
        (dict(kl_weight=jnp.zeros(2)), ValueError, "kl_weight was given without kl"),
        (
            dict(kl=jnp.zeros((2, 3)), kl_weight=jnp.zeros((3,))),
            ValueError,
            "kl_weight must have shape",
        ),
        (
            dict(agg="mean"),
            ValueError,
            "agg='mean' is not one of 'seq-mean-token-mean', 'seq-mean-token-sum', 'token-mean'",
        ),
        (dict(dual_clip=1.0), ValueError, "dual_clip must be > 1"),
        (dict(clip_low=1.0), ValueError, "clip_low < 1"),
    ],
)
def test_bad_inputs(change, error, match):
    args = dict(
        logp=jnp.zeros((2, 3)),
        old_logp=jnp.zeros((2, 3)),
        advantages=jnp.zeros(2),
        mask=jnp.ones((2, 3), bool),
    )
    args.update(change)
    pos = [args.pop(k) for k in ("logp", "old_logp", "advantages", "mask")]
    with pytest.raises(error, match=match):
        pl.policy_loss(*pos, **args)
    with pytest.raises(ValueError, match="agg='x' is not one of"):
        pl.loss_denominator(jnp.ones((2, 3), bool), agg="x")
