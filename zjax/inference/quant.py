"""Quantized weights for serving: int8 weight-only, int8 weights and activations, int4 groups.

``quantize_params(params, mode)`` replaces every matmul weight of the reference GPT's params
dict by a quantized weight: a pytree holding the logical weight ``W [K, N]`` compactly, with
``dot(x) = x @ W`` (``x [..., K]`` -> float32 ``[..., N]``, like ``zjax.inference.model.dot`` of a
float weight; the caller rounds to its dtype). ``zjax.inference.model`` runs every weight matmul
through ``dot``, so the quantized params serve as they are.

- ``Int8Weight`` (mode ``"int8"``): int8 values, symmetric, one float32 scale per output column
  (``absmax / 127``); ``dot`` multiplies ``x`` by the integers and scales the result.
- ``W8A8Weight`` (``"w8a8"``): the same weight; ``dot`` also quantizes ``x`` per token (row absmax
  over ``K`` / 127) and multiplies int8 by int8 into int32.
- ``Int4Weight`` (``"int4"``): symmetric int4 in ``[-7, 7]`` (``-8`` unused: ``absmax / 7`` keeps
  every group symmetric), one bfloat16 scale per group of ``group_size`` rows along ``K`` and
  column ``[K / G, N]``, two values packed a uint8 byte (``pallas_kernels.pack_int4``'s layout).
  The scale is bfloat16 to halve its overhead (at group 32: 0.5 instead of 1 bit a weight); it
  is rounded *up* to a bfloat16 so that no value clips.

The embedding (a gather), norms and biases stay as they are. With tied embeddings the output
head reads the float embedding too: it is not quantized. When stacked (leading layers axis)
every array of a quantized weight has the layers axis first, so ``lax.scan`` over ``blocks``
hands each layer its own slice, whose ``dot`` works as is.

Calibration (optional, every mode): ``calibrate(params, cfg, batches)`` measures each matmul
input's second moment ``E[x xᵀ]`` on sample tokens, and ``quantize_params(..., calibration=)``
then rounds the weights by GPTQ rather than to nearest: the scales stay absmax-based, the
integers absorb each other's rounding error along ``K``. It matters most for int4. There is
no SmoothQuant-style activation smoothing for w8a8.

Example:
  >>> import jax.numpy as jnp
  >>> w = quantize_int8(jnp.array([[1.0, -2.0], [0.5, 4.0]]))
  >>> w.values.tolist(), w.scale.tolist()
  ([[127, -64], [64, 127]], [0.007874015718698502, 0.031496062874794006])
  >>> w.dot(jnp.ones((1, 2)))
  Array([[1.503937, 1.984252]], dtype=float32)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.quantized_matmul import (
    INT4_MAX, INT8_MAX, dequantize_int4, int4_matmul, int8_matmul, pack_int4, w8a8_matmul,
)

MODES = ("int8", "w8a8", "int4")
INT4_SCALE_DTYPE = jnp.bfloat16


def _weight(cls):
    """A frozen dataclass registered as a pytree whose ``impl`` is static metadata."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    data = [f.name for f in dataclasses.fields(cls) if f.name != "impl"]
    return jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=["impl"])


