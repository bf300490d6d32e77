"""Logical axis names and the table that maps them onto the mesh axes (MaxText style).

Model code names the dimensions of every parameter and activation with the logical names below
(STYLE.md 5.6); only this module and the configs know the mesh axes `data`, `fsdp`, `tensor`
(`ares_jax.parallel.mesh.AXES`). Re-sharding is a change of the table, not of the model: a topology
preset passes overrides (`config.mesh.rules`) that are merged over `DEFAULT_RULES`.

Logical names (dimension letters as in STYLE.md 5):

| name           | dimension                                         | default mesh axes      |
|----------------|---------------------------------------------------|------------------------|
| `batch`        | B or N, rows of a batch (activations, KV cache)   | ('data', 'fsdp')       |
| `length`       | T, token positions of activations                 | None                   |
| `kv_length`    | positions of the KV cache                         | None                   |
| `embed`        | D, model width (parameters and activations)       | 'fsdp'                 |
| `mlp`          | F, MLP width                                      | 'tensor'               |
| `heads`        | H, query heads                                    | 'tensor'               |
| `kv_heads`     | K, key/value heads                                | 'tensor'               |
| `head_dim`     | Dh                                                | None                   |
| `vocab`        | V, vocabulary (embedding table, LM head, logits)  | 'tensor'               |
| `layers`       | L, stacked (scanned) layers                       | None                   |
| `patches`      | P, flattened vision patches of a batch            | ('data', 'fsdp')       |
| `patch_in`     | input features of a patch (1176)                  | None                   |
| `vision_embed` | width of the vision tower                         | 'fsdp'                 |
| `vision_mlp`   | MLP width of the vision tower                     | 'tensor'               |
| `vision_heads` | heads of the vision tower                         | 'tensor'               |

Resolution of a spec (`logical_to_spec`), dimension by dimension from the first:
- a logical name maps to one mesh axis, a tuple of mesh axes, or None (replicated);
- a mesh axis is used at most once per spec: a later dimension drops axes an earlier one took, so
  one table serves parameters and activations (an activation [batch, length, embed] gets
  P(('data', 'fsdp'), None, None): batch took fsdp, embed stays whole, as FSDP wants);
- with a shape and a mesh, a dimension keeps the longest prefix of its mesh axes whose size product
  divides it, and is replicated if none does (2 KV heads over tensor=4 are replicated; a batch of
  4 over data=2, fsdp=4 is split over data only). Mesh axes of size 1 are kept: they cost nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH = "batch"
LENGTH = "length"
KV_LENGTH = "kv_length"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
VOCAB = "vocab"
LAYERS = "layers"
PATCHES = "patches"
PATCH_IN = "patch_in"
VISION_EMBED = "vision_embed"
VISION_MLP = "vision_mlp"
VISION_HEADS = "vision_heads"

MeshAxes = str | tuple[str, ...] | None
Rules = Mapping[str, MeshAxes]

DEFAULT_RULES: dict[str, MeshAxes] = {
    BATCH: ("data", "fsdp"),
    LENGTH: None,
    KV_LENGTH: None,
    EMBED: "fsdp",
    MLP: "tensor",
    HEADS: "tensor",
    KV_HEADS: "tensor",
    HEAD_DIM: None,
    VOCAB: "tensor",
    LAYERS: None,
    PATCHES: ("data", "fsdp"),
    PATCH_IN: None,
    VISION_EMBED: "fsdp",
    VISION_MLP: "tensor",
    VISION_HEADS: "tensor",
}

LOGICAL_NAMES = tuple(DEFAULT_RULES)


def _known() -> str:
    return ", ".join(sorted(DEFAULT_RULES))


def _mesh_axes(name: str, value) -> tuple[str, ...]:
    """Normalises a rule value to a tuple of mesh-axis names."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(
        f"logical axis rule for {name!r} must be a mesh axis name, a tuple of names, or None; "
        f"got {value!r}."
    )


def merge_rules(overrides: Rules | Iterable[tuple[str, MeshAxes]] | None = None) -> dict:
    """Returns `DEFAULT_RULES` with `overrides` merged over it.

    Args:
      overrides: None, a mapping, or (name, mesh axes) pairs (the config's `mesh.rules` form);
        each name must be one of `LOGICAL_NAMES`; a value is a mesh axis, a tuple of them, or None.

    Raises:
      ValueError: for a logical name not in the table (the sentence lists the known ones).
      TypeError: for a malformed value.
    """
    rules = dict(DEFAULT_RULES)
    if overrides is None:
        return rules
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    for item in items:
        if not (isinstance(item, Sequence) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"a logical axis rule must be a (name, mesh axes) pair; got {item!r}.")
        name, value = item
        if name not in DEFAULT_RULES:
            raise ValueError(f"unknown logical axis name {name!r}; known names: {_known()}.")
        axes = _mesh_axes(name, value)
        rules[name] = None if not axes else axes[0] if len(axes) == 1 else axes
    return rules


