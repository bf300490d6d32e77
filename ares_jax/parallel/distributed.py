"""Multi-process (multi-host) initialisation of JAX.

`maybe_initialize` calls `jax.distributed.initialize` when several processes take part, and does
nothing for a single process. It must run before anything touches a JAX backend (jax.devices()).
Where the process layout comes from, first match wins:

1. explicit arguments;
2. the variables JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES,
   JAX_PROCESS_ID;
3. a cluster jax detects itself (`jax.distributed.initialize()` with no arguments): Slurm
   (SLURM_NTASKS > 1), Open MPI (OMPI_COMM_WORLD_SIZE > 1), multi-worker TPU (TPU_WORKER_HOSTNAMES
   with several hosts, or MEGASCALE_COORDINATOR_ADDRESS for multi-slice);
4. ARES_DISTRIBUTED=1 forces 3 where no variable reveals the cluster (a Cloud TPU VM pod whose
   layout only the metadata server knows); ARES_DISTRIBUTED=0 turns all of this off.
"""

from __future__ import annotations

import logging
import os
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


def _cluster(env: Mapping[str, str]) -> str | None:
    """Names the multi-process cluster the environment reveals, or None."""
    if (_int_env(env, "SLURM_NTASKS") or _int_env(env, "SLURM_NPROCS") or 1) > 1:
        return "slurm"
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
        return "explicit/JAX_* variables", {k: v for k, v in kwargs.items() if v is not None}
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
    return True
