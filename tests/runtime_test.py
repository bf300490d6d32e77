"""Stage plumbing: a train state placed for a donating step has one buffer per leaf; the workdir
lock, its release and staleness, an unwritable workdir, the completion record."""

import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


# ---------------------------------------------------------------------------------------------
# The stage's hold on its workdir.


def test_second_run_on_a_workdir_is_refused_with_one_sentence(tmp_path):
    with runtime.lock_workdir(tmp_path):
        with pytest.raises(runtime.WorkdirError) as e:
            with runtime.lock_workdir(tmp_path):
                pass
        message = str(e.value)
        assert f"the workdir {tmp_path} is in use by another run" in message
        assert f"pid {os.getpid()}" in message and "\n" not in message
    with runtime.lock_workdir(tmp_path):  # released on exit
        pass


def test_lock_of_a_dead_holder_is_not_in_the_way(tmp_path):
    # A run killed by SIGKILL holds no lock: the kernel drops it with the process.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'pid 1 on elsewhere'); "
            "print('held', flush=True); time.sleep(60)",
            str(tmp_path / runtime.LOCK_FILE),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runtime.WorkdirError, match="pid 1 on elsewhere"):
            with runtime.lock_workdir(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with runtime.lock_workdir(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / runtime.LOCK_FILE).read_text()


def test_unwritable_workdir_is_one_sentence(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(runtime.WorkdirError, match=r"^cannot write to the workdir .*a_file/run"):
        with runtime.lock_workdir(blocker / "run"):
            pass
    if os.geteuid() != 0:  # root writes anywhere
        readonly = tmp_path / "readonly"
        readonly.mkdir(mode=0o555)
        with pytest.raises(runtime.WorkdirError, match="Permission denied"):
            with runtime.lock_workdir(readonly):
                pass


def test_stage_run_forgets_completion_and_closes_what_it_holds(tmp_path):
    runtime.mark_complete(tmp_path, "AEPO", 7)
    assert runtime.is_complete(tmp_path)["step"] == 7
    closed = []
    with pytest.raises(RuntimeError, match="boom"):
        with runtime.stage_run(tmp_path, "AEPO") as hold:
            assert runtime.is_complete(tmp_path) is None  # unfinished until marked again
            hold.callback(closed.append, "checkpointer")
            raise RuntimeError("boom")
    assert closed == ["checkpointer"]
    assert runtime.is_complete(tmp_path) is None
    with runtime.lock_workdir(tmp_path):  # the lock went with the exception
        pass
