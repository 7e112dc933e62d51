"""``x @ W`` with W stored quantized: int8 weight-only, int8 weights and activations, int4 groups.

The logical weight is ``W [K, N]``; ``x`` is ``[..., K]`` and the result ``[..., N]`` is float32
(as ``jnp.matmul(..., preferred_element_type=float32)``: the caller rounds to its own dtype).

- ``int8_matmul``: ``values`` int8 ``[K, N]``, one float32 ``scale`` per output column ``[N]``;
  ``x @ W = (x @ values) * scale``: the int8 tile is widened to ``x``'s dtype, multiplied in
  float32 accumulators and scaled once at the end.
- ``w8a8_matmul``: the same weight; ``x`` is quantized per row (token) to int8 with a float32
  scale (``quantize_rows``), the product accumulates exactly in int32 and is rescaled by
  row scale x column scale. The row absmax needs a whole row before any tile can start, so
  the activation quantization runs once, before the kernel, rather than once per column tile.
- ``int4_matmul``: ``packed`` uint8 ``[K / 2, N]`` (two int4 values a byte, ``pack_int4``), one
  ``scale`` per group of ``G`` rows and column ``[K / G, N]``. Within group ``g`` (rows
  ``gG .. gG + G - 1``) byte row ``i`` holds row ``gG + i`` in its low nibble and row
  ``gG + G/2 + i`` in its high nibble, so each nibble plane of a group multiplies a contiguous
  half of the group's ``x`` columns and no interleave is needed in the kernel.

The Pallas kernels run one program per (row block, column block); each walks ``K`` in
chunks (int4: one group at a time), widens one ``[chunk, block_n]`` tile of the stored
integers in registers and accumulates in float32 (w8a8: int32). The dequantized matrix never
exists in memory. Rows are padded to whole blocks; ``K`` and ``N`` take the largest power-of-two
block (at least 16) that divides them, else they are padded with zeros (a copy of the
quantized weight per call: quantize weights whose sides are multiples of 16 to avoid it).
The ``xla`` references are the plain jnp formulas. Inference only: no VJP.
Under ``impl="auto"`` the kernels are used nowhere yet: they have run in interpret mode only.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.dispatch import (
    MIN_BLOCK, block_size, dot_unsupported, pallas_call, resolve_impl, round_up,
)

# Default blocks (rows, output columns, K chunk), each clamped to the call's shape.
_MAX_BLOCKS = (64, 128, 128)
INT8_MAX = 127
INT4_MAX = 7
# Why impl="auto" takes the XLA path on every backend (see the module docstring).
_AUTO_USES_XLA = "the quantized-matmul kernels have not yet run compiled on a GPU (interpret mode only)"


def int8_matmul(x: jax.Array, values: jax.Array, scale: jax.Array, impl: str = "auto", *,
                block_sizes: tuple[int, int, int] | None = None) -> jax.Array:
    """``x @ (values * scale)`` for an int8 weight with one scale per output column.

    Args:
      x: ``[..., K]``, float32, bfloat16 or float16; the tiles multiply in this dtype.
      values: int8 ``[K, N]``.
      scale: ``[N]``, any float dtype.
      impl: ``"auto" | "pallas" | "interpret" | "xla"`` (see ``pallas_kernels.dispatch``).
      block_sizes: ``(rows, N block, K chunk)``, each clamped to the shape; default
        ``(64, 128, 128)``.

    Returns:
      float32 ``[..., N]``.

    Example:
      >>> import jax.numpy as jnp
      >>> int8_matmul(jnp.ones((1, 2)), jnp.array([[1, 2], [3, -4]], jnp.int8),
      ...             jnp.array([0.5, 1.0]), impl="interpret")
      Array([[ 2., -2.]], dtype=float32)
    """
    _check("int8_matmul", x, values, scale, (values.shape[1],), jnp.int8)
    blocks = _blocks(x, values.shape, block_sizes, 3)
    impl = _impl("int8_matmul", impl, dot_unsupported(x.dtype, **_sides(blocks)))
    if impl == "xla":
        return int8_matmul_reference(x, values, scale)
    kernel = functools.partial(_int8_kernel, chunk=blocks[2])
    return _call(kernel, "zjax_int8_matmul", x, values, scale, None, blocks, impl)


def w8a8_matmul(x: jax.Array, values: jax.Array, scale: jax.Array, impl: str = "auto", *,
                block_sizes: tuple[int, int, int] | None = None) -> jax.Array:
    """``x @ (values * scale)`` with ``x`` quantized per row to int8 and an int32 product.

    Args and block sizes as in ``int8_matmul``; ``x``'s rows are quantized by ``quantize_rows``.

    Returns:
      float32 ``[..., N]``: ``(x_q @ values) * x_scale[:, None] * scale[None, :]``.

    Example:
      >>> import jax.numpy as jnp
      >>> w8a8_matmul(jnp.array([[1.0, -1.0]]), jnp.array([[1, 2], [3, -4]], jnp.int8),
      ...             jnp.array([0.5, 1.0]), impl="interpret")
      Array([[-1.,  6.]], dtype=float32)
    """
    _check("w8a8_matmul", x, values, scale, (values.shape[1],), jnp.int8)
    blocks = _blocks(x, values.shape, block_sizes, 3)
    impl = _impl("w8a8_matmul", impl, dot_unsupported(None, **_sides(blocks)))
    x_q, x_scale = quantize_rows(x)
    if impl == "xla":
        return _w8a8_product(x_q, x_scale, values, scale)
    kernel = functools.partial(_w8a8_kernel, chunk=blocks[2])
    return _call(kernel, "zjax_w8a8_matmul", x_q, values, scale, x_scale, blocks, impl)


def int4_matmul(x: jax.Array, packed: jax.Array, scale: jax.Array, impl: str = "auto", *,
                block_sizes: tuple[int, int] | None = None) -> jax.Array:
    """``x @ W`` for int4 ``W`` packed two values a byte with one scale per (group, column).

    Args:
      x: ``[..., K]``, float32, bfloat16 or float16; the tiles multiply in this dtype.
      packed: uint8 ``[K / 2, N]`` from ``pack_int4`` with group size ``G = K / scale.shape[0]``.
      scale: ``[K / G, N]``, any float dtype.
      impl: ``"auto" | "pallas" | "interpret" | "xla"`` (see ``pallas_kernels.dispatch``).
      block_sizes: ``(rows, N block)``, clamped to the shape; default ``(64, 128)``. The kernel
        steps through ``K`` one group at a time; on GPU ``G / 2`` must be a power of two >= 16.

    Returns:
      float32 ``[..., N]``.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[1, -8], [7, 2]], jnp.int8)   # K=2, N=2, one group of 2
      >>> int4_matmul(jnp.ones((1, 2)), pack_int4(w, 2), jnp.full((1, 2), 0.5), impl="interpret")
      Array([[ 4., -3.]], dtype=float32)
    """
    if packed.ndim != 2 or scale.ndim != 2 or scale.shape[1] != packed.shape[1] or \
            (2 * packed.shape[0]) % max(scale.shape[0], 1):
        raise ValueError(f"int4_matmul: packed {packed.shape} and scale {scale.shape}; need packed [K/2, N] "
                         "and scale [K/G, N] with the group size G dividing K")
    group = 2 * packed.shape[0] // scale.shape[0]
    _check("int4_matmul", x, packed, scale, scale.shape, jnp.uint8, k=2 * packed.shape[0])
    if group % 2:
        raise ValueError(f"int4_matmul: group size {group} (K / scale.shape[0]) is odd; a group packs pairs of rows")
    rows, cols = _blocks(x, (2 * packed.shape[0], packed.shape[1]), block_sizes, 2)[:2]
    unsupported = dot_unsupported(x.dtype, **_sides((rows, cols, group // 2)))
    impl = _impl("int4_matmul", impl, unsupported)
    if impl == "xla":
        return int4_matmul_reference(x, packed, scale)
    kernel = functools.partial(_int4_kernel, group=group)
    return _call(kernel, "zjax_int4_matmul", x, packed, scale, None, (rows, cols, group), impl)


def int8_matmul_reference(x, values, scale):
    """The XLA path of ``int8_matmul``: ``(x @ values) * scale``, float32 accumulation."""
    out = jnp.matmul(x, values.astype(x.dtype), preferred_element_type=jnp.float32)
    return out * scale.astype(jnp.float32)


def w8a8_matmul_reference(x, values, scale):
    """The XLA path of ``w8a8_matmul``: per-row int8 ``x``, int32 product, both scales."""
    return _w8a8_product(*quantize_rows(x), values, scale)


def int4_matmul_reference(x, packed, scale):
    """The XLA path of ``int4_matmul``: ``x @ dequantized W``, W dequantized in ``x``'s dtype."""
    w = dequantize_int4(packed, scale)
    return jnp.matmul(x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row symmetric int8: ``(q int8 [..., K], scale float32 [...])``, ``scale = absmax / 127``.

    An all-zero row gets scale 0 and zeros.
    """
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / INT8_MAX
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x / safe[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def pack_int4(q: jax.Array, group_size: int) -> jax.Array:
    """int4 values ``[K, N]`` (ints in ``[-8, 7]``) -> uint8 ``[K / 2, N]``, in groups of ``group_size`` rows.

    Within each group, byte row ``i`` holds group row ``i`` in its low nibble and group row
    ``i + group_size / 2`` in its high nibble (4-bit two's complement).

    Example:
      >>> import jax.numpy as jnp
      >>> pack_int4(jnp.array([[1], [-1], [-8], [7]], jnp.int8), 2).ravel().tolist()
      [241, 120]
    """
    k, n = q.shape
    if group_size % 2 or k % group_size:
        raise ValueError(f"pack_int4: group_size={group_size} with K={k}; use an even group size dividing K")
    u = (q.astype(jnp.int32) & 0xF).astype(jnp.uint8).reshape(k // group_size, 2, group_size // 2, n)
    return (u[:, 0] | (u[:, 1] << 4)).reshape(k // 2, n)


def unpack_int4(packed: jax.Array, group_size: int) -> jax.Array:
    """Inverse of ``pack_int4``: uint8 ``[K / 2, N]`` -> int8 ``[K, N]`` in ``[-8, 7]``."""
    half, n = group_size // 2, packed.shape[1]
    p = packed.astype(jnp.int32).reshape(-1, 1, half, n)
    both = jnp.concatenate([_low_nibble(p), _high_nibble(p)], axis=1)
    return both.reshape(2 * packed.shape[0], n).astype(jnp.int8)


def dequantize_int4(packed: jax.Array, scale: jax.Array) -> jax.Array:
    """float32 ``[K, N]``: the unpacked values times their group's scale."""
    group = 2 * packed.shape[0] // scale.shape[0]
    q = unpack_int4(packed, group).astype(jnp.float32)
    return q * jnp.repeat(scale.astype(jnp.float32), group, axis=0)


def _low_nibble(p):
    return ((p & 0xF) ^ 8) - 8  # sign-extends the 4-bit two's complement


def _high_nibble(p):
    return (((p >> 4) & 0xF) ^ 8) - 8


def _w8a8_product(x_q, x_scale, values, scale):
    acc = jnp.matmul(x_q, values, preferred_element_type=jnp.int32).astype(jnp.float32)
    return acc * x_scale[..., None] * scale.astype(jnp.float32)


def _impl(kernel, impl, unsupported):
    return resolve_impl(kernel, impl, _AUTO_USES_XLA if impl == "auto" else unsupported)


def _check(kernel, x, weight, scale, scale_shape, weight_dtype, k=None):
    k = weight.shape[0] if k is None else k
    if x.ndim < 1 or x.shape[-1] != k or weight.ndim != 2:
        raise ValueError(f"{kernel}: x {x.shape} and weight {weight.shape}; need x [..., K] for a weight of K={k} "
                         "rows")
    if weight.dtype != weight_dtype:
        raise ValueError(f"{kernel}: weight dtype {weight.dtype}; it must be {jnp.dtype(weight_dtype)}")
    if scale.shape != tuple(scale_shape):
        raise ValueError(f"{kernel}: scale has shape {scale.shape}; it must be {tuple(scale_shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{kernel}: x dtype {x.dtype}; use a float dtype")


def _blocks(x, weight_shape, block_sizes, n):
    """Blocks ``(rows, N block, K chunk)``: rows a power of two clamped to the rows; N and K the
    largest power of two (>= 16, <= the limit) dividing them, else one they get padded to."""
    limits = _MAX_BLOCKS[:n] if block_sizes is None else tuple(block_sizes)
    if len(limits) != n or not all(isinstance(b, int) and b > 0 for b in limits):
        raise ValueError(f"block_sizes={block_sizes!r}; use {n} positive ints "
                         f"({'rows, N block, K chunk' if n == 3 else 'rows, N block'}), or None for the defaults")
    k, cols = weight_shape
    rows = block_size(limits[0], math.prod(x.shape[:-1]))
    return (rows, _dividing_block(limits[1], cols)) + ((_dividing_block(limits[2], k),) if n == 3 else ())


def _dividing_block(limit, n):
    b = block_size(limit, n)
    while b > MIN_BLOCK and n % b:
        b //= 2
    return b if n % b == 0 else block_size(limit, n)


def _sides(blocks):
    return dict(zip(("block_rows", "block_n", "block_k"), blocks))


def _call(kernel, name, x, weight, col_scale, row_scale, blocks, impl):
    """Runs ``kernel`` over (row block, column block) programs of the padded operands.

    ``blocks[2]`` is the kernel's step along ``K``, to whose multiple ``K`` is padded (int4's
    step is its group, which divides ``K``); ``col_scale``'s last axis is the columns'.
    """
    rows_block, cols_block, k_step = blocks
    *lead, k = x.shape
    rows, n = math.prod(lead), weight.shape[1]
    pad_rows, pad_k, pad_n = round_up(rows, rows_block) - rows, round_up(k, k_step) - k, round_up(n, cols_block) - n
    x2 = _pad(x.reshape(rows, k), pad_rows, pad_k)
    weight = _pad(weight, pad_k, pad_n)
    col_scale = _pad(col_scale, *(0,) * (col_scale.ndim - 1), pad_n)
    scale_block = col_scale.shape[:-1] + (cols_block,)
    in_specs = [pl.BlockSpec((rows_block, x2.shape[1]), lambda i, j: (i, 0)),
                pl.BlockSpec((weight.shape[0], cols_block), lambda i, j: (0, j)),
                pl.BlockSpec(scale_block, lambda i, j: (0,) * (len(scale_block) - 1) + (j,))]
    args = [x2, weight, col_scale]
    if row_scale is not None:
        args.append(_pad(row_scale.reshape(rows), pad_rows))
        in_specs.append(pl.BlockSpec((rows_block,), lambda i, j: (i,)))
    out = pallas_call(
        kernel,
        grid=(x2.shape[0] // rows_block, weight.shape[1] // cols_block),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((rows_block, cols_block), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((x2.shape[0], weight.shape[1]), jnp.float32),
        interpret=impl == "interpret",
        name=name,
    )(*args)
    return out[:rows, :n].reshape(*lead, n)


def _pad(a, *pads):
    """``a`` with zeros appended along its leading axes (``pads[i]`` to axis ``i``)."""
    if not any(pads):
        return a
    return jnp.pad(a, [(0, p) for p in pads] + [(0, 0)] * (a.ndim - len(pads)))


def _int8_kernel(x_ref, w_ref, s_ref, o_ref, *, chunk):
    dtype = x_ref.dtype

    def step(k, acc):
        cols = pl.ds(pl.multiple_of(k * chunk, chunk), chunk)
        # one [chunk, block_n] tile of the weight, widened (not scaled) in registers
        return acc + jnp.dot(x_ref[:, cols], w_ref[cols, :].astype(dtype), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, x_ref.shape[1] // chunk, step, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc * s_ref[...].astype(jnp.float32)[None, :]


def _w8a8_kernel(x_ref, w_ref, s_ref, xs_ref, o_ref, *, chunk):
    def step(k, acc):
        cols = pl.ds(pl.multiple_of(k * chunk, chunk), chunk)
        return acc + jnp.dot(x_ref[:, cols], w_ref[cols, :], preferred_element_type=jnp.int32)

    acc = jax.lax.fori_loop(0, x_ref.shape[1] // chunk, step, jnp.zeros(o_ref.shape, jnp.int32))
    o_ref[...] = acc.astype(jnp.float32) * xs_ref[...][:, None] * s_ref[...].astype(jnp.float32)[None, :]


def _int4_kernel(x_ref, p_ref, s_ref, o_ref, *, group):
    dtype, half = x_ref.dtype, group // 2

    def step(g, acc):
        p = p_ref[pl.ds(pl.multiple_of(g * half, half), half), :].astype(jnp.int32)
        start = pl.multiple_of(g * group, group)
        # the group's two nibble planes multiply the two halves of its x columns
        part = jnp.dot(x_ref[:, pl.ds(start, half)], _low_nibble(p).astype(dtype),
                       preferred_element_type=jnp.float32)
        part += jnp.dot(x_ref[:, pl.ds(start + half, half)], _high_nibble(p).astype(dtype),
                        preferred_element_type=jnp.float32)
        return acc + part * s_ref[pl.ds(g, 1), :].astype(jnp.float32)

    o_ref[...] = jax.lax.fori_loop(0, x_ref.shape[1] // group, step, jnp.zeros(o_ref.shape, jnp.float32))
