"""Logical axis names -> mesh axes: the one mapping (``logical_axis_rules``) that places
parameters and activations.

Model code names the axes of an activation and calls ``shard(x, ("batch", "length",
"embed"))``; the config's rules say which mesh axis each name is split over. ZeRO reads
the same rules to choose the dimension it splits each parameter along (the names ruled
to ``data``, see ``zjax.parallel.zero.split_dim``). ``batch`` is always split over
``replica`` x ``data``.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from zjax.config.schema import DEFAULT_LOGICAL_AXIS_RULES
# The batch is split over both data-parallel axes: replicas outside ZeRO and ZeRO's data axis.
from zjax.parallel.zero import BATCH_AXES

_RULES: contextvars.ContextVar[Mapping[str, str | None] | None] = contextvars.ContextVar("zjax_rules", default=None)


@contextlib.contextmanager
def axis_rules(rules: Mapping[str, str | None]):
    """Sets the logical-axis rules ``shard`` reads (the train step sets its config's while tracing)."""
    token = _RULES.set(dict(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def current_rules() -> Mapping[str, str | None]:
    rules = _RULES.get()
    return DEFAULT_LOGICAL_AXIS_RULES if rules is None else rules


def logical_spec(names: Sequence[str | None], rules: Mapping[str, str | None] | None = None,
                 mesh_axes: Mapping[str, int] | None = None) -> P:
    """The PartitionSpec of an array whose axes have these logical ``names``.

    Each name maps to its rule's mesh axis (``batch`` to ``replica`` x ``data``); a mesh
    axis is used once, by the first name that claims it, and (when ``mesh_axes`` is
    given) only if that mesh has it with a size above 1.

    Example:
      >>> logical_spec(("batch", "length", "embed"))
      P(('replica', 'data'), None, None)
      >>> logical_spec(("length", "embed"))
      P(None, 'data')
    """
    rules = current_rules() if rules is None else rules
    used: set[str] = set()
    out = []
    for name in names:
        axes = BATCH_AXES if name == "batch" else ((rules.get(name),) if name is not None else (None,))
        keep = tuple(a for a in axes if a is not None and a not in used
                     and (mesh_axes is None or mesh_axes.get(a, 1) > 1))
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return P(*out)


def shard(x: Any, names: Sequence[str | None]) -> Any:
    """Constrains activation ``x`` to the layout its logical axis ``names`` imply.

    A no-op outside a mesh (``jax.set_mesh``), and inside zjax's train step, whose
    per-device program already holds each device's part (the batch split over
    ``replica`` x ``data``); under a mesh with automatic axes, a
    ``with_sharding_constraint`` by the rules (see ``logical_spec``).

    Args:
      x: an array whose rank equals ``len(names)``.
      names: one logical axis name (or None) per dimension.

    Example:
      >>> import jax.numpy as jnp, zjax
      >>> zjax.shard(jnp.ones((2, 3)), ("batch", "embed")).shape  # no mesh: unchanged
      (2, 3)
    """
    if len(names) != x.ndim:
        raise ValueError(f"zjax.shard: {len(names)} names {tuple(names)} for an array of shape {x.shape}; "
                         "give one name (or None) per dimension")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    free = {a: n for a, n in mesh.shape.items() if a not in mesh.manual_axes}
    spec = logical_spec(names, mesh_axes=free)
    if all(s is None for s in spec):
        return x
    return jax.lax.with_sharding_constraint(x, spec)