class _PerColumnInt8:
    """What ``Int8Weight`` and ``W8A8Weight`` share: int8 ``values [K, N]`` and float32 ``scale [N]``."""

    values: jax.Array
    scale: jax.Array

    def dequantize(self) -> jax.Array:
        """float32 ``W``."""
        return self.values.astype(jnp.float32) * self.scale[..., None, :].astype(jnp.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical weight's shape."""
        return self.values.shape


@_weight
class Int8Weight(_PerColumnInt8):
    """``W = values * scale``: int8 ``values [K, N]``, float32 ``scale [N]`` (with leading layer axes
    when stacked); ``impl`` picks ``pallas_kernels.int8_matmul``'s implementation."""

    values: jax.Array
    scale: jax.Array
    impl: str = "auto"

    def dot(self, x: jax.Array) -> jax.Array:
        """float32 ``x @ W`` for ``x [..., K]``, the integers widened to ``x``'s dtype."""
        return int8_matmul(x, self.values, self.scale, self.impl)


@_weight
class W8A8Weight(_PerColumnInt8):
    """Stored as ``Int8Weight``; ``dot`` quantizes ``x`` per token to int8 and multiplies in int32
    (``pallas_kernels.w8a8_matmul``)."""

    values: jax.Array
    scale: jax.Array
    impl: str = "auto"

    def dot(self, x: jax.Array) -> jax.Array:
        """float32 ``x_q @ values`` rescaled by ``x``'s row scales and the column scales."""
        return w8a8_matmul(x, self.values, self.scale, self.impl)


@_weight
class Int4Weight:
    """``W``'s int4 values packed two a byte, ``packed`` uint8 ``[K / 2, N]``, and ``scale [K / G, N]``
    (bfloat16), one per group of ``G`` rows and column (leading layer axes when stacked)."""

    packed: jax.Array
    scale: jax.Array
    impl: str = "auto"

    def dot(self, x: jax.Array) -> jax.Array:
        """float32 ``x @ W`` for ``x [..., K]``, unpacked and scaled one group at a time."""
        return int4_matmul(x, self.packed, self.scale, self.impl)

    def dequantize(self) -> jax.Array:
        """float32 ``W``."""
        return _per_matrix(dequantize_int4, self.packed, self.scale)

    @property
    def group_size(self) -> int:
        """Rows of ``K`` per scale."""
        return 2 * self.packed.shape[-2] // self.scale.shape[-2]

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical weight's shape."""
        return self.packed.shape[:-2] + (2 * self.packed.shape[-2], self.packed.shape[-1])


def quantize_params(params: dict, mode: str, *, group_size: int = 128, skip: Iterable[str] = (),
                    impl: str = "auto", calibration: dict[str, jax.Array] | None = None) -> dict:
    """The GPT's params dict with every matmul weight quantized.

    The matmul weights are the 3-D leaves under ``blocks`` (stacked ``[layers, K, N]``: the
    attention's ``wq, wk, wv, wo``, the MLP's ``w_gate, w_up, w_down``) and the 2-D leaves
    elsewhere (``lm_head`` when untied) except ``embedding``; the rest (embedding, norms,
    biases) is returned unchanged.

    Args:
      params: ``nnx.to_pure_dict(nnx.state(GPT, nnx.Param))``, float32 or bfloat16.
      mode: ``"int8"`` (``Int8Weight``), ``"w8a8"`` (``W8A8Weight``) or ``"int4"`` (``Int4Weight``).
      group_size: int4 only: rows of ``K`` per scale; must be even and divide every weight's ``K``.
      skip: matmul weights to keep in float, by key (``"lm_head"``, ``"w_down"``) or path
        (``"blocks/attn/wq"``).
      impl: the ``pallas_kernels`` implementation every weight's ``dot`` uses.
      calibration: ``calibrate``'s input second moments: each weight is then rounded by GPTQ
        (each row's rounding error is absorbed by the rows of ``K`` not yet rounded, weighted
        by how their inputs correlate) instead of to nearest.

    Raises:
      ValueError: for an unknown ``mode``, a ``group_size`` that is not even or does not
        divide some ``K``, a ``skip`` entry that names no matmul weight, or a ``calibration``
        that lacks a weight or does not fit its shape.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"embedding": jnp.ones((8, 4)), "blocks": {"mlp": {"w_up": jnp.ones((2, 4, 6))}}}
      >>> q = quantize_params(params, "int4", group_size=2)
      >>> q["blocks"]["mlp"]["w_up"].packed.shape, q["embedding"].shape
      ((2, 2, 6), (8, 4))
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a quantization mode; use one of {MODES}")
    weights = _matmul_weights(params)
    skip = set(skip)
    unknown = {name for name in skip if not any(name in (path[-1], "/".join(path)) for path in weights)}
    if unknown:
        raise ValueError(f"skip={sorted(unknown)} names no matmul weight; the matmul weights are "
                         f"{sorted('/'.join(path) for path in weights)}")
    chosen = {path: w for path, w in weights.items() if not skip & {path[-1], "/".join(path)}}
    if mode == "int4":
        _check_group_size(group_size, chosen)
    quantize = {"int8": quantize_int8, "w8a8": quantize_w8a8,
                "int4": functools.partial(quantize_int4, group_size=group_size)}[mode]
    out = jax.tree.map(lambda x: x, params)  # a copy of the dicts, sharing the arrays
    for path, w in chosen.items():
        node = out
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = quantize(w, impl=impl, input_moment=_moment_of(calibration, path, w))
    return out


def calibrate(params: dict, cfg, batches: Iterable[jax.Array]) -> dict[str, jax.Array]:
    """The input second moment ``E[x xᵀ]`` of every matmul weight, for ``quantize_params(calibration=)``.

    Runs ``zjax.inference.model.logits`` on each batch of int tokens ``[B, T]`` with every matmul
    weight wrapped so that its ``dot`` also sends ``xᵀ x`` to the host, where it is summed.

    Args:
      params: the float params dict (as ``quantize_params`` takes it).
      cfg: the model config.
      batches: token batches, e.g. windows of the training data.

    Returns:
      ``{"blocks/attn/wq": float32 [layers, K, K], ..., "lm_head": [K, K]}``: the mean over
      the tokens of each weight's input times its transpose (one ``[K, K]`` a weight and layer:
      4 K² bytes each, which bounds the models this serves on one host).
    """
    from zjax.inference.model import logits

    weights = _matmul_weights(params)
    sums = {path: np.zeros(w.shape[:-1] + (w.shape[-2],)) for path, w in weights.items()}

    def record(path, layer, xtx):
        sums[path][layer] += xtx  # layer: an index into the stack, or () for a 2-D weight

    probed = jax.tree.map(lambda x: x, params)
    for path, w in weights.items():
        node = probed
        for key in path[:-1]:
            node = node[key]
        layers = jnp.arange(w.shape[0]) if w.ndim == 3 else jnp.zeros((), jnp.int32)
        node[path[-1]] = _InputRecorder(w, layers, functools.partial(record, path))
    forward = jax.jit(lambda p, tokens: logits(p, cfg, tokens))
    tokens_seen = 0
    for tokens in batches:
        jax.block_until_ready(forward(probed, tokens))
        tokens_seen += tokens.size
    jax.effects_barrier()
    if not tokens_seen:
        raise ValueError("batches is empty; calibrate needs at least one batch of tokens")
    return {"/".join(path): jnp.asarray(total / tokens_seen, jnp.float32) for path, total in sums.items()}


def weight_bytes(params) -> int:
    """Bytes of every array in ``params`` as stored (quantized weights count their integers and
    scales); works on ``jax.ShapeDtypeStruct`` leaves too."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def quantize_int8(w: jax.Array, impl: str = "auto", input_moment: jax.Array | None = None) -> Int8Weight:
    """Symmetric per-column int8 of ``w [..., K, N]``: ``scale = absmax over K / 127``; rounded to
    nearest (``|w - dequantized| <= scale / 2``; an all-zero column gets scale 0 and zeros), or by
    GPTQ given the input's second moment ``[..., K, K]`` (``calibrate``)."""
    values, scale = _quantize(w, w.shape[-2], INT8_MAX, jnp.float32, input_moment)
    return Int8Weight(values, scale[..., 0, :], impl=impl)


