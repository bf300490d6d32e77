"""Tests for ares_jax/parallel/mesh.py and distributed.py on the 8 fake CPU devices."""

import jax
import pytest

from ares_jax.parallel import distributed, mesh


@pytest.mark.parametrize(
    "shape, sizes",
    [
        ({"data": 8, "fsdp": 1, "tensor": 1}, (8, 1, 1)),
        ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
        ({"data": -1, "fsdp": 2, "tensor": 1}, (4, 2, 1)),
        ({"data": 4, "fsdp": 1, "tensor": 2}, (4, 1, 2)),
        ((-1, 2, 1), (4, 2, 1)),
        ({"tensor": 2, "data": -1}, (4, 1, 2)),  # missing axes are 1
        (None, (8, 1, 1)),
    ],
)
def test_make_mesh_shapes(shape, sizes):
    m = mesh.make_mesh(shape)
    assert m.axis_names == ("data", "fsdp", "tensor")
    assert tuple(m.shape.values()) == sizes
    assert sorted(d.id for d in m.devices.flat) == sorted(d.id for d in jax.devices())


def test_make_mesh_on_a_subset_of_devices():
    m = mesh.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices=jax.devices()[:4])
    assert tuple(m.shape.values()) == (1, 4, 1)


@pytest.mark.parametrize(
    "shape, match",
    [
        ({"data": 4, "fsdp": 1, "tensor": 1}, r"uses 4 devices but 8 are available"),
        ({"data": 3, "fsdp": -1, "tensor": 1}, r"do not divide the 8 devices"),
        ({"data": -1, "fsdp": -1, "tensor": 1}, r"at most one axis may be -1"),
        ({"data": 0, "fsdp": 1, "tensor": 1}, r"'data' has size 0"),
        ({"data": 8, "expert": 1}, r"unknown axis 'expert'"),
        ((8, 1), r"must give 3 sizes"),
    ],
)
def test_make_mesh_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        mesh.make_mesh(shape)


