"""ZeRO placement: how each parameter is laid out, sharded and brought back.

Every parameter leaf has one *flat layout*: its per-layer elements flattened and
padded to a multiple of the shard count, so any shape shards over the ``data``
axis with at most ``shards - 1`` padding elements per layer. A leaf whose first
logical axis is ``layers`` keeps that axis in front, so a scan can take one layer
at a time and ZeRO-3 can gather one layer at a time.

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


@dataclasses.dataclass(frozen=True)
class LeafLayout:
    """Where one parameter lives: its user shape and its flat, padded, sharded form.

    Attributes:
      shape: the user's shape of the leaf.
      stacked: True when the leading axis is the ``layers`` axis of a scanned stack.
      shards: number of ZeRO partitions (the ``data`` axis size, or 1 for stage 0).
      partitioned: True when the flat form is split over ``data`` (stages 1-3),
        even on a one-device axis.
    """

    shape: tuple[int, ...]
    stacked: bool
    shards: int
    partitioned: bool

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
    def padded(self) -> int:
        return -(-self.size // self.shards) * self.shards

    @property
    def flat_shape(self) -> tuple[int, ...]:
        return self.lead + (self.padded,)

    @property
    def local_shape(self) -> tuple[int, ...]:
        """Shape of one device's part of the flat form (the whole of it when replicated)."""
        return self.lead + (self.padded // self.shards,)

    @property
    def spec(self) -> P:
        """PartitionSpec of the flat form: last axis over ``data`` when sharded."""
        if not self.partitioned:
            return P()
        return P(*([None] * len(self.lead)), DATA)

    def per_layer(self) -> "LeafLayout":
        return LeafLayout(self.layer_shape, False, self.shards, self.partitioned)


def make_layouts(params: Any, logical_axes: Any, shards: int, partitioned: bool) -> Any:
    """One LeafLayout per leaf of ``params`` (shapes only are read).

    Args:
      params: a pytree of arrays or ShapeDtypeStructs.
      logical_axes: None, or a pytree with the same structure whose leaves are
        tuples of logical axis names; a leaf whose tuple starts with ``layers`` is
        treated as a scanned stack.
      shards: the ZeRO partition count (1 for stage 0).
      partitioned: whether the flat forms are split over ``data`` (stages 1-3).
    """
    leaves, treedef = jax.tree.flatten(params)
    if logical_axes is None:
        axes = [()] * len(leaves)
    else:
        axes = treedef.flatten_up_to(logical_axes)
    layouts = [
        LeafLayout(tuple(x.shape), bool(a) and a[0] == "layers" and len(x.shape) >= 1, shards, partitioned)
        for x, a in zip(leaves, axes)
    ]
    return jax.tree.unflatten(treedef, layouts)


def is_layout(x: Any) -> bool:
    return isinstance(x, LeafLayout)


def map_layouts(fn, layouts: Any, *trees: Any) -> Any:
    """``jax.tree.map`` over a layout tree and trees of the same structure."""
    return jax.tree.map(fn, layouts, *trees, is_leaf=is_layout)


def flatten(x: jax.Array, lay: LeafLayout) -> jax.Array:
    """User shape -> flat padded form ``lead + (padded,)``."""
    x = x.reshape(lay.lead + (lay.size,))
    pad = lay.padded - lay.size
    if pad:
        x = jnp.pad(x, [(0, 0)] * len(lay.lead) + [(0, pad)])
    return x


def unflatten(x: jax.Array, lay: LeafLayout) -> jax.Array:
    """Flat padded form -> user shape."""
    if lay.padded != lay.size:
        x = x[..., : lay.size]
    return x.reshape(lay.shape)


def local_slice(flat: jax.Array, lay: LeafLayout) -> jax.Array:
    """This device's part of a replicated flat array (inside shard_map)."""
    if not lay.partitioned:
        return flat
    n = lay.padded // lay.shards
    start = lax.axis_index(DATA) * n
    return lax.dynamic_slice_in_dim(flat, start, n, axis=flat.ndim - 1)


def reduce_scatter_grads(flat: jax.Array, lay: LeafLayout) -> jax.Array:
    """Sums a full local flat gradient over ``data`` and keeps this device's part."""
    if not lay.partitioned:
        return lax.psum(flat, DATA)
    return lax.psum_scatter(flat, DATA, scatter_dimension=flat.ndim - 1, tiled=True)


def all_gather_params(shard: jax.Array, lay: LeafLayout) -> jax.Array:
    """Local flat part -> the full flat array, the same (invariant) on every device."""
    if not lay.partitioned:
        return shard
    return lax.all_gather(shard, DATA, axis=shard.ndim - 1, tiled=True, to="invarying")


# --- ZeRO-3: gather for compute, reduce-scatter in the backward pass ----------------


def gather_for_compute(shard: jax.Array, lay: LeafLayout, compute_dtype, reduce_dtype) -> jax.Array:
    """ZeRO-3's parameter fetch: cast the local master shard, all-gather, unflatten.

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
    flat = flatten(ct.astype(reduce_dtype), lay)
    return lax.psum_scatter(flat, DATA, scatter_dimension=flat.ndim - 1, tiled=True).astype(shard_dtype)


@functools.lru_cache(maxsize=None)
def _gather_op(lay: LeafLayout, compute_dtype, reduce_dtype, master_dtype):
    @jax.custom_vjp
    def gather(shard):
        full = lax.all_gather(shard.astype(compute_dtype), DATA, axis=shard.ndim - 1, tiled=True)
        return unflatten(full, lay)

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
