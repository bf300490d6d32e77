"""Stage plumbing: a train state placed for a donating step has one buffer per leaf."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ares_jax import runtime


def _pointers_per_device(tree):
    out = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            out.setdefault(shard.device, []).append(shard.data.unsafe_buffer_pointer())
    return out


def test_place_state_unshares_buffers_and_places_on_the_mesh():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    zeros = jnp.zeros(3)  # one buffer used twice, as an initial state may do
    sharded = jax.device_put(jnp.arange(16.0).reshape(4, 4), NamedSharding(mesh, P("fsdp")))
    state = {"a": zeros, "b": zeros, "w": sharded, "w2": sharded, "n": jnp.zeros((), jnp.int32)}
    placed = runtime.place_state(state, mesh)
    for device, pointers in _pointers_per_device(placed).items():
        assert len(pointers) == len(set(pointers)), device  # no two leaves share a buffer
    for key in ("a", "b", "n"):
        assert placed[key].sharding == NamedSharding(mesh, P())
    assert placed["w"].sharding == sharded.sharding
    for key, value in state.items():
        np.testing.assert_array_equal(np.asarray(placed[key]), np.asarray(value))
    # A donating step accepts it.
    step = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    jax.block_until_ready(step(placed))


def test_buckets():
    assert runtime.bucket_up(100, (64, 128, 256)) == 128
    assert runtime.bucket_up(300, (64, 128, 256)) == 256
    assert [runtime.pow2(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