def _mesh_sizes(mesh) -> dict[str, int] | None:
    return None if mesh is None else dict(mesh.shape)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    rules: Rules | Iterable[tuple[str, MeshAxes]] | None = None,
    *,
    shape: Sequence[int] | None = None,
    mesh: Mesh | jax.sharding.AbstractMesh | None = None,
) -> PartitionSpec:
    """Maps logical dimension names to a PartitionSpec (resolution rules in the module docstring).

    Args:
      logical_axes: one logical name (or None = replicated) per dimension.
      rules: overrides merged over `DEFAULT_RULES` (None = the defaults).
      shape: the array's shape; with `mesh`, enables the divisibility fallback.
      mesh: a Mesh or AbstractMesh; when given, every mesh axis named by the rules must exist in it.

    Raises:
      ValueError: for an unknown logical name, a mesh axis the mesh lacks, or a shape whose rank
        differs from len(logical_axes).
    """
    table = merge_rules(rules)
    sizes = _mesh_sizes(mesh)
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(
            f"logical axes {tuple(logical_axes)} name {len(logical_axes)} dimensions but the "
            f"shape {tuple(shape)} has {len(shape)}."
        )
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"unknown logical axis name {name!r}; known names: {_known()}.")
        axes = [a for a in _mesh_axes(name, table[name]) if a not in used]
        if sizes is not None:
            missing = [a for a in axes if a not in sizes]
            if missing:
                raise ValueError(
                    f"logical axis {name!r} maps to mesh axis {missing[0]!r}, which the mesh "
                    f"(axes {tuple(sizes)}) does not have."
                )
            if shape is not None:
                kept, product = [], 1
                for a in axes:
                    if shape[dim] % (product * sizes[a]):
                        break
                    kept.append(a)
                    product *= sizes[a]
                axes = kept
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def logical_sharding(
    mesh: Mesh,
    logical_axes: Sequence[str | None],
    rules: Rules | Iterable[tuple[str, MeshAxes]] | None = None,
    *,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
    """NamedSharding on `mesh` for the logical axes (pass `shape` for the divisibility fallback)."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules, shape=shape, mesh=mesh))


def constrain(
    x: jax.Array,
    logical_axes: Sequence[str | None],
    rules: Rules | Iterable[tuple[str, MeshAxes]] | None = None,
    *,
    mesh: Mesh | None = None,
) -> jax.Array:
    """`with_sharding_constraint` by logical names; for activations inside jitted model code.

    Uses `mesh` if given, else the mesh set by `jax.set_mesh(mesh)` (the legacy `with mesh:`
    context is not seen). Without a mesh it returns `x` unchanged, so model code runs as is on
    one device. Divisibility is checked against x's shape.
    """
    if mesh is None:
        current = jax.sharding.get_abstract_mesh()
        if current.empty:
            return x
        spec = logical_to_spec(logical_axes, rules, shape=x.shape, mesh=current)
        return jax.lax.with_sharding_constraint(x, spec)
    return jax.lax.with_sharding_constraint(
        x, logical_sharding(mesh, logical_axes, rules, shape=x.shape)
    )


def _is_axes(node) -> bool:
    return isinstance(node, tuple) and all(a is None or isinstance(a, str) for a in node)


def tree_shardings(
    mesh: Mesh,
    logical_axes_tree,
    shapes_tree,
    rules: Rules | Iterable[tuple[str, MeshAxes]] | None = None,
):
    """NamedShardings for a pytree: `logical_axes_tree` has a tuple of names where `shapes_tree`
    (arrays or `jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`) has a leaf."""
    return jax.tree.map(
        lambda axes, leaf: logical_sharding(mesh, axes, rules, shape=leaf.shape),
        logical_axes_tree,
        shapes_tree,
        is_leaf=_is_axes,
    )


def ways(mesh, rules, name: str, size: int) -> int:
    """Into how many shards logical axis `name` of length `size` is split on `mesh`."""
    spec = logical_to_spec((name,), rules, shape=(size,), mesh=mesh)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return math.prod(mesh.shape[a] for a in axes)
