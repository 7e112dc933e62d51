"""The device mesh built from the config: ``data`` (ZeRO and data parallelism) x ``tensor``."""
from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh

from zjax.config import resolve_mesh_shape
from zjax.errors import ConfigError

AXES = ("data", "tensor")


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all devices of all processes).

    Args:
      mesh_cfg: the config's ``mesh`` block (``data``, ``tensor``; -1 = remaining devices).
      devices: optional explicit device list.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_cfg, len(devices))
    if shape["tensor"] != 1:
        raise ConfigError(
            f"mesh.tensor={shape['tensor']}: tensor parallelism is not implemented yet; "
            "use mesh.tensor: 1 (all devices on the data axis)"
        )
    return jax.make_mesh(
        tuple(shape[a] for a in AXES), AXES, devices=devices, axis_types=(AxisType.Auto,) * len(AXES)
    )
