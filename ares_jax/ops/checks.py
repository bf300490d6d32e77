"""Input validation shared by the kernels.

Shape, rank and dtype checks run at trace time (shapes are static under jit), so they cost nothing
at run time and fail with a sentence naming the argument. Value checks (NaN entropies) cannot be
decided at trace time: on concrete arrays they raise at once; under jit a host callback raises
when the compiled computation sees a bad value, so a wrong number is never returned silently.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def check_rank(x, rank: int, name: str, fn: str) -> None:
    """Raises ValueError unless `x` has exactly `rank` dimensions."""
    if np.ndim(x) != rank:
        raise ValueError(f"{fn}: {name} must have rank {rank}, got shape {_shape(x)}.")


def check_same_shape(fn: str, **arrays) -> None:
    """Raises ValueError unless all keyword arrays have one shape."""
    items = [(name, _shape(a)) for name, a in arrays.items() if a is not None]
    first_name, first_shape = items[0]
    for name, shape in items[1:]:
        if shape != first_shape:
            raise ValueError(
                f"{fn}: {name} has shape {shape} but {first_name} has shape {first_shape}; "
                "they must match."
            )


def check_floating(x, name: str, fn: str) -> None:
    """Raises TypeError unless `x` has a floating dtype."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{fn}: {name} must be a floating array, got dtype {jnp.result_type(x)}.")


def check_integer(x, name: str, fn: str) -> None:
    """Raises TypeError unless `x` has an integer dtype."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise TypeError(f"{fn}: {name} must be an integer array, got dtype {jnp.result_type(x)}.")


def check_bool(x, name: str, fn: str) -> None:
    """Raises TypeError unless `x` is boolean."""
    if jnp.result_type(x) != jnp.bool_:
        raise TypeError(f"{fn}: {name} must be a bool array, got dtype {jnp.result_type(x)}.")


def check_choice(value, choices: Sequence, name: str, fn: str) -> None:
    """Raises ValueError unless `value` is one of `choices`."""
    if value not in choices:
        known = ", ".join(repr(c) for c in sorted(choices, key=str))
        raise ValueError(f"{fn}: {name}={value!r} is not one of {known}.")


def check_group_size(n: int, group_size: int, fn: str, *, minimum: int = 1) -> None:
    """Raises ValueError unless `n` responses split evenly into groups of `group_size`."""
    if not isinstance(group_size, int | np.integer) or group_size < minimum:
        raise ValueError(f"{fn}: group_size must be an integer >= {minimum}, got {group_size!r}.")
    if n % group_size:
        raise ValueError(
            f"{fn}: {n} responses do not split into groups of {group_size}; responses must be "
            "ordered group by group with every group complete."
        )


def _raise_if(bad, message: str) -> None:
    if bool(np.asarray(bad)):
        raise ValueError(message)


def assert_finite(x: jax.Array, name: str, fn: str, where: jax.Array | None = None) -> None:
    """Raises ValueError if `x` holds NaN or inf where `where` is True (everywhere if None).

    On concrete arrays the check runs now. Under a transformation it is compiled in as a host
    callback that raises when the computation runs (the error then surfaces as a runtime error
    carrying this message).
    """
    bad = ~jnp.isfinite(x)
    if where is not None:
        bad = bad & where
    any_bad = jnp.any(bad)
    message = f"{fn}: {name} holds NaN or inf at positions that are not masked out."
    if isinstance(any_bad, jax.core.Tracer):
        jax.debug.callback(_raise_if, any_bad, message)
    else:
        _raise_if(any_bad, message)
