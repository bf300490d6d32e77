r"""Memory planner: will an AEPO config fit a topology? Per-device bytes, counted and compiled.

  python -m ares_jax.plan --config=configs/aepo.py:paper_3b --topology=v5p-8
  python -m ares_jax.plan --config=configs/aepo.py:preset=paper_7b,topology=2x8xh100
  python -m ares_jax.plan --config=configs/aepo.py:paper_7b --topology=v5p-8,v5p-64,v6e-16,8xh100
  python -m ares_jax.plan --config=configs/aepo.py:smoke --xla=false     # analytic only, instant

For each topology (configs/topologies.py; `--topology` overrides the config's `mesh.topology`, and a
comma list plans several) it builds the stage's parameters, optimizer state, learner batch and KV
cache as abstract, sharded shapes (nothing is allocated; ares_jax/aepo/memory.py) and reports, per
device:
- analytic: the bytes of each shard (parameters, optimizer, reference, gradients, batch, KV
  cache: exact) and a formula for the activations of one micro-batch, of the log-prob pass and of
  the rollout's prefill/decode;
- XLA: `memory_analysis()` of the learner's update step and log-prob pass and of the sampler's
  prefill and decode loop, compiled for the topology. TPU topologies compile for the real chips
  through libtpu from this CPU machine (TPU.md; `pip install "jax[tpu]"` where the planner
  runs); a compilation that runs out of HBM reports the temporaries XLA needed. GPU
  topologies compile on as many fake CPU devices (XLA's CPU backend, not the GPU compiler: its
  temporaries are indicative); `--config.model.attention=cudnn` cannot be compiled there and is
  planned analytically only.

Then a verdict per topology: the phase with the largest total (XLA's where it compiled, else the
analytic count) against the device's HBM, with its largest item named. `--config.KEY=VALUE`
overrides apply as for `ares_jax.main`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import threading
import time
from collections.abc import Iterator

from absl import app, flags
from ml_collections import config_flags

from configs import topologies

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "AEPO config file[:preset], e.g. configs/aepo.py:paper_3b.", lock_config=True
)
_TOPOLOGY = flags.DEFINE_string(
    "topology", "", "Topology name(s), comma-separated; default: the config's mesh.topology."
)
_XLA = flags.DEFINE_bool("xla", True, "Also compile with XLA and read its memory analysis.")
flags.mark_flag_as_required("config")

GiB = 2**30
_OOM = re.compile(
    r"HLO temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)"
)
_UNIT = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}

LABELS = {
    "parameters": "parameters",
    "optimizer": "optimizer",
    "reference": "reference model",
    "gradients": "gradients",
    "learner_batch": "learner batch",
    "activations": "activations (one micro-batch)",
    "logprob_pass": "log-prob pass",
    "kv_cache": "KV cache",
    "rollout_work": "prefill/decode work space",
}
PHASE_LABELS = {"rollout": "rollout", "logprob": "log-prob passes", "update": "update step"}


STEP_LABELS = {
    "update": "update step",
    "logprob": "log-prob pass",
    "prefill": "prefill",
    "decode": "decode loop",
}


def gib(n: float | None) -> str:
    """Bytes as GiB with one decimal."""
    return "n/a" if n is None else f"{n / GiB:.1f}"


def unit_for(values) -> tuple[str, int]:
    """GiB, or MiB when every value is below 1 GiB (the small CPU presets)."""
    return ("GiB", GiB) if max(values, default=0) >= GiB else ("MiB", 2**20)


def fmt(n: float | None, unit: tuple[str, int]) -> str:
    return "n/a" if n is None else f"{n / unit[1]:.1f}"


# ---------------------------------------------------------------------------------------------
# Verdict
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether the largest phase fits the device, and what dominates it."""

    fits: bool
    need: int  # bytes per device of the largest phase
    have: int  # HBM per device
    phase: str
    source: str  # 'XLA' or 'analytic'
    biggest: str  # item key of the largest item of that phase
    biggest_bytes: int

    def text(self) -> str:
        u = unit_for([self.need])
        where = f"{PHASE_LABELS[self.phase]}, {self.source}"
        item = f"biggest item: {LABELS[self.biggest]}, {fmt(self.biggest_bytes, u)} {u[0]}"
        if self.fits:
            return (
                f"fits ({fmt(self.need, u)} {u[0]} of {gib(self.have)} GiB, in the {where}; {item})"
            )
        return (
            f"does not fit (needs {gib(self.need)} GiB, has {gib(self.have)} GiB, in the "
            f"{where}; {item})"
        )


