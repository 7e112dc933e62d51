"""Loss scaling for fp16 training, with DeepSpeed's dynamic loss scale semantics.

A scaler is a ``LossScaler(init, update)`` pair of pure functions over a
``LossScaleState`` of jnp scalars, so it runs inside ``jax.jit`` and
``jax.shard_map`` and is carried in the train state like optax state.

Each step the training loop multiplies the loss by ``state.scale``, divides the
gradients by it, checks them with ``all_finite``, applies the optimizer update
only where they are finite (``select_tree``), and calls ``update`` with that flag.

Example:
    >>> import jax.numpy as jnp
    >>> scaler = dynamic_loss_scale(initial_scale_power=4, loss_scale_window=2, hysteresis=1)
    >>> state = scaler.init()
    >>> state = scaler.update(state, all_finite({"w": jnp.array([jnp.inf])}))
    >>> float(state.scale), int(state.skipped)
    (8.0, 1)
"""
import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from zjax.errors import ConfigError


class LossScaleState(NamedTuple):
    """State of a loss scaler; every field is a jnp scalar.

    The fields mirror DeepSpeed's ``DynamicLossScaler`` attributes (``cur_scale``
    is ``scale``), plus two counters for the training loop.
    """

    scale: jax.Array  # float32
    cur_iter: jax.Array  # int32, number of updates so far
    last_overflow_iter: jax.Array  # int32, -1 before the first overflow
    cur_hysteresis: jax.Array  # int32, overflows still tolerated before the scale drops
    skipped: jax.Array  # int32, number of steps with non-finite gradients
    overflow_at_min: jax.Array  # bool, the latest update overflowed with the scale at its minimum


class LossScaler(NamedTuple):
    """A loss scale schedule as a pair of pure functions.

    ``init()`` returns the first state; ``update(state, grads_finite)`` returns the
    state for the next step, where ``grads_finite`` is a bool scalar that must be the
    same on every device (see ``all_finite(..., axis_name=...)``).
    """

    init: Callable[[], LossScaleState]
    update: Callable[[LossScaleState, jax.Array], LossScaleState]


def dynamic_loss_scale(
    initial_scale_power: int = 16,
    loss_scale_window: int = 1000,
    hysteresis: int = 2,
    min_loss_scale: float = 1.0,
    scale_factor: float = 2.0,
) -> LossScaler:
    """DeepSpeed's dynamic loss scale (``DynamicLossScaler.update_scale``, no consecutive hysteresis).

    The scale starts at ``2**initial_scale_power``. An overflow uses up one unit of
    hysteresis; once none is left (``cur_hysteresis == 1``) each overflow divides the
    scale by ``scale_factor``, not below ``min_loss_scale``. When
    ``(cur_iter - last_overflow_iter) % loss_scale_window == 0`` on a clean step the
    scale is multiplied by ``scale_factor`` and the hysteresis refilled.

    ``overflow_at_min`` is set exactly where DeepSpeed raises "Current loss scale
    already at minimum": an overflow with no hysteresis left and the scale already at
    ``min_loss_scale``. The scale then stays at the minimum, so a loop that does not
    raise keeps skipping steps there.

    Args:
      initial_scale_power: the first scale is ``2**initial_scale_power``.
      loss_scale_window: clean steps after an overflow before the scale grows.
      hysteresis: overflows before the scale drops (DeepSpeed's ``delayed_shift``).
      min_loss_scale: the scale never drops below this.
      scale_factor: the scale is divided or multiplied by this.

    Returns:
      A ``LossScaler``.

    Example:
      >>> scaler = dynamic_loss_scale(initial_scale_power=8, hysteresis=2)
      >>> state = scaler.update(scaler.init(), False)  # uses up hysteresis
      >>> float(state.scale), int(state.cur_hysteresis)
      (256.0, 1)
      >>> state = scaler.update(state, False)  # now the scale halves
      >>> float(state.scale)
      128.0
    """
    _check_int("initial_scale_power", initial_scale_power, minimum=0)
    _check_int("loss_scale_window", loss_scale_window, minimum=1)
    _check_int("hysteresis", hysteresis, minimum=1)
    _check_positive("min_loss_scale", min_loss_scale)
    _check_positive("scale_factor", scale_factor)

    def init() -> LossScaleState:
        return _initial_state(2.0**initial_scale_power, hysteresis)

    def update(state: LossScaleState, grads_finite: jax.Array) -> LossScaleState:
        overflow = jnp.logical_not(grads_finite)
        hysteresis_used_up = (hysteresis == 1) | (state.cur_hysteresis == 1)
        shrink = overflow & hysteresis_used_up
        window_done = (state.cur_iter - state.last_overflow_iter) % loss_scale_window == 0
        grow = jnp.logical_not(overflow) & window_done

        shrunk = jnp.maximum(state.scale / scale_factor, jnp.float32(min_loss_scale))
        scale = jnp.where(shrink, shrunk, jnp.where(grow, state.scale * scale_factor, state.scale))
        cur_hysteresis = jnp.where(
            overflow & ~hysteresis_used_up,
            state.cur_hysteresis - 1,
            jnp.where(grow, jnp.int32(hysteresis), state.cur_hysteresis),
        )
        return LossScaleState(
            scale=scale,
            cur_iter=state.cur_iter + 1,
            last_overflow_iter=jnp.where(overflow, state.cur_iter, state.last_overflow_iter),
            cur_hysteresis=cur_hysteresis,
            skipped=state.skipped + overflow.astype(jnp.int32),
            overflow_at_min=shrink & (state.scale == jnp.float32(min_loss_scale)),
        )

    return LossScaler(init, update)


