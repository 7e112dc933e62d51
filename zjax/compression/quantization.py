"""Quantization-aware training: fake quantization with straight-through gradients.

``fake_quant(w, bits)`` rounds a weight to a ``bits``-bit grid and back (one scale per output
column, or per ``group_size`` input rows of a column) while its gradient passes through as if
it were the identity. At 8 bits, symmetric and per column it is exactly
``zjax.inference.quant``'s int8 (``scale = absmax / 127``), so a model trained with it exports to
the engine's real int8 weights with the values it was trained on (``clean.export_int8``).

Weights: the train step applies ``quantize_weights`` to the parameters the loss reads (the
compute copy, on global arrays, before ZeRO's gathers), so the optimizer updates the float
master with the gradient taken at the quantized weights (the straight-through estimator), under
every ZeRO stage and the tensor axis. Bits follow DeepSpeed's MoQ schedule
(``zjax.compression.schedule.weight_bits``).

Activations: the reference GPT passes the inputs of its projections through
``quantize_input(x, name)``, which fake-quantizes each token (row) to ``bits`` while an
``activation_quantization`` context (entered by the step while tracing) matches ``name``.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from zjax.compression import masks as M


def _ste(x: jax.Array, rounded: jax.Array) -> jax.Array:
    """``rounded`` forward, identity backward."""
    return x + lax.stop_gradient(rounded.astype(x.dtype) - x)


def _grid(w: jax.Array, bits, symmetric: bool, axis: int) -> jax.Array:
    """``w`` rounded to a ``bits``-bit grid with one scale (and zero point) per reduction over ``axis``."""
    w32 = lax.stop_gradient(w).astype(jnp.float32)
    bits = jnp.asarray(bits, jnp.float32)
    if symmetric:
        levels = 2.0 ** (bits - 1) - 1  # 127 at 8 bits: [-127, 127], zjax.inference.quant's int8
        scale = jnp.max(jnp.abs(w32), axis=axis, keepdims=True) / levels
        safe = jnp.where(scale > 0, scale, 1.0)
        return jnp.where(scale > 0, jnp.clip(jnp.round(w32 / safe), -levels, levels) * scale, 0.0)
    levels = 2.0 ** bits - 1
    low = jnp.min(w32, axis=axis, keepdims=True)
    high = jnp.max(w32, axis=axis, keepdims=True)
    scale = (high - low) / levels
    safe = jnp.where(scale > 0, scale, 1.0)
    zero = jnp.round(-low / safe)
    q = jnp.clip(jnp.round(w32 / safe) + zero, 0, levels)
    return jnp.where(scale > 0, (q - zero) * scale, w32)


def fake_quant(w: jax.Array, bits, *, symmetric: bool = True, group_size: int | None = None) -> jax.Array:
    """``w [..., K, N]`` quantized to ``bits`` and dequantized, gradients straight through.

    One scale per column (over ``K``), or per ``group_size`` rows of ``K`` and column. ``bits``
    may be traced (a schedule).

    >>> fake_quant(jnp.array([[1.0, 0.5], [0.3, -1.0]]), 2).tolist()
    [[1.0, 0.0], [0.0, -1.0]]
    """
    if w.ndim < 2:
        raise ValueError(f"fake_quant quantizes matrices [..., K, N]; got shape {tuple(w.shape)}")
    if group_size is None:
        return _ste(w, _grid(w, bits, symmetric, -2))
    k = w.shape[-2]
    if k % group_size:
        raise ValueError(f"group_size={group_size} does not divide the weight's input dimension {k}")
    grouped = w.reshape(w.shape[:-2] + (k // group_size, group_size, w.shape[-1]))
    return _ste(w, _grid(grouped, bits, symmetric, -2).reshape(w.shape))


def fake_quant_tokens(x: jax.Array, bits, *, symmetric: bool = True, axis_name: str | None = None) -> jax.Array:
    """Token-wise fake quantization of activations ``[..., features]`` (one dynamic scale per
    token, DeepSpeed's ``range_calibration: dynamic``), gradients straight through. With
    ``axis_name`` the features are split over that mesh axis and the range is taken over all of
    them."""
    x32 = lax.stop_gradient(x).astype(jnp.float32)  # the rounding has no gradient (pmax has no rule either)
    bits = jnp.asarray(bits, jnp.float32)

    def reduce(v, op):
        out = op(v, axis=-1, keepdims=True)
        if axis_name is not None:
            out = (lax.pmax if op is jnp.max else lax.pmin)(out, axis_name)
        return out

    if symmetric:
        levels = 2.0 ** (bits - 1) - 1
        scale = reduce(jnp.abs(x32), jnp.max) / levels
        safe = jnp.where(scale > 0, scale, 1.0)
        return _ste(x, jnp.clip(jnp.round(x32 / safe), -levels, levels) * scale)
    levels = 2.0 ** bits - 1
    low, high = reduce(x32, jnp.min), reduce(x32, jnp.max)
    scale = (high - low) / levels
    safe = jnp.where(scale > 0, scale, 1.0)
    zero = jnp.round(-low / safe)
    return _ste(x, jnp.where(scale > 0, (jnp.clip(jnp.round(x32 / safe) + zero, 0, levels) - zero) * scale, x32))


def quantize_weights(params: Any, groups: list, step) -> Any:
    """``params`` with every leaf a ``weight_quantization`` group matches fake-quantized at the
    bits the group's schedule gives at ``step`` (unchanged before its ``schedule_offset``)."""
    if not groups:
        return params
    from zjax.compression import schedule

    def leaf(path, w):
        name = M.path_name(path)
        group = next((g for g in groups if M.matches(g.modules, name)), None)
        if group is None or getattr(w, "ndim", 0) < 2:
            return w
        bits = schedule.weight_bits(step, group.start_bits, group.target_bits, group.quantization_period,
                                    group.schedule_offset)
        active = schedule.quantization_active(step, group.schedule_offset)
        quantized = fake_quant(w, bits, symmetric=group.symmetric, group_size=group.group_size)
        return jnp.where(active, quantized, w)

    return jax.tree_util.tree_map_with_path(leaf, params)


_ACTIVATIONS: contextvars.ContextVar = contextvars.ContextVar("zjax_activation_quantization", default=None)


@contextlib.contextmanager
def activation_quantization(groups: list, step, prefix: str = ""):
    """While active, ``quantize_input(x, name)`` fake-quantizes ``x`` for the groups matching
    ``prefix + name`` from their ``schedule_offset`` (``step`` may be traced)."""
    token = _ACTIVATIONS.set((list(groups), step, prefix) if groups else None)
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def region_args() -> tuple:
    """What a manual region (``zjax.parallel.sharding.per_shard``) must take as extra replicated
    inputs for ``quantize_input`` to work inside it: the traced step, or ``()`` when no
    ``activation_quantization`` is active (a region cannot read its caller's traced values)."""
    active = _ACTIVATIONS.get()
    return () if active is None else (jnp.asarray(active[1], jnp.int32),)


@contextlib.contextmanager
def in_region(args: tuple):
    """Inside a region: ``activation_quantization`` with the step the region took (``region_args``)."""
    active = _ACTIVATIONS.get()
    if active is None or not args:
        yield
        return
    token = _ACTIVATIONS.set((active[0], args[0], active[2]))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def quantize_input(x: jax.Array, name: str, axis_name: str | None = None) -> jax.Array:
    """The input ``x`` of the matmul with weight ``name`` (e.g. ``blocks/attn/wq``), token-wise
    fake-quantized when an ``activation_quantization`` group matches it; else ``x``."""
    active = _ACTIVATIONS.get()
    if active is None:
        return x
    groups, step, prefix = active
    from zjax.compression import schedule

    group = next((g for g in groups if M.matches(g.modules, prefix + name)), None)
    if group is None:
        return x
    quantized = fake_quant_tokens(x, group.bits, symmetric=group.symmetric, axis_name=axis_name)
    return jnp.where(schedule.quantization_active(step, group.schedule_offset), quantized, x)
