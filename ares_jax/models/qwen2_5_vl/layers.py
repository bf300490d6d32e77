"""Building blocks shared by the vision tower and the text decoder.

Parameters are `nnx.Param`s carrying their logical axis names as metadata (`logical_axes`), which
`ares_jax.parallel.rules` maps onto the mesh. Layers of a tower are stacked: one module whose
parameters have a leading layer axis (`stack_layers`), run by `lax.scan` or unrolled with static
slices. Numerics follow QWEN2_5_VL.md 3.4 so that bfloat16 runs agree with transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]

normal_init: Initializer = nnx.initializers.normal(stddev=0.02)
zeros_init: Initializer = nnx.initializers.zeros_init()
ones_init: Initializer = nnx.initializers.ones_init()


def param(
    rngs: nnx.Rngs,
    shape: Sequence[int],
    axes: Sequence[str | None],
    *,
    init: Initializer = normal_init,
    dtype: jnp.dtype = jnp.float32,
) -> nnx.Param:
    """A parameter of `shape` with logical axis names `axes` (one per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f"param: {len(axes)} axis names for shape {tuple(shape)}.")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(axes))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as transformers computes it: statistics in float32, cast back, then scale."""
    in_dtype = x.dtype
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(in_dtype) * xf.astype(in_dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def stack_layers(layers: Sequence[nnx.Module]) -> nnx.Module:
    """One module whose parameters are the layers' parameters stacked on a new leading axis."""
    pieces = [nnx.split(layer) for layer in layers]
    graphdef = pieces[0][0]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[state for _, state in pieces])
    return nnx.merge(graphdef, stacked)


def run_layers(
    stacked: nnx.Module,
    x: jax.Array,
    body: Callable[[nnx.Module, jax.Array, object], jax.Array],
    *,
    scan: bool,
    remat: bool,
    flags: Sequence[bool] | None = None,
) -> jax.Array:
    """Applies `body(layer, x, flag_i)` for every layer of a stacked module.

    `flags` is an optional per-layer Python bool (e.g. full or window attention). With `scan` the
    layers run under `lax.scan` (one compiled layer body, fast to compile) and the flag arrives as
    a traced bool scalar; unrolled, the layers are static slices and the flag a Python bool.
    `remat` recomputes each layer's activations in the backward pass.
    """
    graphdef, state = nnx.split(stacked)
    num_layers = jax.tree.leaves(state)[0].shape[0]
    flags = [False] * num_layers if flags is None else list(flags)

    def step(x, layer_state, flag):
        return body(nnx.merge(graphdef, layer_state), x, flag)

    if scan:
        if remat:
            step = jax.checkpoint(step)

        def scan_body(x, xs):
            layer_state, flag = xs
            return step(x, layer_state, flag), None

        x, _ = jax.lax.scan(scan_body, x, (state, jnp.asarray(flags)))
        return x
    for i in range(num_layers):
        layer_state = jax.tree.map(lambda a, i=i: a[i], state)
        if remat:
            x = jax.checkpoint(step, static_argnums=2)(x, layer_state, flags[i])
        else:
            x = step(x, layer_state, flags[i])
    return x
