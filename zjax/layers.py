"""Scanning a stack of identical layers: the one place where remat and ZeRO-3 hook in.

Model code calls ``scan_layers(fn, carry, stacked_params)``. The train step sets,
while it traces, how the backward pass treats each layer (the remat policy) and
whether layer parameters arrive still sharded (ZeRO-3, gathered here one layer at a
time). Outside a train step ``scan_layers`` is a plain ``lax.scan``.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable

import jax

from zjax import zero
from zjax.errors import ConfigError

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class _LayerContext:
    policy: str = "none"
    zero3: bool = False


_CONTEXT = contextvars.ContextVar("zjax_layer_context", default=_LayerContext())


@contextlib.contextmanager
def layer_context(policy: str = "none", zero3: bool = False):
    """Sets the remat policy and ZeRO-3 mode seen by ``scan_layers`` while tracing."""
    if policy not in REMAT_POLICIES:
        raise ConfigError(f"remat.policy={policy!r} is not a policy; use one of {sorted(REMAT_POLICIES)}")
    token = _CONTEXT.set(_LayerContext(policy, zero3))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def checkpoint_policy(name: str, zero3: bool):
    """The jax.checkpoint policy for ``name``; None means no checkpoint at all.

    Under ZeRO-3 a layer is always checkpointed and the gathered parameters are
    never saveable, whatever the policy: they are gathered again in the backward
    pass, which is what makes ZeRO-3 save memory.
    """
    base = REMAT_POLICIES[name]
    if not zero3:
        return base
    base = base or jax.checkpoint_policies.everything_saveable

    def policy(prim, *args, **params):
        if zero.is_param_gather(prim, params):
            return False
        return base(prim, *args, **params)

    return policy


def scan_layers(fn: Callable[[Any, Any], Any], carry: Any, stacked_params: Any) -> Any:
    """Applies ``fn`` once per layer: ``carry = fn(carry, params_of_layer_i)``.

    Args:
      fn: one layer, ``(carry, layer_params) -> carry``; it receives plain arrays of
        the per-layer shape.
      carry: the activations flowing through the stack.
      stacked_params: a pytree whose leaves carry a leading ``layers`` axis. Pass it
        through unchanged: under ZeRO-3 its leaves are still-sharded placeholders.

    Returns:
      The carry after the last layer.
    """
    ctx = _CONTEXT.get()

    def layer(c, p):
        return fn(c, zero.materialize_layer(p))

    policy = checkpoint_policy(ctx.policy, ctx.zero3)
    if policy is not None:
        layer = jax.checkpoint(layer, policy=policy)

    def body(c, p):
        return layer(c, p), None

    out, _ = jax.lax.scan(body, carry, stacked_params)
    return out