def verdict(
    items: dict[str, int],
    phases: dict[str, tuple[str, ...]],
    analytic: dict[str, int],
    xla: dict[str, int] | None,
    hbm: int,
) -> Verdict:
    """The verdict for per-device `items`, the item keys of each phase in `phases`, the phase
    totals `analytic` and (where compiled, else None) `xla`, and `hbm` bytes per device. XLA's
    totals decide where present; the biggest item is the largest analytic item of the phase."""
    totals, source = (xla, "XLA") if xla else (analytic, "analytic")
    phase = max(totals, key=totals.get)
    biggest = max(phases[phase], key=items.get)
    return Verdict(
        fits=totals[phase] <= hbm,
        need=totals[phase],
        have=hbm,
        phase=phase,
        source=source,
        biggest=biggest,
        biggest_bytes=items[biggest],
    )


# ---------------------------------------------------------------------------------------------
# Devices and progress
# ---------------------------------------------------------------------------------------------


def prepare_environment(names: list[str]) -> None:
    """Before jax is imported: compile-only runs use the CPU platform (TPU.md), with as many fake
    CPU devices as the largest GPU topology has."""
    if not names:
        return
    gpus = [topologies.get(n).num_devices for n in names if topologies.get(n).platform == "gpu"]
    if "jax" in sys.modules:
        return  # too late to change; `devices_for` checks the count
    os.environ["JAX_PLATFORMS"] = "cpu"
    if gpus:
        kept = re.sub(
            r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")
        )
        count = f"--xla_force_host_platform_device_count={max(gpus)}"
        os.environ["XLA_FLAGS"] = f"{kept} {count}".strip()


def devices_for(topology: topologies.Topology | None) -> tuple[list, str]:
    """(devices to compile for, a sentence saying what they are)."""
    import jax

    if topology is None:
        devices = jax.devices()
        return devices, f"the {len(devices)} local {devices[0].platform} device(s)"
    if topology.platform == "tpu":
        from jax.experimental import topologies as jax_topologies

        try:
            desc = jax_topologies.get_topology_desc(
                platform="tpu",
                topology_name=topology.tpu_topology,
                chip_config_name="default",
                chips_per_host_bounds=topology.chips_per_host_bounds,
                num_slices=topology.num_slices,
            )
        except Exception as e:  # noqa: BLE001 - no libtpu, or it refused the topology
            raise RuntimeError(
                f"cannot compile for TPU topology {topology.tpu_topology!r} ({e}); install libtpu "
                "in this environment (pip install 'jax[tpu]') or pass --xla=false."
            ) from None
        return list(desc.devices), (
            f"compiled by XLA for the TPU slice {topology.tpu_topology} through libtpu"
        )
    cpus = jax.devices("cpu")
    if len(cpus) < topology.num_devices:
        raise RuntimeError(
            f"topology {topology.name!r} needs {topology.num_devices} fake CPU devices but jax has "
            f"{len(cpus)}; start python with XLA_FLAGS=--xla_force_host_platform_device_count="
            f"{topology.num_devices} or pass --xla=false."
        )
    return cpus[: topology.num_devices], (
        f"compiled by XLA's CPU backend on {topology.num_devices} fake CPU devices in the "
        f"{topology.name} mesh (not the GPU compiler: temporaries are indicative)"
    )


