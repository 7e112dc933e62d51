"""Scanning a stack of identical layers: the one place where remat and ZeRO-3 hook in.

Model code calls ``scan_layers(fn, carry, stacked_params)``. The train step sets,
while it traces, how the backward pass treats each layer (the remat policy, see
``zjax.remat``) and whether layer parameters arrive still sharded (ZeRO-3, gathered
here one layer at a time). Outside a train step ``scan_layers`` is a plain ``lax.scan``.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable

import jax
from jax.ad_checkpoint import checkpoint_name

from zjax import zero
# The function behind the public jax.ad_checkpoint.print_saved_residuals, as data.
from jax._src.ad_checkpoint import saved_residuals as _saved_residuals
from zjax.remat import LAYER_INPUT, RematPolicy, remat_policy


@dataclasses.dataclass(frozen=True)
class _LayerContext:
    policy: RematPolicy = RematPolicy()
    sharded_params: bool = False
    # When a list, scan_layers appends what one layer saves for the backward pass.
    residuals: list | None = None
    # When a list, scan_layers appends its number of layers each time it is traced.
    calls: list | None = None


_CONTEXT = contextvars.ContextVar("zjax_layer_context", default=_LayerContext())


@contextlib.contextmanager
def layer_context(policy: Any = "none", sharded_params: bool = False, residuals: list | None = None,
                  calls: list | None = None):
    """Sets the remat policy and ZeRO-3 mode seen by ``scan_layers`` while tracing.

    Args:
      policy: a policy name from ``zjax.remat.POLICIES``, or the ``remat`` config
        block (needed for ``custom``: it carries ``names``), or a ``RematPolicy``.
      sharded_params: whether stacked parameters arrive as ``zero.ShardedParam``
        (ZeRO-2 and ZeRO-3), opened one layer at a time.
      residuals: a list that each ``scan_layers`` call appends to, once per trace, with
        ``(n_layers, saved_residuals of one layer)`` (what ``zjax.remat.remat_report`` reads).
      calls: a list that each ``scan_layers`` call appends its number of layers to (the
        train step reads it to tell a user whose model has no layer seam that the remat
        policy did nothing).
    """
    token = _CONTEXT.set(_LayerContext(remat_policy(policy), sharded_params, residuals, calls))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def checkpoint_policy(policy: Any, sharded_params: bool):
    """The jax.checkpoint policy for ``policy`` (a name or ``RematPolicy``); None means no checkpoint.

    Under ZeRO-3 a layer is always checkpointed and the gathered parameters are
    never saveable, whatever the policy: they are gathered again in the backward
    pass, which is what makes ZeRO-3 save memory.
    """
    base = remat_policy(policy).jax_policy()
    if not sharded_params:
        return base
    base = base or jax.checkpoint_policies.everything_saveable

    def policy_fn(prim, *args, **params):
        if zero.is_zero_param(prim, params):
            return False
        return base(prim, *args, **params)

    return policy_fn


def scan_layers(fn: Callable[[Any, Any], Any], carry: Any, stacked_params: Any) -> Any:
    """Applies ``fn`` once per layer: ``carry = fn(carry, params_of_layer_i)``.

    Each layer's input is tagged ``layer_input`` (``checkpoint_name``), so a remat
    policy can name it (``full_offload`` keeps it in host memory).

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
        c = jax.tree.map(lambda x: checkpoint_name(x, LAYER_INPUT), c)
        return fn(c, zero.materialize_layer(p))

    if ctx.calls is not None:
        ctx.calls.append(jax.tree.leaves(stacked_params)[0].shape[0])
    policy = checkpoint_policy(ctx.policy, ctx.sharded_params)
    if policy is not None:
        layer = jax.checkpoint(layer, policy=policy)
    if ctx.residuals is not None:
        first = jax.tree.map(lambda x: x[0], stacked_params)
        n_layers = jax.tree.leaves(stacked_params)[0].shape[0]
        ctx.residuals.append((n_layers, _saved_residuals(layer, carry, first)))

    def body(c, p):
        return layer(c, p), None

    out, _ = jax.lax.scan(body, carry, stacked_params)
    return out
