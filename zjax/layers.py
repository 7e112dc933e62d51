"""The layer seam: the one place where remat and ZeRO-3's just-in-time gathers hook in.

Model code marks its layers in one of two ways:

- ``scan_layers(fn, carry, stacked_params)`` for a stack of identical layers whose
  parameters carry a leading ``layers`` axis;
- ``layer(block)(*args)`` around each block that a Python loop calls (an NNX module,
  an Equinox module or any function of arrays).

The train step sets, while it traces, how the backward pass treats each layer (the
remat policy, see ``zjax.config.remat``) and whether layer parameters arrive still sharded
(ZeRO-3, gathered here one layer at a time). Outside a train step ``scan_layers`` is a
plain ``lax.scan`` and ``layer(block)`` is ``block``.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from zjax.errors import ConfigError
from zjax.parallel import pipeline, zero
# The function behind the public jax.ad_checkpoint.print_saved_residuals, as data.
from jax._src.ad_checkpoint import saved_residuals as _saved_residuals
from zjax.config.remat import LAYER_INPUT, RematPolicy, remat_policy


@dataclasses.dataclass(frozen=True)
class _LayerContext:
    policy: RematPolicy = RematPolicy()
    sharded_params: bool = False
    # When a list, scan_layers appends what one layer saves for the backward pass.
    residuals: list | None = None
    # When a list, scan_layers appends its number of layers each time it is traced.
    calls: list | None = None
    # ZeRO-3: id(gathered array) -> (gathered, shard, how to gather it again, LoCo error buffer or None) for every
    # parameter the step gathered whole; `layer` re-gathers these inside the block.
    gathered: dict | None = None


_CONTEXT = contextvars.ContextVar("zjax_layer_context", default=_LayerContext())


@contextlib.contextmanager
def layer_context(policy: Any = "none", sharded_params: bool = False, residuals: list | None = None,
                  calls: list | None = None, gathered: dict | None = None):
    """Sets the remat policy and ZeRO-3 mode seen by ``scan_layers`` while tracing.

    Args:
      policy: a policy name from ``zjax.config.remat.POLICIES``, or the ``remat`` config
        block (needed for ``custom``: it carries ``names``), or a ``RematPolicy``.
      sharded_params: whether stacked parameters arrive as ``zero.ShardedParam``
        (ZeRO-2 and ZeRO-3), opened one layer at a time.
      residuals: a list that each ``scan_layers`` call appends to, once per trace, with
        ``(n_layers, saved_residuals of one layer)`` (what ``zjax.analysis.activations.remat_report`` reads).
      calls: a list that each ``scan_layers`` call appends its number of layers to (the
        train step reads it to tell a user whose model has no layer seam that the remat
        policy did nothing).
      gathered: a dict that ``gather_param`` fills (ZeRO-3), read by ``layer``.
    """
    token = _CONTEXT.set(_LayerContext(remat_policy(policy), sharded_params, residuals, calls, gathered))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


_TILES: contextvars.ContextVar[dict] = contextvars.ContextVar("zjax_tiles", default={})


@contextlib.contextmanager
def tiling(**tiles: int):
    """Sets the sequence tiles ``tiles(kind)`` returns while tracing (the train step sets the
    config's ``tiling``: ``mlp=``, ``loss=``)."""
    token = _TILES.set({k: int(v) for k, v in tiles.items()})
    try:
        yield
    finally:
        _TILES.reset(token)


def tiles(kind: str) -> int:
    """How many sequence tiles the config asks for ``kind`` (``mlp``, ``loss``); 1 outside a step."""
    return _TILES.get().get(kind, 1)


def tiled(fn: Callable, tiles: int, params: Any, *sequences: Any, axis: int = 1, what: str = "tiling") -> Any:
    """``fn(params, *sequences)`` computed in ``tiles`` pieces along ``axis`` (Arctic Long
    Sequence Training's tiled compute): one piece at a time in a loop, and a custom VJP that
    recomputes each piece in the backward pass, so only one piece's intermediates ever
    exist (a ``jax.checkpoint`` inside would be overridden by the layer's own checkpoint
    policy, which saves everything it sees: measured). ``fn`` must act on each position
    of ``axis`` independently (an MLP, a per-token loss); ``params`` (weights) are shared
    by every piece and get the sum of the pieces' gradients.

    Example:
      >>> import jax.numpy as jnp
      >>> tiled(lambda w, x: x * w, 2, 2.0, jnp.arange(4.0)[None]).tolist()
      [[0.0, 2.0, 4.0, 6.0]]
    """
    if tiles <= 1:
        return fn(params, *sequences)
    length = sequences[0].shape[axis]
    if length % tiles:
        raise ConfigError(f"{what}={tiles} does not divide the {length} positions a device holds; "
                          "use a number of tiles that divides the sequence length (per sequence shard)")

    def split(x):
        shape = x.shape[:axis] + (tiles, length // tiles) + x.shape[axis + 1:]
        return jnp.moveaxis(x.reshape(shape), axis, 0)

    def join(y):
        y = jnp.moveaxis(y, 0, axis)
        return y.reshape(y.shape[:axis] + (length,) + y.shape[axis + 2:])

    def forward(params, sequences):
        out = jax.lax.map(lambda pieces: fn(params, *pieces), tuple(split(x) for x in sequences))
        return jax.tree.map(join, out)

    @jax.custom_vjp
    def run(params, sequences):
        return forward(params, sequences)

    def fwd(params, sequences):
        return forward(params, sequences), (params, sequences)

    def bwd(saved, ct):
        params, sequences = saved

        def piece(grads, xs):
            pieces, ct_piece = xs
            _, vjp = jax.vjp(lambda p, *s: fn(p, *s), params, *pieces)
            d_params, *d_pieces = vjp(ct_piece)
            return jax.tree.map(jnp.add, grads, d_params), tuple(d_pieces)

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads0 = zero.varying_like(zeros, (params, sequences, ct))
        d_params, d_pieces = jax.lax.scan(piece, grads0, (tuple(split(x) for x in sequences), jax.tree.map(split, ct)))
        return zero.cotangent_like((d_params, tuple(join(d) for d in d_pieces)), (params, sequences))

    run.defvjp(fwd, bwd)
    return run(params, tuple(sequences))


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
        if zero.is_hpz_secondary(prim, params):  # ZeRO++ hpZ: keep it, so the backward gathers in-node
            return True
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

    hook = pipeline.current_hook()
    if hook is not None:  # a pipeline slot: this stage's chunk of the stack
        return hook.run(body, carry, stacked_params)
    out, _ = jax.lax.scan(body, carry, stacked_params)
    return out


# --- the seam for a Python loop over blocks ----------------------------------------------


def gather_param(shard: jax.Array, lay: zero.LeafLayout, compute_dtype, reduce_dtype, error=None) -> jax.Array:
    """ZeRO-3's whole-parameter gather for the loss, remembered so that ``layer`` can
    gather the same parameter again inside its block instead (see ``layer``). ``error``:
    LoCo's error buffer (``zero.gather_for_compute``), passed on to that gather too."""
    out = zero.gather_for_compute(shard, lay, compute_dtype, reduce_dtype, error)
    found = _CONTEXT.get().gathered
    if found is not None:
        found[id(out)] = (out, shard, (lay, compute_dtype, reduce_dtype), error)
    return out


def note_params(params: Any) -> None:
    """Remembers ``params``' arrays as parameters, so ``layer`` does not count them as its input."""
    found = _CONTEXT.get().gathered
    if found is not None:
        found.update({id(x): (x, x, None, None) for x in jax.tree.leaves(params)})


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def layer(block: Callable) -> Callable:
    """Marks one block of a model that loops over its blocks in Python.

    ``x = zjax.layer(block)(x, *more)`` calls ``block(x, *more)``; inside a zjax train
    step the block becomes one unit of rematerialization (the config's remat policy;
    its array arguments are tagged ``layer_input``) and, under ZeRO-3, its parameters
    are all-gathered when the block runs and again when its backward pass runs, so that
    only one block's gathered parameters exist at a time, as with DeepSpeed's
    per-module gathering. Outside a train step it calls ``block`` unchanged.

    Args:
      block: an NNX module (its state, ``nnx.Param`` and the rest, such as dropout
        RNG counters, goes in and, updated, comes back out), an Equinox-style module
        (a callable pytree) or a function. Its parameters may come in as the module's
        fields or as arguments; parameters a function reads from its closure are
        gathered with the loss, not per block.

    Returns:
      A function with ``block``'s signature and outputs.

    Example:
      >>> import jax.numpy as jnp, zjax
      >>> zjax.layer(lambda w, x: x @ w)(jnp.eye(2), jnp.ones(2)).tolist()
      [1.0, 1.0]
    """
    if not callable(block):
        raise TypeError(f"zjax.layer(block) needs a callable block (an NNX module or a function), got {block!r}")

    def call(*args, **kwargs):
        ctx = _CONTEXT.get()
        if ctx.calls is not None:
            ctx.calls.append(1)
        module = isinstance(block, nnx.Module)
        if module:
            graphdef, own = nnx.split(block)
        else:
            own = block
        leaves, treedef = jax.tree.flatten((own, args, kwargs))
        n_own = len(jax.tree.leaves(own))
        known = ctx.gathered or {}
        dynamic, inputs, how, errors = [], [], [], []
        for i, x in enumerate(leaves):
            if _is_array(x):
                entry = known.get(id(x))
                dynamic.append(i)
                # ZeRO-3: a parameter gathered for the loss enters as its shard and is gathered here.
                inputs.append(entry[1] if entry is not None and entry[2] is not None else x)
                how.append(entry[2] if entry is not None else ("input" if i >= n_own else None))
                # LoCo: the parameter's error buffer goes in too (its cotangent is the new buffer)
                errors.append(entry[3] if entry is not None and entry[2] is not None else None)
        with_error = [k for k, e in enumerate(errors) if e is not None]
        inputs += [errors[k] for k in with_error]

        def run(*inputs):
            full = list(leaves)
            error_of = dict(zip(with_error, inputs[len(dynamic):]))
            for k, (i, x, h) in enumerate(zip(dynamic, inputs, how)):
                full[i] = checkpoint_name(x, LAYER_INPUT) if h == "input" else (
                    x if h is None else zero.gather_for_compute(x, *h, error_of.get(k)))
            fn, a, kw = jax.tree.unflatten(treedef, full)
            if not module:
                return fn(*a, **kw), None
            inner = nnx.merge(graphdef, fn)
            return inner(*a, **kw), nnx.state(inner, nnx.Not(nnx.Param))

        shards = [k for k, h in enumerate(how) if isinstance(h, tuple)]
        inputs_at = {k for k, h in enumerate(how) if h == "input"}
        policy = checkpoint_policy(ctx.policy, ctx.sharded_params and bool(shards))
        if policy is not None:
            run = jax.checkpoint(run, policy=policy)
        if ctx.residuals is not None:
            # a saved argument is the layer input when it is one of the block's array arguments
            ctx.residuals.append((1, [
                (aval, f"named '{LAYER_INPUT}'" if _argument_index(source) in inputs_at else source)
                for aval, source in _saved_residuals(run, *inputs)
            ]))
        out, rest = (run if policy is None else _recompute_in_backward(run))(*inputs)
        if module:
            nnx.update(block, rest)
        return out

    return call


def _argument_index(source: str) -> int | None:
    """k for a residual described as ``from the argument inputs[k]``, else None."""
    if source.startswith("from the argument inputs["):
        return int(source.split("[")[1].split("]")[0])
    return None


def _recompute_in_backward(run: Callable) -> Callable:
    """``run`` (checkpointed) whose backward pass recomputes only once the block's output
    cotangent exists.

    What ``jax.checkpoint`` recomputes (a ZeRO-3 gather, activations a remat policy does
    not keep) is meant to be computed again in the block's backward pass, but nothing
    ties it there: XLA may move it anywhere, and XLA:CPU merges it with the identical
    forward computation (it drops the barrier ``jax.checkpoint`` puts between them), so
    the forward values stay alive until the backward pass and nothing is saved. Here each
    input of the block that the backward pass reads (a parameter shard, the layer input)
    is made to depend on one element of the cotangent (times zero), so the recomputation
    happens in the block's own backward pass, on every backend.
    """
    where: list[int] = []

    @jax.custom_vjp
    def seam(*inputs):
        return run(*inputs)

    def fwd(*inputs):
        out, backward = jax.vjp(run, *inputs)
        held = {id(x) for x in inputs}
        where[:] = [i for i, x in enumerate(jax.tree.leaves(backward)) if id(x) in held]
        return out, backward

    def bwd(backward, ct):
        leaves, treedef = jax.tree.flatten(backward)
        floats = [x for x in jax.tree.leaves(ct) if jnp.issubdtype(x.dtype, jnp.floating) and x.size]
        if floats:
            zero_from_ct = floats[0].reshape(-1)[0] * 0
            for i in where:
                if jnp.issubdtype(leaves[i].dtype, jnp.floating):
                    leaves[i] = leaves[i] + zero_from_ct.astype(leaves[i].dtype)
        return jax.tree.unflatten(treedef, leaves)(ct)

    seam.defvjp(fwd, bwd)
    return seam
