"""The gated MLP input, ``act(x @ w_gate) * (x @ w_up)``, as fused Pallas kernels.

SwiGLU uses ``silu`` as the gate's activation, GeGLU the tanh-approximate ``gelu``.
The forward kernel computes both projections of one tile of rows and hidden units in
float32 accumulators and writes only the gated product: the pre-activations never
reach memory. The backward kernel recomputes them for the same tile and writes the
two pre-activation cotangents; the three matmuls that contract over rows or hidden
units (``dx``, ``dw_gate``, ``dw_up``) are left to XLA, which runs them at matmul speed.
Rows, hidden units and the model dimension are padded to whole blocks with zeros,
which add nothing to the dot products, and sliced off again.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.dispatch import (
    block_size, dot_unsupported, match_cotangent, pallas_call, resolve_impl, round_up,
)

# Default block sizes (rows, hidden units, model-dimension chunk), each clamped to the
# call's shape; Triton's dot needs every block dimension to be at least 16.
_MAX_BLOCKS = (64, 128, 64)
_GELU_C = math.sqrt(2.0 / math.pi)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, impl: str = "auto", *,
           block_sizes: tuple[int, int, int] | None = None) -> jax.Array:
    """``silu(x @ w_gate) * (x @ w_up)`` with the gate's activation fused into the matmul.

    Args:
      x: ``[..., d]``, any float dtype.
      w_gate: ``[d, f]``.
      w_up: ``[d, f]``.
      impl: ``"auto" | "pallas" | "interpret" | "xla"`` (see ``pallas_kernels.dispatch``).
      block_sizes: ``(rows, f, d_chunk)`` per kernel step, each clamped to the shape;
        by default ``(64, 128, 64)``. On GPU each must be a power of two of at least 16.

    Returns:
      ``[..., f]`` in the promoted dtype of the three inputs; matmuls accumulate in
      float32.

    Example:
      >>> import jax.numpy as jnp
      >>> swiglu(jnp.ones((1, 2)), jnp.ones((2, 1)), jnp.full((2, 1), 0.5), impl="interpret")
      Array([[1.761594]], dtype=float32)
    """
    return _gated(x, w_gate, w_up, impl, block_sizes, "swiglu")


def geglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, impl: str = "auto", *,
          block_sizes: tuple[int, int, int] | None = None) -> jax.Array:
    """``gelu(x @ w_gate) * (x @ w_up)`` (tanh-approximate gelu) with the gate fused.

    Args and returns as in ``swiglu``.

    Example:
      >>> import jax.numpy as jnp
      >>> geglu(jnp.ones((1, 2)), jnp.ones((2, 1)), jnp.full((2, 1), 0.5), impl="interpret")
      Array([[1.9545977]], dtype=float32)
    """
    return _gated(x, w_gate, w_up, impl, block_sizes, "geglu")


def swiglu_reference(x, w_gate, w_up):
    """The jnp SwiGLU the kernel is tested against (float32 accumulation)."""
    return _gated_reference(x, w_gate, w_up, jax.nn.silu)


def geglu_reference(x, w_gate, w_up):
    """The jnp GeGLU the kernel is tested against (float32 accumulation, tanh gelu)."""
    return _gated_reference(x, w_gate, w_up, functools.partial(jax.nn.gelu, approximate=True))


def _gated_reference(x, w_gate, w_up, activation: Callable):
    dtype = jnp.result_type(x, w_gate, w_up)
    x, w_gate, w_up = (a.astype(dtype) for a in (x, w_gate, w_up))
    gate = jnp.dot(x, w_gate, preferred_element_type=jnp.float32)
    up = jnp.dot(x, w_up, preferred_element_type=jnp.float32)
    return (activation(gate) * up).astype(dtype)


def _gated(x, w_gate, w_up, impl, block_sizes, kernel):
    _check_weights(kernel, x, w_gate, w_up)
    blocks = _blocks(kernel, x, w_gate, block_sizes)
    impl = resolve_impl(kernel, impl, _unsupported(x, w_gate, w_up, blocks))
    if impl == "xla":
        reference = swiglu_reference if kernel == "swiglu" else geglu_reference
        return reference(x, w_gate, w_up)
    return _fused(x, w_gate, w_up, kernel, blocks, impl == "interpret")


def _check_weights(kernel, x, w_gate, w_up):
    d = x.shape[-1]
    if w_gate.ndim != 2 or w_gate.shape[0] != d:
        raise ValueError(f"{kernel}: w_gate has shape {w_gate.shape}; it must be ({d}, f), "
                         f"with d the last axis of x {x.shape}")
    if w_up.shape != w_gate.shape:
        raise ValueError(f"{kernel}: w_up has shape {w_up.shape}; it must match w_gate "
                         f"{w_gate.shape}")


def _blocks(kernel, x, w_gate, block_sizes):
    """Block sizes ``(rows, f, d_chunk)``, clamped to the padded shape of this call."""
    if block_sizes is None:
        block_sizes = _MAX_BLOCKS
    if len(block_sizes) != 3 or not all(isinstance(b, int) and b > 0 for b in block_sizes):
        raise ValueError(f"{kernel}: block_sizes={block_sizes!r}; use three positive ints "
                         "(rows, f, d_chunk), or None for the defaults")
    dims = (math.prod(x.shape[:-1]), w_gate.shape[1], w_gate.shape[0])
    return tuple(block_size(b, n) for b, n in zip(block_sizes, dims))


def _unsupported(x, w_gate, w_up, blocks) -> str | None:
    rows, f, d_chunk = blocks
    return dot_unsupported(jnp.result_type(x, w_gate, w_up), block_rows=rows, block_f=f, block_d=d_chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused(x, w_gate, w_up, kernel, blocks, interpret):
    return _fused_fwd(x, w_gate, w_up, kernel, blocks, interpret)[0]


def _fused_fwd(x, w_gate, w_up, kernel, blocks, interpret):
    dtype = jnp.result_type(x, w_gate, w_up)
    rows, f = math.prod(x.shape[:-1]), w_gate.shape[1]
    x2, wg, wu = _padded(x, w_gate, w_up, blocks)
    row_spec, weight_spec, tile_spec, grid = _specs(x2, wg, blocks)
    h = pallas_call(
        functools.partial(_forward_kernel, activation=kernel, chunk=blocks[2], dtype=dtype),
        grid=grid,
        in_specs=[row_spec, weight_spec, weight_spec],
        out_specs=tile_spec,
        out_shape=jax.ShapeDtypeStruct((x2.shape[0], wg.shape[1]), dtype),
        interpret=interpret,
        name=f"zjax_{kernel}_fwd",
    )(x2, wg, wu)
    return h[:rows, :f].reshape(*x.shape[:-1], f), (x, w_gate, w_up)


def _fused_bwd(kernel, blocks, interpret, residuals, dh):
    x, w_gate, w_up = residuals
    dtype = jnp.result_type(x, w_gate, w_up)
    rows, (d, f) = math.prod(x.shape[:-1]), w_gate.shape
    x2, wg, wu = _padded(x, w_gate, w_up, blocks)
    padded_rows, padded_f = x2.shape[0], wg.shape[1]
    dh2 = jnp.pad(dh.reshape(rows, f).astype(dtype), ((0, padded_rows - rows), (0, padded_f - f)))
    row_spec, weight_spec, tile_spec, grid = _specs(x2, wg, blocks)
    dgate, dup = pallas_call(
        functools.partial(_backward_kernel, activation=kernel, chunk=blocks[2], dtype=dtype),
        grid=grid,
        in_specs=[row_spec, weight_spec, weight_spec, tile_spec],
        out_specs=[tile_spec, tile_spec],
        out_shape=[jax.ShapeDtypeStruct((padded_rows, padded_f), dtype)] * 2,
        interpret=interpret,
        name=f"zjax_{kernel}_bwd",
    )(x2, wg, wu, dh2)
    dgate, dup = dgate[:rows, :f], dup[:rows, :f]
    xr = x.reshape(rows, d).astype(dtype)
    dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
    dx = dot(dgate, w_gate.astype(dtype).T) + dot(dup, w_up.astype(dtype).T)
    return (match_cotangent(dx.astype(x.dtype).reshape(x.shape), x),
            match_cotangent(dot(xr.T, dgate).astype(w_gate.dtype), w_gate),
            match_cotangent(dot(xr.T, dup).astype(w_up.dtype), w_up))


def _padded(x, w_gate, w_up, blocks):
    (d, f), rows = w_gate.shape, math.prod(x.shape[:-1])
    pad_rows, pad_f, pad_d = (round_up(n, b) - n for n, b in zip((rows, f, d), blocks))
    x2 = jnp.pad(x.reshape(rows, d), ((0, pad_rows), (0, pad_d)))
    return (x2, jnp.pad(w_gate, ((0, pad_d), (0, pad_f))), jnp.pad(w_up, ((0, pad_d), (0, pad_f))))


def _specs(x2, wg, blocks):
    block_rows, block_f, _ = blocks
    (padded_rows, d), padded_f = x2.shape, wg.shape[1]
    row_spec = pl.BlockSpec((block_rows, d), lambda i, j: (i, 0))
    weight_spec = pl.BlockSpec((d, block_f), lambda i, j: (0, j))
    tile_spec = pl.BlockSpec((block_rows, block_f), lambda i, j: (i, j))
    return row_spec, weight_spec, tile_spec, (padded_rows // block_rows, padded_f // block_f)


def _projections(x_ref, wg_ref, wu_ref, chunk, dtype):
    """``x @ w_gate`` and ``x @ w_up`` for one tile, accumulated in float32 over ``d``."""
    block_rows, block_f = x_ref.shape[0], wg_ref.shape[1]

    def step(k, acc):
        gate, up = acc
        cols = pl.ds(pl.multiple_of(k * chunk, chunk), chunk)
        x = x_ref[:, cols].astype(dtype)
        gate += jnp.dot(x, wg_ref[cols, :].astype(dtype), preferred_element_type=jnp.float32)
        up += jnp.dot(x, wu_ref[cols, :].astype(dtype), preferred_element_type=jnp.float32)
        return gate, up

    zeros = jnp.zeros((block_rows, block_f), jnp.float32)
    return jax.lax.fori_loop(0, x_ref.shape[1] // chunk, step, (zeros, zeros))


def _activation_and_slope(activation, gate):
    """The activation at ``gate`` and its derivative, in float32, as Triton can lower them."""
    if activation == "swiglu":
        sig = 1.0 / (1.0 + jnp.exp(-gate))
        return gate * sig, sig * (1.0 + gate * (1.0 - sig))
    t = jnp.tanh(_GELU_C * (gate + 0.044715 * gate * gate * gate))
    value = 0.5 * gate * (1.0 + t)
    inner_slope = _GELU_C * (1.0 + 3 * 0.044715 * gate * gate)
    slope = 0.5 * (1.0 + t) + 0.5 * gate * (1.0 - t * t) * inner_slope
    return value, slope


def _forward_kernel(x_ref, wg_ref, wu_ref, h_ref, *, activation, chunk, dtype):
    gate, up = _projections(x_ref, wg_ref, wu_ref, chunk, dtype)
    value, _ = _activation_and_slope(activation, gate)
    h_ref[...] = (value * up).astype(h_ref.dtype)


def _backward_kernel(x_ref, wg_ref, wu_ref, dh_ref, dgate_ref, dup_ref, *, activation, chunk,
                     dtype):
    gate, up = _projections(x_ref, wg_ref, wu_ref, chunk, dtype)
    value, slope = _activation_and_slope(activation, gate)
    dh = dh_ref[...].astype(jnp.float32)
    dgate_ref[...] = (dh * up * slope).astype(dgate_ref.dtype)
    dup_ref[...] = (dh * value).astype(dup_ref.dtype)


_fused.defvjp(_fused_fwd, _fused_bwd)
