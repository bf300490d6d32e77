"""The device mesh: axes ('data', 'fsdp', 'tensor').

`data` splits the batch only (parameters replicated across it), `fsdp` splits the batch and shards
parameters and optimizer state, `tensor` shards heads, MLP width and vocabulary (Megatron style).
`ares_jax.parallel.rules` maps logical dimension names onto these axes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor")
DEFAULT_SHAPE = {"data": -1, "fsdp": 1, "tensor": 1}


def resolve_shape(shape: Mapping[str, int] | Sequence[int] | None, num_devices: int) -> tuple:
    """Returns the mesh sizes (data, fsdp, tensor) for `num_devices` devices.

    Args:
      shape: a mapping over `AXES` (missing axes are 1) or a sequence of 3 sizes; one size may be
        -1, meaning all remaining devices. None = `DEFAULT_SHAPE`.
      num_devices: devices the mesh must use, all of them.

    Raises:
      ValueError: unknown axis, bad size, several -1, or a product different from num_devices.
    """
    if shape is None:
        shape = DEFAULT_SHAPE
    if isinstance(shape, Mapping):
        unknown = [k for k in shape if k not in AXES]
        if unknown:
            raise ValueError(f"mesh shape has unknown axis {unknown[0]!r}; axes are {AXES}.")
        sizes = [shape.get(a, 1) for a in AXES]
    else:
        sizes = list(shape)
        if len(sizes) != len(AXES):
            raise ValueError(f"mesh shape {tuple(sizes)} must give {len(AXES)} sizes for {AXES}.")
    for axis, size in zip(AXES, sizes, strict=True):
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {axis!r} has size {size!r}; use a positive int or -1.")
    named = dict(zip(AXES, sizes, strict=True))
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {named}: at most one axis may be -1.")
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(
                f"mesh shape {named}: the fixed axes ({fixed} devices) do not divide the "
                f"{num_devices} devices, so -1 cannot fill the rest."
            )
        sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"mesh shape {named} uses {fixed} devices but {num_devices} are available; the "
            "product of the sizes must equal the device count (or use -1 for one axis)."
        )
    return tuple(sizes)


def make_mesh(
    shape: Mapping[str, int] | Sequence[int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds the ('data', 'fsdp', 'tensor') mesh over `devices` (default: all, every process).

    Device order comes from `jax.make_mesh` (mesh_utils), which respects the TPU ICI topology;
    a shape that needs a physical axis split in two (tensor=2 on a 4x4 v6e slice) is laid out by
    `mesh_utils.create_device_mesh(..., allow_split_physical_axes=True)`, which keeps each mesh
    axis on neighbouring chips. Axis types are Auto: GSPMD propagates shardings, and
    `rules.constrain` pins activations. Devices of several TPU slices (multi-slice, joined by
    the data-centre network) are laid out by `device_grid`: `data` spans the slices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_shape(shape, len(devices))
    types = (AxisType.Auto,) * len(AXES)
    if num_slices(devices) > 1:
        return Mesh(device_grid(sizes, devices), AXES, axis_types=types)
    try:
        return jax.make_mesh(sizes, AXES, axis_types=types, devices=devices)
    except (ValueError, NotImplementedError) as e:  # mesh_utils raises the latter for a split
        if "allow_split_physical_axes" not in str(e):
            raise
    grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    return Mesh(grid, AXES, axis_types=types)


def num_slices(devices: Sequence) -> int:
    """Distinct TPU slices among `devices` (1 where devices carry no `slice_index`)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(sizes: Sequence[int], devices: Sequence) -> np.ndarray:
    """The [data, fsdp, tensor] array of `devices` spread over several slices: `data` is split
    into slices x data-per-slice, so only the data-parallel gradient reduction crosses the slow
    network, and fsdp and tensor stay inside each slice (on its ICI, by mesh_utils' layout).

    Raises:
      ValueError: if the data axis is not a multiple of the slice count, naming both.
    """
    slices = num_slices(devices)
    data, fsdp, tensor = sizes
    if data % slices:
        raise ValueError(
            f"mesh.shape.data={data} must be a multiple of the {slices} slices the devices span: "
            "data parallelism is what crosses slices (fsdp and tensor stay within one)."
        )
    return mesh_utils.create_hybrid_device_mesh(
        (data // slices, fsdp, tensor), (slices, 1, 1), devices, allow_split_physical_axes=True
    )
