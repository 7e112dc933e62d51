"""ZeRO placement: how each parameter is laid out, sharded and brought back.

Every parameter leaf keeps its own shape and is sharded over the ``data`` axis along one
of its dimensions (as PyTorch's FSDP2 and MaxText do), so an optimizer sees each
parameter whole and in its shape: any optax transform (masks by ``ndim``, LAMB's trust
ratio, Adafactor's factored moments) is exact. The dimension is the leaf's ``embed``
axis when it divides by the shard count, else its largest dimension that does; a leaf
with no such dimension is padded along its largest one by at most ``shards - 1`` rows
(its *stored* shape). A leaf whose first logical axis is ``layers`` keeps that axis
whole, so a scan can take one layer at a time and ZeRO-3 can gather one layer at a time.

Under sequence parallelism (``mesh.sequence`` = P > 1) the ZeRO group is ``data`` x
``sequence``, as in DeepSpeed-Ulysses (its sequence-data-parallel group): every device
of a sequence group computes the same weights' gradients from its part of the tokens, so
the state is split over all D x P of them (``LeafLayout.group``), not kept P times.

The collectives are explicit (inside ``jax.shard_map`` over ``data``):
``reduce_scatter_grads`` for gradients, ``all_gather_params`` for updated params,
``gather_for_compute`` for ZeRO-3's just-in-time parameter gathering, whose
backward pass is a reduce-scatter, and ``take_for_compute``, ZeRO-2's reduce-scatter
of each layer's gradient inside the backward pass.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from zjax.errors import ConfigError
from zjax.parallel.quantize import quantized_all_gather, two_hop_reduce_scatter

DATA = "data"
# Replicas outside ZeRO (slices over DCN); the batch is split over both axes.
REPLICA = "replica"
BATCH_AXES = (REPLICA, DATA)
# Sequence parallelism's axis: it shares ZeRO's split with data (LeafLayout.group).
SEQUENCE = "sequence"
# The logical axis ZeRO shards when it divides (MaxText's fsdp axis).
ZERO_AXIS = "embed"


@dataclasses.dataclass(frozen=True)
class ZeroStage:
    """Everything a ZeRO stage decides, in one place (the step, ``zjax plan``, ``zjax profile``
    and checkpoints read it; none of them branches on the stage number).

    Attributes:
      stage: 0-3.
      data: the ZeRO group's size N (the ``data`` axis, times ``sequence`` under sequence
        parallelism).
      mixed: True when the compute dtype is lower than the fp32 param dtype.
    """

    stage: int
    data: int
    mixed: bool = False

    def __post_init__(self):
        if self.stage not in (0, 1, 2, 3):
            raise ValueError(f"zero.stage={self.stage}: use 0, 1, 2 or 3")

    @property
    def shards(self) -> int:
        """ZeRO partitions of each parameter's stored form and optimizer state."""
        return 1 if self.stage == 0 else self.data

    @property
    def partitioned(self) -> bool:
        """Optimizer state (and the master, where kept) split over ``data``."""
        return self.stage >= 1

    @property
    def keeps_replicated(self) -> bool:
        """A user-shaped replicated copy of the params lives in the state (stages 0-2)."""
        return self.stage <= 2

    @property
    def keeps_master(self) -> bool:
        """A sharded fp32 master lives in the state: stage 3, and stages 1-2 in mixed precision
        (in fp32 at stages 0-2 the replicated params are the master)."""
        return self.stage == 3 or (self.stage >= 1 and self.mixed)

    @property
    def reduces_in_backward(self) -> bool:
        """The loss is differentiated with respect to this device's shard, so each layer's
        gradient is reduce-scattered inside the backward pass (stages 2-3); else the full
        local gradient is accumulated and reduced once after the micro-batches."""
        return self.stage >= 2

    @property
    def gathers_for_loss(self) -> bool:
        """Parameters reach the loss by all-gathering shards (stage 3), not from a replicated copy."""
        return self.stage == 3

    @property
    def gathers_after_update(self) -> bool:
        """Updated shards are all-gathered into the replicated copy (stages 1-2)."""
        return self.partitioned and self.keeps_replicated

    @property
    def frozen_shards(self) -> int:
        """Partitions of a frozen parameter: split like a master at stage 3, else replicated."""
        return self.data if self.gathers_for_loss else 1

    def state_bytes(self, psi: float, compute_bytes: int, param_bytes: int = 4, moment_bytes: int = 8) -> float:
        """Persistent TrainState bytes per device for ``psi`` trainable parameters (ZeRO's table)."""
        n = self.shards
        replicated = (compute_bytes if self.keeps_master else param_bytes) * psi if self.keeps_replicated else 0
        master = param_bytes * psi / n if self.keeps_master else 0
        return replicated + master + moment_bytes * psi / n


