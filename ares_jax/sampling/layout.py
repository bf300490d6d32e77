"""The policy laid out for generation: cast and resharded once per iteration, outside the loop.

Why. The learner keeps the policy FSDP-sharded: `embed` (and `vision_embed`) map to the `fsdp`
mesh axis, so every matrix is split over a batch axis (`parallel/rules.py`). The sampler's decode
loop (`sampler._decode`, a `lax.while_loop`) multiplies a few rows per chip by every weight at
each step, and GSPMD all-gathers each FSDP-sharded weight inside the loop body, on every step:
the whole model crosses the interconnect once per generated token (compiled for a v5p-8, tiny
model, mesh 1 x 4 x 1: 15 all-gathers in the loop body, every MLP matrix, attention projection
and the unembedding; tests/sampling/layout_test.py).

What. `rollout_params` makes one copy of the policy for the rollout:
  * every floating parameter in the rollout's compute dtype (the model's `dtype` by default:
    bfloat16 for the paper presets; float32 stays float32 if asked), never wider than stored:
    the model casts each weight to its compute dtype where it uses it, so the copy computes
    exactly what the policy does;
  * no parameter split over the batch axes (`data`, `fsdp`, and any the `batch` rule names):
    split over `tensor` where its logical axis maps there (heads, kv_heads, mlp, vocab and the
    vision tower's heads and MLP), whole otherwise (`rollout_rules`).
It is one jitted function with `out_shardings`: the cast and the reshard (one all-gather per
weight) run once, before the prefill; inside the decode loop the weights are local.

Cost. The copy lives beside the policy (which the learner keeps as it is) for the rollout:
per chip, the model's parameters in the compute dtype, divided by the `tensor` ways of the
axes split there. bfloat16 with tensor = 1 (the v5p-8 paper mesh 1 x 4 x 1): Qwen2.5-VL-3B
3.75e9 parameters, 7.0 GiB (5.7 GiB of it the text decoder); 7B 8.29e9, 15.4 GiB (14.2 GiB).
`aepo/memory.py` counts it as an argument of the rollout phase (`rollout_work`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from ares_jax.models.qwen2_5_vl import params as model_params
from ares_jax.parallel import rules as R

# Mesh axes that split rows of a batch (parallel/mesh.py): never a weight's in the rollout.
BATCH_AXES = ("data", "fsdp")
# Logical names only activations use: their rules are left as they are.
_ACTIVATION_NAMES = (R.BATCH, R.LENGTH, R.KV_LENGTH, R.PATCHES)


def _axes(value) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def rollout_rules(rules: R.Rules | Iterable[tuple[str, R.MeshAxes]] | None = None) -> dict:
    """The logical-axis rules of the rollout copy: `rules` (overrides merged over
    `rules.DEFAULT_RULES`) with the batch axes (`BATCH_AXES` and those of the `batch` rule)
    taken out of every parameter's logical name. What remains is `tensor` where a name maps
    there (tensor parallel), nothing otherwise (replicated). Activation names keep their rules.
    """
    table = R.merge_rules(rules)
    batch = set(BATCH_AXES) | set(_axes(table[R.BATCH]))
    out = {}
    for name, value in table.items():
        if name in _ACTIVATION_NAMES:
            out[name] = value
            continue
        kept = tuple(a for a in _axes(value) if a not in batch)
        out[name] = None if not kept else kept[0] if len(kept) == 1 else kept
    return out


def rollout_dtype(stored, dtype) -> np.dtype:
    """The dtype of a parameter stored as `stored` in the rollout copy: `dtype` for floating
    parameters unless it is wider than stored; other parameters as stored."""
    stored, dtype = np.dtype(stored), np.dtype(dtype)
    if not jnp.issubdtype(stored, jnp.floating) or dtype.itemsize > stored.itemsize:
        return stored
    return dtype


def _compute_dtype(graphdef, params, dtype):
    if dtype is not None:
        return dtype
    return nnx.merge(graphdef, params).dtype


def rollout_shardings(params: nnx.State, mesh, rules=None) -> dict[tuple, NamedSharding]:
    """NamedSharding of every parameter of the rollout copy, by flat path (`rollout_rules`).
    `params` are the model's parameters from `nnx.split(model)` (full paths: their logical
    axes are the parameters' metadata), concrete or abstract."""
    return model_params.param_shardings(params, mesh, rollout_rules(rules))


def abstract_rollout_params(
    graphdef: nnx.GraphDef, params: nnx.State, mesh, *, dtype=None, rules=None
) -> nnx.State:
    """What `rollout_params` returns, as `jax.ShapeDtypeStruct`s with their shardings (nothing
    allocated; the planner's abstract policy)."""
    dtype = _compute_dtype(graphdef, params, dtype)
    shardings = rollout_shardings(params, mesh, rules)
    return nnx.from_flat_state(
        [
            (
                path,
                v.replace(
                    jax.ShapeDtypeStruct(
                        v.get_value().shape,
                        rollout_dtype(v.get_value().dtype, dtype),
                        sharding=shardings[path],
                    )
                ),
            )
            for path, v in nnx.to_flat_state(params)
        ]
    )


@functools.lru_cache(maxsize=16)
def _lay_out(dtypes: tuple, shardings: tuple):
    """The jitted cast-and-reshard of a flat list of parameters (cached per layout)."""

    def cast(leaves):
        return [x.astype(d) for x, d in zip(leaves, dtypes, strict=True)]

    return jax.jit(cast, out_shardings=list(shardings))


def rollout_params(
    graphdef: nnx.GraphDef, params: nnx.State, mesh, *, dtype=None, rules=None
) -> nnx.State:
    """The policy laid out for generation (module docstring): a new State, the same paths and
    metadata as `params`, to pass to `sampler.generate` with `graphdef` on `mesh`.

    Args:
      graphdef, params: the policy, `nnx.split(model)` (every parameter, full paths).
      mesh: the mesh the rollout runs on (`generate(..., mesh=mesh)`).
      dtype: the rollout's compute dtype; None = the model's (`model.dtype`, from graphdef).
        Floating parameters are cast to it, never widened (`rollout_dtype`).
      rules: the logical-axis rule overrides of the run (`config.mesh.rules`).

    Returns:
      A copy: the policy's own arrays are neither donated nor changed (the learner keeps them).
      One compiled function per layout, cached; the reshard happens once per call.
    """
    dtype = _compute_dtype(graphdef, params, dtype)
    shardings = rollout_shardings(params, mesh, rules)
    flat = nnx.to_flat_state(params)
    paths = [path for path, _ in flat]
    leaves = [v.get_value() for _, v in flat]
    dtypes = tuple(rollout_dtype(x.dtype, dtype) for x in leaves)
    out = _lay_out(dtypes, tuple(shardings[p] for p in paths))(leaves)
    return nnx.from_flat_state(
        [(path, v.replace(x)) for (path, v), x in zip(flat, out, strict=True)]
    )
