"""Multi-process (multi-host) initialisation of JAX.

`maybe_initialize` calls `jax.distributed.initialize` when several processes take part, and does
nothing for a single process. It must run before anything touches a JAX backend (jax.devices()).
Where the process layout comes from, first match wins:

1. explicit arguments, then the variables JAX_COORDINATOR_ADDRESS (host:port of process 0),
   JAX_NUM_PROCESSES, JAX_PROCESS_ID (what launch/slurm_gpu.sbatch and a localhost test set);
2. a Slurm job step of several tasks (srun; SLURM_STEP_NODELIST set, SLURM_NTASKS > 1): the
   coordinator is the step's first node, on JAX_COORDINATOR_PORT or the port JAX's own Slurm
   support derives from SLURM_JOB_ID, the processes are the tasks. A task per node sees all the
   node's devices; several tasks per node get one device each (SLURM_LOCALID), as JAX does;
3. a cluster jax detects itself (`jax.distributed.initialize()` with no arguments): Open MPI
   (OMPI_COMM_WORLD_SIZE > 1), multi-worker TPU (TPU_WORKER_HOSTNAMES with several hosts, or
   MEGASCALE_COORDINATOR_ADDRESS for multi-slice);
4. ARES_DISTRIBUTED=1 forces 3 where no variable reveals the cluster (a Cloud TPU VM pod whose
   layout only the metadata server knows; launch/tpu_pod.sh sets it); ARES_DISTRIBUTED=0 turns
   all of this off.

With the whole layout known (1 with all three values, 2), JAX's cluster detection is switched off
(`cluster_detection_method="deactivate"`): under srun it would otherwise restrict each process
to the single device SLURM_LOCALID, even with one process per 8-GPU node. JAX_LOCAL_DEVICE_IDS,
read by JAX itself, still restricts the devices where it is set. Outside a job step (python run
straight from an sbatch script) Slurm's variables describe the allocation, not this process, and
are ignored.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

import jax

log = logging.getLogger(__name__)


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer.") from None


def first_node(nodelist: str) -> str:
    """The first host of a Slurm node list, as JAX's Slurm support reads it:
    'gpu[003-004,9],cpu1' -> 'gpu003', 'node7,node8' -> 'node7'."""
    m = re.match(r"([^,\[]*)(?:\[([^,\-\]]*))?", nodelist)
    return m.group(1) + (m.group(2) or "")


def slurm_port(job_id: int) -> int:
    """The coordinator port JAX's Slurm support derives from the job id (61440..65535)."""
    return job_id % 2**12 + (65535 - 2**12 + 1)


def _slurm(env: Mapping[str, str]) -> dict | None:
    """initialize() arguments for a Slurm job step of several tasks, or None."""
    tasks = _int_env(env, "SLURM_NTASKS") or _int_env(env, "SLURM_NPROCS") or 1
    if tasks <= 1 or not env.get("SLURM_STEP_NODELIST"):
        return None
    for name in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID"):
        if _int_env(env, name) is None:
            raise ValueError(f"Slurm job step of {tasks} tasks without {name}; run it with srun.")
    port = _int_env(env, "JAX_COORDINATOR_PORT") or slurm_port(_int_env(env, "SLURM_JOB_ID"))
    kwargs = dict(
        coordinator_address=f"{first_node(env['SLURM_STEP_NODELIST'])}:{port}",
        num_processes=tasks,
        process_id=_int_env(env, "SLURM_PROCID"),
        cluster_detection_method="deactivate",
    )
    nodes = _int_env(env, "SLURM_STEP_NUM_NODES") or _int_env(env, "SLURM_JOB_NUM_NODES")
    if nodes != tasks and not env.get("JAX_LOCAL_DEVICE_IDS"):
        kwargs["local_device_ids"] = [_int_env(env, "SLURM_LOCALID")]
    return kwargs


def _cluster(env: Mapping[str, str]) -> str | None:
    """Names the multi-process cluster JAX will detect itself, or None."""
    if (_int_env(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "openmpi"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if env.get("ARES_DISTRIBUTED") == "1":
        return "forced (ARES_DISTRIBUTED=1)"
    return None


def plan(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[str, dict] | None:
    """Decides how to initialise; returns (source, kwargs for jax.distributed.initialize) or None
    for a single process. Pure: reads `env` (default os.environ), starts nothing."""
    env = os.environ if env is None else env
    if env.get("ARES_DISTRIBUTED") == "0":
        return None
    address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
    count = num_processes if num_processes is not None else _int_env(env, "JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else _int_env(env, "JAX_PROCESS_ID")
    if count is not None and count < 1:
        raise ValueError(f"num_processes must be >= 1, got {count}.")
    if count == 1:
        return None
    if count is not None or address is not None or index is not None:
        kwargs = dict(coordinator_address=address, num_processes=count, process_id=index)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if len(kwargs) == 3:
            kwargs["cluster_detection_method"] = "deactivate"
        return "explicit/JAX_* variables", kwargs
    slurm = _slurm(env)
    if slurm is not None:
        return "slurm", slurm
    cluster = _cluster(env)
    return None if cluster is None else (cluster, {})


_done = False


def maybe_initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Initialises jax.distributed if several processes run; idempotent.

    Returns:
      True if this process is part of an initialised multi-process run, False for one process.
    """
    global _done
    if _done or jax.distributed.is_initialized():
        _done = True
        log.info(
            "jax.distributed already initialised; process %d of %d.",
            jax.process_index(),
            jax.process_count(),
        )
        return True
    decision = plan(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    if decision is None:
        log.debug("Single process: jax.distributed not initialised.")
        return False
    source, kwargs = decision
    log.info("Initialising jax.distributed from %s with %s.", source, kwargs or "auto-detection")
    jax.distributed.initialize(**kwargs)
    _done = True
    log.info(
        "jax.distributed ready: process %d of %d, %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    if jax.default_backend() == "cpu" and jax.local_device_count() > 1:
        log.warning(CPU_DEVICES_WARNING, jax.local_device_count(), os.cpu_count())
    return True


# Seen on 2 cores with 2 devices a process: the text embedding's all-to-all and the vision
# tower's loop of all-gathers, independent in one program, each held one of the two threads of
# each process, and every process waited for a peer in the other collective.
CPU_DEVICES_WARNING = (
    "%d CPU devices in this process (%s cores): XLA's CPU runtime runs the independent "
    "collectives of a program at the same time on a pool of one thread per core, and a gloo "
    "collective holds its thread until every process joins, so programs with several "
    "collectives can hang. Run one CPU device per process (drop "
    "--xla_force_host_platform_device_count)."
)