@dataclasses.dataclass(frozen=True)
class LeafLayout:
    """Where one parameter lives: its user shape and its stored, sharded form.

    Attributes:
      shape: the user's shape of the leaf.
      stacked: True when the leading axis is the ``layers`` axis of a scanned stack.
      shards: number of ZeRO partitions (the ZeRO group's size: ``data``, times ``group``'s
        sizes; 1 for stage 0).
      partitioned: True when the leaf is split over ``data`` (stages 1-3), even on a
        one-device axis.
      dim: the dimension of one layer (``layer_shape``) split over ``data``; None for a
        leaf that is not split (stage 0, scalars).
      model_axes: per dimension of one layer, the model-parallel mesh axis it is split
        over (``tensor``, by the logical-axis rules), or None; never ``dim``. The step
        leaves these axes to XLA (automatic) and runs ZeRO's collectives on each of
        their shards, so a parameter split over ``tensor`` is never gathered over it.
      group: ``(axis, size)`` of the axes that share ZeRO's split with ``data`` (minor to it):
        ``(("sequence", P),)`` under sequence parallelism, else empty. The step is manual
        over ``data`` only; the collectives run manual over these too (``on_model_shards``).
      lead_axis: the mesh axis a stack's ``layers`` dimension is split over (``stage``:
        pipeline parallelism, each stage holding its contiguous chunk of layers), or None.
      interleave: ``(V, P)`` when the interleaved pipeline schedule gives each of the ``P``
        stages ``V`` chunks of the stack (chunk ``v`` of stage ``s`` is the model's
        ``v·P + s``-th of ``V·P``): the state keeps the stack in *stage order*
        (``to_stage_order``) so that each stage's rows are its chunks; else None.
    """

    shape: tuple[int, ...]
    stacked: bool
    shards: int
    partitioned: bool
    dim: int | None = None
    model_axes: tuple[str | None, ...] = ()
    group: tuple[tuple[str, int], ...] = ()
    lead_axis: str | None = None
    interleave: tuple[int, int] | None = None

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.stacked else self.shape

    @property
    def lead(self) -> tuple[int, ...]:
        return self.shape[:1] if self.stacked else ()

    @property
    def size(self) -> int:
        return math.prod(self.layer_shape)

    @property
    def sharded(self) -> bool:
        """True when the leaf is split over ``data`` (its spec names ``data``)."""
        return self.partitioned and self.dim is not None

    @property
    def axis(self) -> int:
        """The split dimension in the stored (whole-stack) array."""
        return len(self.lead) + self.dim

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The user shape, the split dimension padded to a multiple of ``shards``."""
        if not self.sharded:
            return self.shape
        shape = list(self.shape)
        shape[self.axis] = -(-shape[self.axis] // self.shards) * self.shards
        return tuple(shape)

    @property
    def local_shape(self) -> tuple[int, ...]:
        """Shape of one device's part of the stored form (the whole of it when not split)."""
        if not self.sharded:
            return self.shape
        shape = list(self.stored_shape)
        shape[self.axis] //= self.shards
        return tuple(shape)

    @property
    def zero_axes(self) -> str | tuple[str, ...]:
        """The mesh axes of ZeRO's split: ``data``, or ``("data", "sequence")``."""
        return (DATA, *(name for name, _ in self.group)) if self.group else DATA

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one ``data`` shard of the stored form (what the step's shard_map, manual
        over ``data``, sees; ``local_shape`` when ``group`` is empty)."""
        if not self.sharded:
            return self.shape
        shape = list(self.stored_shape)
        shape[self.axis] //= self.shards // math.prod(size for _, size in self.group)
        return tuple(shape)

    @property
    def spec(self) -> P:
        """PartitionSpec of the stored form: the split dimension over ``data`` (and ``group``),
        the others over their model-parallel axes."""
        axes = [self.lead_axis] * len(self.lead) + list(self.model_axes or [None] * len(self.layer_shape))
        if self.sharded:
            axes[self.axis] = self.zero_axes
        return _trim(axes)

    @property
    def data_spec(self) -> P:
        """The part of ``spec`` over ``data`` (what a ``shard_map`` manual over ``data`` names)."""
        return P(*([None] * self.axis), DATA) if self.sharded else P()

    @property
    def model_spec(self) -> P:
        """The part of ``spec`` over the model-parallel axes (a replicated copy's sharding)."""
        return _trim([self.lead_axis] * len(self.lead) + list(self.model_axes or ()))

    @property
    def shard_spec(self) -> P:
        """The part of ``spec`` that is not ``data``: the model-parallel axes and ``group``'s
        (what a ``data`` shard is split over inside the step)."""
        axes = [self.lead_axis] * len(self.lead) + list(self.model_axes or [None] * len(self.layer_shape))
        if self.sharded and self.group:
            names = tuple(name for name, _ in self.group)
            axes[self.axis] = names if len(names) > 1 else names[0]
        return _trim(axes)

    def per_layer(self) -> "LeafLayout":
        return LeafLayout(self.layer_shape, False, self.shards, self.partitioned, self.dim, self.model_axes,
                          self.group)


def _trim(axes: list) -> P:
    while axes and axes[-1] is None:
        axes.pop()
    return P(*axes)


def make_layouts(params: Any, logical_axes: Any, shards: int, partitioned: bool,
                 zero_names: tuple[str, ...] = (ZERO_AXIS,), model_rules: Mapping[str, str | None] | None = None,
                 mesh_shape: Mapping[str, int] | None = None, group: tuple[tuple[str, int], ...] = (),
                 repeats: int = 1) -> Any:
    """One LeafLayout per leaf of ``params`` (shapes only are read).

    Args:
      params: a pytree of arrays or ShapeDtypeStructs.
      logical_axes: None, or a pytree with the same structure whose leaves are
        tuples of logical axis names; a leaf whose tuple starts with ``layers`` is
        treated as a scanned stack.
      shards: the ZeRO partition count (1 for stage 0).
      partitioned: whether the leaves are split over ``data`` (stages 1-3).
      zero_names: the logical axes the rules map to ``data``, preferred in this order.
      model_rules: logical axis name -> mesh axis (the config's rules); names ruled to a
        model-parallel axis (any but ``data``/``replica``) of ``mesh_shape`` size above 1
        split their dimension over it when the size divides (else it stays whole).
      mesh_shape: mesh axis name -> size.
      group: ``LeafLayout.group`` (``shards`` includes its sizes).
      repeats: the chunks of a stack each device of its lead axis holds (the interleaved
        pipeline's ``V``; ``LeafLayout.interleave``).
    """
    leaves, treedef = jax.tree.flatten(params)
    if logical_axes is None:
        axes = [()] * len(leaves)
    else:
        axes = treedef.flatten_up_to(logical_axes)
    layouts = []
    for x, names in zip(leaves, axes):
        shape = tuple(x.shape)
        stacked = bool(names) and names[0] == "layers" and len(shape) >= 1
        layer_names = tuple(names[1:] if stacked else names) if names else ()
        layer_shape = shape[1:] if stacked else shape
        # an axis of the ZeRO group splits no dimension as a model-parallel axis
        model = model_axes_of(layer_shape, layer_names, model_rules or {},
                              {a: n for a, n in (mesh_shape or {}).items() if a not in dict(group)})
        free = tuple(i for i, a in enumerate(model) if a is None)
        dim = split_dim(layer_shape, layer_names, shards, zero_names, free) if partitioned else None
        lead = (model_rules or {}).get("layers") if stacked else None
        size = (mesh_shape or {}).get(lead, 1) if lead else 1
        if size > 1 and shape[0] % size:
            raise ConfigError(f"a 'layers' stack of {shape[0]} layers does not split into mesh.{lead}={size} "
                              f"equal chunks; use a {lead} size that divides {shape[0]} (or model.n_layers that "
                              f"{size} divides)")
        if size > 1 and repeats > 1 and shape[0] % (size * repeats):
            raise ConfigError(f"a 'layers' stack of {shape[0]} layers does not split into mesh.{lead}={size} x "
                              f"pipeline.repeats={repeats} = {size * repeats} equal chunks; use sizes whose product "
                              f"divides {shape[0]}")
        layouts.append(LeafLayout(shape, stacked, shards, partitioned, dim,
                                  model if any(a is not None for a in model) else (), group if dim is not None else (),
                                  lead if size > 1 else None,
                                  (repeats, size) if size > 1 and repeats > 1 else None))
    return jax.tree.unflatten(treedef, layouts)


def model_axes_of(shape: tuple[int, ...], names: tuple[str, ...], rules: Mapping[str, str | None],
                  mesh_shape: Mapping[str, int]) -> tuple[str | None, ...]:
    """Per dimension, the model-parallel mesh axis its logical name is ruled to, where that
    axis has a size above 1 that divides the dimension (each mesh axis used once)."""
    out: list[str | None] = [None] * len(shape)
    if len(names) != len(shape):
        return tuple(out)
    used: set[str] = set()
    for i, name in enumerate(names):
        axis = rules.get(name) if name is not None else None
        if axis in (None, DATA, REPLICA) or axis in used:
            continue
        size = mesh_shape.get(axis, 1)
        if size > 1 and shape[i] % size == 0:
            out[i] = axis
            used.add(axis)
    return tuple(out)


def split_dim(shape: tuple[int, ...], names: tuple[str, ...], shards: int,
              zero_names: tuple[str, ...] = (ZERO_AXIS,), free: tuple[int, ...] | None = None) -> int | None:
    """The dimension ZeRO splits: the first of ``zero_names`` (the logical axes the rules map
    to ``data``) that the leaf has and that divides by ``shards``, else the largest dimension
    that does, else the largest (to be padded); None for a scalar. Only dimensions in ``free``
    (default: all) are candidates: one split over a model-parallel axis is not; a leaf with
    no free dimension is not split over ``data``."""
    free = tuple(range(len(shape))) if free is None else free
    if not free:
        return None
    divisible = [i for i in free if shape[i] % shards == 0]
    if len(names) == len(shape):
        for name in zero_names:
            if name in names and names.index(name) in divisible:
                return names.index(name)
    candidates = divisible or free
    return max(candidates, key=lambda i: (shape[i], -i))


def state_specs(state_shapes: Any, layouts: Any) -> Any:
    """Shardings of optimizer state (shapes from ``jax.eval_shape(tx.init, params)``).

    A subtree with the params' structure and stored shapes (Adam's moments) is split like
    the params (over ``data`` from stage 1, over ``tensor`` at every stage), so an
    element-wise update needs no communication. A leaf under a dict key naming a parameter's
    path (``a/b/c``, or ``anything:a/b/c``: ``zjax.compression``'s masks, scores and dense
    values) with that parameter's stored shape is split like it -- otherwise an update reading
    both would move one of them, with collectives that depend on nothing but the state and
    can run beside the forward's (XLA:CPU then deadlocks). Any other leaf is split like the
    one parameter of its shape, or, where no or several parameters have it (Adafactor's
    factored moments), along its largest dimension that divides by the shard count, or kept
    whole.
    """
    leaves, treedef = jax.tree.flatten(layouts, is_leaf=is_layout)
    partitioned = any(lay.partitioned for lay in leaves)
    shards = leaves[0].shards if leaves else 1
    zero_axes = next((lay.zero_axes for lay in leaves if lay.sharded), DATA)
    stored = tuple(lay.stored_shape for lay in leaves)
    param_specs = jax.tree.unflatten(treedef, [lay.spec for lay in leaves])
    by_shape: dict = {}
    for lay in leaves:
        by_shape.setdefault(lay.stored_shape, set()).add(lay.spec)

    named = {_path_name(path): lay for path, lay in jax.tree_util.tree_flatten_with_path(layouts, is_leaf=is_layout)[0]}

    def leaf_spec(path, x) -> P:
        shape = tuple(x.shape)
        key = getattr(path[-1], "key", None) if path else None
        lay = named.get(key.rsplit(":", 1)[-1]) if isinstance(key, str) else None
        if lay is not None and lay.stored_shape == shape:
            return lay.spec
        if len(by_shape.get(shape, ())) == 1:
            return next(iter(by_shape[shape]))
        dim = split_dim(shape, (), shards) if partitioned else None
        if dim is None or shape[dim] % shards:
            return P()
        return P(*([None] * dim), zero_axes)

    def is_params(node) -> bool:
        return is_param_subtree(node, treedef, stored)

    return jax.tree_util.tree_map_with_path(lambda path, n: param_specs if is_params(n) else leaf_spec(path, n),
                                            state_shapes, is_leaf=is_params)


def _path_name(path) -> str:
    """A key path as ``a/b/c`` (as ``zjax.compression.masks.path_name`` names parameters)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def is_param_subtree(node: Any, treedef: Any, shapes: tuple) -> bool:
    """True when ``node`` has the params' tree structure and these leaf ``shapes`` (an
    optimizer's moments; a single-array model's moments too)."""
    return (jax.tree.structure(node) == treedef
            and tuple(tuple(getattr(x, "shape", ())) for x in jax.tree.leaves(node)) == shapes)


def is_layout(x: Any) -> bool:
    return isinstance(x, LeafLayout)


def map_layouts(fn, layouts: Any, *trees: Any) -> Any:
    """``jax.tree.map`` over a layout tree and trees of the same structure."""
    return jax.tree.map(fn, layouts, *trees, is_leaf=is_layout)


def to_stored(x: jax.Array, lay: LeafLayout) -> jax.Array:
    """User shape -> stored form (the split dimension zero-padded to whole shards)."""
    pad = lay.stored_shape[lay.axis] - lay.shape[lay.axis] if lay.sharded else 0
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[lay.axis] = (0, pad)
        x = jnp.pad(x, widths)
    return x


def to_stage_order(x: jax.Array, lay: LeafLayout | None) -> jax.Array:
    """A stack in the model's layer order -> the state's order (``LeafLayout.interleave``): the
    ``V·P`` chunks ``c = v·P + s`` reordered to ``(s, v)``, so that the contiguous rows of stage
    ``s`` are its chunks ``s, P + s, ..., (V-1)·P + s``. Identity without interleaving.

    Example:
      >>> lay = LeafLayout((8,), True, 1, False, lead_axis="stage", interleave=(2, 2))
      >>> to_stage_order(jnp.arange(8), lay).tolist(), from_stage_order(to_stage_order(jnp.arange(8), lay), lay).tolist()
      ([0, 1, 4, 5, 2, 3, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7])
    """
    if lay is None or lay.interleave is None:
        return x
    v, p = lay.interleave
    return x.reshape((v, p, -1) + x.shape[1:]).swapaxes(0, 1).reshape(x.shape)


def from_stage_order(x: jax.Array, lay: LeafLayout | None) -> jax.Array:
    """The inverse of ``to_stage_order``."""
    if lay is None or lay.interleave is None:
        return x
    v, p = lay.interleave
    return x.reshape((p, v, -1) + x.shape[1:]).swapaxes(0, 1).reshape(x.shape)


def interleaved(layouts: Any) -> bool:
    """Whether any stack of ``layouts`` is kept in stage order (``to_stage_order``)."""
    return any(lay.interleave is not None for lay in jax.tree.leaves(layouts, is_leaf=is_layout) if lay is not None)


def stage_order(layouts: Any, tree: Any, inverse: bool = False) -> Any:
    """``to_stage_order`` (``from_stage_order`` when ``inverse``) on every leaf of ``tree`` (the
    structure of ``layouts``; None holes kept)."""
    fn = from_stage_order if inverse else to_stage_order
    return jax.tree.map(lambda lay, x: None if x is None else fn(x, lay), layouts, tree,
                        is_leaf=lambda x: x is None or is_layout(x))


def from_stored(x: jax.Array, lay: LeafLayout) -> jax.Array:
    """Stored form -> user shape."""
    if lay.stored_shape != lay.shape:
        x = lax.slice_in_dim(x, 0, lay.shape[lay.axis], axis=lay.axis)
    return x


def on_model_shards(fn, in_specs: Any, out_specs: Any):
    """``fn`` run on each shard of the model-parallel axes (``tensor``) that ``in_specs`` and
    ``out_specs`` (PartitionSpecs over those axes only) name and the current mesh leaves to
    XLA; ``fn`` itself where they name none (no mesh, size-1 axes, or axes already manual).

    ZeRO's collectives over ``data`` go through it: left to XLA, an all-gather over ``data``
    of a tensor-split parameter is preceded by an all-gather over ``tensor`` (measured).
    """
    axes = auto_axes((in_specs, out_specs))
    if not axes:
        return fn
    return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=in_specs, out_specs=out_specs,
                         axis_names=set(axes), check_vma=False)


def auto_axes(specs: Any) -> tuple[str, ...]:
    """The mesh axes that PartitionSpecs ``specs`` name and the current mesh leaves to XLA
    with a size above 1 (what ``on_model_shards`` makes manual), sorted."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    named = set()
    for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)):
        for part in spec:
            named.update(part if isinstance(part, tuple) else (part,))
    return tuple(sorted(a for a in named if a is not None and a in mesh.shape and a not in mesh.manual_axes
                        and mesh.shape[a] > 1))


