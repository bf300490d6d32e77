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


def test_stages_preprocess_with_the_checkpoints_normalisation(tmp_path):
    """Pixel limits from the config; mean/std from model.path's image processor unless
    data.image_mean/image_std set them; the prompts the stages encode (rollout, SFT, pass rates,
    validation: `batching.encode_prompts` with `runtime.image_kwargs`) are normalised so."""
    from ares_jax import batching
    from ares_jax.aepo import train as aepo_train
    from ares_jax.models.qwen2_5_vl import config, hub_files, processor
    from ares_jax.models.qwen2_5_vl.tokenizer import build_tokenizer
    from configs import aepo as aepo_config
    from tests.data.virl39k import IMAGES, image_bytes

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    settings = hub_files.default_image_settings(2352, 50176)._replace(mean=mean, std=std)
    hub_files.write_export_files(tmp_path, settings=settings)
    c = aepo_config.stage_config("smoke")
    with c.unlocked():
        c.model.path = str(tmp_path)
    kwargs = runtime.image_kwargs(c)
    assert kwargs == dict(
        min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels, image_mean=mean, image_std=std
    )
    rollout = aepo_train._rollout_settings(c, sampling=None)
    assert (rollout.image_mean, rollout.image_std) == (mean, std)

    cfg, tokenizer = config.preset("tiny"), build_tokenizer()
    image = image_bytes(*IMAGES[0])
    encoded = batching.encode_prompts(
        ["<image>What?"], [[image]], tokenizer, cfg, template="", length_buckets=(128,), **kwargs
    )
    want, _ = processor.preprocess_image(
        image, min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels, mean=mean, std=std
    )
    np.testing.assert_array_equal(encoded.patches[0], want)
    hub, _ = processor.preprocess_image(
        image, min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels
    )
    assert np.abs(hub - want).max() > 0.1  # the hub's normalisation is another

    with c.unlocked():
        c.data.image_mean, c.data.image_std = (0.1, 0.2, 0.3), (1.0, 1.0, 1.0)
    got = runtime.run_image_settings(c)
    assert (got.mean, got.std) == ((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
    with c.unlocked():
        c.model.path = None
        c.data.image_mean = c.data.image_std = None
    got = runtime.run_image_settings(c)
    assert (got.mean, got.std) == (processor.IMAGE_MEAN, processor.IMAGE_STD)