def static_loss_scale(scale: float = 1.0) -> LossScaler:
    """A fixed loss scale; steps with non-finite gradients are still counted in ``skipped``.

    Args:
      scale: the loss scale, a positive finite number.

    Returns:
      A ``LossScaler`` whose ``scale`` never changes and whose ``overflow_at_min`` stays False.

    Example:
      >>> scaler = static_loss_scale(128.0)
      >>> state = scaler.update(scaler.init(), False)
      >>> float(state.scale), int(state.skipped)
      (128.0, 1)
    """
    _check_positive("scale", scale)

    def init() -> LossScaleState:
        return _initial_state(scale, 1)

    def update(state: LossScaleState, grads_finite: jax.Array) -> LossScaleState:
        overflow = jnp.logical_not(grads_finite)
        return state._replace(
            cur_iter=state.cur_iter + 1,
            last_overflow_iter=jnp.where(overflow, state.cur_iter, state.last_overflow_iter),
            skipped=state.skipped + overflow.astype(jnp.int32),
            overflow_at_min=jnp.zeros((), jnp.bool_),
        )

    return LossScaler(init, update)


def no_loss_scale() -> LossScaler:
    """Scale 1.0, for fp32 and bf16 training; non-finite steps are still counted as skipped.

    Example:
      >>> float(no_loss_scale().init().scale)
      1.0
    """
    return static_loss_scale(1.0)


def loss_scaler_from_config(cfg) -> LossScaler:
    """The loss scaler that ``cfg.loss_scale`` and ``cfg.precision`` ask for.

    ``loss_scale.enabled`` None means on exactly when ``precision.compute_dtype`` is
    ``"float16"``. ``loss_scale.at_min`` is not used here: the training loop reads
    ``overflow_at_min`` and raises ``LossScaleError`` when it is ``"error"``.

    Args:
      cfg: a zjax ``Config`` (any object with the same attributes).

    Returns:
      ``dynamic_loss_scale``, ``static_loss_scale`` or ``no_loss_scale``.
    """
    ls = cfg.loss_scale
    enabled = ls.enabled
    if enabled is None:
        enabled = str(cfg.precision.compute_dtype) == "float16"
    if not enabled:
        return no_loss_scale()
    if ls.dynamic:
        return dynamic_loss_scale(
            initial_scale_power=ls.initial_scale_power,
            loss_scale_window=ls.loss_scale_window,
            hysteresis=ls.hysteresis,
            min_loss_scale=ls.min_loss_scale,
        )
    return static_loss_scale(ls.static_scale)


def all_finite(tree, axis_name=None) -> jax.Array:
    """True when every element of every leaf of ``tree`` is finite (no inf, no nan).

    Args:
      tree: a pytree of arrays of any dtype (integer leaves are always finite).
      axis_name: inside ``shard_map``, the mesh axis name (or tuple of names) the
        leaves are sharded over; the answer is then agreed across those devices,
        so every device skips the same steps.

    Returns:
      A bool scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> bool(all_finite({"a": jnp.ones(3), "b": jnp.array([1.0, jnp.nan], jnp.bfloat16)}))
      False
    """
    finite = jnp.ones((), jnp.bool_)
    for leaf in jax.tree.leaves(tree):
        finite = finite & jnp.all(jnp.isfinite(leaf))
    if axis_name is not None:
        finite = jax.lax.pmin(finite.astype(jnp.int32), axis_name).astype(jnp.bool_)
    return finite


def select_tree(pred: jax.Array, new_tree, old_tree):
    """``new_tree`` where ``pred`` is True, else ``old_tree``, leaf by leaf and bit for bit.

    Used to skip the parameter and optimizer update on a step whose gradients
    overflowed. Matching leaves must have the same shape and dtype.

    Args:
      pred: a bool scalar.
      new_tree: the updated pytree.
      old_tree: the pytree to keep when ``pred`` is False, same structure.

    Returns:
      A pytree of the same structure.

    Example:
      >>> import jax.numpy as jnp
      >>> select_tree(jnp.array(False), {"w": jnp.ones(2)}, {"w": jnp.zeros(2)})["w"].tolist()
      [0.0, 0.0]
    """
    pred = jnp.asarray(pred, jnp.bool_)

    def select(new, old):
        new, old = jnp.asarray(new), jnp.asarray(old)
        return jax.lax.select(jnp.broadcast_to(pred, new.shape), new, old)

    return jax.tree.map(select, new_tree, old_tree)


def _initial_state(scale: float, hysteresis: int) -> LossScaleState:
    return LossScaleState(
        scale=jnp.float32(scale),
        cur_iter=jnp.int32(0),
        # DeepSpeed's start value: as if an overflow came just before the first step,
        # so the scale first grows on the loss_scale_window-th clean update.
        last_overflow_iter=jnp.int32(-1),
        cur_hysteresis=jnp.int32(hysteresis),
        skipped=jnp.int32(0),
        overflow_at_min=jnp.zeros((), jnp.bool_),
    )


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"loss_scale.{name}: got {value!r}; use an integer >= {minimum}")


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < float("inf"):
        raise ConfigError(f"loss_scale.{name}: got {value!r}; use a positive finite number")