def quantize_w8a8(w: jax.Array, impl: str = "auto", input_moment: jax.Array | None = None) -> W8A8Weight:
    """``quantize_int8``'s storage, as a ``W8A8Weight``."""
    values, scale = _quantize(w, w.shape[-2], INT8_MAX, jnp.float32, input_moment)
    return W8A8Weight(values, scale[..., 0, :], impl=impl)


def quantize_int4(w: jax.Array, group_size: int = 128, impl: str = "auto",
                  input_moment: jax.Array | None = None) -> Int4Weight:
    """Symmetric group-wise int4 of ``w [..., K, N]``: per group of ``group_size`` rows and column,
    ``scale = absmax / 7`` rounded up to bfloat16 and values in ``[-7, 7]``; rounded to nearest
    (``|w - dequantized| <= scale / 2``; an all-zero group gets scale 0 and zeros), or by GPTQ
    given the input's second moment ``[..., K, K]`` (``calibrate``)."""
    k = w.shape[-2]
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2 or k % group_size:
        raise ValueError(f"group_size={group_size!r} for a weight of K={k}; use an even group size dividing K")
    q, scale = _quantize(w, group_size, INT4_MAX, INT4_SCALE_DTYPE, input_moment)
    return Int4Weight(_per_matrix(functools.partial(pack_int4, group_size=group_size), q), scale, impl=impl)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weight", "layer"], meta_fields=["record"])
@dataclasses.dataclass(frozen=True)
class _InputRecorder:
    """A float weight whose ``dot`` also sends ``xᵀ x`` of its input to ``record(layer, xtx)``."""

    weight: jax.Array
    layer: jax.Array
    record: Callable

    def dot(self, x):
        rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        jax.debug.callback(self.record, self.layer, rows.T @ rows)
        return jnp.matmul(x, self.weight, preferred_element_type=jnp.float32)


