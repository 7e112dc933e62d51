"""DeepSpeed's communication-compressed optimizers: 1-bit Adam, 0/1 Adam and 1-bit LAMB.

Each is an optax transformation that does its own data-parallel communication. Its
``update`` must run inside a ``jax.shard_map`` that is manual over ``axis_name`` (the
data-parallel mesh axis), and it takes the device's LOCAL gradient, not yet averaged over
that axis. Parameters and updates are whole arrays on every device (ZeRO stage 0). Every
state leaf is per device. The error buffers differ from device to device, and 0/1 Adam's
momentum and parameters also differ between its syncs. A caller that keeps the state outside
the ``shard_map`` gives each state leaf a leading device axis split over ``axis_name``.
``init`` must also run inside the ``shard_map``, because it sizes the error buffers from the
axis size. Under ``shard_map(..., check_vma=True)``, the state from ``init`` and the updates
from ``update`` are typed as varying over ``axis_name``, because they are per device. Apply
the updates to parameters typed varying too (``lax.pcast(params, axis_name,
to="varying")``). For 1-bit Adam and 1-bit LAMB the updates are still equal on every device.

The compressed all-reduce is DeepSpeed's (``deepspeed/runtime/comm/nccl.py``,
``compressed_allreduce``), written here as :func:`compressed_allreduce`. Only signs go on the
wire, 8 to a ``uint8`` byte, plus one float32 scale per device and phase. An all-reduce of
``P`` float32 values therefore moves about ``P / 8`` bytes each way instead of ``4 P``: 1/32
of the traffic.

Behaviour that differs from DeepSpeed (``deepspeed/runtime/fp16/onebit/``):

* ``freeze_step`` counts parameter updates. 1-bit Adam and 1-bit LAMB here run
  ``freeze_step`` exact updates. DeepSpeed's first ``step()`` call only initializes the
  optimizer (its fp16 wrapper makes that call with zero gradients), yet it counts in
  ``state['step']``, so DeepSpeed runs ``freeze_step - 1`` exact updates. DeepSpeed's
  ``freeze_step=F + 1`` is zjax's ``F``. For 0/1 Adam the offset cancels out: both run
  ``var_freeze_step`` updates in the variance phase. :func:`zero_one_adam_schedule` applies
  DeepSpeed's divisibility rules to DeepSpeed's count, in which update ``t`` is step ``t + 2``.
* The error buffers are part of the optimizer state, so they are checkpointed with it and
  restored. DeepSpeed drops them when it loads a checkpoint.
* ``exp_avg_mask`` (the momentum mask for always-zero rows), the MPI and cupy backends, and
  the fp16 master-weight and loss-scale wrapper are not here. Loss scaling belongs to the
  train step (``zjax.train.loss_scale``).
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from zjax.errors import ConfigError

_SHIFTS = np.arange(8, dtype=np.uint8)
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------- the compressed all-reduce


def padded_size(size: int, axis_size: int) -> int:
    """Length of the worker error buffer for ``size`` values over ``axis_size`` devices.

    DeepSpeed pads every compressed buffer to a multiple of ``axis_size * lcm(axis_size, 8)``.
    Each device's chunk is then a whole number of bytes of packed signs.

    Example:
      >>> padded_size(100, 8), padded_size(128, 8), padded_size(5, 3)
      (128, 128, 72)
    """
    unit = axis_size * math.lcm(axis_size, 8)
    return -(-size // unit) * unit


def init_errors(size: int, axis_size: int) -> tuple[jax.Array, jax.Array]:
    """Zero error buffers for :func:`compressed_allreduce` of ``size`` values over ``axis_size`` devices.

    Returns:
      ``(worker_error, server_error)``: float32 of lengths ``padded_size(size, axis_size)``
      and ``padded_size(size, axis_size) // axis_size``.

    Example:
      >>> [e.shape for e in init_errors(100, 8)]
      [(128,), (16,)]
    """
    p = padded_size(size, axis_size)
    return jnp.zeros(p, jnp.float32), jnp.zeros(p // axis_size, jnp.float32)


def _pack(positive: jax.Array) -> jax.Array:
    """Bools ``[..., 8k]`` to ``uint8[..., k]``, bit ``b`` of byte ``i`` = element ``8i + b``."""
    bits = positive.reshape(*positive.shape[:-1], -1, 8).astype(jnp.uint8)
    return jnp.sum(bits << _SHIFTS, axis=-1, dtype=jnp.uint8)


def _unpack(packed: jax.Array) -> jax.Array:
    """Inverse of ``_pack``."""
    bits = (packed[..., None] >> _SHIFTS) & np.uint8(1)
    return bits.reshape(*packed.shape[:-1], -1).astype(bool)


def _plus_minus_one(positive: jax.Array) -> jax.Array:
    return jnp.where(positive, jnp.float32(1.0), jnp.float32(-1.0))


def compressed_allreduce(
    x: jax.Array, worker_error: jax.Array, server_error: jax.Array, axis_name: str, *, pack: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """DeepSpeed's 1-bit all-reduce with error feedback: every device gets the same estimate of the mean of ``x``.

    Call it inside ``jax.shard_map`` manual over ``axis_name`` (``n`` devices). Each device
    ``i`` holds its own ``x_i``, its worker error ``w_i`` (length ``P``, the padded size) and
    its server error ``s_i`` (length ``P / n``). ``x`` is flattened and padded with zeros to
    ``P``. Then:

    1. Worker: ``b_i = x_i + w_i``, with scale ``a_i = ||b_i||_2 / sqrt(P)``. The compressed
       vector is ``q_i = a_i * sign(b_i)``, where a zero counts as +1, as in DeepSpeed. The
       new worker error is ``w_i' = b_i - q_i``.
    2. The signs, packed 8 to a uint8 (or one per uint8 when ``pack=False``), go out by one
       all-to-all: device ``k`` receives chunk ``k`` of every ``q_i``. The scales ``a_i`` go
       out by one float32 all-gather.
    3. Server (device ``k``, chunk ``k``): ``c_k = sum_i sign_i[k] * (a_i / n) + s_k``, which
       is ``mean_i q_i[k] + s_k``. It is compressed the same way, with its own scale
       ``||c_k|| / sqrt(P / n)``: ``Q_k = r_k * sign(c_k)``, and ``s_k' = c_k - Q_k``.
    4. The signs of ``Q_k`` (packed) and the scales ``r_k`` are all-gathered. The result is
       ``concat_k Q_k``, cut to ``x``'s size and shape.

    The identity that error feedback maintains is exact apart from float32 rounding. Let
    ``s = concat_k s_k`` be the server errors of all devices in device order, every vector
    be padded to ``P``, and ``mean_i`` be taken over the ``n`` devices. Then::

        result = mean_i x_i + mean_i (w_i - w_i') + (s - s')

    Over steps ``t = 1..T`` the error terms telescope, so the sum of what was communicated
    differs from the sum of the true means only by the error buffers left at the end::

        sum_t result_t = sum_t mean_i x_i,t + mean_i (w_i,0 - w_i,T) + (s_0 - s_T)

    Nothing is lost over time: what one step leaves out is carried to the next.

    Args:
      x: this device's values, of any shape, summed over the axis in float32.
      worker_error: this device's worker error, float32, of length
        ``padded_size(x.size, n)`` (see :func:`init_errors`).
      server_error: this device's server error, float32, of length ``len(worker_error) // n``.
      axis_name: the manual mesh axis to reduce over.
      pack: True sends 8 signs per byte. False sends one sign per byte, with the same
        result, for comparison.

    Returns:
      ``(mean_estimate, new_worker_error, new_server_error)``. ``mean_estimate`` has
      ``x``'s shape and dtype and is the same on every device.

    Example (8 devices; device ``i`` holds ``i + 1`` everywhere, so both compressions are exact):
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> def mean_of(x):
      ...     w, s = init_errors(x[0].size, 8)
      ...     return compressed_allreduce(x[0], w, s, "data")[0][None]
      >>> x = jnp.arange(1.0, 9.0)[:, None] * jnp.ones((8, 64))
      >>> out = jax.shard_map(mean_of, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False)(x)
      >>> out[:, :3].tolist()[0], bool((out == 4.5).all())
      ([4.5, 4.5, 4.5], True)
    """
    n = _axis_size(axis_name, "compressed_allreduce")
    size, p = x.size, worker_error.size
    if worker_error.ndim != 1 or p < size or p % (8 * n) != 0:
        raise ConfigError(
            f"compressed_allreduce: worker_error of shape {worker_error.shape} cannot hold x of size {size}: "
            f"it must be 1-D of length padded_size(x.size, {n}) = {padded_size(size, n)} (see init_errors)"
        )
    if server_error.shape != (p // n,):
        raise ConfigError(
            f"compressed_allreduce: server_error of shape {server_error.shape} must have shape ({p // n},), "
            f"the worker error's length {p} over the {n} devices of axis {axis_name!r}"
        )
    if p == 0:
        return x, worker_error, server_error
    buf = jnp.pad(x.reshape(-1).astype(jnp.float32), (0, p - size)) + worker_error
    new_worker_error, _, new_server_error, gathered, server_scales = _exchange(buf, server_error, axis_name, n, pack)
    all_signs = _plus_minus_one(_unpack(gathered) if pack else gathered.astype(bool))
    out = (all_signs * server_scales[:, None]).reshape(-1)[:size]
    return out.reshape(x.shape).astype(x.dtype), new_worker_error, new_server_error


def _exchange(buf: jax.Array, server_error: jax.Array, axis_name: str, n: int, pack: bool) -> tuple:
    """Both phases of the 1-bit all-reduce on this device's padded buffer ``buf`` (``x + w``, ``n``
    chunks): ``(new_worker_error, server_values (mine, compressed), new_server_error, every
    server's signs [n, chunk / 8], every server's scale [n])``."""
    chunk = buf.size // n
    worker_scale = jnp.linalg.norm(buf) / np.float32(np.sqrt(buf.size))
    worker_positive = buf >= 0
    new_worker_error = buf - worker_scale * _plus_minus_one(worker_positive)

    rows = worker_positive.reshape(n, chunk)
    sent = _pack(rows) if pack else rows.astype(jnp.uint8)
    received = lax.all_to_all(sent, axis_name, 0, 0)  # row j: device j's signs of my chunk
    worker_scales = lax.all_gather(worker_scale, axis_name)
    signs = _plus_minus_one(_unpack(received) if pack else received.astype(bool))
    server = jnp.sum(signs * (worker_scales * np.float32(1.0 / n))[:, None], axis=0) + server_error
    server_scale = jnp.linalg.norm(server) / np.float32(np.sqrt(chunk))
    server_positive = server >= 0
    compressed = server_scale * _plus_minus_one(server_positive)

    mine = _pack(server_positive) if pack else server_positive.astype(jnp.uint8)
    gathered = lax.all_gather(mine, axis_name)  # (n, chunk / 8): every device's chunk signs
    server_scales = lax.all_gather(server_scale, axis_name)
    return new_worker_error, compressed, server - compressed, gathered, server_scales


def _allreduce_tree(tree: Any, worker: Any, server: Any, axis_name: str, pack: bool) -> tuple[Any, Any, Any]:
    """``compressed_allreduce`` of every leaf of ``tree`` (each with its own scales and errors)."""
    leaves, treedef = jax.tree.flatten(tree)
    done = [
        compressed_allreduce(x, w, s, axis_name, pack=pack)
        for x, w, s in zip(leaves, treedef.flatten_up_to(worker), treedef.flatten_up_to(server))
    ]
    return tuple(treedef.unflatten([d[k] for d in done]) for k in range(3))


def _shard_rows(x: jax.Array, axis: int, n: int) -> jax.Array:
    """``x`` (a whole local array) as ``[n, width]`` float32 rows: row ``k`` is the ZeRO shard ``k``
    of ``x`` along ``axis`` (``x``'s ``k``-th block of that axis), flattened and zero-padded to
    ``width``, a multiple of 8 (whole bytes of packed signs)."""
    rows = jnp.moveaxis(x, axis, 0)
    size = rows.size // n
    width = -(-size // 8) * 8
    return jnp.pad(rows.reshape(n, size).astype(jnp.float32), ((0, 0), (0, width - size)))


def _rows_to_array(rows: jax.Array, shape: tuple, axis: int) -> jax.Array:
    """Inverse of ``_shard_rows`` for ``rows [k, width]`` holding ``k`` shards of an array whose
    shards have ``shape``... put together along ``axis`` (``k = 1``: one shard)."""
    moved = (shape[axis] * rows.shape[0],) + tuple(d for i, d in enumerate(shape) if i != axis)
    size = int(np.prod(shape))
    return jnp.moveaxis(rows[:, :size].reshape(moved), 0, axis)


def sharded_compressed_allreduce(
    x: jax.Array, worker_error: jax.Array, server_error: jax.Array, axis_name: str, axis: int, *, pack: bool = True
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """:func:`compressed_allreduce` whose server chunks are ZeRO's shards: device ``k`` serves shard
    ``k`` of ``x`` along ``axis`` and keeps its own part of the estimated mean.

    The same two phases (worker: signs and one scale of ``x_i + w_i``, all-to-all; server:
    ``c_k = mean of its chunk + s_k``, signs and a scale, all-gathered), with each shard padded to
    whole bytes on its own (``_shard_rows``), so chunk ``k`` is exactly shard ``k``. Where no
    padding is needed (the shard's size a multiple of 8, ``axis`` 0) it is ``compressed_allreduce``
    bit for bit. Call it inside a ``shard_map`` manual over ``axis_name`` (``n`` devices).

    Args:
      x: this device's whole local values (e.g. its momentum), split by ZeRO along ``axis``.
      worker_error: float32 ``[n * width]`` (``init_sharded_errors``).
      server_error: float32 ``[width]``.
      axis_name: the manual data axis; axis: the dimension of ``x`` ZeRO splits.
      pack: 8 signs per byte (True) or one.

    Returns:
      ``(my_part, new_worker_error, new_server_error, signs, scales)``: this device's shard of the
      mean estimate (``x``'s dtype), the new buffers, and every server's signs (``uint8 [n, width
      / 8]``, ``[n, width]`` unpacked) and scales (``float32 [n]``), from which
      ``sharded_estimate`` rebuilds the whole estimate on any device.
    """
    n = _axis_size(axis_name, "sharded_compressed_allreduce")
    rows = _shard_rows(x, axis, n)
    width = rows.shape[1]
    if worker_error.shape != (n * width,) or server_error.shape != (width,):
        raise ConfigError(f"sharded_compressed_allreduce: error buffers {worker_error.shape} and {server_error.shape} "
                          f"for x of shape {x.shape} split along axis {axis} over {n}: use init_sharded_errors")
    new_worker_error, mine, new_server_error, gathered, server_scales = _exchange(
        rows.reshape(-1) + worker_error, server_error, axis_name, n, pack)
    shard = list(x.shape)
    shard[axis] //= n
    part = _rows_to_array(mine[None], tuple(shard), axis)
    return part.astype(x.dtype), new_worker_error, new_server_error, gathered, server_scales


def sharded_estimate(signs: jax.Array, scales: jax.Array, shard_shape: tuple, axis: int, *,
                     pack: bool = True) -> jax.Array:
    """The whole mean estimate of a ``sharded_compressed_allreduce`` from its ``signs`` and
    ``scales`` (every device's shard, put together along ``axis``), on any device."""
    values = _plus_minus_one(_unpack(signs) if pack else signs.astype(bool)) * scales[:, None]
    return _rows_to_array(values, tuple(shard_shape), axis)


def init_sharded_errors(shard_shape: tuple, axis_size: int) -> tuple[jax.Array, jax.Array]:
    """Zero ``(worker_error [n * width], server_error [width])`` for a shard of ``shard_shape``."""
    width = -(-int(np.prod(shard_shape)) // 8) * 8
    return jnp.zeros((axis_size * width,), jnp.float32), jnp.zeros((width,), jnp.float32)


# ------------------------------------------------------------------------------ shared parts


def _axis_size(axis_name: str, fn: str) -> int:
    try:
        return lax.axis_size(axis_name)
    except NameError:
        raise ConfigError(
            f"{fn}: axis_name={axis_name!r} is not a manual mesh axis here: call it (and the optimizer's "
            f"init and update) inside jax.shard_map over a mesh that has axis {axis_name!r}"
        ) from None


def _check_int(fn: str, name: str, value: Any, low: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{fn}: {name}={value!r} must be an integer >= {low} ({meaning})")


def _check_number(fn: str, name: str, value: Any, low: float, high: float | None, meaning: str, *,
                  low_open: bool = False, high_open: bool = True) -> None:
    ok = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        lo = f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f" and {'<' if high_open else '<='} {high}"
        raise ConfigError(f"{fn}: {name}={value!r} must be a number {lo}{hi} ({meaning})")


def _check_common(fn: str, learning_rate: Any, b1: Any, b2: Any, eps: Any, weight_decay: Any,
                  axis_name: Any, pack: Any) -> None:
    if not callable(learning_rate):
        _check_number(fn, "learning_rate", learning_rate, 0.0, None, "a float, or a schedule step -> lr")
    _check_number(fn, "b1", b1, 0.0, 1.0, "the momentum's decay, e.g. 0.9")
    _check_number(fn, "b2", b2, 0.0, 1.0, "the variance's decay, e.g. 0.999")
    _check_number(fn, "eps", eps, 0.0, None, "added to sqrt(variance), e.g. 1e-8")
    _check_number(fn, "weight_decay", weight_decay, 0.0, None, "decoupled weight decay, e.g. 0.0 or 0.01")
    if not isinstance(axis_name, str) or not axis_name:
        raise ConfigError(f"{fn}: axis_name={axis_name!r} must be the name of the data-parallel mesh axis, e.g. 'data'")
    if not isinstance(pack, bool):
        raise ConfigError(f"{fn}: pack={pack!r} must be True (8 signs per byte) or False (one per byte)")


def _neg_lr(learning_rate: Any, count: jax.Array) -> Any:
    """``-lr`` at update ``count`` (from 0), computed as optax's ``scale_by_learning_rate`` does."""
    return -1 * learning_rate(count) if callable(learning_rate) else -learning_rate


def _scale(updates: Any, step_size: Any) -> Any:
    """Multiply by ``step_size`` as optax's ``scale``/``scale_by_schedule`` do (bit for bit)."""
    if isinstance(step_size, (int, float)):
        return jax.tree.map(lambda g: step_size * g, updates)
    return jax.tree.map(lambda g: jnp.array(step_size, dtype=g.dtype) * g, updates)


def _pmean(tree: Any, axis_name: str) -> Any:
    return jax.tree.map(lambda g: lax.pmean(g, axis_name), tree)


def _ema(decay: float, old: Any, new: Any) -> Any:
    """``decay * old + (1 - decay) * new``, as torch's ``old.mul_(decay).add_(new, alpha=1 - decay)``."""
    return jax.tree.map(lambda o, x: decay * o + (1 - decay) * x, old, new)


def _need_params(params: Any, fn: str) -> None:
    if params is None:
        raise ValueError(f"{fn}: update needs params (weight decay or the LAMB trust ratio reads them)")


def _varying(tree: Any, axis_name: str) -> Any:
    """Every leaf typed as varying over ``axis_name``, so that the branches of a ``lax.cond``
    or ``lax.switch`` agree under ``shard_map(..., check_vma=True)``. A no-op when vma checking
    is off."""

    def leaf(x: jax.Array) -> jax.Array:
        try:
            return lax.pcast(x, axis_name, to="varying")
        except ValueError:  # "Unsupported pcast from=varying": it already is
            return x

    return jax.tree.map(leaf, tree)


def _branches(axis_name: str, *fns: Any) -> list[Any]:
    """``fns`` with their outputs typed varying over ``axis_name`` (see ``_varying``)."""
    return [lambda state, fn=fn: _varying(fn(state), axis_name) for fn in fns]


def _select(pred: jax.Array, tree_true: Any, tree_false: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), tree_true, tree_false)


class DataParallelTransformation(NamedTuple):
    """An optax-style transformation that does its own communication over a data axis.

    ``init`` and ``update`` run inside a ``jax.shard_map`` manual over ``axis_name``; ``update``
    takes the device's LOCAL gradient, and every state leaf is per device. ``zjax``'s train
    step recognizes this type: it hands the optimizer unreduced gradients and keeps the state
    with a leading device axis split over ``data`` (see ``zjax.train.step``).

    Attributes:
      init, update: as an ``optax.GradientTransformationExtraArgs``.
      axis_name: the data-parallel mesh axis the transformation communicates over.
      local_offset: None, or ``state -> tree``: what each device adds to the (consensus)
        parameters for its own forward pass (0/1 Adam's local steps with ``offset_params=True``).
      reshard: None, or ``axes -> DataParallelTransformation``: the same optimizer for ZeRO's
        split parameters (``axes``: like the params, each leaf's split dimension, -1 for a leaf
        kept whole): ``init`` and ``update`` then take this device's parameter shards and
        return update shards (the gradients stay whole and local). None: it runs at ZeRO-0 only.
    """

    init: Any
    update: Any
    axis_name: str
    local_offset: Any = None
    reshard: Any = None


def _decayed(updates: Any, params: Any, weight_decay: float, mask: Any) -> Any:
    """``u + weight_decay * p`` where ``mask`` (a pytree of bools like the params, or a callable
    ``params -> that``; None = every parameter) says so."""
    if not weight_decay:
        return updates
    flags = _mask_leaves(mask, params)
    leaves, treedef = jax.tree.flatten(updates)
    ps = treedef.flatten_up_to(params)
    return treedef.unflatten([u + weight_decay * p if f else u for u, p, f in zip(leaves, ps, flags)])


def _mask_leaves(mask: Any, params: Any) -> list[bool]:
    """The decay mask as one Python bool per parameter leaf (in ``params``' leaf order)."""
    leaves, treedef = jax.tree.flatten(params)
    if mask is None:
        return [True] * len(leaves)
    tree = mask(params) if callable(mask) else mask
    try:
        flags = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"weight-decay mask does not have the params' structure: {e}") from None
    return [bool(f) for f in flags]


# ---------------------------------------------------------------------------------- 1-bit Adam


class OnebitAdamState(NamedTuple):
    """State of :func:`onebit_adam`. Every leaf is per device."""

    count: jax.Array  # int32: updates done
    mu: Any  # momentum (the same on every device)
    nu: Any  # variance: frozen after freeze_step updates
    worker_error: Any  # per param: float32[padded_size(size, n)], this device's
    server_error: Any  # per param: float32[padded_size(size, n) // n], this device's chunk
    # under ZeRO (``shard_axes``): per split param, the last compressed momentum's signs and
    # scales from every server (each device rebuilds the whole momentum from them); else None
    signs: Any = None
    scales: Any = None


def onebit_adam(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    freeze_step: int,
    axis_name: str,
    pack: bool = True,
    bias_correction: bool = True,
    mask: Any = None,
    shard_axes: Any = None,
) -> DataParallelTransformation:
    """1-bit Adam (DeepSpeed's ``OnebitAdam``): exact Adam, then a frozen variance and 1-bit momentum.

    ``update(grads, state, params)`` runs inside ``jax.shard_map`` manual over ``axis_name``,
    with this device's local gradients.

    * Updates ``0 .. freeze_step - 1`` are exact Adam on the mean gradient
      (``lax.pmean`` of the local gradients, a float32 all-reduce). They are bit for bit
      ``optax.adam(learning_rate, b1, b2, eps)`` fed that mean, or ``optax.adamw(...,
      weight_decay)`` when ``weight_decay > 0``.
    * From update ``freeze_step`` on, the variance stays as it was after update
      ``freeze_step - 1``. Each device updates its own momentum with its local gradient,
      ``m_i = b1 m + (1 - b1) g_i``. :func:`compressed_allreduce` then averages it, one
      tensor at a time as DeepSpeed does, each tensor with its own scales and its own error
      buffers in the state. Every device ends with the same momentum ``m``. The update is
      ``-lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p)``. Gradients are not
      all-reduced in this phase: only packed signs and float32 scales are communicated,
      about 1/32 of the bytes of an fp32 all-reduce.

    ``bias_correction=True`` (the default) divides by ``1 - b1**t`` and, for the frozen
    variance, ``1 - b2**freeze_step``, as optax does. The step size is therefore continuous
    across the freeze. DeepSpeed's ``OnebitAdam`` applies no bias correction: its
    ``bias_correction`` argument is unused. ``bias_correction=False`` is DeepSpeed's formula,
    ``m / (sqrt(v) + eps)``.

    Args:
      learning_rate: a float, or a schedule evaluated at the update count (from 0).
      b1, b2, eps: Adam's coefficients.
      weight_decay: decoupled (AdamW) weight decay, added to the update before the lr.
      freeze_step: the number of exact updates before the variance freezes (>= 1).
      axis_name: the data-parallel mesh axis that the shard_map is manual over.
      pack: True sends 8 signs per byte. False sends one sign per byte (same result).
      bias_correction: see above.
      mask: which parameters weight decay applies to: a pytree of bools like the params, or
        ``params -> such a tree``; None = every parameter.
      shard_axes: None (ZeRO-0), or ZeRO's split (``reshard``): a pytree like the params of each
        leaf's split dimension (-1: kept whole). ``init`` and ``update`` then take this device's
        parameter shards and return update shards; the gradients stay whole and local. The
        exact phase reduce-scatters them (float32) and keeps the moments as shards; the
        compressed phase runs ``sharded_compressed_allreduce``, each device serving its own
        shard, and keeps the servers' signs and scales (1 bit per element) to rebuild the whole
        momentum at the next update (the first compressed update all-gathers the exact one once).
        The variance and the momentum are stored as shards; the worker error stays whole.

    Returns:
      A :class:`DataParallelTransformation`. Its ``update`` also accepts
      ``compressed=``. None (the default) picks the phase from the count with ``lax.cond``,
      so the compiled step holds both phases' collectives and runs one of them. True or
      False compiles only the compressed or the exact phase, and the caller must pass the
      value that matches the count (``count >= freeze_step``).

    Example (8 devices, each with its own gradient; the first update is Adam's on their mean):
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> tx = onebit_adam(1e-3, freeze_step=100, axis_name="data")
      >>> def step(params, grads):
      ...     state = tx.init(params)
      ...     updates, state = tx.update({"w": grads[0]}, state, params)
      ...     return updates
      >>> params, grads = {"w": jnp.zeros(64)}, jnp.arange(8.0)[:, None] * jnp.ones((8, 64))
      >>> f = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=False)
      >>> round(float(f(params, grads)["w"][0]), 6)
      -0.001
    """
    fn = "onebit_adam"
    _check_common(fn, learning_rate, b1, b2, eps, weight_decay, axis_name, pack)
    _check_int(fn, "freeze_step", freeze_step, 1, "the number of exact Adam updates before the variance freezes, "
               "e.g. 20% of the run; 0 would freeze a variance of zeros")
    if not isinstance(bias_correction, bool):
        raise ConfigError(f"{fn}: bias_correction={bias_correction!r} must be True (optax's Adam) or False (DeepSpeed's)")

    def axes_of(params: Any) -> list[int]:
        leaves, treedef = jax.tree.flatten(params)
        if shard_axes is None:
            return [-1] * len(leaves)
        return [int(a) for a in treedef.flatten_up_to(shard_axes)]

    def init(params: Any) -> OnebitAdamState:
        n = _axis_size(axis_name, fn)
        leaves, treedef = jax.tree.flatten(params)
        axes = axes_of(params)
        errors = [init_errors(p.size, n) if a < 0 else init_sharded_errors(p.shape, n) for p, a in zip(leaves, axes)]
        sharded = shard_axes is not None
        width = [e[1].size for e in errors]
        return _varying(OnebitAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
            worker_error=treedef.unflatten([e[0] for e in errors]),
            server_error=treedef.unflatten([e[1] for e in errors]),
            signs=treedef.unflatten([jnp.zeros((n, w // 8 if pack else w) if a >= 0 else (0,), jnp.uint8)
                                     for a, w in zip(axes, width)]) if sharded else None,
            scales=treedef.unflatten([jnp.zeros((n if a >= 0 else 0,), jnp.float32) for a in axes])
            if sharded else None,
        ), axis_name)

    def update(grads: Any, state: OnebitAdamState, params: Any = None, *, compressed: bool | None = None,
               **extra_args: Any) -> tuple[Any, OnebitAdamState]:
        del extra_args
        if weight_decay:
            _need_params(params, fn)
        count_inc = optax.safe_increment(state.count)

        def finish(mu: Any, nu: Any, nu_count: Any) -> Any:
            # optax.scale_by_adam, then add_decayed_weights, then scale_by_learning_rate.
            if bias_correction:
                mu = optax.tree.bias_correction(mu, b1, count_inc)
                nu = optax.tree.bias_correction(nu, b2, nu_count)
            out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + 0.0) + eps), mu, nu)
            out = _decayed(out, params, weight_decay, mask)
            return _scale(out, _neg_lr(learning_rate, state.count))

        def exact(state: OnebitAdamState) -> tuple[Any, OnebitAdamState]:
            g = _mean_shards(grads, axes_of(grads), axis_name)
            mu = optax.tree.update_moment(g, state.mu, b1, 1)
            nu = optax.tree.update_moment_per_elem_norm(g, state.nu, b2, 2)
            return finish(mu, nu, count_inc), state._replace(count=count_inc, mu=mu, nu=nu)

        def onebit(state: OnebitAdamState) -> tuple[Any, OnebitAdamState]:
            if shard_axes is not None:
                return sharded_onebit(state)
            local = optax.tree.update_moment(grads, state.mu, b1, 1)
            mu, worker, server = _allreduce_tree(local, state.worker_error, state.server_error, axis_name, pack)
            new = state._replace(count=count_inc, mu=mu, worker_error=worker, server_error=server)
            return finish(mu, state.nu, jnp.asarray(freeze_step, jnp.int32)), new

        def sharded_onebit(state: OnebitAdamState) -> tuple[Any, OnebitAdamState]:
            leaves, treedef = jax.tree.flatten(grads)
            flat = treedef.flatten_up_to
            out = []
            for g, m, w, srv, sg, sc, a in zip(leaves, flat(state.mu), flat(state.worker_error),
                                             flat(state.server_error), flat(state.signs), flat(state.scales),
                                             axes_of(grads)):
                if a < 0:  # a leaf ZeRO keeps whole: the momentum is whole and the same everywhere
                    local = b1 * m + (1 - b1) * g
                    est, w, srv = compressed_allreduce(local, w, srv, axis_name, pack=pack)
                    out.append((est, w, srv, sg, sc))
                    continue
                # the whole synced momentum: rebuilt from the last servers' signs, or at the first
                # compressed update the exact one, all-gathered once
                whole = lax.cond(
                    state.count == freeze_step,
                    lambda m=m, a=a: _varying(lax.all_gather(m, axis_name, axis=a, tiled=True), axis_name),
                    lambda m=m, a=a, sg=sg, sc=sc: _varying(sharded_estimate(sg, sc, m.shape, a, pack=pack), axis_name))
                local = b1 * whole + (1 - b1) * g
                out.append(sharded_compressed_allreduce(local, w, srv, axis_name, a, pack=pack))
            fields = [treedef.unflatten([o[k] for o in out]) for k in range(5)]
            new = state._replace(count=count_inc, mu=fields[0], worker_error=fields[1], server_error=fields[2],
                                 signs=fields[3], scales=fields[4])
            return finish(fields[0], state.nu, jnp.asarray(freeze_step, jnp.int32)), new

        if compressed is None:
            return lax.cond(state.count < freeze_step, *_branches(axis_name, exact, onebit), state)
        return onebit(state) if compressed else exact(state)

    def reshard(axes: Any) -> DataParallelTransformation:
        return onebit_adam(learning_rate, b1, b2, eps, weight_decay, freeze_step=freeze_step, axis_name=axis_name,
                           pack=pack, bias_correction=bias_correction, mask=mask, shard_axes=axes)

    return DataParallelTransformation(init, update, axis_name, reshard=reshard)


def _mean_shards(grads: Any, axes: list[int], axis_name: str) -> Any:
    """The mean over ``axis_name`` of whole local gradients: of each split leaf only this
    device's shard (a float32 reduce-scatter along its axis), the others whole (``pmean``)."""
    leaves, treedef = jax.tree.flatten(grads)
    n = np.float32(lax.axis_size(axis_name))
    return treedef.unflatten([lax.pmean(g, axis_name) if a < 0 else
                              lax.psum_scatter(g, axis_name, scatter_dimension=a, tiled=True) / n
                              for g, a in zip(leaves, axes)])


# ---------------------------------------------------------------------------------- 0/1 Adam


class ZeroOneAdamPhase(NamedTuple):
    """What 0/1 Adam does at one update (bool arrays, elementwise over the steps given)."""

    variance_update: jax.Array  # the gradient is all-reduced exactly and the variance updated
    sync: jax.Array  # devices communicate, ending with the same momentum (and params)
    local_phase: jax.Array  # after var_freeze_step: variance frozen, momentum accumulated locally


@functools.lru_cache(maxsize=None)
def _variance_phases(var_update_scaler: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DeepSpeed's variance-update steps as phases (first step, last step, interval), in its step count.

    DeepSpeed's first counted step, 1, only initializes. From step 2, the variance updates
    at every step that is a multiple of ``interval``. After ``var_update_scaler`` such
    steps the interval doubles, so the next phase starts at the first multiple of the new
    interval after the last step.
    """
    firsts, lasts, intervals = [], [], []
    first, interval = 2, 1
    while first <= _INT32_MAX and interval <= 2**30:
        last = first + (var_update_scaler - 1) * interval
        firsts.append(first)
        lasts.append(min(last, _INT32_MAX))
        intervals.append(interval)
        interval *= 2
        first = (last // interval + 1) * interval
    return (np.asarray(firsts, np.int32), np.asarray(lasts, np.int32), np.asarray(intervals, np.int32))


def zero_one_adam_schedule(
    step: Any,
    *,
    var_freeze_step: int,
    var_update_scaler: int = 16,
    local_step_scaler: int = 32678,
    local_step_clipper: int = 16,
) -> ZeroOneAdamPhase:
    """What 0/1 Adam (DeepSpeed's ``ZeroOneAdam``) does at update ``step`` (0-based).

    This is a pure function of the step, in closed form, with no state. It reproduces the
    counters of DeepSpeed's loop (``deepspeed/runtime/fp16/onebit/zoadam.py``).
    ``tests/train/test_onebit.py`` checks it against a literal transcription of that loop.
    DeepSpeed's first ``step()`` call only initializes, so update ``t`` here is DeepSpeed's
    ``state['step'] = t + 2``. Its divisibility rules apply to that number.

    * Updates ``0 .. var_freeze_step - 1``: the variance phase. Every update communicates.
      Starting with interval 1, the steps divisible by the interval are variance updates: the
      engine all-reduces the gradient exactly, and the variance and momentum take it. After
      ``var_update_scaler`` variance updates the interval doubles. The remaining updates of
      this phase average the gradient with the 1-bit :func:`compressed_allreduce` and update
      only the momentum.
    * Updates from ``var_freeze_step`` on: the local phase. The variance is frozen. Each device
      steps on its own momentum, and syncs at the updates whose DeepSpeed step is divisible by
      the local interval. The local interval starts at 1 and doubles, up to
      ``local_step_clipper``, every ``local_step_scaler`` updates of this phase.

    Args:
      step: the update index (int, or an int array of any shape; traced values work).
      var_freeze_step, var_update_scaler, local_step_scaler, local_step_clipper: as in
        :func:`zero_one_adam`. The scalers default to DeepSpeed's values
        (``local_step_scaler=32678`` is DeepSpeed's number, not 32768).

    Returns:
      ``ZeroOneAdamPhase(variance_update, sync, local_phase)``, bool arrays of ``step``'s shape.

    Example:
      >>> ph = zero_one_adam_schedule(jnp.arange(12), var_freeze_step=8, var_update_scaler=2, local_step_scaler=2)
      >>> ph.variance_update.astype(int).tolist()
      [1, 1, 1, 0, 1, 0, 1, 0, 0, 0, 0, 0]
      >>> ph.sync.astype(int).tolist()
      [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]
    """
    fn = "zero_one_adam_schedule"
    _check_int(fn, "var_freeze_step", var_freeze_step, 1, "the number of updates in the variance phase")
    _check_int(fn, "var_update_scaler", var_update_scaler, 1, "variance updates per interval before it doubles")
    _check_int(fn, "local_step_scaler", local_step_scaler, 1, "updates per local interval before it doubles")
    _check_int(fn, "local_step_clipper", local_step_clipper, 1, "the largest local interval")
    t = jnp.asarray(step, jnp.int32)
    s = t + 2  # DeepSpeed's state['step'] at this update
    firsts, lasts, intervals = (jnp.asarray(a) for a in _variance_phases(var_update_scaler))
    phase = jnp.clip(jnp.searchsorted(firsts, s, side="right") - 1, 0, len(firsts) - 1)
    local = t >= var_freeze_step
    variance = (s % intervals[phase] == 0) & (s <= lasts[phase]) & ~local
    doublings = jnp.minimum(jnp.maximum(t - var_freeze_step, 0) // local_step_scaler, 30)
    interval = jnp.minimum(jnp.int32(local_step_clipper), jnp.left_shift(jnp.int32(1), doublings))
    sync = jnp.where(local, s % interval == 0, True)
    return ZeroOneAdamPhase(variance, sync, local)


class ZeroOneAdamState(NamedTuple):
    """State of :func:`zero_one_adam`. Every leaf is per device."""

    count: jax.Array  # int32: updates done
    mu: Any  # momentum (differs between devices between syncs in the local phase)
    nu: Any  # variance (the same on every device)
    momentum_accumulator: Any  # sum of this device's updates since the last sync (DeepSpeed's u)
    lrs: jax.Array  # float32: sum of the learning rates since the last sync
    worker_error: Any  # per param, as in OnebitAdamState
    server_error: Any


def zero_one_adam(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    var_freeze_step: int,
    var_update_scaler: int = 16,
    local_step_scaler: int = 32678,
    local_step_clipper: int = 16,
    axis_name: str,
    pack: bool = True,
    mask: Any = None,
    offset_params: bool = False,
    shard_axes: Any = None,
) -> DataParallelTransformation:
    """0/1 Adam (DeepSpeed's ``ZeroOneAdam``): sparse variance updates, then local steps with 1-bit syncs.

    ``update(grads, state, params)`` runs inside ``jax.shard_map`` manual over ``axis_name``,
    with this device's local gradients. :func:`zero_one_adam_schedule` decides, from the
    count, which of four updates runs (one ``lax.switch``; every device takes the same branch):

    * variance update: ``g = pmean(g_i)``, then ``v = b2 v + (1 - b2) g^2`` and
      ``m = b1 m + (1 - b1) g``.
    * 1-bit update: ``g = compressed_allreduce(g_i)`` (per tensor, error feedback), then
      ``m = b1 m + (1 - b1) g``. The variance is unchanged.
    * local step (local phase): ``m_i = b1 m_i + (1 - b1) g_i``, with no communication. The
      update ``u_i`` is added to the accumulator and the lr to ``lrs``.
    * local step with sync: as a local step, then the accumulated update, rescaled to
      momentum units (``acc * (sqrt(v) + eps)``), is averaged by
      :func:`compressed_allreduce` into ``c``. The device's own local updates since the last
      sync are undone and replaced by ``c / (sqrt(v) + eps)``, the momentum becomes
      ``-c / lrs``, and the accumulator and ``lrs`` restart from zero. The error buffers are
      zeroed when the local phase starts, as in DeepSpeed.

    Each update is ``-lr * (m / (sqrt(v) + eps) + weight_decay * p)``. As in DeepSpeed there
    is no bias correction, so the first updates are about ``3 lr`` in size.

    Between syncs each device's parameters and momentum are its own. The caller must
    therefore keep the parameters per device (a leading device axis split over
    ``axis_name``), not replicated. At a sync they become equal again, up to float32
    rounding: like DeepSpeed, each device subtracts its accumulated updates, which rounds
    slightly differently on each device.

    ``offset_params=True`` keeps ONE copy of the parameters instead, the consensus ``p``
    (equal on every device, what the devices agree on at a sync), and each device's own
    parameters are ``p + local_offset(state)``, its updates since the last sync (the
    ``momentum_accumulator``). ``update`` then reads ``params`` as the consensus and returns
    the consensus's update: the same as above outside the local phase, 0 in a local step,
    and ``c / (sqrt(v) + eps)`` at a sync. The caller evaluates the gradient at
    ``p + local_offset(state)``. zjax's train step works this way.

    Args:
      learning_rate: a float, or a schedule evaluated at the update count (from 0).
      b1, b2, eps, weight_decay: as in :func:`onebit_adam`.
      var_freeze_step: the number of updates in the variance phase (>= 1).
      var_update_scaler: variance updates at each interval before the interval doubles.
      local_step_scaler: updates of the local phase before the local interval doubles.
      local_step_clipper: the largest local interval.
      axis_name: the data-parallel mesh axis that the shard_map is manual over.
      pack: True sends 8 signs per byte. False sends one sign per byte (same result).
      mask: which parameters weight decay applies to (as in :func:`onebit_adam`).
      offset_params: see above.
      shard_axes: ZeRO 1-2 (``reshard``, with ``offset_params``): the consensus parameters
        come and go as this device's shards; the state stays whole on every device (the local
        phase gives each device its own momentum and offset), so only the consensus master is
        split. Weight decay would need the whole consensus each update: not with shards.

    Returns:
      A :class:`DataParallelTransformation` (its ``local_offset`` is None unless
      ``offset_params``).

    Example (the first update is an exact variance update on the mean gradient: ``-lr * 0.1 / sqrt(0.001)``):
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> tx = zero_one_adam(1e-3, var_freeze_step=100, axis_name="data")
      >>> def step(params, grads):
      ...     updates, _ = tx.update({"w": grads[0]}, tx.init(params), params)
      ...     return updates
      >>> params, grads = {"w": jnp.zeros(64)}, jnp.arange(8.0)[:, None] * jnp.ones((8, 64))
      >>> f = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=False)
      >>> round(float(f(params, grads)["w"][0]), 5)
      -0.00316
    """
    fn = "zero_one_adam"
    _check_common(fn, learning_rate, b1, b2, eps, weight_decay, axis_name, pack)
    schedule = functools.partial(
        zero_one_adam_schedule, var_freeze_step=var_freeze_step, var_update_scaler=var_update_scaler,
        local_step_scaler=local_step_scaler, local_step_clipper=local_step_clipper,
    )
    try:
        schedule(0)
    except ConfigError as e:
        raise ConfigError(str(e).replace("zero_one_adam_schedule", fn)) from None

    if shard_axes is not None and (weight_decay or not offset_params):
        raise ConfigError(f"{fn}: on ZeRO's shards (reshard) it keeps one consensus copy (offset_params=True) and "
                          f"no weight decay (weight_decay={weight_decay}: it would need the whole consensus at "
                          "every update); use weight_decay=0, or zero.stage 0")

    def axes_of(tree: Any) -> list[int]:
        leaves, treedef = jax.tree.flatten(tree)
        return [-1] * len(leaves) if shard_axes is None else [int(a) for a in treedef.flatten_up_to(shard_axes)]

    def whole(params: Any, n: int) -> Any:
        """Zeros of the whole parameters' shapes, from this device's shards."""
        leaves, treedef = jax.tree.flatten(params)
        out = []
        for p, a in zip(leaves, axes_of(params)):
            shape = list(p.shape)
            if a >= 0:
                shape[a] *= n
            out.append(jnp.zeros(shape, p.dtype))
        return treedef.unflatten(out)

    def mine(updates: Any) -> Any:
        """This device's shard of each whole update (the consensus's, which it stores split)."""
        if shard_axes is None:
            return updates
        n, k = lax.axis_size(axis_name), lax.axis_index(axis_name)
        leaves, treedef = jax.tree.flatten(updates)
        return treedef.unflatten([u if a < 0 else lax.dynamic_slice_in_dim(u, k * (u.shape[a] // n), u.shape[a] // n, a)
                                  for u, a in zip(leaves, axes_of(updates))])

    def init(params: Any) -> ZeroOneAdamState:
        n = _axis_size(axis_name, fn)
        params = whole(params, n) if shard_axes is not None else params
        return _varying(ZeroOneAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
            momentum_accumulator=optax.tree.zeros_like(params),
            lrs=jnp.zeros([], jnp.float32),
            worker_error=jax.tree.map(lambda p: init_errors(p.size, n)[0], params),
            server_error=jax.tree.map(lambda p: init_errors(p.size, n)[1], params),
        ), axis_name)

    def update(grads: Any, state: ZeroOneAdamState, params: Any = None) -> tuple[Any, ZeroOneAdamState]:
        if weight_decay:
            _need_params(params, fn)
        if offset_params and weight_decay:  # this device's own parameters
            params = jax.tree.map(jnp.add, params, state.momentum_accumulator)
        phase = schedule(state.count)
        lr = jnp.asarray(learning_rate(state.count) if callable(learning_rate) else learning_rate, jnp.float32)
        count_inc = optax.safe_increment(state.count)
        # DeepSpeed zeroes the error buffers when the local phase starts: they held gradient
        # errors and will hold accumulated-momentum errors.
        starting = state.count == var_freeze_step
        worker = jax.tree.map(lambda e: jnp.where(starting, 0.0, e), state.worker_error)
        server = jax.tree.map(lambda e: jnp.where(starting, 0.0, e), state.server_error)
        state = state._replace(count=count_inc, worker_error=worker, server_error=server)

        def direction(mu: Any, nu: Any) -> Any:
            out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
            out = _decayed(out, params, weight_decay, mask)
            return jax.tree.map(lambda u: -lr * u, out)

        def variance_update(state: ZeroOneAdamState) -> tuple[Any, ZeroOneAdamState]:
            g = _pmean(grads, axis_name)
            nu = jax.tree.map(lambda v, x: b2 * v + (1 - b2) * x * x, state.nu, g)
            mu = _ema(b1, state.mu, g)
            return direction(mu, nu), state._replace(mu=mu, nu=nu)

        def onebit_update(state: ZeroOneAdamState) -> tuple[Any, ZeroOneAdamState]:
            g, w, s = _allreduce_tree(grads, state.worker_error, state.server_error, axis_name, pack)
            mu = _ema(b1, state.mu, g)
            return direction(mu, state.nu), state._replace(mu=mu, worker_error=w, server_error=s)

        def local_step(state: ZeroOneAdamState) -> tuple[Any, ZeroOneAdamState]:
            mu = _ema(b1, state.mu, grads)
            u = direction(mu, state.nu)
            acc = jax.tree.map(jnp.add, state.momentum_accumulator, u)
            if offset_params:  # the consensus does not move; the offset (acc) does
                u = optax.tree.zeros_like(u)
            return u, state._replace(mu=mu, momentum_accumulator=acc, lrs=state.lrs + lr)

        def local_sync(state: ZeroOneAdamState) -> tuple[Any, ZeroOneAdamState]:
            u, state = local_step(state)
            denom = jax.tree.map(lambda v: jnp.sqrt(v) + eps, state.nu)
            scaled = jax.tree.map(jnp.multiply, state.momentum_accumulator, denom)
            c, w, s = _allreduce_tree(scaled, state.worker_error, state.server_error, axis_name, pack)
            mu = jax.tree.map(lambda x: -(x / state.lrs), c)
            # DeepSpeed: p += u; p -= acc; p += c / denom, i.e. undo this device's local steps.
            if offset_params:  # the consensus moves by the averaged correction; the offset restarts at 0
                u = jax.tree.map(lambda ci, d: ci / d, c, denom)
            else:
                u = jax.tree.map(lambda ui, a, ci, d: (ui - a) + ci / d, u, state.momentum_accumulator, c, denom)
            zeros = optax.tree.zeros_like(state.momentum_accumulator)
            return u, state._replace(mu=mu, momentum_accumulator=zeros, lrs=jnp.zeros([], jnp.float32),
                                     worker_error=w, server_error=s)

        index = jnp.where(phase.local_phase, jnp.where(phase.sync, 3, 2), jnp.where(phase.variance_update, 0, 1))
        updates, state = lax.switch(index, _branches(axis_name, variance_update, onebit_update, local_step,
                                                     local_sync), state)
        return mine(updates), state

    def reshard(axes: Any) -> DataParallelTransformation:
        return zero_one_adam(learning_rate, b1, b2, eps, weight_decay, var_freeze_step=var_freeze_step,
                             var_update_scaler=var_update_scaler, local_step_scaler=local_step_scaler,
                             local_step_clipper=local_step_clipper, axis_name=axis_name, pack=pack, mask=mask,
                             offset_params=offset_params, shard_axes=axes)

    offset = (lambda state: state.momentum_accumulator) if offset_params else None
    return DataParallelTransformation(init, update, axis_name, offset, reshard=reshard)


# ---------------------------------------------------------------------------------- 1-bit LAMB


class OnebitLambState(NamedTuple):
    """State of :func:`onebit_lamb`. Every leaf is per device."""

    count: jax.Array  # int32: updates done
    mu: Any  # momentum (the same on every device)
    nu: Any  # variance: frozen after freeze_step updates
    nu_fresh: Any  # variance kept up to date from reconstructed gradients in the compressed phase
    lamb_coeff_freeze: Any  # per param, float32 scalar: EMA of the warm-up trust ratios
    last_factor: Any  # per param, float32 scalar: the previous step's scaling factor
    scaling_coeff: Any  # per param, float32 scalar: equalizes momentum scales in the fused buffer
    worker_error: jax.Array  # float32[padded_size(total params, n)]: one fused buffer
    server_error: jax.Array  # float32[padded_size(total params, n) // n]
    # under ZeRO (``shard_axes``): the last compressed fused buffer's signs and scales, from every server
    signs: Any = None
    scales: Any = None


def onebit_lamb(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    freeze_step: int,
    axis_name: str,
    max_coeff: float = 10.0,
    min_coeff: float = 0.01,
    coeff_beta: float = 0.9,
    factor_max: float = 4.0,
    factor_min: float = 0.5,
    factor_threshold: float = 0.1,
    pack: bool = True,
    mask: Any = None,
    shard_axes: Any = None,
) -> DataParallelTransformation:
    """1-bit LAMB (DeepSpeed's ``OnebitLamb``): exact LAMB, then 1-bit momentum with frozen trust ratios.

    ``update(grads, state, params)`` runs inside ``jax.shard_map`` manual over ``axis_name``,
    with this device's local gradients. The formulas are DeepSpeed's (``lamb.py``), with no
    bias correction, as there.

    * Updates ``0 .. freeze_step - 1`` (warm-up) are DeepSpeed's LAMB on the mean gradient
      ``g`` (a float32 all-reduce): ``m = b1 m + (1 - b1) g`` and ``v = b2 v + (1 - b2) g^2``.
      Per tensor, ``u = m / (sqrt(v) + eps) + weight_decay * p`` and the trust ratio
      ``c = clip(||p|| / ||u||, min_coeff, max_coeff)`` (1 when either norm is 0). The
      update is ``-lr c u``. Whenever ``c != 1``, the EMA ``lamb_coeff_freeze = coeff_beta *
      lamb_coeff_freeze + (1 - coeff_beta) c`` takes it. The last warm-up update copies
      ``v`` into ``v_fresh``.
    * From update ``freeze_step`` on (compressed), ``v`` is frozen. The first compressed update
      fixes each tensor's ``scaling_coeff = mean_k(s_k) / s_p``, where ``s = ||m|| /
      sqrt(size)`` is taken over all tensors ``k``. This gives every tensor the same momentum
      scale in the fused buffer. Each device computes ``m_i = (b1 m + (1 - b1) g_i) *
      scaling_coeff``. All tensors, flattened into one buffer, are averaged by ONE
      :func:`compressed_allreduce` (one fused pair of error buffers, as DeepSpeed's flat
      momentum) and divided by ``scaling_coeff`` again. From the new momentum the
      optimizer reconstructs the gradient, ``(m - b1 m_prev) / (1 - b1)``, and updates
      ``v_fresh`` with it. The trust ratio stays frozen: ``c = lamb_coeff_freeze * factor``,
      where ``factor = max((sqrt(v) + eps) / (sqrt(v_fresh) + eps))``. With weight decay,
      ``factor`` is blended towards 1 by ``min(1, ||m / (sqrt(v) + eps)|| / ||u||)``.
      ``factor`` is clipped to ``[factor_min, factor_max]`` and to within
      ``factor_threshold`` of the last one. The update is ``-lr c u``.

    Simplifications, stated plainly:

    * The step count, the mask and the checkpointed errors differ as described in this
      module's docstring.
    * A tensor whose momentum is all zero at the freeze gets ``scaling_coeff = 1``, where
      DeepSpeed divides by zero.
    * The fused buffer's padding is zeros at every step. The padding is fewer than
      ``n * lcm(n, 8)`` values, padded up to a multiple of that. DeepSpeed's padding is a
      dummy tensor inside its flat momentum, and that tensor keeps the previous step's
      all-reduced values because nothing resets it. The difference reaches the other values
      only through the scales, and it is negligible at real model sizes.

    Nothing else is simplified: the fused buffer, the fresh variance, the factor and its
    clipping are DeepSpeed's. ``tests/train/test_onebit.py`` checks them step by step
    against a transcription of DeepSpeed, on a size that needs no padding. DeepSpeed
    suggests ``1 / (1 - coeff_beta) <= freeze_step``, because ``lamb_coeff_freeze`` starts
    at 0.

    Args:
      learning_rate: a float, or a schedule evaluated at the update count (from 0).
      b1, b2, eps, weight_decay: as in :func:`onebit_adam`.
      freeze_step: the number of exact LAMB updates before the compressed phase (>= 1).
      axis_name: the data-parallel mesh axis that the shard_map is manual over.
      max_coeff, min_coeff: the warm-up trust ratio's clip.
      coeff_beta: decay of the trust ratio's EMA.
      factor_max, factor_min, factor_threshold: the compressed phase's factor clips.
      pack: True sends 8 signs per byte. False sends one sign per byte (same result).
      mask: which parameters weight decay applies to (as in :func:`onebit_adam`).
      shard_axes: as in :func:`onebit_adam` (ZeRO 1-2, ``reshard``): parameter and moment
        shards; the fused buffer is every leaf's rows put side by side (each split leaf's ZeRO
        shards, each whole leaf cut into equal chunks), so each device serves its own shards;
        norms and the factor's maximum are reduced over ``axis_name``.

    Returns:
      A :class:`DataParallelTransformation`. Its ``update`` accepts ``compressed=``
      as :func:`onebit_adam`'s does.

    Example (one exact update: the trust ratio scales it to ``lr * ||p||``):
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> tx = onebit_lamb(1e-2, freeze_step=100, axis_name="data")
      >>> def step(params, grads):
      ...     updates, _ = tx.update({"w": grads[0]}, tx.init(params), params)
      ...     return updates
      >>> params, grads = {"w": jnp.ones(64)}, jnp.arange(8.0)[:, None] * jnp.ones((8, 64))
      >>> f = jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data")), out_specs=P(), check_vma=False)
      >>> round(float(jnp.linalg.norm(f(params, grads)["w"])), 6)
      0.08
    """
    fn = "onebit_lamb"
    _check_common(fn, learning_rate, b1, b2, eps, weight_decay, axis_name, pack)
    _check_int(fn, "freeze_step", freeze_step, 1, "the number of exact LAMB updates before compression, "
               "e.g. 20% of the run; 0 would freeze a variance of zeros")
    _check_number(fn, "min_coeff", min_coeff, 0.0, None, "the smallest trust ratio, e.g. 0.01", low_open=True)
    _check_number(fn, "max_coeff", max_coeff, min_coeff, None, f"the largest trust ratio, at least min_coeff={min_coeff}")
    _check_number(fn, "coeff_beta", coeff_beta, 0.0, 1.0, "decay of the trust ratio's EMA, e.g. 0.9")
    _check_number(fn, "factor_min", factor_min, 0.0, None, "the smallest factor, e.g. 0.5", low_open=True)
    _check_number(fn, "factor_max", factor_max, factor_min, None, f"the largest factor, at least factor_min={factor_min}")
    _check_number(fn, "factor_threshold", factor_threshold, 0.0, None, "the factor's largest change per step, e.g. 0.1")

    def axes_of(params: Any) -> list[int]:
        leaves, treedef = jax.tree.flatten(params)
        return [-1] * len(leaves) if shard_axes is None else [int(a) for a in treedef.flatten_up_to(shard_axes)]

    def widths(params: Any, n: int) -> list[int]:
        """Each leaf's row width in the sharded fused buffer."""
        return [-(-p.size // 8) * 8 if a >= 0 else -(-p.size // (8 * n)) * 8
                for p, a in zip(jax.tree.leaves(params), axes_of(params))]

    def init(params: Any) -> OnebitLambState:
        n = _axis_size(axis_name, fn)
        total = sum(p.size for p in jax.tree.leaves(params))
        worker, server = init_errors(total, n)
        signs = scales = None
        if shard_axes is not None:
            width = sum(widths(params, n))
            worker, server = jnp.zeros((n * width,), jnp.float32), jnp.zeros((width,), jnp.float32)
            signs = jnp.zeros((n, width // 8 if pack else width), jnp.uint8)
            scales = jnp.zeros((n,), jnp.float32)
        scalars = lambda value: jax.tree.map(lambda p: jnp.full([], value, jnp.float32), params)  # noqa: E731
        return _varying(OnebitLambState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params),
            nu=optax.tree.zeros_like(params),
            nu_fresh=optax.tree.zeros_like(params),
            lamb_coeff_freeze=scalars(0.0),
            last_factor=scalars(1.0),
            scaling_coeff=scalars(1.0),
            worker_error=worker,
            server_error=server,
            signs=signs,
            scales=scales,
        ), axis_name)

    def update(grads: Any, state: OnebitLambState, params: Any = None, *, compressed: bool | None = None,
               **extra_args: Any) -> tuple[Any, OnebitLambState]:
        del extra_args
        _need_params(params, fn)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        count_inc = optax.safe_increment(state.count)
        leaves, treedef = jax.tree.flatten(grads)
        flat = lambda tree: treedef.flatten_up_to(tree)  # noqa: E731
        ps = flat(params)
        decays = [weight_decay if f else 0.0 for f in _mask_leaves(mask, params)]
        axes = axes_of(params)
        n = _axis_size(axis_name, fn)
        sizes = [p.size * (n if a >= 0 else 1) for p, a in zip(ps, axes)]  # whole sizes

        def norm(x, a):  # of the whole leaf: its shards' squares summed over the devices
            if a < 0:
                return jnp.linalg.norm(x)
            return jnp.sqrt(lax.psum(jnp.sum(jnp.square(x)), axis_name))

        def amax(x, a):
            return jnp.max(x) if a < 0 else lax.pmax(jnp.max(x), axis_name)

        def exact(state: OnebitLambState) -> tuple[Any, OnebitLambState]:
            g = _mean_shards(grads, axes, axis_name)
            mu = _ema(b1, state.mu, g)
            nu = jax.tree.map(lambda v, x: b2 * v + (1 - b2) * x * x, state.nu, g)
            nu_fresh = _select(count_inc == freeze_step, nu, state.nu_fresh)
            updates, coeffs = [], []
            for m, v, p, lcf, wd, a in zip(flat(mu), flat(nu), ps, flat(state.lamb_coeff_freeze), decays, axes):
                u = m / (jnp.sqrt(v) + eps)
                if wd:
                    u = u + wd * p
                w_norm, u_norm = norm(p, a), norm(u, a)
                ratio = jnp.clip(w_norm / jnp.where(u_norm == 0, 1.0, u_norm), min_coeff, max_coeff)
                c = jnp.where((w_norm != 0) & (u_norm != 0), ratio, 1.0).astype(jnp.float32)
                coeffs.append(jnp.where(c != 1.0, coeff_beta * lcf + (1 - coeff_beta) * c, lcf))
                updates.append((-lr * c) * u)
            new = state._replace(count=count_inc, mu=mu, nu=nu, nu_fresh=nu_fresh,
                                 lamb_coeff_freeze=treedef.unflatten(coeffs))
            return treedef.unflatten(updates), new

        def onebit(state: OnebitLambState) -> tuple[Any, OnebitLambState]:
            mus = flat(state.mu)
            scales = [norm(m, a) / np.float32(np.sqrt(max(size, 1))) for m, a, size in zip(mus, axes, sizes)]
            united = sum(scales) / len(scales)
            fixed = [jnp.where(s > 0, united / jnp.where(s > 0, s, 1.0), 1.0) for s in scales]
            first = state.count == freeze_step
            sc = [jnp.where(first, f, old) for f, old in zip(fixed, flat(state.scaling_coeff))]
            extra = {}
            if shard_axes is None:
                local = [(b1 * m + (1 - b1) * g) * c for m, g, c in zip(mus, leaves, sc)]
                buf = jnp.concatenate([x.reshape(-1).astype(jnp.float32) for x in local])
                avg, worker, server = compressed_allreduce(buf, state.worker_error, state.server_error, axis_name,
                                                           pack=pack)
                offsets = np.cumsum([0] + [x.size for x in local])
                new_mu = [(avg[a:b].reshape(x.shape).astype(x.dtype)) / c
                          for x, a, b, c in zip(local, offsets[:-1], offsets[1:], sc)]
            else:
                new_mu, worker, server, extra = sharded_exchange(state, mus, sc)
            updates, fresh, factors = [], [], []
            for m, m_prev, v, f, p, lcf, last, wd, a in zip(new_mu, mus, flat(state.nu), flat(state.nu_fresh), ps,
                                                           flat(state.lamb_coeff_freeze), flat(state.last_factor),
                                                           decays, axes):
                grad = (m - m_prev * b1) / (1 - b1)
                f = b2 * f + (1 - b2) * grad * grad
                denom = jnp.sqrt(v) + eps
                prelim = m / denom
                u = prelim + wd * p if wd else prelim
                factor = amax(denom / (jnp.sqrt(f) + eps), a)
                if wd:
                    blend = jnp.minimum(1.0, norm(prelim, a) / norm(u, a))
                    factor = factor * blend + (1.0 - blend)
                factor = jnp.maximum(jnp.minimum(factor, factor_max), factor_min)
                factor = jnp.maximum(jnp.minimum(factor, last * (1.0 + factor_threshold)),
                                     last * (1.0 - factor_threshold)).astype(jnp.float32)
                updates.append((-lr * (lcf * factor)) * u)
                fresh.append(f)
                factors.append(factor)
            new = state._replace(
                count=count_inc, mu=treedef.unflatten(new_mu), nu_fresh=treedef.unflatten(fresh),
                last_factor=treedef.unflatten(factors), scaling_coeff=treedef.unflatten(sc),
                worker_error=worker, server_error=server, **extra,
            )
            return treedef.unflatten(updates), new

        def sharded_exchange(state: OnebitLambState, mus: list, sc: list) -> tuple:
            """The fused buffer as rows: each leaf's local momentum (times its coefficient) cut into
            the devices' ZeRO shards, or equal chunks for a whole leaf, side by side; device k serves
            row k. Returns the new momentum (shards, or whole leaves rebuilt from every server's
            signs), the new error buffers and the signs and scales to keep."""
            wid = widths(params, n)
            offsets = np.cumsum([0] + wid)
            previous = _plus_minus_one(_unpack(state.signs) if pack else state.signs.astype(bool)) \
                * state.scales[:, None]
            rows = []
            for m, g, c, a, w, o in zip(mus, leaves, sc, axes, wid, offsets):
                if a >= 0:  # the whole synced momentum: the last servers' values, or at the freeze the exact one
                    whole = lax.cond(
                        state.count == freeze_step,
                        lambda m=m, a=a: _varying(lax.all_gather(m, axis_name, axis=a, tiled=True), axis_name),
                        lambda m=m, a=a, o=o, w=w, c=c: _varying(
                            _rows_to_array(previous[:, o:o + w], m.shape, a) / c, axis_name))
                    rows.append(_shard_rows((b1 * whole + (1 - b1) * g) * c, a, n))
                else:
                    x = ((b1 * m + (1 - b1) * g) * c).reshape(-1).astype(jnp.float32)
                    rows.append(jnp.pad(x, (0, n * w - x.size)).reshape(n, w))
            buf = jnp.concatenate(rows, axis=1).reshape(-1) + state.worker_error
            worker, mine, server, signs, scales = _exchange(buf, state.server_error, axis_name, n, pack)
            values = _plus_minus_one(_unpack(signs) if pack else signs.astype(bool)) * scales[:, None]
            new_mu = []
            for m, c, a, w, o in zip(mus, sc, axes, wid, offsets):
                if a >= 0:
                    new_mu.append((_rows_to_array(mine[None, o:o + w], m.shape, a) / c).astype(m.dtype))
                else:
                    new_mu.append((values[:, o:o + w].reshape(-1)[:m.size].reshape(m.shape) / c).astype(m.dtype))
            return new_mu, worker, server, {"signs": signs, "scales": scales}

        if compressed is None:
            return lax.cond(state.count < freeze_step, *_branches(axis_name, exact, onebit), state)
        return onebit(state) if compressed else exact(state)

    def reshard(axes: Any) -> DataParallelTransformation:
        return onebit_lamb(learning_rate, b1, b2, eps, weight_decay, freeze_step=freeze_step, axis_name=axis_name,
                           max_coeff=max_coeff, min_coeff=min_coeff, coeff_beta=coeff_beta, factor_max=factor_max,
                           factor_min=factor_min, factor_threshold=factor_threshold, pack=pack, mask=mask,
                           shard_axes=axes)

    return DataParallelTransformation(init, update, axis_name, reshard=reshard)


__all__ = [
    "DataParallelTransformation", "OnebitAdamState", "OnebitLambState", "ZeroOneAdamPhase", "ZeroOneAdamState", "compressed_allreduce",
    "init_errors", "onebit_adam", "onebit_lamb", "padded_size", "zero_one_adam", "zero_one_adam_schedule",
]