@contextlib.contextmanager
def progress(label: str, every: float = 15.0) -> Iterator[None]:
    """Prints `label`, a line every `every` seconds while the block runs, and the time taken."""
    start = time.perf_counter()
    print(f"plan: {label} ...", file=sys.stderr, flush=True)
    done = threading.Event()

    def tick():
        while not done.wait(every):
            print(
                f"plan:   still {label} ({time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
                flush=True,
            )

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        seconds = time.perf_counter() - start
        print(f"plan: {label}: {seconds:.1f} s", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# One plan
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """Everything the tables show for one (config, topology)."""

    name: str  # topology name, or 'local'
    mesh: dict[str, int]
    hbm: int | None
    source: str  # what the XLA numbers are
    items: dict[str, int]
    analytic: dict[str, int]  # phase totals
    xla: dict[str, int] | None  # phase totals
    compiled: dict[str, object]  # function name -> memory.Compiled
    notes: list[str]
    verdict: Verdict | None


def _out_of_memory(error: Exception) -> int | None:
    """XLA's temporaries from a TPU compilation that ran out of HBM, else None."""
    match = _OOM.search(str(error))
    return None if match is None else int(float(match.group(1)) * _UNIT[match.group(2)])


def plan_one(c, topology: topologies.Topology | None, *, xla: bool) -> Plan:
    """Counts, and with `xla` compiles, the AEPO stage of config `c` on `topology` (None: the
    local devices)."""
    import jax
    from jax.sharding import AbstractMesh, AxisType

    from ares_jax.aepo import memory
    from ares_jax.parallel import mesh as mesh_lib

    notes = []
    platform = topology.platform if topology else jax.devices()[0].platform
    if xla and c.model.attention == "cudnn" and platform != "gpu":
        notes.append("model.attention='cudnn' compiles on a GPU only: analytic numbers only.")
        xla = False
    if xla:
        devices, source = devices_for(topology)
        mesh = mesh_lib.make_mesh(dict(c.mesh.shape), devices=devices)
    else:  # shardings need the mesh's shape only
        count = topology.num_devices if topology else jax.device_count()
        sizes = mesh_lib.resolve_shape(dict(c.mesh.shape), count)
        mesh = AbstractMesh(sizes, mesh_lib.AXES, axis_types=(AxisType.Auto,) * len(sizes))
        source = "not compiled (--xla=false)"
    x = memory.setup(c, mesh, platform=platform)
    items = memory.analytic_items(x)
    analytic = memory.phase_totals(items)
    compiled, xla_totals = {}, None
    if xla:
        name = topology.name if topology else "local devices"
        for fn, lower in memory.LOWERINGS.items():
            with progress(f"{name}: compiling the {STEP_LABELS[fn]}"):
                try:
                    compiled[fn] = memory.Compiled.of(lower(x).compile())
                except jax.errors.JaxRuntimeError as e:
                    temp = _out_of_memory(e)
                    if temp is None:
                        raise
                    compiled[fn] = memory.Compiled(memory.argument_bytes(fn, x), 0, 0, temp, 0)
                    notes.append(
                        f"XLA stopped compiling the {STEP_LABELS[fn]}, out of HBM: its "
                        f"temporaries need {gib(temp)} GiB; its total is arguments + those."
                    )
        xla_totals = memory.xla_phase_totals(compiled, items)
    hbm = topology.hbm_bytes if topology else _local_hbm(jax.devices()[0])
    result = verdict(items, memory.PHASES, analytic, xla_totals, hbm) if hbm else None
    return Plan(
        name=topology.name if topology else "local",
        mesh=dict(mesh.shape),
        hbm=hbm,
        source=source,
        items=items,
        analytic=analytic,
        xla=xla_totals,
        compiled=compiled,
        notes=notes,
        verdict=result,
    )


def _local_hbm(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return (stats or {}).get("bytes_limit")


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def detail(p: Plan, preset: str) -> str:
    """Markdown: every item and phase of one plan, with its source."""
    from ares_jax.aepo import memory

    u = unit_for([*p.items.values(), *p.analytic.values(), *(p.xla or {}).values()])
    mesh = " x ".join(f"{k} {v}" for k, v in p.mesh.items())
    lines = [
        f"### {preset} on {p.name} (mesh {mesh}; HBM {gib(p.hbm)} GiB per device)",
        "",
        f"| item | {u[0]} per device | what (analytic) |",
        "|---|---:|---|",
    ]
    for key, bytes_ in p.items.items():
        lines.append(f"| {LABELS[key]} | {fmt(bytes_, u)} | {memory.ITEMS[key]} |")
    lines += ["", f"XLA: {p.source}.", ""]
    lines += [
        f"| phase | analytic {u[0]} | XLA {u[0]} | compiled: argument / output / alias / temp |"
    ]
    lines += ["|---|---:|---:|---|"]
    for phase, label in PHASE_LABELS.items():
        fns = ("prefill", "decode") if phase == "rollout" else (phase,)
        parts = []
        for fn in fns:
            cm = p.compiled.get(fn)
            if cm is not None:
                sizes = (cm.argument, cm.output, cm.alias, cm.temp)
                parts.append(f"{STEP_LABELS[fn]}: " + " / ".join(fmt(b, u) for b in sizes))
        xla = fmt(p.xla[phase], u) if p.xla else "n/a"
        lines.append(f"| {label} | {fmt(p.analytic[phase], u)} | {xla} | {'; '.join(parts)} |")
    lines.append("")
    lines += [f"Note: {n}" for n in p.notes]
    lines.append(f"Verdict: {p.verdict.text() if p.verdict else 'n/a (no HBM size known)'}")
    return "\n".join(lines)


SUMMARY_COLUMNS = (
    "preset",
    "topology",
    "mesh (data, fsdp, tensor)",
    "parameters",
    "optimizer",
    "reference",
    "gradients",
    "activations",
    "KV cache",
    "log-prob pass",
    "total, analytic",
    "total, XLA",
    "HBM",
    "fits?",
)


def summary(plans: list[tuple[Plan, str]]) -> str:
    """Markdown: one row per (plan, preset), per-device sizes in one unit."""
    u = unit_for([b for p, _ in plans for b in (*p.items.values(), *p.analytic.values())])
    head = [f"{c} ({u[0]})" if 3 <= i <= 11 else c for i, c in enumerate(SUMMARY_COLUMNS)]
    head[12] = "HBM (GiB)"
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * 10 + "---|"]
    for p, preset in plans:
        i = p.items
        if p.verdict is None:
            fits = "n/a"
        elif p.verdict.fits:
            fits = "fits"
        else:
            fits = f"no ({LABELS[p.verdict.biggest]})"
        cells = [
            preset,
            p.name,
            ", ".join(str(v) for v in p.mesh.values()),
            *(fmt(i[k], u) for k in ITEM_COLUMNS),
            fmt(max(p.analytic.values()), u),
            fmt(max(p.xla.values()), u) if p.xla else "n/a",
            gib(p.hbm),
            fits,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


ITEM_COLUMNS = (
    "parameters",
    "optimizer",
    "reference",
    "gradients",
    "activations",
    "kv_cache",
    "logprob_pass",
)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def _die(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with a config that fails to load reported in one sentence."""
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.keys()  # forces a lazily reported load failure
    except Exception as e:  # noqa: BLE001 - every failure here is a user error
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [repr(e)]
        _die(re.sub(r"^\w+(Error|Exception): ", "", lines[-1]))
    return rest


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _die(f"unexpected arguments {argv[1:]}; options are --config, --topology, --xla.")
    config = _CONFIG.value
    if config.get("stage") != "aepo":
        _die(
            f"config.stage={config.get('stage')!r}: the planner plans one AEPO stage; name a "
            "stage preset of configs/aepo.py (stage, smoke, paper_3b, paper_7b), not the pipeline."
        )
    spec = flags.FLAGS["config"].config_filename
    preset = spec.split(":", 1)[1] if ":" in spec else "default"
    given = [n.strip() for n in _TOPOLOGY.value.split(",") if n.strip()]
    names = given or ([config.mesh.topology] if config.mesh.topology else [])
    try:
        for name in names:
            topologies.get(name)
    except ValueError as e:
        _die(str(e))
    prepare_environment(names if _XLA.value else [])
    plans = []
    for name in names or [None]:
        c = config.copy_and_resolve_references()
        try:
            if given:  # --topology replaces the config's mesh
                topologies.apply(c, name)
            topologies.check(c)
            p = plan_one(c, topologies.get(name) if name else None, xla=_XLA.value)
        except (ValueError, RuntimeError) as e:
            _die(str(e))
        print(detail(p, preset) + "\n", flush=True)
        plans.append((p, preset))
    print(summary(plans))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
