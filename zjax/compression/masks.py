"""Pruning masks of matmul weights, computed from their magnitudes.

Every function takes a weight ``w`` whose last two axes are a matmul's ``(in, out)`` (a JAX
``x @ w`` weight; torch stores the transpose) and any leading axes a stack of such matrices
(``layers`` first, experts), each pruned on its own; it returns a boolean mask of ``w``'s shape
(True = kept). They are jittable and work on sharded global arrays: the threshold of magnitude
pruning is found by bisection on the floats' bit patterns (``kth_largest``), which needs only
element-wise compares and sums (a scalar all-reduce per round under ZeRO, never a sort of a
gathered matrix).

Ranks follow DeepSpeed's compression library (``deepspeed/compression/basic_layer.py``): sparse
pruning keeps the weights of largest magnitude, row pruning the output features (torch's rows)
of largest l1 norm, channel pruning the input features, head pruning the heads whose rows of the
attention output projection have the largest l1 norm.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from jax import lax

from zjax.errors import ConfigError


def kept_count(size: int, dense_ratio) -> jax.Array:
    """How many of ``size`` items a ``dense_ratio`` keeps: ``round(size * ratio)``, at least 1."""
    return jnp.maximum(jnp.round(jnp.float32(size) * jnp.asarray(dense_ratio, jnp.float32)).astype(jnp.int32), 1)


def _order_key(x: jax.Array) -> jax.Array:
    """float32 -> uint32 keys that order like the floats (negative ones too): a positive float's
    bit pattern with the top bit set, a negative one's bits inverted."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_key(key: jax.Array) -> jax.Array:
    bits = jnp.where(key >> 31 == 1, key ^ jnp.uint32(0x80000000), ~key)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _kth_key(keys: jax.Array, k, axes: int = 1) -> jax.Array:
    """The k-th largest of ``keys`` (uint32) over the last ``axes`` axes: 32 rounds of bisection,
    each counting ``keys >= t``, find the largest ``t`` with at least ``k`` keys at or above it
    (a loop: unrolled, XLA:CPU took 380 s instead of 4 s to compile a train step with two)."""
    k = jnp.asarray(k, jnp.int32)
    over = tuple(range(-axes, 0))
    lead = keys.shape[:keys.ndim - axes]
    expand = (...,) + (None,) * axes

    def body(_, bounds):
        lo, hi = bounds  # count(keys >= lo) >= k > count(keys >= hi)
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(keys >= mid[expand], axis=over, dtype=jnp.int32) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    lo = jnp.zeros(lead, jnp.uint32)
    hi = jnp.full(lead, jnp.iinfo(jnp.uint32).max, jnp.uint32)
    lo, _ = lax.fori_loop(0, 32, body, (lo, hi))
    return lo


def kth_largest(x: jax.Array, k) -> jax.Array:
    """The ``k``-th largest value of the float32 ``x`` over its last axis, exactly.

    Floats order like ``_order_key``'s unsigned patterns, so a bisection on the pattern, each round
    counting ``x >= t``, finds an element of ``x``: the k-th largest. Only compares and sums: a
    sharded ``x`` is never sorted or gathered whole.

    >>> float(kth_largest(jnp.array([0.5, 3.0, -1.0, 2.0]), 3))
    0.5
    """
    return _from_key(_kth_key(_order_key(x), k))


def top_k_mask(x: jax.Array, k, axes: int = 1) -> jax.Array:
    """Exactly the ``k`` largest of ``x`` over its last ``axes`` axes (1 or 2; ties at the threshold
    kept in row-major order, as a stable sort would): DeepSpeed's ``TopKBinarizer`` without a sort
    and without flattening (a reshape of a sharded matrix would move it).

    >>> top_k_mask(jnp.array([0.5, -3.0, 0.5, 2.0]), 2).tolist()
    [True, False, False, True]
    >>> top_k_mask(jnp.array([[1.0, 0.0], [0.0, 0.0]]), 2, axes=2).tolist()
    [[True, True], [False, False]]
    """
    if axes not in (1, 2):
        raise ValueError(f"axes={axes}: top_k_mask ranks over the last axis or the last two")
    keys = _order_key(x)
    expand = (...,) + (None,) * axes
    threshold = _kth_key(keys, k, axes)[expand]
    over = tuple(range(-axes, 0))
    above = jnp.sum(keys > threshold, axis=over, keepdims=True, dtype=jnp.int32)
    ties = keys == threshold
    order = jnp.cumsum(ties, axis=-1, dtype=jnp.int32)  # ties up to this one, in row-major order
    if axes == 2:
        rows = jnp.sum(ties, axis=-1, keepdims=True, dtype=jnp.int32)
        order = order + jnp.cumsum(rows, axis=-2, dtype=jnp.int32) - rows
    return (keys > threshold) | (ties & (order <= k - above))


def _matrices(w: jax.Array, what: str) -> None:
    if w.ndim < 2:
        raise ConfigError(f"{what} prunes matrices (a matmul weight, last two axes (in, out)); got a leaf of shape "
                          f"{tuple(w.shape)}; narrow the group's modules to matmul weights")


def magnitude_mask(w: jax.Array, dense_ratio, exact: bool = False) -> jax.Array:
    """Keeps the ``dense_ratio`` of each matrix's weights of largest magnitude: every weight at or
    above the k-th largest magnitude, or with ``exact`` exactly k (ties at the threshold by
    position)."""
    _matrices(w, "sparse pruning")
    flat = jnp.abs(w.astype(jnp.float32)).reshape(w.shape[:-2] + (-1,))
    k = kept_count(flat.shape[-1], dense_ratio)
    kept = top_k_mask(flat, k) if exact else flat >= kth_largest(flat, k)[..., None]
    return kept.reshape(w.shape)


