"""Unscaling loss-scaled gradients and checking them for overflow in one pass.

Each floating leaf is flattened to rows of ``_LANES`` elements (zero-padded to whole
blocks) and read once: the kernel multiplies it by ``1 / scale`` in float32 (or wider),
writes it back in the leaf's dtype, and writes per block whether every unscaled
element is finite. The per-block flags are then reduced to one bool.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.dispatch import KERNEL_DTYPES, pallas_call, resolve_impl, round_up

_LANES = 128
# Rows per block: 64K elements, a comfortable Triton block.
_MAX_BLOCK_ROWS = (1 << 16) // _LANES


def unscale_and_check(grads, scale, impl: str = "auto"):
    """``grads * (1 / scale)`` leaf by leaf, and whether every element of it is finite.

    The check runs on the unscaled values, so an inf or nan in ``grads`` is reported
    (``inf * (1/scale)`` stays inf), and so is an overflow of the unscaling itself.

    Args:
      grads: a pytree of arrays, any shapes. Floating leaves are multiplied in
        float32 (float64 stays float64) and returned in their own dtype; other
        leaves (integers, ``float0``) are returned unchanged and count as finite.
      scale: the loss scale, a scalar (Python number or array).
      impl: ``"auto" | "pallas" | "interpret" | "xla"`` (see ``pallas_kernels.dispatch``).

    Returns:
      ``(unscaled_grads, all_finite)``: a pytree like ``grads`` and a bool scalar.
      Inside ``shard_map`` the bool covers this shard only; combine it across the mesh
      as ``zjax.train.loss_scale.all_finite`` does with ``axis_name``.

    Example:
      >>> import jax.numpy as jnp
      >>> g, ok = unscale_and_check({"w": jnp.array([4.0, -8.0], jnp.float16)}, 4.0,
      ...                           impl="interpret")
      >>> g["w"], ok
      (Array([ 1., -2.], dtype=float16), Array(True, dtype=bool))
    """
    inverse = _inverse(scale)
    leaves, treedef = jax.tree.flatten(grads)
    floating = [i for i, leaf in enumerate(leaves) if _is_float(leaf)]
    unsupported = next((f"leaf dtype {leaves[i].dtype} (use float32, bfloat16 or float16)"
                        for i in floating if leaves[i].dtype not in KERNEL_DTYPES), None)
    impl = resolve_impl("unscale_and_check", impl, unsupported)
    if impl == "xla":
        return unscale_and_check_reference(grads, scale)
    out, flags = list(leaves), [jnp.ones((), jnp.bool_)]
    for i in floating:
        if leaves[i].size:
            out[i], finite = _unscale_leaf(leaves[i], inverse, impl == "interpret")
            flags.append(finite)
    return jax.tree.unflatten(treedef, out), jnp.all(jnp.stack(flags))


def unscale_and_check_reference(grads, scale):
    """The jnp unscale-and-check the kernel must match bit for bit."""
    inverse = _inverse(scale)
    unscaled = jax.tree.map(
        lambda g: (g.astype(_compute_dtype(g)) * inverse.astype(_compute_dtype(g))).astype(g.dtype)
        if _is_float(g) else g, grads)
    finite = jnp.ones((), jnp.bool_)
    for leaf in jax.tree.leaves(unscaled):
        if _is_float(leaf):
            finite = finite & jnp.all(jnp.isfinite(leaf))
    return unscaled, finite


def _inverse(scale) -> jax.Array:
    scale = jnp.asarray(scale, jnp.float32)
    if scale.shape not in ((), (1,)):
        raise ValueError(f"unscale_and_check: scale has shape {scale.shape}; it must be a scalar")
    return jnp.float32(1.0) / scale.reshape(())


def _is_float(leaf) -> bool:
    return jnp.issubdtype(leaf.dtype, jnp.floating)


def _compute_dtype(leaf):
    return jnp.promote_types(leaf.dtype, jnp.float32)


def _unscale_leaf(leaf, inverse, interpret):
    n = leaf.size
    rows = -(-n // _LANES)
    block = min(_MAX_BLOCK_ROWS, pl.next_power_of_2(rows))
    padded = round_up(rows, block)
    flat = jnp.pad(leaf.reshape(-1), (0, padded * _LANES - n)).reshape(padded, _LANES)
    blocks = padded // block
    row_spec = pl.BlockSpec((block, _LANES), lambda i: (i, 0))
    out, finite = pallas_call(
        functools.partial(_unscale_kernel, dtype=_compute_dtype(leaf)),
        grid=(blocks,),
        in_specs=[row_spec, pl.BlockSpec((1, 1), lambda i: (0, 0))],
        out_specs=[row_spec, pl.BlockSpec((1, 1), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct(flat.shape, leaf.dtype),
                   jax.ShapeDtypeStruct((blocks, 1), jnp.int32)],
        interpret=interpret,
        name="zjax_unscale_and_check",
    )(flat, inverse.reshape(1, 1))
    unscaled = out.reshape(-1)[:n].reshape(leaf.shape)
    return unscaled, jnp.min(finite) > 0


def _unscale_kernel(g_ref, inverse_ref, out_ref, finite_ref, *, dtype):
    out = (g_ref[...].astype(dtype) * inverse_ref[...].astype(dtype)).astype(out_ref.dtype)
    out_ref[...] = out
    finite = jnp.isfinite(out).astype(jnp.int32)
    finite_ref[...] = jnp.min(jnp.min(finite, axis=1, keepdims=True), axis=0, keepdims=True)
