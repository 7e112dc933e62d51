"""The optax optimizer and learning-rate schedule a config asks for.

Schedules reproduce DeepSpeed's ``deepspeed/runtime/lr_schedules.py``: the lr that optax
uses at update ``t`` (its step count, from 0) is DeepSpeed's ``get_lr()`` at
``last_batch_iteration = t``. Gradient clipping is not here: the train step clips by
the true global norm, which a sharded optimizer cannot see.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zjax.config.schema import Config
from zjax.parallel.zero import DATA
from zjax.train import onebit


def make_schedule(cfg: Config) -> optax.Schedule:
    """The learning rate as a function of the optimizer step.

    Args:
      cfg: the config; reads ``schedule`` and ``optimizer.lr`` (the peak lr of the
        warmup schedules, and of ``onecycle`` when ``cycle_max_lr`` is null).

    Returns:
      ``step -> lr``; ``step`` may be a traced integer.

    Example:
      >>> cfg = Config(schedule={"type": "warmup", "warmup_steps": 10})
      >>> round(float(make_schedule(cfg)(5)), 8)
      0.00015
    """
    s, peak = cfg.schedule, cfg.optimizer.lr
    total = s.total_steps or cfg.steps
    if s.type == "constant":
        return optax.constant_schedule(peak)
    if s.type == "onecycle":
        first = s.cycle_first_step_size or max(1, total // 2)
        return _one_cycle(
            s.cycle_min_lr,
            s.cycle_max_lr or peak,
            first,
            s.cycle_second_step_size or first,
            s.decay_lr_rate,
            s.decay_step_size,
        )
    # DeepSpeed stretches a warmup shorter than 2 steps to 2, so that log(warmup) > 0.
    warmup = max(2, s.warmup_steps) if s.warmup_steps else 0

    def schedule(step: Any) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        rise = _warmup_fraction(t, warmup, s.warmup_type)
        if s.type == "warmup_cosine":
            progress = jnp.clip((t - warmup + 1) / max(1, total - warmup), 0.0, 1.0)
            cosine = s.cos_min_ratio + (1 - s.cos_min_ratio) * (1 + jnp.cos(jnp.pi * progress)) / 2
            warm = s.warmup_min_ratio + (1 - s.warmup_min_ratio) * rise
            return peak * jnp.where(t < warmup, warm, jnp.maximum(0.0, cosine))
        if s.type == "warmup_decay":
            after = jnp.maximum(0.0, (total - t) / max(1, total - warmup))
        else:
            after = 1.0
        gamma = jnp.where(t < warmup, rise, after)
        return s.warmup_min_lr + (peak - s.warmup_min_lr) * gamma

    return schedule


def _warmup_fraction(t: jax.Array, warmup: int, kind: str) -> jax.Array:
    """DeepSpeed's warmup gamma, 0 at t=0 rising towards 1 at t=warmup (used where t < warmup)."""
    if warmup == 0:
        return jnp.ones_like(t)
    if kind == "log":
        return jnp.log(t + 1) / np.log(warmup)
    return t / warmup


def _one_cycle(
    min_lr: float, max_lr: float, first: int, second: int, decay_rate: float, decay_step_size: int
) -> optax.Schedule:
    """DeepSpeed's OneCycle lr: up ``first`` steps, down ``second``, then optional decay."""
    cycle = float(first + second)
    ratio = first / cycle

    def schedule(step: Any) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        x = (t + 1) / cycle - jnp.floor((t + 1) / cycle)
        scale = jnp.where(x <= ratio, x / ratio, (x - 1) / (ratio - 1))
        cycling = min_lr + (max_lr - min_lr) * scale
        if decay_rate == 0 or decay_step_size == 0:
            decayed = jnp.asarray(min_lr, jnp.float32)
        else:
            decayed = min_lr / (1 + decay_rate * (t - cycle + 1) / decay_step_size)
        return jnp.where(t < cycle, cycling, decayed)

    return schedule


