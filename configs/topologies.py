"""Named hardware topologies and the mesh each gets: `--config=configs/aepo.py:...,topology=NAME`.

  python -m ares_jax.main --config=configs/aepo.py:preset=paper_3b,topology=v5p-8 --workdir=DIR
  python -m ares_jax.plan --config=configs/aepo.py:preset=paper_7b,topology=2x8xh100

A topology names the machine: device kind, devices, hosts (one JAX process each), HBM per device,
and for TPUs the slice shape that `jax.experimental.topologies` compiles for without the hardware
(TPU.md). `apply` turns it into `config.mesh.shape` (data, fsdp, tensor), `config.mesh.rules` and
`config.mesh.topology`, by one rule for every topology and model:

- data = slices (TPU) or nodes (GPU): parameters are replicated across the slow data-centre
  network and only gradients cross it, once per optimizer step;
- fsdp = the devices of one slice or node: parameters, gradients and optimizer state are sharded
  over the fast interconnect (ICI, NVLink) and the batch rows split over data x fsdp;
- tensor = 1, unless the micro-batch has fewer rows than data x fsdp devices (a row cannot be
  split by FSDP): then the smallest power of two that gives every device a row, within one host
  and only if it divides the query heads (16 for 3B, 28 for 7B) and the MLP width. The KV heads
  (2 for 3B, 4 for 7B) are then sharded too where they divide; where they do not, the rule
  ('kv_heads', None) replicates the K/V projections and the KV cache over `tensor` (that is
  also what ares_jax/parallel/rules.py falls back to for a dimension that does not divide; the
  override only makes the choice explicit).

With the paper presets (32-row micro-batches) every topology here gets tensor = 1: FSDP shards all
state over every device of a slice or node, and splitting heads over `tensor` would not lower the
per-device activations (the rows per device would double as the heads per device halve). A smaller
`train.micro_batch_size` or more devices bring `tensor` in; `python -m ares_jax.plan` shows the
per-device memory of any choice.

HBM per device: TPU v5p 95 GiB, TPU v6e (Trillium) 32 GiB, NVIDIA H100 SXM 80 GB (81,559 MiB as
nvidia-smi reports it; JAX takes 75% of it unless XLA_PYTHON_CLIENT_MEM_FRACTION says more).

This module imports nothing from ares_jax (configs stay importable without jax).
"""

from __future__ import annotations

import dataclasses
import re

import ml_collections

GiB = 2**30
MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Topology:
    """One machine or pod: what `python -m ares_jax.plan` compiles for and compares memory with."""

    name: str
    platform: str  # 'tpu' | 'gpu'
    device_kind: str  # as people name it: 'TPU v5p', 'NVIDIA H100 80GB'
    num_devices: int  # chips (TPU) or GPUs, all hosts together
    num_hosts: int  # hosts, one JAX process each
    hbm_bytes: int  # memory per device
    num_slices: int = 1  # TPU slices or GPU nodes, joined by the data-centre network
    # TPU only: the slice for jax.experimental.topologies.get_topology_desc (TPU.md).
    tpu_topology: str = ""
    chips_per_host_bounds: tuple[int, int, int] = (2, 2, 1)

    @property
    def devices_per_host(self) -> int:
        return self.num_devices // self.num_hosts

    @property
    def devices_per_slice(self) -> int:
        return self.num_devices // self.num_slices


_V5P_HBM = 95 * GiB
_V6E_HBM = 32 * GiB
_H100_HBM = 81559 * MiB

_FIXED = {
    "v5p-8": Topology("v5p-8", "tpu", "TPU v5p", 4, 1, _V5P_HBM, tpu_topology="v5p:2x2x1"),
    "v5p-64": Topology("v5p-64", "tpu", "TPU v5p", 32, 8, _V5P_HBM, tpu_topology="v5p:4x4x2"),
    "v6e-16": Topology("v6e-16", "tpu", "TPU v6e", 16, 4, _V6E_HBM, tpu_topology="v6e:4x4"),
}
_GPU_NODES = re.compile(r"(?:(\d+)x)?8xh100")

NAMES = ("v5p-8", "v5p-64", "v6e-16", "8xh100", "2x8xh100")
KNOWN = "'v5p-8', 'v5p-64', 'v6e-16', '8xh100', '2x8xh100' (or 'Nx8xh100' for N nodes)"

# Query and KV heads and MLP width of the model presets (ares_jax/models/qwen2_5_vl/config.py;
# tests/configs/topologies_test.py keeps the two in step).
MODEL_HEADS = {
    "tiny": (4, 2, 128),
    "small": (4, 2, 384),
    "3b": (16, 2, 11008),
    "7b": (28, 4, 18944),
}


def get(name: str) -> Topology:
    """The topology called `name`.

    Raises:
      ValueError: one sentence naming config.mesh.topology and the known names.
    """
    if name in _FIXED:
        return _FIXED[name]
    match = _GPU_NODES.fullmatch(name)
    nodes = int(match.group(1) or 1) if match else 0
    if nodes < 1:
        raise ValueError(f"config.mesh.topology: unknown topology {name!r}; known: {KNOWN}.")
    return Topology(name, "gpu", "NVIDIA H100 80GB", 8 * nodes, nodes, _H100_HBM, num_slices=nodes)


def mesh_for(
    topology: Topology, *, heads: int, kv_heads: int, mlp: int, micro_batch: int
) -> tuple[dict[str, int], tuple]:
    """(mesh shape, logical-rule overrides) for a model on `topology` (the module docstring)."""
    data = topology.num_slices
    per_slice = topology.devices_per_slice
    tensor = 1
    while data * per_slice // tensor > micro_batch:
        wider = tensor * 2
        if topology.devices_per_host % wider or heads % wider or mlp % wider:
            break
        tensor = wider
    rules = (("kv_heads", None),) if kv_heads % tensor else ()
    return dict(data=data, fsdp=per_slice // tensor, tensor=tensor), rules


def apply(c: ml_collections.ConfigDict, name: str) -> None:
    """Sets c.mesh.topology, c.mesh.shape and c.mesh.rules for topology `name` and the model and
    micro-batch the config holds now (`train` for AEPO, `sft` for AdaCS)."""
    topology = get(name)
    if c.model.preset not in MODEL_HEADS:
        raise ValueError(
            f"config.model.preset: {c.model.preset!r} has no head counts for topology {name!r}; "
            f"known: {', '.join(sorted(MODEL_HEADS))}."
        )
    heads, kv_heads, mlp = MODEL_HEADS[c.model.preset]
    block = c.train if "train" in c else c.sft
    shape, rules = mesh_for(
        topology, heads=heads, kv_heads=kv_heads, mlp=mlp, micro_batch=block.micro_batch_size
    )
    c.mesh.topology = name
    c.mesh.shape.update(shape)
    c.mesh.rules = rules


def check(c: ml_collections.ConfigDict) -> None:
    """Validation: a known c.mesh.topology whose device count the mesh shape uses up exactly."""
    name = c.mesh.topology
    if not name:
        return
    topology = get(name)
    sizes = [c.mesh.shape[a] for a in ("data", "fsdp", "tensor")]
    fixed = 1
    for size in sizes:
        fixed *= size if size != -1 else 1
    uses = fixed if -1 not in sizes else None
    if (uses is not None and uses != topology.num_devices) or topology.num_devices % fixed:
        raise ValueError(
            f"config.mesh.shape: {dict(c.mesh.shape)} does not use the {topology.num_devices} "
            f"devices of topology {name!r} (the product of the sizes must equal it)."
        )
