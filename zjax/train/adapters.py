"""Adapters: Flax NNX modules, Flax Linen params and plain pytrees through one trainer.

Each adapter answers three questions for ``TrainStep``: how to call the user's loss
on a params pytree, how to make the params from what ``train.init`` was given, and
which logical axes each parameter has.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Callable

import jax
from flax import nnx
from flax.core import meta

from zjax.errors import ConfigError


def adapt(loss_fn: Callable, model: Any, logical_axes: Any) -> "Adapter":
    if not callable(loss_fn):
        raise ConfigError(f"loss_fn={loss_fn!r} is not callable; pass loss_fn(params, batch) -> loss | (loss, aux)")
    if model is None:
        return Adapter(loss_fn, logical_axes)
    if isinstance(model, nnx.Module):
        return NNXAdapter(loss_fn, logical_axes, model)
    raise ConfigError(
        f"model={type(model).__name__} is not a Flax NNX module; pass an nnx.Module, or leave model out and "
        "give params (plain or Linen, boxed with nn.with_logical_partitioning) to train.init"
    )


def _takes_rng(fn: Callable) -> bool:
    try:
        params = [
            p for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return False
    return len(params) >= 3


def _split_loss(out: Any):
    if isinstance(out, tuple):
        if len(out) != 2:
            raise ConfigError(f"loss_fn returned a tuple of {len(out)} items; return loss or (loss, aux_dict)")
        return out
    return out, {}


def _read_if_file(given: Any) -> Any:
    """A ``.safetensors`` path becomes its params tree; anything else passes through."""
    if isinstance(given, (str, os.PathLike)):
        if not str(given).endswith(".safetensors"):
            raise ConfigError(f"train.init({str(given)!r}): a params file must be .safetensors")
        return load_safetensors(given)
    return given


def load_safetensors(path) -> dict:
    """A safetensors file as a nested dict of numpy arrays (keys split at dots)."""
    from safetensors.numpy import load_file

    tree: dict[str, Any] = {}
    for name, array in load_file(str(path)).items():
        node = tree
        *parents, leaf = name.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = array
    return tree



def _is_box(x: Any) -> bool:
    return isinstance(x, meta.AxisMetadata)


class Adapter:
    """Plain pytrees (and Linen params boxed with logical partitioning)."""

    def __init__(self, loss_fn: Callable, logical_axes: Any):
        self.user_loss = loss_fn
        self.takes_rng = _takes_rng(loss_fn)
        self.given_axes = logical_axes
        self.found_axes = None

    def loss_fn(self, params, batch, key):
        user = self.to_user(params, key)
        out = self.user_loss(user, batch, key) if self.takes_rng else self.user_loss(user, batch)
        return _split_loss(out)

    def to_user(self, params, key=None):
        return params

    def params_source(self, given: Any) -> tuple[Callable, Any]:
        """``(fn, tree)`` with ``fn(rng, tree) -> params`` from what ``train.init`` received.

        Arrays travel in ``tree`` (a jit argument, never a baked-in constant); init
        functions get ``tree=None``.
        """
        if given is None:
            raise ConfigError("train.init(params) needs params: a pytree, or an init function fn(rng) -> params")
        given = _read_if_file(given)
        if callable(given):
            return self._unboxed(lambda rng, _: given(rng)), None
        return self._unboxed(lambda rng, tree: tree), given

    def _unboxed(self, make: Callable) -> Callable:
        def fn(rng, tree):
            tree = make(rng, tree)
            if any(_is_box(x) for x in jax.tree.leaves(tree, is_leaf=_is_box)):
                self.found_axes = jax.tree.map(
                    lambda x: tuple(getattr(x, "names", ())) if _is_box(x) else (), tree, is_leaf=_is_box
                )
                tree = meta.unbox(tree)
            return tree

        return fn

    def logical_axes(self, abstract_params: Any) -> Any:
        return self.given_axes if self.given_axes is not None else self.found_axes

    def trainable_mask(self, trainable: Any, params: Any) -> tuple[bool, ...]:
        """One bool per params leaf (in ``jax.tree.leaves`` order) from ``make_train_step``'s
        ``trainable=``: None (all), a predicate ``fn(path, leaf)``, or a pytree of bools."""
        with_paths = jax.tree_util.tree_flatten_with_path(params)[0]
        if trainable is None:
            mask = (True,) * len(with_paths)
        elif callable(trainable):
            mask = tuple(bool(trainable(_keys(path), leaf)) for path, leaf in with_paths)
        else:
            mask = _mask_from_tree(trainable, params)
        return _some(mask)



class NNXAdapter(Adapter):
    """A Flax NNX module: ``loss_fn(module, batch)``; its ``nnx.Param`` state is trained.

    The module is rebuilt inside the step from the params and its other state (kept as
    plain arrays, so that the module's own mutations, such as a dropout stream's counter,
    happen inside the trace where NNX allows them). Each RNG stream (``nnx.Rngs``) is
    reseeded from the step's key, which differs per step, micro-batch and device, so
    dropout draws a new mask every time; other state the loss changes (batch statistics)
    is not carried from one step to the next.
    """

    def __init__(self, loss_fn, logical_axes, model: nnx.Module):
        super().__init__(loss_fn, logical_axes)
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self.rest = nnx.to_pure_dict(rest)
        self.streams = sorted({node.tag for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)})
        self.model_params_state = params
        self.model_params = nnx.to_pure_dict(params)
        self.found_axes = _nnx_axes(params)

    def to_user(self, params, key=None):
        module = nnx.merge(self.graphdef, params, self.rest)
        if key is not None and self.streams:
            nnx.reseed(module, **{name: jax.random.fold_in(key, i) for i, name in enumerate(self.streams)})
        return module

    def trainable_mask(self, trainable: Any, params: Any) -> tuple[bool, ...]:
        """``trainable=`` may be any NNX filter (a Variable type such as ``nnx.LoRAParam``,
        ``nnx.PathContains(...)``, a predicate ``fn(path, variable)``) or a pytree of bools."""
        if not _is_nnx_filter(trainable):
            return super().trainable_mask(trainable, params)
        module = nnx.merge(self.graphdef, self.model_params_state, self.rest)
        chosen = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(module, trainable)))[0]
        wanted = {_keys(path) for path, _ in chosen}
        return _some(tuple(_keys(path) in wanted for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]))

    def params_source(self, given: Any) -> tuple[Callable, Any]:
        given = _read_if_file(given)
        if given is None:
            given = self.model_params
        elif isinstance(given, nnx.Module):
            given = nnx.to_pure_dict(nnx.state(given, nnx.Param))
        elif callable(given):
            return (lambda rng, _: nnx.to_pure_dict(nnx.state(given(rng), nnx.Param))), None
        return (lambda rng, tree: tree), given


def _keys(path) -> tuple:
    """A jax key path as plain names: dict keys, attribute names and sequence indices."""
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def _mask_from_tree(trainable: Any, params: Any) -> tuple[bool, ...]:
    """A pytree of bools, the params' tree or a prefix of it, as one bool per leaf."""
    try:
        full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: bool(m), sub), trainable, params)
    except (ValueError, TypeError) as err:
        raise ConfigError(
            f"trainable= is a pytree that does not match the params' tree ({err}); pass bools in the params' "
            "structure (or a prefix of it), a predicate fn(path, leaf) -> bool, or an NNX filter"
        ) from None
    return tuple(jax.tree.leaves(full))


def _some(mask: tuple[bool, ...]) -> tuple[bool, ...]:
    if not any(mask):
        raise ConfigError(f"trainable= selects none of the {len(mask)} parameters; select at least one to train")
    return mask


def _is_nnx_filter(x: Any) -> bool:
    """A Variable type, a path substring, a predicate or NNX filter object, or a tuple of them."""
    if isinstance(x, (tuple, list)):
        return bool(x) and all(_is_nnx_filter(f) for f in x)
    return not isinstance(x, bool) and (callable(x) or isinstance(x, (str, type)))


def _nnx_axes(params: nnx.State) -> Any:
    """Pure-dict tree of each Param's logical axes (its ``out_sharding`` metadata)."""
    axes = jax.tree.map(
        lambda v: v.replace(value=_Axes(tuple(v.get_metadata().get("out_sharding") or ()))),
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return jax.tree.map(lambda a: a.names, nnx.to_pure_dict(axes), is_leaf=lambda x: isinstance(x, _Axes))


class _Axes:
    """A tuple of axis names kept as one leaf while trees are mapped."""

    def __init__(self, names: tuple):
        self.names = names
