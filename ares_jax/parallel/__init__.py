"""Device mesh, logical-axis sharding rules and multi-host initialisation (pure jax/numpy)."""

from ares_jax.parallel.distributed import maybe_initialize
from ares_jax.parallel.mesh import AXES, make_mesh
from ares_jax.parallel.rules import (
    DEFAULT_RULES,
    LOGICAL_NAMES,
    constrain,
    logical_sharding,
    logical_to_spec,
    merge_rules,
    tree_shardings,
)

__all__ = [
    "AXES",
    "DEFAULT_RULES",
    "LOGICAL_NAMES",
    "constrain",
    "logical_sharding",
    "logical_to_spec",
    "make_mesh",
    "maybe_initialize",
    "merge_rules",
    "tree_shardings",
]
