"""Tests for ares_jax/checkpoint.py: round trips, pruning, fallback, async, SIGTERM, sharding."""

import logging
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ares_jax import checkpoint


def make_state(seed=0):
    key = jax.random.key(seed)
    k1, k2 = jax.random.split(key)
    params = {
        "dense": {"kernel": jax.random.normal(k1, (8, 4)), "bias": jnp.zeros((4,), jnp.bfloat16)},
        "embed": jax.random.normal(k2, (16, 8), jnp.bfloat16),
    }
    tx = optax.adamw(1e-3, weight_decay=1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return {
        "params": params,
        "opt_state": opt_state,
        "rng": jax.random.fold_in(key, 7),
        "raw_rng": jax.random.PRNGKey(seed + 3),
        "step": jnp.asarray(seed + 11, jnp.int32),
        "counters": np.arange(3, dtype=np.int64),
    }


def assert_bit_exact(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        if jnp.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            assert x.dtype == y.dtype
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


def abstract(state):
    return jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
            if isinstance(x, jax.Array)
            else x
        ),
        state,
    )


EXTRA = {"data": {"epoch": 1, "index": 37}, "controller": [[0.1, 0.2], [0.3, 0.4]], "tau": 1.25}


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_bit_exact(tmp_path, async_save):
    state = make_state()
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", every_steps=1, keep=3, async_save=async_save)
    assert ckpt.latest_step() is None
    assert ckpt.save(5, state, EXTRA)
    ckpt.wait()
    assert ckpt.latest_step() == 5
    restored, extra, step = ckpt.restore(abstract(state))
    assert step == 5 and extra == EXTRA
    assert_bit_exact(restored, state)
    # Onto concrete arrays of a different state, too.
    restored, _, _ = ckpt.restore(make_state(seed=1))
    assert_bit_exact(restored, state)
    assert isinstance(restored["counters"], np.ndarray)
    ckpt.close()


def test_extra_converts_numpy_and_refuses_bytes(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=2, async_save=False)
    state = {"w": jnp.ones(2)}
    ckpt.save(1, state, {"a": np.float32(0.5), "b": np.arange(2), "c": (1, 2)})
    _, extra, _ = ckpt.restore(state)
    assert extra == {"a": 0.5, "b": [0, 1], "c": [1, 2]}
    with pytest.raises(TypeError, match="extra/pos"):
        ckpt.save(2, state, {"pos": b"\x00"})
    ckpt.close()


@pytest.mark.parametrize("async_save", [False, True])
def test_every_steps_force_and_existing_step(tmp_path, async_save):
    ckpt = checkpoint.Checkpointer(tmp_path, every_steps=10, keep=5, async_save=async_save)
    state = {"w": jnp.ones(2)}
    assert not ckpt.save(5, state)
    assert ckpt.save(10, state)
    assert not ckpt.save(10, state, force=True)  # already saved: a no-op
    assert ckpt.save(13, state, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [10, 13]
    ckpt.close()


def test_keep_last_n(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, every_steps=2, keep=2, async_save=True)
    for step in range(1, 9):
        ckpt.save(step, {"w": jnp.full((3,), step, jnp.float32)}, {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [6, 8]
    assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["6", "8"]
    state, extra, step = ckpt.restore({"w": jnp.zeros(3)})
    assert step == 8 and extra == {"step": 8}
    np.testing.assert_array_equal(state["w"], np.full(3, 8.0))
    ckpt.close()


def _array_data_files(directory):
    # Orbax's OCDBT layout keeps the array bytes in folders named "d".
    return [
        os.path.join(r, f)
        for r, _, fs in os.walk(directory)
        for f in fs
        if os.path.basename(r) == "d"
    ]


# A failed TensorStore read sometimes posts a callback to Orbax's already-closed asyncio loop;
# Python reports it as unraisable. Harmless, and not ours.
_ORBAX_CLOSED_LOOP = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@_ORBAX_CLOSED_LOOP
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_latest_falls_back(tmp_path, caplog, damage):
    ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=3, async_save=False)
    target = {"w": jnp.zeros(256), "n": jnp.zeros((), jnp.int32)}
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.arange(256.0) * step, "n": jnp.int32(step)}, {"s": step})
    ckpt.close()
    victims = _array_data_files(tmp_path / "2" / "state")
    assert victims
    for victim in victims:
        if damage == "truncate":
            with open(victim, "r+b") as f:
                f.truncate(os.path.getsize(victim) // 2)
        else:
            os.remove(victim)

    ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=3, async_save=False)
    assert ckpt.latest_step() == 2
    with caplog.at_level(logging.WARNING, logger="ares_jax.checkpoint"):
        state, extra, step = ckpt.restore(target)
    assert step == 1 and extra == {"s": 1}
    np.testing.assert_array_equal(state["w"], np.arange(256.0))
    assert any(
        "step 2" in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records
    )
    # The damaged step is set aside, so that the run can save step 2 again.
    assert ckpt.all_steps() == [1]
    assert (tmp_path / "2.corrupt").is_dir()
    assert ckpt.save(2, {"w": jnp.ones(256), "n": jnp.int32(2)})
    assert ckpt.restore(target).step == 2
    ckpt.close()


@_ORBAX_CLOSED_LOOP
def test_corrupt_extra_falls_back(tmp_path, caplog):
    ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=3, async_save=False)
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.ones(2) * step}, {"s": step})
    (tmp_path / "2" / "extra" / "metadata").write_text('{"s": ')
    with caplog.at_level(logging.WARNING, logger="ares_jax.checkpoint"):
        assert ckpt.restore({"w": jnp.zeros(2)}).step == 1
    assert "step 2" in caplog.text
    ckpt.close()


