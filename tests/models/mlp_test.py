"""The decoder's SwiGLU MLP (`text.gated_mlp`): its custom VJP against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ares_jax.models.qwen2_5_vl import layers, text


def _plain(h, gate, up, down):
    g = jnp.einsum("btd,df->btf", h, gate)
    u = jnp.einsum("btd,df->btf", h, up)
    return jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, down)


def _inputs(dtype):
    r = np.random.default_rng(0)
    shapes = ((3, 17, 24), (24, 40), (24, 40), (40, 24))
    # Projections of a few units either side of 0, where silu bends.
    scales = (1.0, 0.4, 0.4, 0.2)
    return [
        jnp.asarray(r.standard_normal(s) * c, dtype) for s, c in zip(shapes, scales, strict=True)
    ]


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_values_and_gradients_equal_autodiff(dtype, tol):
    args = _inputs(dtype)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 17, 24)), dtype)

    def loss(f):
        return lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w.astype(jnp.float32))

    np.testing.assert_array_equal(text.gated_mlp(*args), _plain(*args))  # the same forward
    got = jax.grad(loss(text.gated_mlp), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(loss(_plain), argnums=(0, 1, 2, 3))(*args)
    for name, a, b in zip(("h", "gate", "up", "down"), got, want, strict=True):
        assert a.dtype == b.dtype == dtype, name
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        err = np.max(np.abs(a - b)) / np.max(np.abs(b))
        assert err < tol, (name, err)


@pytest.mark.parametrize("policy", ["full", "dots", "attention"])
def test_under_every_remat_policy(policy):
    """Inside `jax.checkpoint` (model.remat) the backward pass reruns the forward and gives the
    same gradients."""
    args = _inputs(jnp.float32)
    f = lambda *a: jnp.sum(text.gated_mlp(*a) ** 2)  # noqa: E731
    want = jax.grad(f, argnums=(0, 1, 2, 3))(*args)
    ck = jax.checkpoint(f, policy=layers.checkpoint_policy(policy))
    got = jax.jit(jax.grad(ck, argnums=(0, 1, 2, 3)))(*args)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
