"""Pipeline parallelism over the ``stage`` mesh axis: the GPipe schedule as a circular buffer.

``gpipe(stage_fn, stage_params, x, microbatches=M)`` runs ``P`` pipeline stages (the
leading dimension of every leaf of ``stage_params``, split over the ``stage`` mesh axis
when the current mesh has one of size P) over ``M`` micro-batches of ``x``. It is MaxText's
formulation, automatic over the axis: a buffer ``[P, B/M, ...]`` split over ``stage``
holds each stage's input; at each of the ``M + P - 1`` ticks every stage applies its
layers to its slot at once (``vmap`` over the stage dimension, which XLA partitions so
that each device computes its own stage), stage 0 takes the next micro-batch, the last
stage's output is kept, and the buffer shifts one stage on (``jnp.roll`` along the split
dimension: one collective-permute of a micro-batch's activation per tick). Stage ``s``
works on micro-batch ``t - s`` at tick ``t``; the ``P - 1`` ticks at either end where it
has none are the bubble, ``(P - 1) / (M + P - 1)`` of the ticks.

The backward pass is JAX's transpose of the loop (all forwards, then all backwards:
GPipe); what a stage keeps for it per tick is its ``stage_fn``'s residuals (wrap it in
``jax.checkpoint`` to keep only its input). No parameter crosses a stage boundary: each
device holds and updates its own stage's layers. Measured (benchmarks/pipeline.py): the
backward's roll lowers to two permutes per tick and the input's gradient is summed over
the stages (an all-reduce of one micro-batch per tick): 3 permutes + 1 all-reduce per
tick in all, where a hand-written schedule would send 2.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from zjax.errors import ConfigError

STAGE = "stage"
_MICROBATCHES: contextvars.ContextVar[int] = contextvars.ContextVar("zjax_pipeline_microbatches", default=1)


@contextlib.contextmanager
def pipeline_microbatches(microbatches: int):
    """Sets the pipeline micro-batches ``scan_layers`` uses while tracing (the step sets the config's)."""
    token = _MICROBATCHES.set(int(microbatches))
    try:
        yield
    finally:
        _MICROBATCHES.reset(token)


def microbatches() -> int:
    return _MICROBATCHES.get()


def stage_axis() -> tuple[str, int] | None:
    """``("stage", P)`` when the current mesh splits layers over a ``stage`` axis of size P > 1
    that XLA partitions (outside any shard_map manual over it), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or STAGE not in mesh.shape or mesh.shape[STAGE] == 1 or STAGE in mesh.manual_axes:
        return None
    return STAGE, mesh.shape[STAGE]


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """The idle fraction of a pipeline's ticks: ``(P - 1) / (V·M + P - 1)`` (GPipe and 1F1B
    with V = 1; interleaved 1F1B with V virtual stages per device).

    Example:
      >>> round(bubble_fraction(4, 8), 4)
      0.2727
    """
    return (stages - 1) / (repeats * microbatches + stages - 1)


def gpipe(stage_fn: Callable[[Any, jax.Array], jax.Array], stage_params: Any, x: jax.Array, *,
          microbatches: int) -> jax.Array:
    """``x`` through ``P`` stages in order, ``stage_fn(params_of_stage_s, h) -> h``.

    Args:
      stage_fn: one stage's computation; its output has its input's shape and dtype.
      stage_params: a pytree whose leaves all lead with the stage dimension ``P``.
      x: ``[B, ...]``, ``B`` divisible by ``microbatches``.
      microbatches: ``M``, the micro-batches in flight.

    Returns:
      ``[B, ...]``: ``stage_fn`` of the last stage after ... after that of stage 0, per row.

    Example:
      >>> w = jnp.arange(1.0, 4.0)  # three stages, each multiplies by its weight
      >>> gpipe(lambda w, h: h * w, w, jnp.ones((4, 2)), microbatches=2)[0].tolist()
      [6.0, 6.0]
    """
    leaves = jax.tree.leaves(stage_params)
    if not leaves:
        raise ValueError("gpipe: stage_params has no arrays; its leaves lead with the stage dimension")
    stages = leaves[0].shape[0]
    if any(leaf.shape[:1] != (stages,) for leaf in leaves):
        raise ValueError(f"gpipe: every leaf of stage_params must lead with the same stage count; got shapes "
                         f"{[leaf.shape for leaf in leaves]}")
    batch = x.shape[0]
    if batch % microbatches:
        raise ConfigError(f"pipeline.microbatches={microbatches} does not divide the {batch} rows a device "
                          "holds per micro-step; use a divisor of it")
    xs = x.reshape((microbatches, batch // microbatches) + x.shape[1:])
    axis = stage_axis()[0] if stage_axis() else None

    def pin(buf):
        # the buffer's stage dimension lives on the stage axis: each device holds its stage's slot
        if axis is None:
            return buf
        return lax.with_sharding_constraint(buf, jax.sharding.PartitionSpec(axis))

    def tick(carry, t):
        buf, outs = carry
        entering = lax.dynamic_index_in_dim(xs, jnp.minimum(t, microbatches - 1), keepdims=False)
        # stage 0's slot takes the next micro-batch (a select on each device's own slot: no communication)
        first = (lax.broadcasted_iota(jnp.int32, buf.shape, 0) == 0) & (t < microbatches)
        buf = pin(jnp.where(first, entering[None], buf))
        out = pin(jax.vmap(stage_fn)(stage_params, buf))
        # every stage files its output in its own row of `outs` (no communication); the last
        # stage's row collects micro-batch t - (P - 1), the others' rows are overwritten scratch
        slot = jnp.clip(t - (stages - 1), 0, microbatches - 1)
        outs = pin(lax.dynamic_update_index_in_dim(outs, out[:, None], slot, 1))
        return (pin(jnp.roll(out, 1, axis=0)), outs), None

    buf = pin(jnp.zeros((stages,) + xs.shape[1:], x.dtype))
    outs = pin(jnp.zeros((stages,) + xs.shape, x.dtype))
    (_, outs), _ = lax.scan(tick, (buf, outs), jnp.arange(microbatches + stages - 1))
    # the last stage's outputs, once, to where the caller uses them
    return outs[-1].reshape(x.shape)
