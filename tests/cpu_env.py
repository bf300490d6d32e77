"""The XLA settings of the test process and of the stage processes the tests start.

The suite compiles hundreds of programs and runs each a few times, so its time is mostly LLVM's:
unoptimised CPU code generation (`FAST_COMPILE`) compiles the tiny models' programs in about half
the time (a forward and backward of the `tiny` model: 8.5 s at the default level, 3.3-4.9 s at
0) and costs little at run time. The test process and every process a test starts use it, so the
numbers a test compares across processes come from code generated the same way; the stages' own
runs (the command line outside the tests) keep the default.
"""

from __future__ import annotations

import os

FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for `devices` fake CPU devices (None: one), compiled with FAST_COMPILE."""
    if devices is None:
        return FAST_COMPILE
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


def stage_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """os.environ for a process the test starts (a stage, the evaluation command): the CPU only,
    `devices` fake devices (None: one), FAST_COMPILE; `extra` added last."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(devices), **extra}