def block_mask(w: jax.Array, dense_ratio, rows: int, cols: int) -> jax.Array:
    """Keeps whole ``rows x cols`` blocks (DeepSpeed's ``4x1``-style patterns: rows of the input
    dimension by columns of the output) of largest l1 norm."""
    _matrices(w, "sparse pruning")
    n_in, n_out = w.shape[-2:]
    if n_in % rows or n_out % cols:
        raise ConfigError(f"sparse pruning pattern '{rows}x{cols}' needs a weight whose (in, out) = ({n_in}, {n_out}) "
                          f"divide by ({rows}, {cols}); use a pattern that divides it or none")
    blocks = jnp.abs(w.astype(jnp.float32)).reshape(w.shape[:-2] + (n_in // rows, rows, n_out // cols, cols))
    scores = blocks.sum(axis=(-3, -1))  # [..., in/rows, out/cols]
    kept = magnitude_mask(scores, dense_ratio)
    return jnp.broadcast_to(kept[..., :, None, :, None], blocks.shape).reshape(w.shape)


def n_of_m_mask(w: jax.Array, n: int, m: int) -> jax.Array:
    """Keeps the ``n`` largest of every ``m`` consecutive weights along the input dimension (N:M
    structured sparsity, 2:4 for sparse tensor cores); exactly ``n`` of each group."""
    _matrices(w, "N:M sparse pruning")
    n_in = w.shape[-2]
    if n_in % m:
        raise ConfigError(f"sparse pruning pattern '{n}:{m}' needs the input dimension ({n_in}) to divide by {m}")
    groups = jnp.abs(w.astype(jnp.float32)).reshape(w.shape[:-2] + (n_in // m, m, w.shape[-1]))
    # rank within each group: the number of elements that beat this one (ties by position)
    a = groups[..., :, None, :]
    b = groups[..., None, :, :]
    earlier = jnp.arange(m)[:, None] > jnp.arange(m)[None, :]  # [i, j]: j comes before i
    beaten = (b > a) | ((b == a) & earlier[:, :, None])
    rank = beaten.sum(axis=-2)
    return (rank < n).reshape(w.shape)


def _top_features(scores: jax.Array, dense_ratio) -> jax.Array:
    """Keeps the ``round(ratio * F)`` features of largest score along the last axis, exactly that
    many (ties broken by position)."""
    features = scores.shape[-1]
    k = kept_count(features, dense_ratio)
    order = jnp.argsort(-scores, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)
    return ranks < k


def row_mask(w: jax.Array, dense_ratio) -> jax.Array:
    """Row pruning: keeps the output features (torch's rows, the last axis here) of largest l1
    norm; returns a mask over ``[..., out]``."""
    _matrices(w, "row pruning")
    return _top_features(jnp.abs(w.astype(jnp.float32)).sum(axis=-2), dense_ratio)


def channel_mask(w: jax.Array, dense_ratio) -> jax.Array:
    """Channel pruning: keeps the input features (the first matrix axis here) of largest l1 norm;
    returns a mask over ``[..., in]``."""
    _matrices(w, "channel pruning")
    return _top_features(jnp.abs(w.astype(jnp.float32)).sum(axis=-1), dense_ratio)


def head_mask(w: jax.Array, dense_ratio, num_heads: int, groups: int = 1) -> jax.Array:
    """Head pruning of an attention output projection ``w`` ``[..., heads * head_dim, d]``: keeps
    the heads whose rows have the largest l1 norm, the same number in each of ``groups``
    contiguous groups of heads (grouped-query attention's KV groups, so that the cleaned model
    keeps its grouping); returns a mask over ``[..., heads]``."""
    _matrices(w, "head pruning")
    rows = w.shape[-2]
    if rows % num_heads or num_heads % groups:
        raise ConfigError(f"head pruning with num_heads={num_heads} (groups {groups}) needs an output projection whose "
                          f"input dimension ({rows}) divides by num_heads, and num_heads by the groups; set "
                          "num_heads to the model's number of attention heads")
    scores = jnp.abs(w.astype(jnp.float32)).reshape(w.shape[:-2] + (num_heads, rows // num_heads, -1)).sum((-2, -1))
    grouped = scores.reshape(scores.shape[:-1] + (groups, num_heads // groups))
    return _top_features(grouped, dense_ratio).reshape(scores.shape)


def expand(mask: jax.Array, size: int) -> jax.Array:
    """A feature mask ``[..., F]`` repeated to ``[..., size]`` (``size`` a multiple of ``F``:
    heads to their rows; a group-of-heads mask to KV heads by ``any``)."""
    features = mask.shape[-1]
    if size % features == 0:
        return jnp.repeat(mask, size // features, axis=-1)
    raise ConfigError(f"a pruning mask over {features} features cannot be laid over a dimension of {size}")


def reduce_to(mask: jax.Array, features: int) -> jax.Array:
    """A per-head mask ``[..., H]`` onto ``features`` KV heads (``H`` a multiple): a KV head is kept
    while any of its query heads is."""
    heads = mask.shape[-1]
    if heads == features:
        return mask
    if heads % features:
        raise ConfigError(f"{heads} heads do not split into {features} key/value heads")
    return mask.reshape(mask.shape[:-1] + (features, heads // features)).any(-1)


def path_name(path) -> str:
    """A pytree key path as ``a/b/c`` (what ``modules`` regexes are matched against)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def matches(patterns, name: str) -> bool:
    """Whether any of ``patterns`` (regexes; ``*`` alone matches everything) is found in ``name``."""
    return any(p == "*" or re.search(p, name) for p in patterns)
