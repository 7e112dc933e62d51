"""The device mesh built from the config: ``replica`` x ``data`` (ZeRO) x ``stage`` x
``tensor`` x ``sequence`` x ``expert``, one named axis per parallelism (size 1 when unused).

``replica`` is outermost so that, on hardware with a slow outer network, each replica
is a group of well-connected devices: on multi-slice TPUs the mesh comes from
``mesh_utils.create_hybrid_device_mesh`` with the slices along ``replica``; elsewhere
devices are taken in ``jax.devices()`` order, which groups each process's devices, so a
replica spans whole processes (hosts).
"""
from __future__ import annotations

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from zjax.config.schema import resolve_mesh_shape
from zjax.errors import ConfigError

AXES = ("replica", "data", "stage", "tensor", "sequence", "expert")
# Axes whose parallelism is not built yet: their size must be 1.
NOT_BUILT: dict[str, str] = {}


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all devices of all processes).

    Args:
      mesh_cfg: the config's ``mesh`` block (``data``, ``tensor``; -1 = remaining devices).
      devices: optional explicit device list.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    for axis, what in NOT_BUILT.items():
        if shape[axis] != 1:
            raise ConfigError(
                f"mesh.{axis}={shape[axis]}: {what} is not implemented yet; "
                f"use mesh.{axis}: 1 (all devices on the data axis)"
            )
    sizes = tuple(shape[a] for a in AXES)
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1:
        if shape["replica"] != len(slices):
            raise ConfigError(
                f"mesh.replica={shape['replica']} but the devices span {len(slices)} slices; "
                f"use mesh.replica: {len(slices)} (one replica per slice; ZeRO runs inside each)"
            )
        grid = mesh_utils.create_hybrid_device_mesh((1, *sizes[1:]), (len(slices), *[1] * (len(AXES) - 1)),
                                                    devices)
        return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))
    return jax.make_mesh(sizes, AXES, devices=devices, axis_types=(AxisType.Auto,) * len(AXES))
