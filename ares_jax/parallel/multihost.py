"""Host data when several processes drive one mesh: global arrays in, host arrays out, and
Python objects exchanged between the processes.

The stages run the same host code on every process (multi-controller JAX). Host arrays that go
into a jitted step are the same on every process (the stages make them so: each process reads its
own share of the data and the shares are exchanged, `data.pipeline.PromptStream.next_global_batch`),
and every crossing goes through this module:

    x = multihost.put(batch, shardings)   # NumPy -> global jax.Arrays, no cross-host traffic
    y = multihost.fetch(outputs)          # jax.Arrays -> NumPy, the whole value on every process
    parts = multihost.allgather_objects(obj)   # [obj of process 0, obj of process 1, ...]
    scores = multihost.spread(grade, items)    # host work split over the processes, then shared
    multihost.check_agreement("step 7", metrics)   # raises if the processes' values differ

`fetch`, `allgather_objects`, `spread` and `check_agreement` are collectives when several
processes run: every process must call them in the same order. With one process they are
`jax.device_put`, `jax.device_get`, `[obj]`, a plain call and nothing.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def put(tree: Any, shardings: Any) -> Any:
    """Host values -> jax.Arrays with `shardings` (one Sharding, or a matching tree of them).

    With several processes every process must hold the same value of each leaf: it copies only
    the blocks its own devices hold (`jax.make_array_from_callback`), so nothing crosses hosts and
    no equality check runs (jax.device_put would all-gather each array to check). Leaves that are
    already global arrays are resharded on device.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: _put_one(x, shardings), tree)
    return jax.tree.map(_put_one, tree, shardings)


def _put_one(x, sharding: jax.sharding.Sharding) -> jax.Array:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    """The sharding that puts a whole copy on every device of `mesh`."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def fetch(tree: Any) -> Any:
    """jax.Arrays -> NumPy arrays holding the global value, on every process (other leaves are
    passed through `np.asarray`).

    An array whose shards all live on this process, or that is fully replicated, is read from
    local memory; any other array is all-gathered (a collective: every process must call `fetch`
    on the same arrays in the same order).
    """
    return jax.tree.map(_fetch_one, tree)


def _fetch_one(x) -> np.ndarray:
    if not isinstance(x, jax.Array):
        return np.asarray(x)
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def allgather_objects(obj: Any) -> list[Any]:
    """[obj of process 0, obj of process 1, ...] on every process, for any picklable `obj`
    (a collective with several processes). One process: [obj]."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))  # [processes, max size]
    return [pickle.loads(gathered[p, : int(n)].tobytes()) for p, n in enumerate(sizes)]


def spread(fn: Callable[[list], Sequence], items: Sequence) -> list:
    """`fn(items)` with the items spread over the processes, the results on every process.

    `fn` maps a list of items to a list of as many results. Process p applies it to items
    p, p + P, p + 2P, ... and the processes exchange the results (a collective), so host work
    such as grading answers is split between the hosts and every host ends with the same list,
    in item order. One process: `list(fn(list(items)))`.
    """
    p, n = jax.process_index(), jax.process_count()
    if n == 1:
        return list(fn(list(items)))
    mine = list(fn(list(items[p::n])))
    out: list = [None] * len(items)
    for h, part in enumerate(allgather_objects(mine)):
        out[h::n] = part
    return out


def check_agreement(name: str, values: Mapping[str, Any]) -> None:
    """Raises if the processes hold different `values` (host scalars; a collective).

    Every process computes the host side of a step from the same gathered data, so they must agree
    exactly; a difference (a grading timeout on one host, a non-deterministic library) would
    otherwise feed different host arrays to one global computation without any error.

    Raises:
      RuntimeError: naming `name`, the first key that differs and each process's value.
    """
    if jax.process_count() == 1:
        return
    local = {k: float(v) for k, v in values.items()}
    everyone = allgather_objects(local)
    for key in sorted(set().union(*everyone)):
        seen = [d.get(key) for d in everyone]
        if any(not _same(v, seen[0]) for v in seen):
            got = ", ".join(f"process {p}: {v!r}" for p, v in enumerate(seen))
            raise RuntimeError(f"processes disagree on {key!r} at {name} ({got}).")


def _same(a: float | None, b: float | None) -> bool:
    return a == b or (a is not None and b is not None and a != a and b != b)  # NaN == NaN here