def _moment_of(calibration, path, w):
    if calibration is None:
        return None
    name = "/".join(path)
    if name not in calibration:
        raise ValueError(f"calibration has no entry for {name}; pass calibrate(params, cfg, batches) of these params")
    moment = calibration[name]
    want = w.shape[:-1] + (w.shape[-2],)
    if tuple(moment.shape) != want:
        raise ValueError(f"calibration[{name!r}] has shape {tuple(moment.shape)}; the weight {w.shape} needs {want}")
    return moment


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(w, group_size, levels, scale_dtype, input_moment):
    """``(values int8 [..., K, N], scale [..., K / group_size, N])`` of ``w``: to nearest, or by GPTQ."""
    if input_moment is not None:
        gptq = functools.partial(_gptq, group_size=group_size, levels=levels, scale_dtype=scale_dtype)
        return _per_matrix(gptq, w, input_moment)
    *lead, k, n = w.shape
    groups = w.astype(jnp.float32).reshape(*lead, k // group_size, group_size, n)
    scale = _scale(jnp.max(jnp.abs(groups), axis=-2), levels, scale_dtype)
    return _round(groups, scale[..., None, :], levels).reshape(w.shape), scale


def _gptq(w, moment, *, group_size, levels, scale_dtype, damp=0.01):
    """GPTQ (Frantar et al. 2022) of one ``[K, N]`` weight, rows of ``K`` in order, no reordering.

    Minimizes ``E|x (W - Q)|²`` for inputs with second moment ``H = moment``: after rounding row
    ``r``, its error is spread over the rows after it through the upper Cholesky factor ``U`` of
    ``H⁻¹``. A group's scales come from its rows as they stand when the group starts.
    ``damp x mean(diag H)`` on the diagonal keeps ``H`` invertible; an input that was always 0
    gets 1 there (its row is rounded to nearest and passes nothing on).
    """
    k, n = w.shape
    diag = jnp.diag(moment)
    h = moment + jnp.diag(jnp.where(diag > 0, 0.0, 1.0) + damp * jnp.mean(diag))
    u = jnp.linalg.cholesky(jnp.linalg.inv(h)).T
    later = jnp.arange(k)

    def group(g, carry):
        w, values, scales = carry
        scale = _scale(jnp.max(jnp.abs(jax.lax.dynamic_slice_in_dim(w, g * group_size, group_size)), axis=0),
                       levels, scale_dtype)

        def row(i, carry):
            w, values = carry
            r = g * group_size + i
            q = _round(w[r], scale, levels)
            err = (w[r] - q * scale.astype(jnp.float32)) / u[r, r]
            w = w - jnp.where((later > r)[:, None], jnp.outer(u[r], err), 0.0)
            return w, values.at[r].set(q)

        w, values = jax.lax.fori_loop(0, group_size, row, (w, values))
        return w, values, scales.at[g].set(scale)

    init = (w.astype(jnp.float32), jnp.zeros((k, n), jnp.int8), jnp.zeros((k // group_size, n), scale_dtype))
    _, values, scales = jax.lax.fori_loop(0, k // group_size, group, init)
    return values, scales


def _scale(absmax, levels, dtype):
    """``absmax / levels`` in ``dtype``, rounded up (so that no value clips)."""
    exact = absmax / levels
    scale = exact.astype(dtype)
    return jnp.where(scale.astype(jnp.float32) < exact, jnp.nextafter(scale, jnp.inf), scale)


def _round(w, scale, levels):
    """``round(w / scale)`` as int8 in ``[-levels, levels]``; 0 where the scale is 0."""
    safe = jnp.where(scale > 0, scale, 1).astype(jnp.float32)
    return jnp.clip(jnp.round(w / safe), -levels, levels).astype(jnp.int8)


def _per_matrix(fn, *arrays):
    """``fn`` of 2-D arrays mapped over the leading (layer) axes of ``arrays``."""
    for _ in range(arrays[0].ndim - 2):
        fn = jax.vmap(fn)
    return fn(*arrays)


def _matmul_weights(params: dict, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], jax.Array]:
    """``{path: weight}`` of the matmul weights: 3-D under ``blocks`` (stacked), 2-D elsewhere,
    never the embedding; quantized weights already there are left alone."""
    found = {}
    for key, value in params.items():
        here = path + (key,)
        if isinstance(value, dict):
            found.update(_matmul_weights(value, here))
        elif hasattr(value, "ndim") and key != "embedding" and value.ndim == (3 if here[0] == "blocks" else 2):
            found[here] = value
    return found


def _check_group_size(group_size, weights):
    ks = {"/".join(path): w.shape[-2] for path, w in weights.items()}
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size={group_size!r}; use an even int >= 2 (int4 values pack two a byte)")
    bad = {path: k for path, k in ks.items() if k % group_size}
    if bad:
        fits = [g for g in range(2, min(ks.values(), default=2) + 1, 2) if all(k % g == 0 for k in ks.values())]
        raise ValueError(f"group_size={group_size} does not divide K of {bad}; use a group size dividing every "
                         f"weight's K ({sorted(set(ks.values()))}): one of {fits}")
