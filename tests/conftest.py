"""Shared test setup.

Every test process sees 8 fake CPU devices, so sharded computations can be compared with the
single-device result in the same run (ARCHITECTURE.md: tests, benchmarks, CI), and compiles with
unoptimised CPU code generation, which halves the suite's compile time (tests/cpu_env.py). The flags
must be set before jax is imported anywhere.
"""

import gc
import os

from tests.cpu_env import FAST_COMPILE  # imports no jax

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
    _flags += f" {FAST_COMPILE}"  # tests/cpu_env.py
os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config, items):
    platform = jax.default_backend()
    skip_gpu = pytest.mark.skip(reason="needs a GPU")
    skip_tpu = pytest.mark.skip(reason="needs a TPU")
    skip_torch = pytest.mark.skip(reason="torch is not installed (pip install torch==2.13.0)")
    has_torch = _has_torch()
    for item in items:
        if "gpu" in item.keywords and platform != "gpu":
            item.add_marker(skip_gpu)
        if "tpu" in item.keywords and platform != "tpu":
            item.add_marker(skip_tpu)
        if "requires_torch" in item.keywords and not has_torch:
            item.add_marker(skip_torch)


@pytest.fixture(autouse=True)
def _no_preemption_carried_over():
    """A SIGTERM simulated by one test (the flag is process-wide) must not stop the next."""
    yield
    from ares_jax import checkpoint

    checkpoint.clear_preemption()


@pytest.fixture(autouse=True, scope="module")
def _caches_cleared_after_each_module():
    """The suite runs in one process: each module's compiled executables and traces are dropped
    when it ends, so they do not pile up over the whole run."""
    yield
    jax.clear_caches()
    gc.collect()
