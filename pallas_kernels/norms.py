"""RMSNorm and LayerNorm as fused Pallas kernels: one pass forward, one pass backward.

Rows are normalised over the last axis with float32 statistics; any leading shape is
flattened to rows and padded to whole blocks. The forward kernel writes the output and
the per-row statistics (mean, 1/std); the backward kernel reads them back and writes
``dx`` together with per-block partial sums of ``dscale`` (and ``dbias``), which are
added up outside the kernel.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.dispatch import match_cotangent, pallas_call, resolve_impl, round_up

# Rows per block: about 64K float32 elements, a comfortable Triton block.
_BLOCK_ELEMENTS = 1 << 16


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6, impl: str = "auto") -> jax.Array:
    """``x / sqrt(mean(x**2) + eps) * scale`` over the last axis, in ``x``'s dtype.

    Args:
      x: ``[..., d]``, any float dtype; statistics are float32.
      scale: ``[d]``.
      eps: added to the mean square.
      impl: ``"auto" | "pallas" | "interpret" | "xla"`` (see ``pallas_kernels.dispatch``).

    Returns:
      An array shaped and typed like ``x``.

    Example:
      >>> import jax.numpy as jnp
      >>> rms_norm(jnp.array([[2.0, -2.0]]), jnp.full(2, 3.0), eps=0.0, impl="interpret")
      Array([[ 3., -3.]], dtype=float32)
    """
    _check_param("rms_norm", "scale", scale, x)
    impl = resolve_impl("rms_norm", impl, _unsupported(x))
    if impl == "xla":
        return rms_norm_reference(x, scale, eps)
    bias = jnp.zeros_like(scale)
    return _norm(x, scale, bias, float(eps), False, impl == "interpret")


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-5,
               impl: str = "auto") -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis, in ``x``'s dtype.

    Args:
      x: ``[..., d]``, any float dtype; statistics are float32.
      scale: ``[d]``.
      bias: ``[d]``.
      eps: added to the variance.
      impl: ``"auto" | "pallas" | "interpret" | "xla"`` (see ``pallas_kernels.dispatch``).

    Returns:
      An array shaped and typed like ``x``.

    Example:
      >>> import jax.numpy as jnp
      >>> layer_norm(jnp.array([[1.0, 3.0]]), jnp.ones(2), jnp.zeros(2), eps=0.0,
      ...            impl="interpret")
      Array([[-1.,  1.]], dtype=float32)
    """
    _check_param("layer_norm", "scale", scale, x)
    _check_param("layer_norm", "bias", bias, x)
    impl = resolve_impl("layer_norm", impl, _unsupported(x))
    if impl == "xla":
        return layer_norm_reference(x, scale, bias, eps)
    return _norm(x, scale, bias, float(eps), True, impl == "interpret")


def rms_norm_reference(x, scale, eps=1e-6):
    """The jnp RMSNorm the kernel is tested against (float32 statistics)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def layer_norm_reference(x, scale, bias, eps=1e-5):
    """The jnp LayerNorm the kernel is tested against (float32 statistics)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def _check_param(kernel, name, param, x):
    if param.shape != (x.shape[-1],):
        raise ValueError(f"{kernel}: {name} has shape {param.shape}; it must be "
                         f"({x.shape[-1]},), the last axis of x {x.shape}")


def _unsupported(x) -> str | None:
    d = x.shape[-1]
    if d & (d - 1):
        return f"hidden size {d} is not a power of two (a Triton block holds whole rows)"
    return None


