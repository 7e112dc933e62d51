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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from zjax.config.schema import DEFAULT_LOGICAL_AXIS_RULES
# The batch is split over both data-parallel axes: replicas outside ZeRO and ZeRO's data axis.
from zjax.parallel.zero import BATCH_AXES, model_axes_of

# Expert parallelism's axis: experts' weights split over it (the rule experts: expert), and the
# batch of activations outside the experts (``_batch_axes``).
EXPERT = "expert"

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
      P(('replica', 'data'), 'sequence', None)
      >>> logical_spec(("length", "embed"), mesh_axes={"data": 8, "sequence": 1})
      P(None, 'data')
    """
    rules = current_rules() if rules is None else rules
    used: set[str] = set()
    out = []
    for name in names:
        axes = _batch_axes(mesh_axes) if name == "batch" else ((rules.get(name),) if name is not None else (None,))
        keep = tuple(a for a in axes if a is not None and a not in used
                     and (mesh_axes is None or mesh_axes.get(a, 1) > 1))
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return P(*out)


def _batch_axes(mesh_axes: Mapping[str, int] | None) -> tuple[str, ...]:
    """The mesh axes ``batch`` is split over: ``replica`` x ``data``, and, for the activations of a
    mesh with an ``expert`` axis above 1, ``expert`` too (it carries batch outside the experts,
    as in MaxText; the step's input stays split over replica x data only)."""
    if mesh_axes is not None and mesh_axes.get(EXPERT, 1) > 1:
        return (*BATCH_AXES, EXPERT)
    return BATCH_AXES


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


# --- model-parallel regions: code that sees its own shard -------------------------------


def model_parallel_axes() -> dict[str, int]:
    """The current mesh's model-parallel axes (all but ``replica`` and ``data``) that XLA
    partitions automatically and that have a size above 1, with their sizes."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return {}
    # the pipeline's stage axis splits whole layers, not a region's arrays (zjax.parallel.pipeline)
    return {a: n for a, n in mesh.shape.items()
            if a not in BATCH_AXES and a != "stage" and a not in mesh.manual_axes and n > 1}


def region_spec(names: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                axes: Mapping[str, int] | None = None) -> P:
    """The PartitionSpec over model-parallel ``axes`` of an array with logical ``names``
    (None: replicated). With ``shape``, a dimension its axis size does not divide stays
    whole, the rule that places parameters (``zjax.parallel.zero.model_axes_of``)."""
    axes = model_parallel_axes() if axes is None else axes
    if names is None:
        return P()
    if shape is None:
        return logical_spec(names, mesh_axes=axes)
    split = list(model_axes_of(tuple(shape), tuple(names), current_rules(), axes))
    if axes.get(EXPERT, 1) > 1 and EXPERT not in split and len(names) == len(shape):  # activations' batch
        for i, name in enumerate(names):
            if name == "batch" and shape[i] % axes[EXPERT] == 0:
                split[i] = EXPERT
                break
    return P(*split)


def per_shard(fn: Callable, in_axes: Sequence[Any], out_axes: Any) -> Callable:
    """``fn`` run on each device's shard of the model-parallel axes (``tensor``): Megatron's
    explicit regions, for code that must see its own shard (a column- then row-parallel
    block that sums once, a vocabulary-parallel loss, a kernel that XLA cannot partition).

    Each input's logical ``in_axes`` entry (a tuple of names, or None for a replicated
    input) gives its split; a parameter's dimension stays whole where its size does not
    divide, as in the parameter's own placement, so entering the region moves nothing.
    Inside ``fn``, ``split_axis(name)`` says which mesh axis a logical axis is split over
    and ``lax.psum`` & co. combine shards. Without model-parallel axes (no mesh, tensor
    size 1) ``fn`` is called on the whole arrays; it must then compute the same thing.
    Data-parallel axes are never made manual here.

    Args:
      fn: a function of arrays.
      in_axes: one entry per positional argument: a tuple of logical names or None.
      out_axes: the same for the output (a tuple of names, None, or a tuple of such
        entries for several outputs; give a list for several outputs).
    """
    def call(*args):
        axes = model_parallel_axes()
        if not axes:
            return fn(*args)
        in_specs = tuple(region_spec(names, None if names is None else np.shape(x), axes)
                         for names, x in zip(in_axes, args))
        out_specs = ([region_spec(n, None, axes) for n in out_axes] if isinstance(out_axes, list)
                     else region_spec(out_axes, None, axes))
        def local(*args):
            # An input that is the same on every shard enters as varying once, so its cotangent
            # is summed over the shards once, however many column-parallel matmuls read it.
            return fn(*(jax.tree.map(lambda x: lax.pcast(x, tuple(axes), to="varying"), x)
                        if all(part is None for part in spec) else x for x, spec in zip(args, in_specs)))

        return jax.shard_map(local, mesh=jax.sharding.get_abstract_mesh(), in_specs=in_specs,
                             out_specs=out_specs if not isinstance(out_specs, list) else tuple(out_specs),
                             axis_names=set(axes), check_vma=True)(*args)

    return call


def split_axis(name: str) -> str | None:
    """Inside ``per_shard``: the manual model-parallel mesh axis logical axis ``name`` is split
    over (by the rules), or None (not split, or outside a region)."""
    mesh = jax.sharding.get_abstract_mesh()
    axis = current_rules().get(name)
    if mesh.empty or axis is None or axis in BATCH_AXES or axis not in mesh.manual_axes or mesh.shape[axis] == 1:
        return None
    return axis