def make_optimizer(cfg: Config, decay_mask: Any = None) -> optax.GradientTransformation:
    """The optax optimizer of ``cfg.optimizer``, driven by ``make_schedule(cfg)``.

    Args:
      cfg: the config; reads ``optimizer`` and ``schedule``.
      decay_mask: a pytree of bools matching the params (True = apply weight decay),
        e.g. ``default_decay_mask(shapes)``; None decays every param.

    Returns:
      The transformation, without gradient clipping. ``onebit_adam``, ``zero_one_adam`` and
      ``onebit_lamb`` are ``zjax.train.onebit.DataParallelTransformation`` objects over ``data``
      (the train step hands them local gradients; 0/1 Adam keeps consensus parameters).

    Example:
      >>> tx = make_optimizer(Config(optimizer={"type": "sgd", "lr": 0.1}))
      >>> params = {"w": jnp.ones(2)}
      >>> updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
      >>> updates["w"].tolist()
      [-0.10000000149011612, -0.10000000149011612]
    """
    o, lr = cfg.optimizer, make_schedule(cfg)
    common = dict(b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, axis_name=DATA, mask=decay_mask)
    if o.type == "onebit_adam":
        return onebit.onebit_adam(lr, freeze_step=o.freeze_step, bias_correction=o.bias_correction, **common)
    if o.type == "zero_one_adam":
        return onebit.zero_one_adam(lr, var_freeze_step=o.var_freeze_step, var_update_scaler=o.var_update_scaler,
                                    local_step_scaler=o.local_step_scaler, local_step_clipper=o.local_step_clipper,
                                    offset_params=True, **common)
    if o.type == "onebit_lamb":
        return onebit.onebit_lamb(lr, freeze_step=o.freeze_step, max_coeff=o.max_coeff, min_coeff=o.min_coeff,
                                  coeff_beta=o.coeff_beta, factor_max=o.factor_max, factor_min=o.factor_min,
                                  factor_threshold=o.factor_threshold, **common)
    if o.type == "adamw":
        return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask)
    if o.type == "adam":
        return optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
    if o.type == "lion":
        return optax.lion(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask)
    if o.type == "adafactor":
        # optax's weight_decay_rate is not scaled by the lr, but zjax's weight_decay is for every
        # optimizer (as in AdamW and HF's Adafactor): undo adafactor's descent sign, add the decay,
        # then descend by the lr. Its eps and decay rates stay optax's; zjax's eps suits Adam.
        return optax.chain(
            optax.adafactor(learning_rate=None),
            optax.scale(-1.0),
            optax.add_decayed_weights(o.weight_decay, decay_mask),
            optax.scale_by_learning_rate(lr),
        )
    sgd = optax.sgd(lr, momentum=o.momentum or None, nesterov=o.nesterov)
    if o.weight_decay == 0:
        return sgd
    # Decay enters the gradient before momentum, as in torch.optim.SGD (and DeepSpeed's).
    return optax.chain(optax.add_decayed_weights(o.weight_decay, decay_mask), sgd)


def default_decay_mask(shapes_tree: Any) -> Any:
    """True for matrices and up, False for norms and biases (0-D and 1-D params).

    Args:
      shapes_tree: a pytree of each param's ORIGINAL shape (a tuple of ints, or
        anything with ``.shape``); zjax stores params flattened, so the shape must be
        the one before flattening.

    Returns:
      A pytree of bools with the same structure.

    Example:
      >>> default_decay_mask({"w": (4, 8), "bias": (8,), "scale": ()})
      {'bias': False, 'scale': False, 'w': True}
    """
    return jax.tree.map(lambda shape: len(getattr(shape, "shape", shape)) >= 2, shapes_tree, is_leaf=_is_shape)


def _is_shape(node: Any) -> bool:
    return hasattr(node, "shape") or (
        isinstance(node, tuple) and all(isinstance(d, (int, np.integer)) for d in node)
    )