def test_maybe_initialize_is_a_noop_for_one_process(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
                 "SLURM_NPROCS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
                 "MEGASCALE_COORDINATOR_ADDRESS", "ARES_DISTRIBUTED"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert distributed.maybe_initialize() is False
    assert distributed.maybe_initialize(num_processes=1) is False
    assert calls == [] and jax.process_count() == 1


_NO_DETECTION = dict(cluster_detection_method="deactivate")


def _slurm_step(*, tasks: int, nodes: int, procid: int, localid: int) -> dict[str, str]:
    """The variables srun sets in a task of job 4242 on nodes gpu[003-004]."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": str(tasks),
        "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_STEP_NODELIST": "gpu[003-004]" if nodes > 1 else "gpu003",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
    }


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node001", "node001"),
        ("node001,host2", "node001"),
        ("node[001-015],host2", "node001"),
        ("node[007,001-005]", "node007"),
        ("rack-a[12]", "rack-a12"),
    ],
)
def test_first_node(nodelist, first):
    assert distributed.first_node(nodelist) == first


def test_slurm_coordinator_is_jaxs(monkeypatch):
    """The coordinator launch/slurm_gpu.sbatch and plan() compute is the one JAX's own Slurm
    support would pick (first node of the step, port from the job id)."""
    from jax._src.clusters.slurm_cluster import SlurmCluster

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "gpu[003-004]")
    jaxs = SlurmCluster.get_coordinator_address(timeout_secs=None, override_coordinator_port=None)
    _, ours = distributed.plan(env=_slurm_step(tasks=2, nodes=2, procid=0, localid=0))
    assert ours["coordinator_address"] == jaxs == f"gpu003:{distributed.slurm_port(4242)}"


def test_slurm_step_without_procid_is_named():
    env = _slurm_step(tasks=2, nodes=2, procid=0, localid=0)
    del env["SLURM_PROCID"]
    with pytest.raises(ValueError, match="without SLURM_PROCID"):
        distributed.plan(env=env)


@pytest.mark.parametrize(
    "kwargs, env, expected",
    [
        ({}, {}, None),
        ({}, {"SLURM_NTASKS": "1"}, None),
        ({}, {"JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}, None),
        (
            {},
            {"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"},
            dict(coordinator_address="h0:1234", num_processes=4, process_id=2, **_NO_DETECTION),
        ),
        (
            dict(coordinator_address="a:1", num_processes=2, process_id=1),
            {"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "4"},
            dict(coordinator_address="a:1", num_processes=2, process_id=1, **_NO_DETECTION),
        ),
        # A partial layout: JAX detects the rest.
        ({}, {"JAX_COORDINATOR_ADDRESS": "h0:1234"}, dict(coordinator_address="h0:1234")),
        # An sbatch script's own environment, outside any srun step: one process.
        ({}, {"SLURM_NTASKS": "16", "SLURM_JOB_ID": "7"}, None),
        # srun, one task per node: all of the node's devices.
        (
            {},
            _slurm_step(tasks=2, nodes=2, procid=1, localid=0),
            dict(
                coordinator_address="gpu003:61586", num_processes=2, process_id=1, **_NO_DETECTION
            ),
        ),
        # srun, 8 tasks on one node: one device per task, as JAX's own Slurm support does.
        (
            {},
            _slurm_step(tasks=8, nodes=1, procid=5, localid=5),
            dict(
                coordinator_address="gpu003:61586",
                num_processes=8,
                process_id=5,
                local_device_ids=[5],
                **_NO_DETECTION,
            ),
        ),
        (
            {},
            {**_slurm_step(tasks=2, nodes=2, procid=0, localid=0), "JAX_COORDINATOR_PORT": "9999"},
            dict(coordinator_address="gpu003:9999", num_processes=2, process_id=0, **_NO_DETECTION),
        ),
        ({}, {"OMPI_COMM_WORLD_SIZE": "2"}, {}),
        ({}, {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, {}),
        ({}, {"TPU_WORKER_HOSTNAMES": "w0"}, None),
        ({}, {"ARES_DISTRIBUTED": "1"}, {}),
        ({}, {"ARES_DISTRIBUTED": "0", "SLURM_NTASKS": "16"}, None),
    ],
)
def test_plan(kwargs, env, expected):
    decision = distributed.plan(**kwargs, env=env)
    assert (None if decision is None else decision[1]) == expected


def test_plan_rejects_bad_env():
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='four'"):
        distributed.plan(env={"JAX_NUM_PROCESSES": "four"})


def test_maybe_initialize_calls_jax_once(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(distributed, "_done", False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.delenv("ARES_DISTRIBUTED", raising=False)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.maybe_initialize() is True
    assert distributed.maybe_initialize() is True  # idempotent
    assert calls == [{}]


class _SliceDevice:
    """A stand-in for a TPU device of a multi-slice job: what mesh_utils reads of one."""

    platform = "cpu"
    device_kind = "cpu"
    process_index = 0

    def __init__(self, i: int, slice_index: int):
        self.id, self.slice_index = i, slice_index

    def __repr__(self):
        return f"d{self.id}s{self.slice_index}"


def test_multi_slice_grid_puts_data_across_slices_and_the_rest_within():
    devices = [_SliceDevice(i, i // 4) for i in range(8)]  # two slices of four chips
    assert mesh.num_slices(devices) == 2 and mesh.num_slices(jax.devices()) == 1
    grid = mesh.device_grid((2, 4, 1), devices)
    assert grid.shape == (2, 4, 1)
    for k in range(2):  # each data index is one whole slice
        assert {d.slice_index for d in grid[k].ravel()} == {k}
    grid = mesh.device_grid((4, 2, 1), devices)  # two data groups per slice
    assert [{d.slice_index for d in grid[k].ravel()} for k in range(4)] == [{0}, {0}, {1}, {1}]
    assert {d.id for d in grid.ravel()} == set(range(8))
    with pytest.raises(ValueError, match=r"mesh\.shape\.data=1 must be a multiple of the 2 slices"):
        mesh.device_grid((1, 8, 1), devices)
