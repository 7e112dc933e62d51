"""ZeRO placement: how each parameter is laid out, sharded and brought back.

Every parameter leaf keeps its own shape and is sharded over the ``data`` axis along one
of its dimensions (as PyTorch's FSDP2 and MaxText do), so an optimizer sees each
parameter whole and in its shape: any optax transform (masks by ``ndim``, LAMB's trust
ratio, Adafactor's factored moments) is exact. The dimension is the leaf's ``embed``
axis when it divides by the shard count, else its largest dimension that does; a leaf
with no such dimension is padded along its largest one by at most ``shards - 1`` rows
(its *stored* shape). A leaf whose first logical axis is ``layers`` keeps that axis
whole, so a scan can take one layer at a time and ZeRO-3 can gather one layer at a time.

The collectives are explicit (inside ``jax.shard_map`` over ``data``):
``reduce_scatter_grads`` for gradients, ``all_gather_params`` for updated params,
``gather_for_compute`` for ZeRO-3's just-in-time parameter gathering, whose
backward pass is a reduce-scatter, and ``take_for_compute``, ZeRO-2's reduce-scatter
of each layer's gradient inside the backward pass.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

DATA = "data"
# Replicas outside ZeRO (slices over DCN); the batch is split over both axes.
REPLICA = "replica"
BATCH_AXES = (REPLICA, DATA)
# The logical axis ZeRO shards when it divides (MaxText's fsdp axis).
ZERO_AXIS = "embed"


@dataclasses.dataclass(frozen=True)
class ZeroStage:
    """Everything a ZeRO stage decides, in one place (the step, ``zjax plan``, ``zjax profile``
    and checkpoints read it; none of them branches on the stage number).

    Attributes:
      stage: 0-3.
      data: the ``data`` axis size N.
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
      shards: number of ZeRO partitions (the ``data`` axis size, or 1 for stage 0).
      partitioned: True when the leaf is split over ``data`` (stages 1-3), even on a
        one-device axis.
      dim: the dimension of one layer (``layer_shape``) split over ``data``; None for a
        leaf that is not split (stage 0, scalars).
    """

    shape: tuple[int, ...]
    stacked: bool
    shards: int
    partitioned: bool
    dim: int | None = None

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
    def spec(self) -> P:
        """PartitionSpec of the stored form: the split dimension over ``data``."""
        if not self.sharded:
            return P()
        return P(*([None] * self.axis), DATA)

    def per_layer(self) -> "LeafLayout":
        return LeafLayout(self.layer_shape, False, self.shards, self.partitioned, self.dim)


def make_layouts(params: Any, logical_axes: Any, shards: int, partitioned: bool,
                 zero_names: tuple[str, ...] = (ZERO_AXIS,)) -> Any:
    """One LeafLayout per leaf of ``params`` (shapes only are read).

    Args:
      params: a pytree of arrays or ShapeDtypeStructs.
      logical_axes: None, or a pytree with the same structure whose leaves are
        tuples of logical axis names; a leaf whose tuple starts with ``layers`` is
        treated as a scanned stack.
      shards: the ZeRO partition count (1 for stage 0).
      partitioned: whether the leaves are split over ``data`` (stages 1-3).
      zero_names: the logical axes the rules map to ``data``, preferred in this order.
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
        dim = split_dim(layer_shape, layer_names, shards, zero_names) if partitioned else None
        layouts.append(LeafLayout(shape, stacked, shards, partitioned, dim))
    return jax.tree.unflatten(treedef, layouts)


def split_dim(shape: tuple[int, ...], names: tuple[str, ...], shards: int,
              zero_names: tuple[str, ...] = (ZERO_AXIS,)) -> int | None:
    """The dimension ZeRO splits: the first of ``zero_names`` (the logical axes the rules map
    to ``data``) that the leaf has and that divides by ``shards``, else the largest dimension
    that does, else the largest (to be padded); None for a scalar."""
    if not shape:
        return None
    divisible = [i for i, n in enumerate(shape) if n % shards == 0]
    if len(names) == len(shape):
        for name in zero_names:
            if name in names and names.index(name) in divisible:
                return names.index(name)
    candidates = divisible or range(len(shape))
    return max(candidates, key=lambda i: (shape[i], -i))


def state_specs(state_shapes: Any, layouts: Any) -> Any:
    """Shardings of optimizer state (shapes from ``jax.eval_shape(tx.init, params)``).

    A subtree with the params' structure and stored shapes (Adam's moments) is split like
    the params, so an element-wise update needs no communication; any other leaf is split
    like the one parameter of its shape, or, where no or several parameters have it
    (Adafactor's factored moments), along its largest dimension that divides by the shard
    count, or kept whole.
    """
    leaves, treedef = jax.tree.flatten(layouts, is_leaf=is_layout)
    if not any(lay.partitioned for lay in leaves):
        return jax.tree.map(lambda _: P(), state_shapes)
    shards = leaves[0].shards
    stored = tuple(lay.stored_shape for lay in leaves)
    param_specs = jax.tree.unflatten(treedef, [lay.spec for lay in leaves])
    by_shape: dict = {}
    for lay in leaves:
        by_shape.setdefault(lay.stored_shape, set()).add(lay.spec)

    def leaf_spec(x) -> P:
        shape = tuple(x.shape)
        if len(by_shape.get(shape, ())) == 1:
            return next(iter(by_shape[shape]))
        dim = split_dim(shape, (), shards)
        if dim is None or shape[dim] % shards:
            return P()
        return P(*([None] * dim), DATA)

    def is_params(node) -> bool:
        return is_param_subtree(node, treedef, stored)

    return jax.tree.map(lambda n: param_specs if is_params(n) else leaf_spec(n), state_shapes, is_leaf=is_params)


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