@_ORBAX_CLOSED_LOOP
def test_no_readable_checkpoint_raises(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=3, async_save=False)
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        ckpt.restore({"w": jnp.zeros(2)})
    ckpt.save(1, {"w": jnp.ones(2)})
    with pytest.raises(FileNotFoundError, match="step 4"):
        ckpt.restore({"w": jnp.zeros(2)}, step=4)
    os.remove(tmp_path / "1" / "extra" / "metadata")
    with pytest.raises(RuntimeError, match=r"tried steps \[1\]"):
        ckpt.restore({"w": jnp.zeros(2)})
    ckpt.close()


def test_async_save_then_wait(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=2, async_save=True)
    state = {"w": jnp.arange(1 << 16, dtype=jnp.float32)}
    assert ckpt.save(1, state, {"a": 1})
    state["w"].delete()  # as if donated: save has already copied the arrays to the host
    ckpt.wait()
    assert (tmp_path / "1" / "state").is_dir()
    restored, _, _ = ckpt.restore({"w": jnp.zeros(1 << 16)})
    np.testing.assert_array_equal(restored["w"], np.arange(1 << 16, dtype=np.float32))
    ckpt.close()


def test_read_only(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.Checkpointer(tmp_path / "nope", every_steps=1, keep=1, read_only=True)
    writer = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=2, async_save=False)
    writer.save(4, {"w": jnp.ones(2)}, {"a": 1})
    writer.close()
    reader = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=2, read_only=True)
    assert reader.restore({"w": jnp.zeros(2)}).extra == {"a": 1}
    with pytest.raises(ValueError, match="read-only"):
        reader.save(5, {"w": jnp.ones(2)})
    reader.close()


def test_restore_onto_sharded_target(tmp_path):
    devices = jax.devices()
    assert len(devices) == 8
    mesh = Mesh(np.array(devices).reshape(4, 2), ("data", "model"))
    state = {
        "w": jnp.arange(64.0).reshape(8, 8),
        "b": jnp.arange(8, dtype=jnp.bfloat16),
        "rng": jax.random.key(3),
    }
    ckpt = checkpoint.Checkpointer(tmp_path, every_steps=1, keep=1, async_save=False)
    ckpt.save(1, state)
    shardings = {
        "w": NamedSharding(mesh, P("data", "model")),
        "b": NamedSharding(mesh, P("model")),
        "rng": NamedSharding(mesh, P()),
    }
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    restored, _, _ = ckpt.restore(target)
    for name in state:
        assert restored[name].sharding == shardings[name]
    assert len(restored["w"].addressable_shards) == 8
    assert restored["w"].addressable_shards[0].data.shape == (2, 4)
    assert_bit_exact(restored, state)
    # A different target dtype casts.
    target["w"] = jax.ShapeDtypeStruct((8, 8), jnp.bfloat16, sharding=shardings["w"])
    assert ckpt.restore(target).state["w"].dtype == jnp.bfloat16
    ckpt.close()


def test_sigterm_sets_flag_and_chains(tmp_path):
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: calls.append(sig))
    try:
        uninstall = checkpoint.install_preemption_handler()
        assert not checkpoint.preempted()
        os.kill(os.getpid(), signal.SIGTERM)
        assert checkpoint.preempted()
        assert calls == [signal.SIGTERM]
        uninstall()
        # The flag outlives the handler: the stage that saw the signal must still stop (this
        # is what let a preempted stage export and exit 0 before).
        assert checkpoint.preempted()
        # The loop's reaction: the step is saved though not due, then Preempted is raised.
        with checkpoint.Checkpointer(tmp_path, every_steps=100, keep=1) as ckpt:
            with pytest.raises(checkpoint.Preempted, match="at step 7, checkpoint saved"):
                checkpoint.save_or_stop(ckpt, 7, {"w": jnp.ones(2)}, stage="test")
        assert (tmp_path / "7").is_dir()
        assert not checkpoint.preempted()  # reported once, by the exception
        with checkpoint.Checkpointer(tmp_path, every_steps=100, keep=1) as ckpt:
            checkpoint.save_or_stop(ckpt, 8, {"w": jnp.ones(2)}, stage="test")  # not due: no-op
            assert ckpt.all_steps() == [7]
        assert signal.getsignal(signal.SIGTERM) is not None
    finally:
        signal.signal(signal.SIGTERM, previous)
        checkpoint.clear_preemption()


def test_resolve_init_order(tmp_path, caplog):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    other = tmp_path / "other"
    other.mkdir()
    with caplog.at_level(logging.INFO, logger="ares_jax.checkpoint"):
        assert checkpoint.resolve_init(ckpt_dir).kind == "random"
        assert "initial weights" in caplog.text
        assert checkpoint.resolve_init(ckpt_dir, init_from=str(other)) == (
            "init_from",
            str(other),
            None,
        )
        assert "config.init_from" in caplog.text
        assert checkpoint.resolve_init(ckpt_dir, resume=str(other), init_from="x").kind == "resume"
        assert "config.resume" in caplog.text
        ckpt = checkpoint.Checkpointer(ckpt_dir, every_steps=1, keep=1, async_save=False)
        ckpt.save(3, {"w": jnp.ones(2)})
        ckpt.close()
        source = checkpoint.resolve_init(ckpt_dir, resume=str(other), init_from=str(other))
        assert source == ("workdir", str(ckpt_dir), 3)
        assert "workdir checkpoint step 3" in caplog.text
    with pytest.raises(FileNotFoundError, match="config.resume"):
        checkpoint.resolve_init(tmp_path / "empty", resume=str(tmp_path / "missing"))