def varying_like(tree: Any, like: Any) -> Any:
    """``tree``'s arrays marked as varying over every manual axis that any array of ``tree`` or
    ``like`` varies over (a loop carry must start with the type the loop gives it, under
    shard_map's vma checks); ``tree`` itself where nothing tracks variance."""
    def varying(x):
        kind = getattr(jax.typeof(x), "manual_axis_type", None)
        return None if kind is None else frozenset(kind.varying)

    found = [varying(x) for x in jax.tree.leaves((tree, like))]
    if not found or any(v is None for v in found):
        return tree
    axes = frozenset().union(*found)

    def mark(x):
        missing = tuple(sorted(axes - varying(x)))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(mark, tree)


def cotangent_like(ct: Any, primal: Any) -> Any:
    """A custom VJP's cotangents given the primals' variance (shard_map's vma checks): summed
    over the manual axes a cotangent varies over and its primal does not (the transpose of
    using an invariant value with varying ones), marked varying where the primal varies."""
    def fix(c, x):
        have = getattr(jax.typeof(c), "manual_axis_type", None)
        want = getattr(jax.typeof(x), "manual_axis_type", None)
        if have is None or want is None or not jnp.issubdtype(c.dtype, jnp.inexact):
            return c
        extra = tuple(sorted(set(have.varying) - set(want.varying)))
        c = lax.psum(c, extra) if extra else c
        missing = tuple(sorted(set(want.varying) - set(jax.typeof(c).manual_axis_type.varying)))
        return lax.pcast(c, missing, to="varying") if missing else c

    return jax.tree.map(fix, ct, primal)