def _block_rows(rows: int, d: int) -> int:
    return max(1, min(pl.next_power_of_2(rows), _BLOCK_ELEMENTS // pl.next_power_of_2(d)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _norm(x, scale, bias, eps, centered, interpret):
    return _norm_fwd(x, scale, bias, eps, centered, interpret)[0]


def _norm_fwd(x, scale, bias, eps, centered, interpret):
    d = x.shape[-1]
    rows = math.prod(x.shape[:-1])
    block = _block_rows(rows, d)
    padded = round_up(rows, block)
    x2 = jnp.pad(x.reshape(rows, d), ((0, padded - rows), (0, 0)))
    row_spec = pl.BlockSpec((block, d), lambda i: (i, 0))
    stat_spec = pl.BlockSpec((block, 1), lambda i: (i, 0))
    param_spec = pl.BlockSpec((1, d), lambda i: (0, 0))
    y, mean, rstd = pallas_call(
        functools.partial(_forward_kernel, eps=eps, centered=centered),
        grid=(padded // block,),
        in_specs=[row_spec, param_spec, param_spec],
        out_specs=[row_spec, stat_spec, stat_spec],
        out_shape=[jax.ShapeDtypeStruct((padded, d), x.dtype),
                   jax.ShapeDtypeStruct((padded, 1), jnp.float32),
                   jax.ShapeDtypeStruct((padded, 1), jnp.float32)],
        interpret=interpret,
        name="zjax_layer_norm_fwd" if centered else "zjax_rms_norm_fwd",
    )(x2, scale.reshape(1, d), bias.reshape(1, d))
    return y[:rows].reshape(x.shape), (x2, scale, bias, mean, rstd)


def _norm_bwd(eps, centered, interpret, residuals, dy):
    x2, scale, bias, mean, rstd = residuals
    padded, d = x2.shape
    rows = math.prod(dy.shape[:-1])
    block = _block_rows(rows, d)
    dy2 = jnp.pad(dy.reshape(rows, d), ((0, padded - rows), (0, 0)))
    blocks = padded // block
    row_spec = pl.BlockSpec((block, d), lambda i: (i, 0))
    stat_spec = pl.BlockSpec((block, 1), lambda i: (i, 0))
    param_spec = pl.BlockSpec((1, d), lambda i: (0, 0))
    partial_spec = pl.BlockSpec((1, d), lambda i: (i, 0))
    dx, dscale, dbias = pallas_call(
        functools.partial(_backward_kernel, centered=centered),
        grid=(blocks,),
        in_specs=[row_spec, row_spec, param_spec, stat_spec, stat_spec],
        out_specs=[row_spec, partial_spec, partial_spec],
        out_shape=[jax.ShapeDtypeStruct((padded, d), x2.dtype),
                   jax.ShapeDtypeStruct((blocks, d), jnp.float32),
                   jax.ShapeDtypeStruct((blocks, d), jnp.float32)],
        interpret=interpret,
        name="zjax_layer_norm_bwd" if centered else "zjax_rms_norm_bwd",
    )(x2, dy2, scale.reshape(1, d), mean, rstd)
    return (match_cotangent(dx[:rows].reshape(dy.shape), x2),
            match_cotangent(dscale.sum(0).astype(scale.dtype), scale),
            match_cotangent(dbias.sum(0).astype(bias.dtype), bias))


def _forward_kernel(x_ref, scale_ref, bias_ref, y_ref, mean_ref, rstd_ref, *, eps, centered):
    x = x_ref[...].astype(jnp.float32)
    mean = jnp.mean(x, axis=1, keepdims=True) if centered else jnp.zeros((x.shape[0], 1), jnp.float32)
    xc = x - mean
    rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=1, keepdims=True) + eps)
    y = xc * rstd * scale_ref[...].astype(jnp.float32) + bias_ref[...].astype(jnp.float32)
    y_ref[...] = y.astype(y_ref.dtype)
    mean_ref[...] = mean
    rstd_ref[...] = rstd


def _backward_kernel(x_ref, dy_ref, scale_ref, mean_ref, rstd_ref, dx_ref, dscale_ref,
                     dbias_ref, *, centered):
    rstd = rstd_ref[...]
    xhat = (x_ref[...].astype(jnp.float32) - mean_ref[...]) * rstd
    dy = dy_ref[...].astype(jnp.float32)
    g = dy * scale_ref[...].astype(jnp.float32)
    d = g.shape[1]
    dx = g - xhat * (jnp.sum(g * xhat, axis=1, keepdims=True) / d)
    if centered:
        dx = dx - jnp.sum(g, axis=1, keepdims=True) / d
    dx_ref[...] = (dx * rstd).astype(dx_ref.dtype)
    dscale_ref[...] = jnp.sum(dy * xhat, axis=0, keepdims=True)
    dbias_ref[...] = jnp.sum(dy, axis=0, keepdims=True)


_norm.defvjp(_norm_fwd, _norm_bwd)
