"""Quantized collectives: the building blocks of DeepSpeed ZeRO++ (qwZ and qgZ).

ZeRO++ cuts ZeRO-3's traffic by quantizing what crosses the wire:

* qwZ (``quantized_all_gather``): each device quantizes its own weight shard to int8
  (or int4) in blocks, with one float32 scale per block, and the packed bytes are
  all-gathered and dequantized: about ``1 + 4/block`` bytes per element instead of 2
  (bf16) or 4 (fp32).
* qgZ (``two_hop_reduce_scatter``): gradients are reduce-scattered in two all-to-all
  hops, first inside each node, then across nodes, quantized to int4 before each hop;
  the cross-node hop carries ``1/node_size`` of the data.

Every function here is plain JAX. The collectives are meant to run inside a
``jax.shard_map`` that is manual over ``axis_name``. XLA:CPU widens int4 collectives
to s8 (and bf16 to f32), so low-bit payloads are packed into ``uint8`` here: the
bytes in the compiled HLO are the bytes that would cross the wire.

Quantization is symmetric and per block: ``x`` is flattened, padded with zeros to a
multiple of ``block``, and each block gets ``scale = max|block| / levels`` (levels
127 for 8 bits, 7 for 4 bits) and integer values ``round(x / scale)`` in
``[-levels, levels]``. An all-zero block has scale 0 and comes back as exact zeros.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from zjax.errors import ConfigError

DEFAULT_BLOCK = 256
_LEVELS = {8: 127, 4: 7}


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "scales"], meta_fields=["shape", "bits"])
@dataclasses.dataclass(frozen=True)
class Quantized:
    """A block-quantized array (a pytree: ``values`` and ``scales`` are its leaves).

    Attributes:
      values: ``int8[blocks, block]`` for 8 bits; for 4 bits ``uint8[blocks, block // 2]``,
        two values per byte (``pack_int4``).
      scales: ``float32[blocks]``, ``max|block| / levels`` (0 for an all-zero block).
      shape: the original array's shape (its size may be smaller than ``blocks * block``:
        the tail of the last block is zero padding).
      bits: 8 or 4.
    """

    values: jax.Array
    scales: jax.Array
    shape: tuple[int, ...]
    bits: int

    @property
    def block(self) -> int:
        """Elements per block."""
        return self.values.shape[-1] * (2 if self.bits == 4 else 1)


def _check_bits(bits, block, allow_none=False):
    if bits is None and allow_none:
        pass
    elif bits not in _LEVELS:
        raise ConfigError(f"bits={bits!r}: use 8 (int8) or 4 (int4, packed two per byte)"
                          + (", or None for no quantization" if allow_none else ""))
    if not isinstance(block, int) or block < 1:
        raise ConfigError(f"block={block!r}: use a positive int (elements per quantization block, e.g. 256)")
    if bits == 4 and block % 2:
        raise ConfigError(f"block={block} with bits=4: use an even block (int4 values are packed two per byte)")


def pack_int4(v: jax.Array) -> jax.Array:
    """Pack int4 values (ints in ``[-8, 7]``) two per byte along the last axis.

    Element ``2i`` goes to the low nibble of byte ``i``, element ``2i + 1`` to its high
    nibble, each as a 4-bit two's complement. The last axis must have even length.

    Example:
      >>> pack_int4(jnp.array([1, -1, -7, 7], jnp.int8)).tolist()
      [241, 121]
      >>> unpack_int4(pack_int4(jnp.array([1, -1, -7, 7], jnp.int8))).tolist()
      [1, -1, -7, 7]
    """
    if v.shape[-1] % 2:
        raise ConfigError(f"pack_int4 of a last axis of length {v.shape[-1]}: use an even length")
    u = v.astype(jnp.uint8) & 0xF
    u = u.reshape(*u.shape[:-1], u.shape[-1] // 2, 2)
    return u[..., 0] | (u[..., 1] << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """Inverse of ``pack_int4``: ``uint8[..., k]`` -> ``int8[..., 2k]`` in ``[-8, 7]``."""
    nibbles = jnp.stack([packed & 0xF, packed >> 4], axis=-1).astype(jnp.int8)
    nibbles = (nibbles ^ 8) - 8  # sign-extend the 4-bit two's complement
    return nibbles.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_signs(x: jax.Array) -> jax.Array:
    """One bit per element of the flattened ``x``: set where ``x >= 0``.

    Returns ``uint8[ceil(n / 8)]``; element ``8i + j`` is bit ``j`` (value ``1 << j``) of
    byte ``i``, and the unused bits of the last byte are 0.

    Example:
      >>> pack_signs(jnp.array([1.0, -2.0, 0.0, -0.5, 3.0])).tolist()
      [21]
      >>> unpack_signs(pack_signs(jnp.array([1.0, -2.0, 0.0, -0.5, 3.0])), 5).tolist()
      [1.0, -1.0, 1.0, -1.0, 1.0]
    """
    return jnp.packbits(jnp.ravel(x) >= 0, bitorder="little")


def unpack_signs(bits: jax.Array, n: int) -> jax.Array:
    """Inverse of ``pack_signs``: ``float32[n]`` of +1 (bit set) and -1."""
    if n > 8 * bits.shape[0]:
        raise ConfigError(f"unpack_signs(n={n}) of {bits.shape[0]} bytes: use n <= {8 * bits.shape[0]}")
    b = jnp.unpackbits(bits, count=n, bitorder="little")
    return jnp.where(b == 1, 1.0, -1.0).astype(jnp.float32)


def _quantize_blocks(x: jax.Array, bits: int):
    """``x``: ``[..., block]``, blocks along the last axis -> (values, float32 scales[...])."""
    levels = _LEVELS[bits]
    x = x.astype(jnp.float32)
    scales = jnp.max(jnp.abs(x), axis=-1) / levels
    safe = jnp.where(scales > 0, scales, 1.0)
    q = jnp.clip(jnp.round(x / safe[..., None]), -levels, levels).astype(jnp.int8)
    return (pack_int4(q) if bits == 4 else q), scales


def _dequantize_blocks(values: jax.Array, scales: jax.Array, bits: int) -> jax.Array:
    q = unpack_int4(values) if bits == 4 else values
    return q.astype(jnp.float32) * scales[..., None]


def quantize(x: jax.Array, bits: int = 8, block: int = DEFAULT_BLOCK) -> Quantized:
    """Symmetric per-block quantization of the flattened ``x``.

    ``x`` is flattened (row-major), padded with zeros to a multiple of ``block`` and split
    into blocks; each block gets ``scale = max|block| / levels`` (float32; levels 127 for
    ``bits=8``, 7 for ``bits=4``) and values ``round(x / scale)`` (to nearest, ties to even),
    in ``[-levels, levels]``. An all-zero block gets scale 0 and values 0 (no division by
    zero). ``dequantize`` returns values with ``|x - dequantize(quantize(x))| <= scale / 2``
    per element (up to float32 rounding of the division and product: at most
    ``2 * levels * scale * 2**-24`` more). For finite ``x`` only.

    Example:
      >>> q = quantize(jnp.array([7.0, -3.0, 1.2, 0.0, 0.0]), bits=4, block=4)
      >>> q.values.dtype, q.values.shape, q.scales.tolist(), unpack_int4(q.values).tolist()
      (dtype('uint8'), (2, 2), [1.0, 0.0], [[7, -3, 1, 0], [0, 0, 0, 0]])
      >>> dequantize(q).tolist()
      [7.0, -3.0, 1.0, 0.0, 0.0]
    """
    _check_bits(bits, block)
    flat = jnp.ravel(x).astype(jnp.float32)
    pad = -flat.size % block
    blocks = jnp.pad(flat, (0, pad)).reshape(-1, block)
    values, scales = _quantize_blocks(blocks, bits)
    return Quantized(values, scales, tuple(x.shape), bits)


def dequantize(q: Quantized) -> jax.Array:
    """The float32 array of ``q.shape`` that ``q`` stands for (padding dropped)."""
    flat = _dequantize_blocks(q.values, q.scales, q.bits).reshape(-1)
    return flat[: math.prod(q.shape)].reshape(q.shape)


# --- qwZ: quantized all-gather ------------------------------------------------------


def quantized_all_gather(x: jax.Array, axis_name: str, *, bits: int = 8, block: int = DEFAULT_BLOCK,
                         axis: int = 0, tiled: bool = True, groups=None) -> jax.Array:
    """ZeRO++'s qwZ: an all-gather that moves block-quantized bytes (inside ``shard_map``).

    Each device quantizes its own shard ``x`` (``quantize(x, bits, block)``: padded to
    whole blocks on its own), all-gathers the packed values and the float32 scales over
    ``axis_name`` (only within its group of ``groups``, ``axis_index_groups``: lists of
    axis indices, equal sizes), and dequantizes every device's part. The result is, bit
    for bit, what ``lax.all_gather(x, axis_name, axis=axis, tiled=tiled,
    axis_index_groups=groups)`` would give with each shard replaced by
    ``dequantize(quantize(shard))``, cast to ``x.dtype``. Per element the wire carries
    ``bits/8 + 4/block`` bytes (``1 + 4/block`` for int8), counting the zero padding of
    each shard's last block.

    The backward pass treats quantization as the identity (straight-through) and is the
    transpose of an exact all-gather: a plain, unquantized ``lax.psum_scatter`` of the
    cotangent in its own dtype (``scatter_dimension=axis``, same ``tiled`` and groups).
    So it can stand in for ZeRO-3's parameter gather, whose backward pass is the gradient
    reduce-scatter: only the forward weights are quantized (as in qwZ); gradients are
    reduced exactly (use ``two_hop_reduce_scatter`` for qgZ separately).

    Args:
      x: this device's shard.
      axis_name: the manual mesh axis to gather over.
      bits: 8 (int8) or 4 (int4, packed two per byte).
      block: elements per quantization block (even for 4 bits).
      axis: dimension of ``x`` to concatenate along (``tiled``) or to insert (not tiled).
      tiled: as in ``lax.all_gather``.
      groups: ``axis_index_groups`` or None for the whole axis.
    """
    _check_bits(bits, block)
    ndim = x.ndim + (0 if tiled else 1)
    if not -ndim <= axis < ndim or (tiled and x.ndim == 0):
        raise ConfigError(f"axis={axis} for a {x.ndim}-d shard with tiled={tiled}: use an axis in "
                          f"[{-ndim}, {ndim - 1}]" + (" (a scalar needs tiled=False)" if tiled and x.ndim == 0 else ""))
    key = None if groups is None else tuple(tuple(int(i) for i in g) for g in groups)
    return _gather_op(axis_name, bits, block, axis % ndim, tiled, key)(x)


@functools.lru_cache(maxsize=None)
def _gather_op(axis_name, bits, block, axis, tiled, groups):
    index_groups = None if groups is None else [list(g) for g in groups]

    @jax.custom_vjp
    def gather(x):
        q = quantize(x, bits, block)
        values = lax.all_gather(q.values, axis_name, axis_index_groups=index_groups)  # [G, blocks, bytes]
        scales = lax.all_gather(q.scales, axis_name, axis_index_groups=index_groups)  # [G, blocks]
        g = values.shape[0]
        parts = _dequantize_blocks(values, scales, bits).reshape(g, -1)[:, : x.size]
        stacked = jnp.moveaxis(parts.reshape(g, *x.shape), 0, axis).astype(x.dtype)
        if not tiled:
            return stacked
        return stacked.reshape(*x.shape[:axis], g * x.shape[axis], *x.shape[axis + 1:])

    def fwd(x):
        return gather(x), None

    def bwd(_, ct):
        return (lax.psum_scatter(ct, axis_name, scatter_dimension=axis, tiled=tiled, axis_index_groups=index_groups),)

    gather.defvjp(fwd, bwd)
    return gather


# --- qgZ: two-hop quantized reduce-scatter ------------------------------------------


def two_hop_reduce_scatter(x: jax.Array, axis_name: str, *, node_size: int, bits: int | None = 4,
                           block: int = DEFAULT_BLOCK, error: jax.Array | None = None, err_beta: float = 0.0):
    """ZeRO++'s qgZ: the mean over ``axis_name`` of ``x``, reduce-scattered in two
    quantized all-to-all hops (inside ``shard_map``).

    Let N be the axis size, L = ``node_size`` (a node is L consecutive devices of the
    axis) and M = N / L the node count; device ``d`` is position ``l = d % L`` of node
    ``m = d // L``. ``x`` (this device's whole gradient) is flattened and padded with
    zeros to a multiple of ``N * block``, P elements, and cut into N slices of ``c = P / N``
    elements; slice ``s`` is viewed as ``(m', l') = divmod(s, L)``.

    * Hop 1, inside the node (groups ``[mL, ..., mL + L - 1]``): device ``(m, l)`` sends
      to its node's position ``l'`` the slices ``{m'L + l' : m' < M}`` (the ``[M, L, c]``
      view transposed to ``[L, M, c]``, row ``l'`` to peer ``l'``), quantized; it
      dequantizes what arrives and sums it: row ``m'`` of its ``[M, c]`` partial sums is
      node ``m``'s sum of slice ``m'L + l``.
    * Hop 2, across nodes (groups ``[l, L + l, ..., (M-1)L + l]``, the devices at the
      same position): it requantizes the partial sums and sends row ``m'`` to node ``m'``,
      i.e. to device ``m'L + l``; dequantizing and summing the M rows that arrive gives
      the sum over all N devices of slice ``mL + l = d``.

    So device ``d`` returns ``float32[c]``, elements ``[d*c, (d+1)*c)`` of the flattened,
    padded mean: the sum divided by N, the full device count. (DeepSpeed's qgZ divides by
    the node count; this is the exact mean up to quantization.) With ``bits=None`` the
    same two hops run unquantized and the result equals
    ``lax.psum_scatter(x, axis_name, tiled=True) / N`` up to float32 summation order.
    A hop whose groups are single devices (L = 1 or M = 1) moves nothing, so it is skipped
    and quantizes nothing. Hop 1 carries ``P * (bits/8 + 4/block)`` bytes per device
    (of which (L-1)/L leave it); hop 2, ``1/L`` of that.

    Error feedback (LoCo-style): ``error`` (float32, ``x``'s shape; None means zeros) is
    what this device's quantization lost last call. It is added to ``x`` before hop 1,
    and the returned ``new_error`` is everything this device's quantizers lost now, both
    hops: ``(x + error) - dequantize(quantize(x + error))`` from hop 1, plus, at the
    positions of the slices ``{m'L + l}`` this device carries in hop 2, hop 2's loss
    ``partial - dequantize(quantize(partial))`` on them. Fed back, that loss re-enters
    the same node's partial sum of the same slice, which this device carries again next
    call. Hence, exactly (in real arithmetic), with ``mean_t`` the exact mean of the
    inputs at call ``t`` and the buffers starting at zero:
    ``sum_t out_t - sum_t mean_t = -(1/N) * sum_d new_error_T^d`` (as full vectors): what
    the quantizers lose is delayed, never dropped. With ``bits=None`` a given ``error`` is
    still added (and so flushed into ``out``) and ``new_error`` is 0.

    ``err_beta`` is DeepSpeed LoCo's (``zeropp_loco_param.err_beta``): the buffer becomes
    ``err_beta * error + (1 - err_beta) * lost``, a moving average of what was lost; 0 (the
    default) keeps the loss itself, for which the identity above holds.

    Args:
      x: this device's gradient (any shape and float dtype).
      axis_name: the manual mesh axis to reduce over.
      node_size: devices per node, L; must divide the axis size.
      bits: 4 or 8 for both hops, or None for no quantization.
      block: elements per quantization block (even for 4 bits).
      error: this device's error-feedback buffer, or None.
      err_beta: the buffer's decay (see above), in [0, 1).

    Returns:
      ``(out, new_error)``: ``float32[c]`` and ``float32[x.shape]``.

    Example (8 devices, 2 nodes of 4; device d gets element d of the mean of the rows):
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> mean = jax.shard_map(lambda x: two_hop_reduce_scatter(x[0], "data", node_size=4, bits=None, block=1)[0],
      ...                      mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False)
      >>> mean(jnp.arange(64.0).reshape(8, 8)).tolist()
      [28.0, 29.0, 30.0, 31.0, 32.0, 33.0, 34.0, 35.0]
    """
    _check_bits(bits, block, allow_none=True)
    n_dev = lax.axis_size(axis_name)
    if not isinstance(node_size, int) or node_size < 1 or n_dev % node_size:
        raise ConfigError(f"node_size={node_size!r} for a '{axis_name}' axis of {n_dev} devices: "
                          f"use a divisor of {n_dev} (devices per node)")
    if error is not None and error.shape != x.shape:
        raise ConfigError(f"error of shape {error.shape} for x of shape {x.shape}: use x's shape (or None)")
    L, M = node_size, n_dev // node_size
    c = -(-x.size // (n_dev * block)) * block  # elements per slice: whole blocks
    k = c // block  # blocks per slice
    flat = jnp.ravel(x).astype(jnp.float32)
    if error is not None:
        flat = flat + jnp.ravel(error).astype(jnp.float32)
    flat = jnp.pad(flat, (0, n_dev * c - x.size))
    lost = jnp.zeros_like(flat)
    intra = [[m * L + j for j in range(L)] for m in range(M)]
    inter = [[m * L + j for m in range(M)] for j in range(L)]

    # hop 1: [M, L, k, block] -> rows by destination position l' -> sum what arrives
    blocks = flat.reshape(M, L, k, block)
    if L == 1:
        partial = blocks[:, 0]
    elif bits is None:
        partial = lax.all_to_all(blocks.transpose(1, 0, 2, 3), axis_name, 0, 0, axis_index_groups=intra).sum(0)
    else:
        values, scales = _quantize_blocks(blocks, bits)
        lost = flat - _dequantize_blocks(values, scales, bits).reshape(-1)
        values = lax.all_to_all(values.transpose(1, 0, 2, 3), axis_name, 0, 0, axis_index_groups=intra)
        scales = lax.all_to_all(scales.transpose(1, 0, 2), axis_name, 0, 0, axis_index_groups=intra)
        partial = _dequantize_blocks(values, scales, bits).sum(0)  # [M, k, block]

    # hop 2: row m' of the partial sums -> device m'L + l
    if M == 1:
        out = partial[0]
    elif bits is None:
        out = lax.all_to_all(partial, axis_name, 0, 0, axis_index_groups=inter).sum(0)
    else:
        values, scales = _quantize_blocks(partial, bits)
        lost2 = partial - _dequantize_blocks(values, scales, bits)  # [M, k, block]: slices m'L + l
        pos = lax.axis_index(axis_name) % L
        lost = lost.reshape(M, L, k, block)
        mine = lax.dynamic_slice_in_dim(lost, pos, 1, 1)  # [M, 1, k, block]: the slices this device carries
        lost = lax.dynamic_update_slice(lost, mine + lost2[:, None], (0, pos, 0, 0))
        lost = lost.reshape(-1)
        values = lax.all_to_all(values, axis_name, 0, 0, axis_index_groups=inter)
        scales = lax.all_to_all(scales, axis_name, 0, 0, axis_index_groups=inter)
        out = _dequantize_blocks(values, scales, bits).sum(0)
    lost = lost[: x.size].reshape(x.shape)
    if err_beta and error is not None:
        lost = err_beta * error.astype(jnp.float32) + (1 - err_beta) * lost
    return out.reshape(c) / n_dev, lost