def constrain(x: jax.Array, lay: LeafLayout, shard: bool = False) -> jax.Array:
    """``x`` (laid out like ``lay``'s stored form, or its ``data`` shard) pinned to ``lay``'s
    split over the automatic axes, so XLA does not pick another layout for a buffer it
    creates (an accumulator)."""
    spec = lay.shard_spec if shard else lay.model_spec
    if not auto_axes(spec):
        return x
    return lax.with_sharding_constraint(x, spec)


def _per_shard(lay: LeafLayout, fn, kinds: str = "ss"):
    """``fn`` on each shard of the automatic axes ``lay`` is split over (model-parallel and
    ``group``). ``kinds``: per input, then the output, ``s`` for a ``data`` shard of the
    stored form or ``f`` for a full one (split over the model-parallel axes only)."""
    if not lay.model_axes and not lay.lead_axis and not (lay.sharded and lay.group):
        return fn
    spec = {"s": lay.shard_spec, "f": lay.model_spec}
    return on_model_shards(fn, tuple(spec[k] for k in kinds[:-1]), spec[kinds[-1]])


def _zero_index(lay: LeafLayout) -> jax.Array:
    """This device's position in ``lay``'s ZeRO group (``data`` major)."""
    return lax.axis_index(lay.zero_axes)