def from_stored(x: jax.Array, lay: LeafLayout) -> jax.Array:
    """Stored form -> user shape."""
    if lay.stored_shape != lay.shape:
        x = lax.slice_in_dim(x, 0, lay.shape[lay.axis], axis=lay.axis)
    return x


def local_slice(stored: jax.Array, lay: LeafLayout) -> jax.Array:
    """This device's part of a replicated stored array (inside shard_map)."""
    if not lay.sharded:
        return stored
    n = lay.local_shape[lay.axis]
    return lax.dynamic_slice_in_dim(stored, lax.axis_index(DATA) * n, n, axis=lay.axis)


def reduce_scatter_grads(stored: jax.Array, lay: LeafLayout) -> jax.Array:
    """Sums a full local stored gradient over ``data`` and keeps this device's part."""
    if not lay.sharded:
        return lax.psum(stored, DATA)
    return lax.psum_scatter(stored, DATA, scatter_dimension=lay.axis, tiled=True)


def all_gather_params(shard: jax.Array, lay: LeafLayout) -> jax.Array:
    """Local stored part -> the full stored array, the same (invariant) on every device."""
    if not lay.sharded:
        return shard
    return lax.all_gather(shard, DATA, axis=lay.axis, tiled=True, to="invarying")


# --- ZeRO-3: gather for compute, reduce-scatter in the backward pass ----------------


def gather_for_compute(shard: jax.Array, lay: LeafLayout, compute_dtype, reduce_dtype) -> jax.Array:
    """ZeRO-3's parameter fetch: cast the local master shard, all-gather, unpad.

    The cast happens before the gather, so a bf16 run moves half the bytes. The
    backward pass casts the cotangent to ``reduce_dtype`` and reduce-scatters it
    straight back into the shard's layout: gradients never exist unsharded.
    """
    return _gather_op(lay, jnp.dtype(compute_dtype), jnp.dtype(reduce_dtype), jnp.dtype(shard.dtype))(shard)


def take_for_compute(shard: jax.Array, full: jax.Array, lay: LeafLayout, reduce_dtype) -> jax.Array:
    """ZeRO-2's parameter use: the replicated compute copy ``full`` goes forward as it is;
    the backward pass reduce-scatters its cotangent into ``shard``'s layout, so a layer's
    full gradient exists only while that layer's backward runs.
    """
    return _take_op(lay, jnp.dtype(reduce_dtype), jnp.dtype(shard.dtype))(shard, full)


def _reduce_scatter_cotangent(ct, lay, reduce_dtype, shard_dtype):
    return reduce_scatter_grads(to_stored(ct.astype(reduce_dtype), lay), lay).astype(shard_dtype)


@functools.lru_cache(maxsize=None)
def _gather_op(lay: LeafLayout, compute_dtype, reduce_dtype, master_dtype):
    @jax.custom_vjp
    def gather(shard):
        if not lay.sharded:
            return from_stored(shard.astype(compute_dtype), lay)
        full = lax.all_gather(shard.astype(compute_dtype), DATA, axis=lay.axis, tiled=True)
        return from_stored(full, lay)

    def fwd(shard):
        return gather(shard), None

    def zero_param_bwd(_, ct):
        return (_reduce_scatter_cotangent(ct, lay, reduce_dtype, master_dtype),)

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


@jax.tree_util.register_pytree_node_class
class ShardedParam:
    """A stacked parameter whose gradient goes to a ``data`` shard; ``scan_layers`` opens it per layer.

    ZeRO-3 (``full`` is None): the shard is all there is; each layer gathers it.
    ZeRO-2: ``full`` is the replicated compute copy; each layer reads it and its
    backward reduce-scatters into the shard. Model code never looks inside: it passes
    the stacked tree to ``scan_layers``, which hands the layer function plain arrays.
    """

    def __init__(self, shard, layout: LeafLayout, compute_dtype, reduce_dtype, full=None):
        self.shard = shard
        self.full = full
        self.layout = layout
        self.compute_dtype = compute_dtype
        self.reduce_dtype = reduce_dtype

    def tree_flatten(self):
        return (self.shard, self.full), (self.layout, self.compute_dtype, self.reduce_dtype)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux, full=children[1])

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
            return gather_for_compute(self.shard, self.layout.per_layer(), self.compute_dtype, self.reduce_dtype)
        return take_for_compute(self.shard, self.full, self.layout.per_layer(), self.reduce_dtype)


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
