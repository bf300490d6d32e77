"""Building blocks shared by the vision tower and the text decoder.

Parameters are `nnx.Param`s carrying their logical axis names as metadata (`logical_axes`), which
`ares_jax.parallel.rules` maps onto the mesh. Layers of a tower are stacked: one module whose
parameters have a leading layer axis (`stack_layers`), run by `lax.scan` or unrolled with static
slices. Numerics follow QWEN2_5_VL.md 3.4 so that bfloat16 runs agree with transformers.
"""

from __future__ import annotations

import warnings
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


# What each layer keeps for the backward pass (`model.remat`); measured in benchmarks/remat.py.
# - 'none': every intermediate of every layer (no checkpoint);
# - 'full': the layer's input only; the whole layer, attention included, reruns in the backward;
# - 'attention': the input and the attention kernel's residuals (its output and per-query
#   log-sum-exp: named in `ops.attention`'s blockwise path, the forward Pallas call's outputs
#   for Splash and Pallas GPU), so the backward reruns the projections and the MLP but not the
#   attention forward;
# - 'dots': the input and every matmul output without batch dimensions (projections, MLP);
# - 'offload': as 'attention', with the blockwise path's named residuals in pinned host memory
#   (a Pallas kernel's stay on the device).
# With XLA's dense attention or cuDNN's ('xla', 'cudnn') 'attention' keeps nothing more than
# 'full'.
REMAT_POLICIES = ("none", "full", "attention", "dots", "offload")
ATTENTION_RESIDUALS = ("attention_out", "attention_lse")


def remat_policy(remat: str | bool) -> str:
    """The policy name of `remat`: one of REMAT_POLICIES, or a bool (True = 'full',
    False = 'none', the old boolean `model.remat`)."""
    if isinstance(remat, bool):
        return "full" if remat else "none"
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; known: {list(REMAT_POLICIES)}")
    return remat


def _offload_supported() -> bool:
    return any(m.kind == "pinned_host" for m in jax.local_devices()[0].addressable_memories())


def _kernel_outputs(prim, *_, **__) -> bool:
    """Saveable: the outputs of a Pallas call. In a decoder layer the only ones are the
    attention kernels', whose forward residuals (output, log-sum-exp) they are."""
    return prim.name == "pallas_call"


def checkpoint_policy(remat: str | bool):
    """The `jax.checkpoint` policy of a remat policy name ('none' is no checkpoint at all).

    'offload' needs a pinned host memory space (TPU, GPU, and this jax's CPU backend, where it
    is the same RAM); without one it warns and falls back to 'attention'.
    """
    cp = jax.checkpoint_policies
    name = remat_policy(remat)
    if name == "offload" and not _offload_supported():
        warnings.warn(
            "remat policy 'offload' (model.remat): the backend has no pinned_host memory; "
            "using 'attention' (residuals kept on the device).",
            stacklevel=2,
        )
        name = "attention"
    if name == "attention":
        return cp.save_from_both_policies(
            cp.save_only_these_names(*ATTENTION_RESIDUALS), _kernel_outputs
        )
    if name == "dots":
        return cp.dots_with_no_batch_dims_saveable
    if name == "offload":
        offload = cp.save_and_offload_only_these_names(
            names_which_can_be_saved=(),
            names_which_can_be_offloaded=ATTENTION_RESIDUALS,
            offload_src="device",
            offload_dst="pinned_host",
        )
        return lambda prim, *a, **kw: _kernel_outputs(prim) or offload(prim, *a, **kw)
    return None  # 'full': nothing saved but the layer's input


def run_layers(
    stacked: nnx.Module,
    x: jax.Array,
    body: Callable[[nnx.Module, jax.Array, object], jax.Array],
    *,
    scan: bool,
    remat: str | bool,
    flags: Sequence[bool] | None = None,
) -> jax.Array:
    """Applies `body(layer, x, flag_i)` for every layer of a stacked module.

    `flags` is an optional per-layer Python bool (e.g. full or window attention). With `scan` the
    layers run under `lax.scan` (one compiled layer body, fast to compile) and the flag arrives as
    a traced bool scalar; unrolled, the layers are static slices and the flag a Python bool.
    `remat` is the policy (REMAT_POLICIES, or a bool) of what each layer keeps for the backward
    pass; the rest is recomputed there.
    """
    remat = remat_policy(remat)
    policy = checkpoint_policy(remat) if remat != "none" else None
    graphdef, state = nnx.split(stacked)
    num_layers = jax.tree.leaves(state)[0].shape[0]
    flags = [False] * num_layers if flags is None else list(flags)

    def step(x, layer_state, flag):
        return body(nnx.merge(graphdef, layer_state), x, flag)

    if scan:
        if remat != "none":
            step = jax.checkpoint(step, policy=policy)

        def scan_body(x, xs):
            layer_state, flag = xs
            return step(x, layer_state, flag), None

        x, _ = jax.lax.scan(scan_body, x, (state, jnp.asarray(flags)))
        return x
    for i in range(num_layers):
        layer_state = jax.tree.map(lambda a, i=i: a[i], state)
        if remat != "none":
            x = jax.checkpoint(step, static_argnums=2, policy=policy)(x, layer_state, flags[i])
        else:
            x = step(x, layer_state, flags[i])
    return x
