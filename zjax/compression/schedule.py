"""When each compression technique acts: DeepSpeed's schedules as pure functions of the step.

Every function takes ``step`` as a Python ``int`` (and returns Python values) or as a traced
int32 scalar inside ``jit`` (and returns jnp scalars); the other arguments are static Python
numbers from the config. Sources: DeepSpeed v0.19.5 (master, 0.19.6, has the same files),
``deepspeed/compression/{config,scheduler,basic_layer,compress,helper}.py``,
``deepspeed/runtime/quantize.py`` and ``deepspeed/runtime/engine.py``.

The step
--------
DeepSpeed counts ``compression_scheduler.training_steps`` (scheduler.py): 0 at the start,
``+= 1`` in ``compression_scheduler.step()``, which ``DeepSpeedEngine._take_model_step`` calls
after every optimizer step that applied (not after an fp16 overflow step, which it skips), and
each ``step()`` then runs ``check_all_modules()``; ``_forward_prologue`` also checks once with
``training_steps == 0`` before the first forward (``step(step_zero_check=True)``). So the forward
of a step runs with ``training_steps`` = the number of optimizer updates applied before it.

In zjax that is ``state.step - state.loss_scale.skipped`` -- the count the learning-rate
schedule is evaluated at (``applied`` in ``zjax.train.step``) -- and it is ``state.step`` itself
whenever no step was skipped (bf16, fp32, or fp16 without overflow). ``step`` below is that
count for the step whose forward is being computed: the first step is ``step == 0``.

Techniques
----------
- Every ``check_*`` of ``compression_scheduler`` sets a module flag once ``training_steps >=
  schedule_offset`` and never clears it, and ``LinearLayer_Compress.forward`` acts on the flag:
  weight quantization with ``quantize_weight_in_forward: true``, activation quantization and
  row/head/channel pruning are active in the forward of ``step`` iff ``step >= schedule_offset``
  (``quantization_active``, ``pruning_active``).
- Sparse pruning's check is ``schedule_offset <= training_steps <= schedule_offset_end``
  (DeepSpeed >= 0.9.3), but the flag it sets is never cleared either, so the mask stays on
  after ``schedule_offset_end``. (With ``method`` l1/topk ``config.py`` stores no
  ``schedule_offset_end`` and that check raises ``KeyError``; the documented meaning, which
  DeepSpeed < 0.9.3 ran, is active from ``schedule_offset`` on.)
- MoQ (``quantize_weight_in_forward: false``, fp16 only): ``runtime/quantize.py Quantizer``
  overwrites the 16-bit weights with their quantized values in ``_take_model_step`` *before*
  ``compression_scheduler.step()``, so a weight first quantized after step ``o`` is first seen
  by the forward of step ``o + 1``; with ``o == 0`` ``_forward_prologue`` quantizes before the
  first forward as well. ``zjax.config.deepspeed`` therefore writes zjax's ``schedule_offset``
  as ``o + 1`` for ``o > 0`` (``o`` for ``o == 0``), and with that offset the forward of
  ``step`` sees quantization iff ``quantization_active(step, offset)`` and at
  ``weight_bits(step, ...)`` bits. (With ``gradient_accumulation_steps`` g > 1 and ``o == 0``
  DeepSpeed's prologue quantizes once per micro-batch of the first step, moving its later bit
  changes g - 1 steps earlier; zjax counts that step once.)

Bits (MoQ)
----------
``Quantizer.quantize`` adds 1 to ``qsteps`` per call, then ``compute_quantization`` for each
weight: ``if start_bits != target_bits and qsteps >= q_period: q_period <<= 1; start_bits -= 1``
(at most one bit per call). ``q_period`` starts at the group's ``quantization_period`` P and
*doubles* at every change while ``qsteps`` is never reset, so the bits drop at the calls
numbered P, 2P, 4P, 8P, ... until ``target_bits``. The forward of ``step`` (``step >= offset``,
zjax's offset) sees the weights of call number ``step - offset + 1``. With P = 1 the very first
quantized forward is already at ``start_bits - 1``. ``quantize_weight_in_forward: true`` reads
neither ``start_bits`` nor ``quantization_period``: it quantizes at ``target_bits`` (the mapping
sets ``start_bits = target_bits``, which makes ``weight_bits`` constant).

Pruning fraction
----------------
DeepSpeed's own code has no gradual pruning schedule: l1 ranks once (in ``init_compression``,
``enable_sparse_pruning`` / ``enable_row_pruning``) and topk re-ranks learned scores every
forward, both at the constant ``dense_ratio`` from ``schedule_offset``; the only
``schedule_offset_end`` / ``schedule_offset_stride`` user is ``snip_momentum``, which hands them
to Intel Neural Compressor's pruner (``compress.py init_compression``, an import that fails in
DeepSpeed <= 0.19.6). ``dense_ratio_at`` and ``mask_update_due`` are therefore zjax's own
schedule: a new mask takes effect at ``schedule_offset`` and, given ``schedule_offset_end``,
every ``stride`` steps after it and at ``schedule_offset_end``, each keeping the fraction that
falls linearly from 1 at ``schedule_offset`` to ``dense_ratio`` at ``schedule_offset_end``.
Without ``schedule_offset_end`` (every DeepSpeed-mapped group) the kept fraction is
``dense_ratio`` from ``schedule_offset`` on, DeepSpeed's behaviour. Both speak of the mask in
effect in the forward of ``step``; an implementation that computes the mask in an optimizer
update computes the one for ``step`` in the update of step ``step - 1`` (DeepSpeed's l1 mask,
ranked once at ``init_compression``, is in effect from the forward of ``schedule_offset``).

Example:
  >>> [weight_bits(s, start_bits=12, target_bits=8, period=2, offset=0) for s in range(8)]
  [12, 11, 11, 10, 10, 10, 10, 9]
  >>> dense_ratio_at(15, dense_ratio=0.5, offset=10, offset_end=20, stride=5)
  0.75
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

_INT32_MAX = 2**31 - 1


def _traced(step: Any) -> bool:
    """A jax value (traced or concrete); Python and numpy integers take the Python path."""
    if isinstance(step, bool):
        raise TypeError(f"step={step!r} is a boolean; give the step as an integer")
    return isinstance(step, jax.Array)


def _check_range(offset: int, offset_end: int | None, stride: int = 1) -> None:
    if offset < 0:
        raise ValueError(f"offset={offset}: give the first step, >= 0")
    if offset_end is not None and offset_end < offset:
        raise ValueError(f"offset_end={offset_end} is before offset={offset}; use an end at or after the start")
    if stride < 1:
        raise ValueError(f"stride={stride}: give a stride >= 1")


def quantization_active(step, offset: int):
    """Whether the forward of ``step`` is quantized: from ``offset`` on (zjax's offset; see the
    module docstring for MoQ's + 1). DeepSpeed: scheduler.py ``check_weight_quantization`` /
    ``check_activation_quantization``, ``training_steps >= schedule_offset``."""
    _check_range(offset, None)
    return step >= offset


def weight_bits(step, start_bits: int, target_bits: int, period: int, offset: int):
    """The bits of the weights in the forward of ``step`` (``start_bits`` before ``offset``).

    DeepSpeed MoQ (runtime/quantize.py ``Quantizer.compute_quantization``): one bit fewer at the
    quantization calls numbered ``period``, ``2 * period``, ``4 * period``, ... counted from 1 at
    the first quantized step, down to ``target_bits``.

    Example:
      >>> [weight_bits(s, 8, 6, period=1, offset=3) for s in (2, 3, 4, 5, 6)]
      [8, 7, 6, 6, 6]
    """
    if target_bits > start_bits:
        raise ValueError(f"target_bits={target_bits} is above start_bits={start_bits}; training lowers the bits")
    if period < 1:
        raise ValueError(f"period={period}: give a quantization period >= 1")
    _check_range(offset, None)
    calls = step - offset + 1  # Quantizer.qsteps when the weights of this forward were quantized
    traced = _traced(step)
    drops = jnp.zeros((), jnp.int32) if traced else 0
    for k in range(start_bits - target_bits):
        threshold = period << k
        if threshold > _INT32_MAX:  # never reached by an int32 step
            break
        drops = drops + ((calls >= threshold).astype(jnp.int32) if traced else int(calls >= threshold))
    return jnp.int32(start_bits) - drops if traced else start_bits - drops


def pruning_active(step, offset: int, offset_end: int | None = None):
    """Whether the pruning mask is applied in the forward of ``step``: from ``offset`` on.

    ``offset_end`` ends the mask updates, not the pruning: DeepSpeed's sparse-pruning flag, set
    while ``schedule_offset <= training_steps <= schedule_offset_end`` (scheduler.py
    ``check_sparse_pruning``), is never cleared, and the other techniques have no end.
    """
    _check_range(offset, offset_end)
    return step >= offset


def _last_update(step, offset: int, offset_end: int, stride: int, traced: bool):
    """The latest mask update at or before ``step`` (``step >= offset``): offset + k * stride, or offset_end."""
    if traced:
        last = offset + ((step - offset) // stride) * stride
        return jnp.where(step >= offset_end, offset_end, last)
    return offset_end if step >= offset_end else offset + ((step - offset) // stride) * stride


def dense_ratio_at(step, dense_ratio: float, offset: int, offset_end: int | None = None, stride: int = 1):
    """The fraction of weights (rows, heads) the mask in effect in the forward of ``step`` keeps.

    1.0 before ``offset``. Without ``offset_end`` (or with ``offset_end == offset``):
    ``dense_ratio`` from ``offset`` on -- DeepSpeed's l1/topk, which have no gradual schedule. With
    ``offset_end > offset`` (zjax's own schedule): the value of the latest update ``u`` (``offset``,
    ``offset + stride``, ... and ``offset_end``), ``dense_ratio + (1 - dense_ratio) * (offset_end -
    u) / (offset_end - offset)``: 1.0 at ``offset``, ``dense_ratio`` from ``offset_end`` on.

    Example:
      >>> [dense_ratio_at(s, 0.25, offset=4, offset_end=10, stride=3) for s in (3, 4, 6, 7, 9, 10)]
      [1.0, 1.0, 1.0, 0.625, 0.625, 0.25]
    """
    if not 0 < dense_ratio <= 1:
        raise ValueError(f"dense_ratio={dense_ratio}: give the fraction to keep, in (0, 1]")
    _check_range(offset, offset_end, stride)
    traced = _traced(step)
    if offset_end is None or offset_end == offset:
        if traced:
            return jnp.where(step >= offset, jnp.float32(dense_ratio), jnp.float32(1.0))
        return float(dense_ratio) if step >= offset else 1.0
    span = offset_end - offset
    if traced:
        last = _last_update(jnp.maximum(step, offset), offset, offset_end, stride, traced)
        remaining = (offset_end - last).astype(jnp.float32) / span
        ratio = jnp.float32(dense_ratio) + jnp.float32(1.0 - dense_ratio) * remaining
        return jnp.where((step < offset) | (last == offset), jnp.float32(1.0), ratio)
    if step < offset:
        return 1.0
    last = _last_update(step, offset, offset_end, stride, traced)
    if last == offset:
        return 1.0
    return dense_ratio + (1.0 - dense_ratio) * (offset_end - last) / span


def mask_update_due(step, offset: int, offset_end: int | None = None, stride: int = 1):
    """Whether a newly computed mask takes effect in the forward of ``step``: at ``offset``, and
    with ``offset_end`` at ``offset + k * stride`` up to and at ``offset_end`` (zjax's schedule;
    DeepSpeed's l1 mask is computed once, see the module docstring).

    Example:
      >>> [s for s in range(12) if mask_update_due(s, offset=2, offset_end=9, stride=3)]
      [2, 5, 8, 9]
    """
    _check_range(offset, offset_end, stride)
    if offset_end is None or offset_end == offset:
        return step == offset
    on_stride = (step - offset) % stride == 0
    if _traced(step):
        return (step >= offset) & (step <= offset_end) & (on_stride | (step == offset_end))
    return offset <= step <= offset_end and (on_stride or step == offset_end)