def local_slice(stored: jax.Array, lay: LeafLayout) -> jax.Array:
    """This device's part of a replicated stored array (inside shard_map)."""
    if not lay.sharded:
        return stored
    n = lay.local_shape[lay.axis]
    return _per_shard(lay, lambda x: lax.dynamic_slice_in_dim(x, _zero_index(lay) * n, n, axis=lay.axis),
                      "fs")(stored)


def reduce_scatter_grads(stored: jax.Array, lay: LeafLayout, error: jax.Array | None = None):
    """Sums a full local stored gradient over ``data`` and keeps this device's part.

    ``error`` (qgZ with LoCo error feedback, ``quantized_reductions``): this device's
    error buffer for the leaf (the stored shape, float32); the result is then the pair
    ``(part, new_error)``. A leaf that is not split keeps its exact all-reduce and its buffer.

    With a ``group`` (sequence parallelism) each of its devices holds a partial gradient
    (from its part of the tokens) that XLA has not summed yet: the stored axis is viewed as
    ``[data, group, n]`` and split over the group on its middle dimension, which XLA
    turns into a reduce-scatter over the group; the rest is reduce-scattered over ``data``.
    """
    if not lay.sharded:
        return _per_shard(lay, lambda x: _cpu_wide(x, lambda y: lax.psum(y, DATA)), "ff")(stored)

    def scatter(x):
        x = x.reshape(x.shape[:lay.axis] + (-1,) + x.shape[lay.axis + 3:]) if lay.group else x
        return _cpu_wide(x, lambda y: lax.psum_scatter(y, DATA, scatter_dimension=lay.axis, tiled=True))

    quantized = _QUANTIZED_REDUCTIONS.get()
    if error is not None:
        if not lay.sharded:
            return reduce_scatter_grads(stored, lay), error
        if quantized is None or lay.group or lay.model_axes or lay.lead_axis:
            raise ConfigError("error feedback (zero.loco) needs qgZ (zero.quantized_gradients) on a leaf split over "
                              "data alone: no tensor, stage or sequence split")
        return _two_hop_scatter(stored, lay=lay, node_size=quantized[0], block=quantized[1], error=error,
                                err_beta=quantized[2])
    if quantized is not None and not lay.group:
        return _per_shard(lay, functools.partial(_two_hop_scatter, lay=lay, node_size=quantized[0],
                                                 block=quantized[1]), "fs")(stored)
    if not lay.group:
        return _per_shard(lay, scatter, "fs")(stored)
    names = tuple(name for name, _ in lay.group)
    extra, axis = math.prod(size for _, size in lay.group), lay.axis
    blocks = stored.reshape(stored.shape[:axis] + (lay.shards // extra, extra, lay.local_shape[axis])
                            + stored.shape[axis + 1:])
    axes = [None] * len(lay.lead) + list(lay.model_axes or [None] * len(lay.layer_shape))
    axes[axis:axis + 1] = [None, names if len(names) > 1 else names[0], None]
    return on_model_shards(scatter, (_trim(axes),), lay.shard_spec)(blocks)


_QUANTIZED_REDUCTIONS: contextvars.ContextVar[tuple[int, int, float] | None] = contextvars.ContextVar(
    "zjax_qgz", default=None)


@contextlib.contextmanager
def quantized_reductions(node_size: int | None, block: int = 256, err_beta: float = 0.0):
    """While tracing: the gradients' reduce-scatters over ``data`` run as ZeRO++'s qgZ
    (``quantize.two_hop_reduce_scatter``: int4 all-to-all inside each node of ``node_size``
    devices, then across nodes); None: exact reduce-scatters. ``err_beta``: the decay of the
    LoCo error buffers, where the step passes them (``reduce_scatter_grads(..., error=)``)."""
    token = _QUANTIZED_REDUCTIONS.set(None if node_size is None else (node_size, block, err_beta))
    try:
        yield
    finally:
        _QUANTIZED_REDUCTIONS.reset(token)


def _two_hop_scatter(x: jax.Array, *, lay: LeafLayout, node_size: int, block: int, error=None,
                     err_beta: float = 0.0):
    """``psum_scatter`` over ``data`` along ``lay.axis`` as qgZ's two quantized hops: each device's
    part (its rows of the split axis) is padded to whole blocks on its own, so the hops' slices
    are exactly the parts; their mean comes back times N (the step divides by the weight).
    With ``error`` (x's shape): ``(part, new_error)``, LoCo's error feedback."""
    n = lax.axis_size(DATA)
    rows = jnp.moveaxis(x, lay.axis, 0)
    width = rows[0].size * (rows.shape[0] // n)
    padded = -(-width // block) * block

    def to_parts(y):
        parts = jnp.moveaxis(y, lay.axis, 0).reshape(n, -1).astype(jnp.float32)
        return jnp.pad(parts, ((0, 0), (0, padded - width))).reshape(-1)

    mean, new_error = two_hop_reduce_scatter(to_parts(x), DATA, node_size=node_size, bits=4, block=block,
                                             error=None if error is None else to_parts(error), err_beta=err_beta)
    mine = (mean[:width] * n).reshape((rows.shape[0] // n,) + rows.shape[1:])
    mine = jnp.moveaxis(mine, 0, lay.axis).astype(x.dtype)
    if error is None:
        return mine
    new_error = new_error.reshape(n, padded)[:, :width].reshape(rows.shape)
    return mine, jnp.moveaxis(new_error, 0, lay.axis).astype(error.dtype)


def _cpu_wide(x: jax.Array, reduce) -> jax.Array:
    """``reduce(x)``, in float32 for a 16-bit ``x`` on XLA:CPU under tensor parallelism: XLA:CPU
    aborts compiling a 16-bit reduction over ``data`` there (hlo_instruction.cc: Invalid
    binary instruction opcode copy), and it widens 16-bit collectives to float32 anyway,
    so the bytes it moves are the same. Elsewhere ``reduce(x)``."""
    mesh = jax.sharding.get_abstract_mesh()
    model_parallel = not mesh.empty and any(a not in BATCH_AXES and n > 1 for a, n in mesh.shape.items())
    if model_parallel and x.dtype.itemsize == 2 and jax.default_backend() == "cpu":
        return reduce(x.astype(jnp.float32)).astype(x.dtype)
    return reduce(x)


def all_gather_params(shard: jax.Array, lay: LeafLayout) -> jax.Array:
    """Local stored part -> the full stored array, the same (invariant) on every device."""
    if not lay.sharded:
        return shard
    return _per_shard(lay, lambda x: lax.all_gather(x, lay.zero_axes, axis=lay.axis, tiled=True, to="invarying"),
                      "sf")(shard)


# --- ZeRO-3: gather for compute, reduce-scatter in the backward pass ----------------


_QUANTIZED_GATHERS: contextvars.ContextVar[int | None] = contextvars.ContextVar("zjax_qwz", default=None)


@contextlib.contextmanager
def quantized_gathers(block: int | None):
    """While tracing: ZeRO-3's parameter gathers move int8 values in blocks of ``block`` elements
    with one float32 scale each (ZeRO++'s qwZ); None: exact gathers."""
    token = _QUANTIZED_GATHERS.set(block)
    try:
        yield
    finally:
        _QUANTIZED_GATHERS.reset(token)


_HPZ: contextvars.ContextVar[int | None] = contextvars.ContextVar("zjax_hpz", default=None)


@contextlib.contextmanager
def secondary_partition(size: int | None):
    """While tracing: ZeRO-3's parameter gathers keep ZeRO++'s hpZ secondary partition, so that
    the backward pass gathers only inside groups of ``size`` consecutive ``data`` devices
    (``gather_for_compute``); None: plain gathers."""
    token = _HPZ.set(size if size and size > 1 else None)
    try:
        yield
    finally:
        _HPZ.reset(token)


def gather_for_compute(shard: jax.Array, lay: LeafLayout, compute_dtype, reduce_dtype, error=None) -> jax.Array:
    """ZeRO-3's parameter fetch: cast the local master shard, all-gather, unpad.

    The cast happens before the gather, so a bf16 run moves half the bytes; under
    ``quantized_gathers`` each device quantizes its shard to int8 blocks instead and the
    gather moves those (about 1 + 4/block bytes per element). The backward pass casts the
    cotangent to ``reduce_dtype`` and reduce-scatters it straight back into the shard's
    layout: gradients never exist unsharded (and are never quantized here).

    Under ``secondary_partition(L)`` (ZeRO++'s hpZ) the gather runs in two hops: across the
    nodes of L devices first (each device gets the shards of its position in every node, 1/L
    of the parameter: the *secondary partition*, which the remat policy saves), then inside
    the node; the backward pass recomputes only the second hop, so its gather never leaves
    the node. The gradient is the same reduce-scatter as without it (bit-identical runs).

    ``error`` (LoCo, with qgZ): this device's error buffer for the parameter (its stored
    shape, float32). It goes in as a second input whose "gradient" is the new buffer: the
    backward pass feeds the buffer into the quantized reduce-scatter and returns what was
    lost as the buffer's cotangent (the step differentiates with respect to the buffers too).
    """
    if error is not None:
        if _HPZ.get() is not None or _QUANTIZED_GATHERS.get() is not None:
            raise ConfigError("zero.loco runs without zero.hpz_partition_size and zero.quantized_weights; unset them")
        return _gather_error_op(lay, jnp.dtype(compute_dtype), jnp.dtype(reduce_dtype), jnp.dtype(shard.dtype))(
            shard, error)
    hpz = _HPZ.get()
    if hpz is not None and lay.sharded and not lay.group:
        cast = jnp.dtype(compute_dtype)
        secondary = _hpz_cross_op(lay, hpz, cast, _QUANTIZED_GATHERS.get())(shard)
        return _hpz_intra_op(lay, hpz, cast, jnp.dtype(reduce_dtype), jnp.dtype(shard.dtype))(secondary, shard)
    node = _HIERARCHICAL.get()
    if node is not None and lay.sharded and not lay.group and node < lax.axis_size(DATA):
        # MiCS: the same two hops, the first not kept (the backward pass gathers again, in two hops)
        cast = jnp.dtype(compute_dtype)
        first = _mics_cross_op(lay, node, cast, _QUANTIZED_GATHERS.get())(shard)
        return _hpz_intra_op(lay, node, cast, jnp.dtype(reduce_dtype), jnp.dtype(shard.dtype))(first, shard)
    return _gather_op(lay, jnp.dtype(compute_dtype), jnp.dtype(reduce_dtype), jnp.dtype(shard.dtype),
                      _QUANTIZED_GATHERS.get())(shard)


_HIERARCHICAL: contextvars.ContextVar[int | None] = contextvars.ContextVar("zjax_mics", default=None)


@contextlib.contextmanager
def hierarchical_gathers(node_size: int | None):
    """While tracing: ZeRO-3's parameter gathers run in two hops, across the nodes of
    ``node_size`` consecutive ``data`` devices and then inside them (MiCS's hierarchical
    gather); None: one hop."""
    token = _HIERARCHICAL.set(node_size)
    try:
        yield
    finally:
        _HIERARCHICAL.reset(token)


@functools.lru_cache(maxsize=None)
def _mics_cross_op(lay: LeafLayout, size: int, compute_dtype, quantization_block: int | None = None):
    """``_hpz_cross_op``'s hop under a name the remat policy does not save (``is_hpz_secondary``):
    MiCS keeps nothing between the passes."""
    hop = _hpz_cross_op(lay, size, compute_dtype, quantization_block)

    @jax.custom_vjp
    def first_hop(shard):
        return hop(shard)

    def fwd(shard):
        return first_hop(shard), jnp.zeros((0,), shard.dtype)

    def mics_cross_bwd(empty, ct):
        return (jnp.zeros(lay.data_shape, empty.dtype),)

    first_hop.defvjp(fwd, mics_cross_bwd)
    return first_hop


def _hpz_groups(size: int) -> tuple[list[list[int]], list[list[int]]]:
    """``(cross, intra)`` device groups of ``data`` for nodes of ``size``: the devices at one
    position in every node, and the devices of one node."""
    n = lax.axis_size(DATA)
    if n % size:
        raise ConfigError(f"zero.hpz_partition_size={size} does not divide mesh.data={n}; use a divisor")
    nodes = n // size
    return ([[m * size + p for m in range(nodes)] for p in range(size)],
            [[m * size + p for p in range(size)] for m in range(nodes)])


@functools.lru_cache(maxsize=None)
def _hpz_cross_op(lay: LeafLayout, size: int, compute_dtype, quantization_block: int | None = None):
    """hpZ's first hop: this device's secondary partition (its node position's shards from every
    node, in node order). Saved by the remat policy (``is_hpz_secondary``); its own gradient is
    zero (the second hop hands the shard its reduced gradient directly). With qwZ
    (``quantization_block``) this cross-node hop moves int8 blocks (the secondary partition holds
    each shard's own quantize-dequantize, in the compute dtype), so the gathered parameter is qwZ's
    bit for bit; the intra-node hop moves it exactly."""
    def cross(shard):
        if quantization_block is not None:
            return quantized_all_gather(shard, DATA, bits=8, block=quantization_block, axis=lay.axis, tiled=True,
                                        groups=_hpz_groups(size)[0]).astype(compute_dtype)
        return lax.all_gather(shard.astype(compute_dtype), DATA, axis=lay.axis, tiled=True,
                              axis_index_groups=_hpz_groups(size)[0])

    @jax.custom_vjp
    def secondary(shard):
        return _per_shard(lay, cross, "ss")(shard)

    def fwd(shard):
        return secondary(shard), jnp.zeros((0,), shard.dtype)

    def hpz_secondary_bwd(empty, ct):
        return (jnp.zeros(lay.data_shape, empty.dtype),)

    secondary.defvjp(fwd, hpz_secondary_bwd)
    return secondary


@functools.lru_cache(maxsize=None)
def _hpz_intra_op(lay: LeafLayout, size: int, compute_dtype, reduce_dtype, master_dtype):
    """hpZ's second hop: the node's secondary partitions put together in ``data`` order; the
    backward pass reduce-scatters the cotangent straight into the shard (as ZeRO-3's)."""
    def intra(secondary):
        rows = jnp.moveaxis(secondary, lay.axis, 0)
        parts = lax.all_gather(rows, DATA, axis=0, tiled=False, axis_index_groups=_hpz_groups(size)[1])
        nodes = rows.shape[0] // lay.data_shape[lay.axis]
        parts = parts.reshape((size, nodes, -1) + rows.shape[1:]).swapaxes(0, 1)  # [nodes, size, rows, ...]
        full = jnp.moveaxis(parts.reshape((-1,) + rows.shape[1:]), 0, lay.axis)
        return from_stored(full, lay)

    @jax.custom_vjp
    def gather(secondary, shard):
        return _per_shard(lay, intra, "sf")(secondary)

    def fwd(secondary, shard):
        return gather(secondary, shard), (jnp.zeros((0,), secondary.dtype),)

    def hpz_zero_param_bwd(res, ct):  # "zero_param_bwd": never saved by the remat policy
        (empty,) = res
        grad = _reduce_scatter_cotangent(ct, lay, reduce_dtype, master_dtype)
        secondary = list(grad.shape)
        secondary[lay.axis] *= lax.axis_size(DATA) // size
        return jnp.zeros(secondary, empty.dtype), grad

    gather.defvjp(fwd, hpz_zero_param_bwd)
    return gather


def take_for_compute(shard: jax.Array, full: jax.Array, lay: LeafLayout, reduce_dtype, error=None) -> jax.Array:
    """ZeRO-2's parameter use: the replicated compute copy ``full`` goes forward as it is;
    the backward pass reduce-scatters its cotangent into ``shard``'s layout, so a layer's
    full gradient exists only while that layer's backward runs. ``error``: as in
    ``gather_for_compute`` (LoCo).
    """
    if error is not None:
        return _take_error_op(lay, jnp.dtype(reduce_dtype), jnp.dtype(shard.dtype))(shard, full, error)
    return _take_op(lay, jnp.dtype(reduce_dtype), jnp.dtype(shard.dtype))(shard, full)


@functools.lru_cache(maxsize=None)
def _take_error_op(lay: LeafLayout, reduce_dtype, shard_dtype):
    @jax.custom_vjp
    def take(shard, full, error):
        return full

    def fwd(shard, full, error):
        return full, error

    def zero_param_bwd(error, ct):
        grad, error = _reduce_scatter_cotangent(ct, lay, reduce_dtype, shard_dtype, error)
        return grad, None, error

    take.defvjp(fwd, zero_param_bwd)
    return take


_LOCAL_GRADS: contextvars.ContextVar[bool] = contextvars.ContextVar("zjax_local_grads", default=False)


@contextlib.contextmanager
def local_gradients(on: bool = True):
    """While tracing: ZeRO-3's gathers reduce nothing in the backward pass; a gather given a
    "sink" (its ``error`` input, of the stored shape) adds it to the gathered parameter and
    hands it the whole local gradient as its cotangent, and the shard gets none (an optimizer
    that communicates itself takes whole local gradients: 1-bit Adam and LAMB with zero sinks,
    0/1 Adam with each device's offset from the consensus)."""
    token = _LOCAL_GRADS.set(bool(on))
    try:
        yield
    finally:
        _LOCAL_GRADS.reset(token)


def _reduce_scatter_cotangent(ct, lay, reduce_dtype, shard_dtype, error=None):
    if error is not None and _LOCAL_GRADS.get():
        return jnp.zeros(lay.data_shape, shard_dtype), to_stored(ct.astype(error.dtype), lay)
    if error is None:
        return reduce_scatter_grads(to_stored(ct.astype(reduce_dtype), lay), lay).astype(shard_dtype)
    grad, error = reduce_scatter_grads(to_stored(ct.astype(reduce_dtype), lay), lay, error)
    return grad.astype(shard_dtype), error


@functools.lru_cache(maxsize=None)
def _gather_op(lay: LeafLayout, compute_dtype, reduce_dtype, master_dtype, quantization_block=None):
    def all_gather(shard):
        if quantization_block is not None:
            full = quantized_all_gather(shard, lay.zero_axes, bits=8, block=quantization_block, axis=lay.axis,
                                        tiled=True).astype(compute_dtype)
        else:
            full = lax.all_gather(shard.astype(compute_dtype), lay.zero_axes, axis=lay.axis, tiled=True)
        return from_stored(full, lay)

    @jax.custom_vjp
    def gather(shard):
        if not lay.sharded:
            return _per_shard(lay, lambda x: from_stored(x.astype(compute_dtype), lay), "ff")(shard)
        return _per_shard(lay, all_gather, "sf")(shard)

    def fwd(shard):
        return gather(shard), None

    # outside the model-parallel shard_map, so that a gradient partial over the ZeRO group's
    # automatic axes (sequence) reaches reduce_scatter_grads unsummed
    def zero_param_bwd(_, ct):
        return (_reduce_scatter_cotangent(ct, lay, reduce_dtype, master_dtype),)

    gather.defvjp(fwd, zero_param_bwd)
    return gather


@functools.lru_cache(maxsize=None)
def _gather_error_op(lay: LeafLayout, compute_dtype, reduce_dtype, master_dtype):
    """``_gather_op`` with a LoCo error buffer as a second input; its cotangent is the new buffer."""
    plain = _gather_op(lay, compute_dtype, reduce_dtype, master_dtype)

    @jax.custom_vjp
    def gather(shard, error):
        out = plain(shard)
        if _LOCAL_GRADS.get():  # a sink: 0/1 Adam's offset (zeros for 1-bit Adam, LAMB) on the gathered consensus
            out = out + from_stored(error, lay).astype(out.dtype)
        return out

    def fwd(shard, error):
        return gather(shard, error), error

    def zero_param_bwd(error, ct):
        return _reduce_scatter_cotangent(ct, lay, reduce_dtype, master_dtype, error)

    gather.defvjp(fwd, zero_param_bwd)
    return gather


@functools.lru_cache(maxsize=None)
def _take_op(lay: LeafLayout, reduce_dtype, shard_dtype):
    @jax.custom_vjp
    def take(shard, full):
        return full

    def fwd(shard, full):
        return full, None

    def zero_param_bwd(_, ct):
        return _reduce_scatter_cotangent(ct, lay, reduce_dtype, shard_dtype), None

    take.defvjp(fwd, zero_param_bwd)
    return take


def is_zero_param(prim, params) -> bool:
    """True for the custom_vjp call of ``gather_for_compute`` or ``take_for_compute``.

    Their outputs are parameters the remat policy must never save: ZeRO-3 gathers
    them again, ZeRO-2 reads them again from the replicated copy.
    """
    return prim.name == "custom_vjp_call" and "zero_param_bwd" in str(params.get("bwd"))


def is_hpz_secondary(prim, params) -> bool:
    """True for the custom_vjp call of hpZ's first hop: the secondary partition the remat policy
    saves, so that the backward pass gathers only inside the node."""
    return prim.name == "custom_vjp_call" and "hpz_secondary_bwd" in str(params.get("bwd"))


@jax.tree_util.register_pytree_node_class
class ShardedParam:
    """A stacked parameter whose gradient goes to a ``data`` shard; ``scan_layers`` opens it per layer.

    ZeRO-3 (``full`` is None): the shard is all there is; each layer gathers it.
    ZeRO-2: ``full`` is the replicated compute copy; each layer reads it and its
    backward reduce-scatters into the shard. Model code never looks inside: it passes
    the stacked tree to ``scan_layers``, which hands the layer function plain arrays.
    """

    def __init__(self, shard, layout: LeafLayout, compute_dtype, reduce_dtype, full=None, error=None):
        self.shard = shard
        self.full = full
        self.error = error  # LoCo's error buffer (stacked like the shard's full form), or None
        self.layout = layout
        self.compute_dtype = compute_dtype
        self.reduce_dtype = reduce_dtype

    def tree_flatten(self):
        return (self.shard, self.full, self.error), (self.layout, self.compute_dtype, self.reduce_dtype)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux, full=children[1], error=children[2])

    @property
    def shape(self):
        return self.layout.shape

    def __jax_array__(self):
        raise self._misuse()

    def __getitem__(self, index):
        raise self._misuse()

    def _misuse(self) -> TypeError:
        return TypeError(
            f"a ZeRO-2/3 stacked parameter of shape {self.layout.shape} was used as an array; parameters "
            "whose first logical axis is 'layers' must go through zjax.scan_layers(fn, carry, stacked), "
            "which gathers one layer at a time (or drop 'layers' from their logical axes)"
        )

    def gather_layer(self) -> jax.Array:
        """The parameter of one layer (call on a per-layer slice)."""
        if self.full is None:
            return gather_for_compute(self.shard, self.layout.per_layer(), self.compute_dtype, self.reduce_dtype,
                                      self.error)
        return take_for_compute(self.shard, self.full, self.layout.per_layer(), self.reduce_dtype, self.error)


def materialize_layer(layer_params: Any) -> Any:
    """Replaces every ShardedParam of one layer's slice by its array."""
    return jax.tree.map(
        lambda p: p.gather_layer() if isinstance(p, ShardedParam) else p,
        layer_params,
        is_leaf=lambda p: isinstance(p, ShardedParam),
    )


# --- frozen parameters: trees with None holes ------------------------------------------------


def split_layouts(layout_def: tuple, trainable: bool) -> Any:
    """The trainable (or frozen) layouts of ``layout_def = (treedef, layouts, trainable mask)``,
    with None where a leaf is of the other kind."""
    treedef, leaves, mask = layout_def
    return jax.tree.unflatten(treedef, [lay if m == trainable else None for lay, m in zip(leaves, mask)])


def _hole(x: Any) -> bool:
    return x is None or isinstance(x, ShardedParam)


def merge_frozen(trainable: Any, frozen: Any) -> Any:
    """One tree from two with complementary ``None`` holes (``frozen`` None: ``trainable``)."""
    if frozen is None:
        return trainable
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=_hole)


def select(layouts: Any, tree: Any) -> Any:
    """``tree`` with ``None`` wherever ``layouts`` (a layout tree with ``None`` holes) has one."""
    return jax.tree.map(lambda lay, x: None if lay is None else x, layouts, tree,
                        is_leaf=lambda x: x is None or is_layout(x))
