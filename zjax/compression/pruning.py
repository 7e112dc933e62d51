"""Pruning as an optax transform: masks that keep pruned weights exactly zero.

``prune(groups)`` is a ``GradientTransformation`` to chain after any optimizer. It keeps a
boolean mask per matched parameter in its state (split like the parameter under ZeRO, saved in
checkpoints) and a count of the updates applied. At the steps a group's schedule says, it ranks
the weights the update would give (``params + updates``) and narrows the masks; every update it
returns is ``where(mask, update, -param)``, so a pruned weight becomes exactly 0.0 and stays
there whatever the optimizer's moments do. The forward pass needs no mask: the weights are zero.

Groups (``zjax.config.schema``'s ``SparsePruningGroup`` / ``StructuredPruningGroup`` or any object
with the same fields) come with a kind: ``sparse`` (single weights, ``RxC`` blocks or N:M),
``row`` (output features), ``channel`` (input features) or ``head`` (the heads of an attention
output projection). A structured group's ``related_modules`` are masked along the shared
dimension on their other side (row pruning of ``mlp/w_up``'s columns masks ``mlp/w_down``'s rows;
head pruning of ``attn/wo``'s head rows masks ``attn/wq``'s head columns and, for grouped KV heads,
a KV head's columns once all its query heads are pruned): ``zjax.compression.clean`` then drops
both sides and the model is physically smaller.

Steps are counted as ``zjax.compression.schedule`` does (DeepSpeed's ``training_steps``: the
updates applied before a step's forward). The mask a schedule puts in effect in the forward of
step ``s`` is computed in the update of step ``s - 1``, from the weights that update gives, so the
forward of step ``schedule_offset`` is the first to see pruned weights; a mask due at step 0 is
computed in the first update (in effect from step 1). DeepSpeed ranks its l1 masks once, from the
weights at ``init_compression``; zjax ranks the weights as they are when the mask takes effect.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from zjax.compression import masks as M
from zjax.errors import ConfigError

KINDS = ("sparse", "row", "channel", "head")


class PruneState(NamedTuple):
    count: jax.Array  # updates applied so far
    masks: dict  # parameter path -> bool mask of its shape (True = kept)


@dataclasses.dataclass(frozen=True)
class _Target:
    """One mask computation: the group, its main leaf and the leaves masked alike."""

    kind: str
    group: Any
    main: str
    related: tuple[str, ...]


def pruning_groups(compression: Any) -> list[tuple[str, Any]]:
    """``(kind, group)`` for every pruning group of a ``CompressionConfig``."""
    return ([("sparse", g) for g in compression.sparse_pruning] + [("row", g) for g in compression.row_pruning]
            + [("channel", g) for g in compression.channel_pruning] + [("head", g) for g in compression.head_pruning])


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split("/"), b.split("/")):
        if x != y:
            break
        n += 1
    return n


def _plan(groups: list[tuple[str, Any]], names: list[str], shapes: dict, stacked) -> list[_Target]:
    targets = []
    # a matrix, or a stack of them (a leaf whose first axis is `layers` needs a third axis)
    matrices = [n for n in names if len(shapes[n]) - (1 if n in stacked else 0) >= 2]
    for kind, group in groups:
        if kind not in KINDS:
            raise ConfigError(f"pruning kind {kind!r} is not one of {KINDS}")
        mains = [n for n in matrices if M.matches(group.modules, n)]
        if not mains:
            raise ConfigError(f"{kind}_pruning modules={group.modules} match no matmul weight; the parameters are "
                              f"{names}")
        related_pool = [n for n in matrices if getattr(group, "related_modules", None)
                        and M.matches(group.related_modules, n) and n not in mains]
        for main in mains:
            related: tuple[str, ...] = ()
            if related_pool:  # the related leaves closest to this one (its own layer, its own block)
                best = max(_common_prefix(main, n) for n in related_pool)
                related = tuple(n for n in related_pool if _common_prefix(main, n) == best)
            targets.append(_Target(kind, group, main, related))
    return targets


def _group_mask(kind: str, group: Any, w: jax.Array, ratio, heads: tuple[int | None, int]) -> jax.Array:
    """The main leaf's mask over its features (structured) or its shape (sparse)."""
    if kind == "sparse":
        pattern = getattr(group, "pattern", None)
        if pattern and ":" in pattern:
            n, m = map(int, pattern.split(":"))
            return M.n_of_m_mask(w, n, m)
        if pattern:
            rows, cols = map(int, pattern.split("x"))
            return M.block_mask(w, ratio, rows, cols)
        return M.magnitude_mask(w, ratio)
    if kind == "row":
        return M.row_mask(w, ratio)
    if kind == "channel":
        return M.channel_mask(w, ratio)
    num_heads, groups = heads
    if num_heads is None:
        raise ConfigError("head_pruning needs num_heads (the model's attention heads), e.g. num_heads: 12")
    return M.head_mask(w, ratio, num_heads, groups)


def _lay(kind: str, feature_mask: jax.Array, w: jax.Array, *, side: str, heads: int | None) -> jax.Array:
    """A feature mask laid over ``w``'s input (``side="in"``) or output axis, broadcast to its shape."""
    size = w.shape[-2] if side == "in" else w.shape[-1]
    if kind == "head":
        if size % heads:  # heads: rows per head
            raise ConfigError(f"head pruning: a related module of width {size} is not a whole number of heads of "
                              f"{heads}; related_modules of head pruning are the q/k/v projections")
        # a KV projection has fewer heads: a KV head stays while any of its query heads does
        feature_mask = M.expand(M.reduce_to(feature_mask, size // heads), size)
    elif feature_mask.shape[-1] != size:
        raise ConfigError(f"{kind} pruning: a related module's dimension ({size}) differs from the pruned one "
                          f"({feature_mask.shape[-1]}); related_modules must share the pruned dimension")
    stack = w.shape[:-2]
    if feature_mask.shape[:-1] != stack:
        feature_mask = jnp.broadcast_to(feature_mask, stack + feature_mask.shape[-1:])
    mask = feature_mask[..., :, None] if side == "in" else feature_mask[..., None, :]
    return jnp.broadcast_to(mask, w.shape)


def _masks_for(target: _Target, candidate: dict, ratio, heads: tuple[int | None, int]) -> dict:
    """``{path: mask}`` of one target from the candidate weights."""
    w = candidate[target.main]
    mask = _group_mask(target.kind, target.group, w, ratio, heads)
    if target.kind == "sparse":
        return {target.main: mask}
    main_side, other_side = {"row": ("out", "in"), "channel": ("in", "out"), "head": ("in", "out")}[target.kind]
    rows_per_head = w.shape[-2] // mask.shape[-1] if target.kind == "head" else None
    out = {target.main: _lay(target.kind, mask, w, side=main_side, heads=rows_per_head)}
    for name in target.related:
        out[name] = _lay(target.kind, mask, candidate[name], side=other_side, heads=rows_per_head)
    return out


def prune(groups: list[tuple[str, Any]], *, num_heads: int | None = None, num_kv_heads: int | None = None,
          stacked=()) -> optax.GradientTransformation:
    """The pruning transform for ``groups`` (``(kind, group)`` pairs; ``pruning_groups(config)``).

    Args:
      groups: what to prune; each group has ``modules`` (regexes on ``a/b/c`` parameter paths),
        ``dense_ratio``, ``schedule_offset`` and, for sparse pruning, ``pattern``,
        ``schedule_offset_end`` and ``schedule_offset_stride``; structured ones
        ``related_modules`` and (head) ``num_heads``.
      num_heads, num_kv_heads: defaults for head groups that give none (the model's heads); with
        fewer KV heads than heads, heads are kept in equal numbers per KV group.
      stacked: the paths (``a/b/c``) of leaves whose first axis is a ``layers`` stack (the train
        step passes them): a matched leaf must be a matrix, or a stack of them; a stacked vector
        (a norm's scales) is not pruned.

    Example:
      >>> import types
      >>> g = types.SimpleNamespace(modules=["w"], dense_ratio=0.5, schedule_offset=0, pattern=None,
      ...                           schedule_offset_end=None, schedule_offset_stride=1)
      >>> tx = prune([("sparse", g)])
      >>> p = {"w": jnp.arange(1.0, 9.0).reshape(2, 4)}
      >>> u, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
      >>> optax.apply_updates(p, u)["w"].tolist()
      [[0.0, 0.0, 0.0, 0.0], [5.0, 6.0, 7.0, 8.0]]
    """

    learned = [f"{kind}_pruning" for kind, g in groups if getattr(g, "method", "l1") == "topk"]
    if learned:
        raise ConfigError(f"{learned[0]} method 'topk' learns scores: zjax.compression.learned_prune wraps the "
                          "optimizer for it (the train step does); prune ranks magnitudes (method l1)")

    def plan(params):
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        names = [M.path_name(p) for p, _ in flat]
        shapes = {M.path_name(p): tuple(x.shape) for p, x in flat}
        return _plan(groups, names, shapes, frozenset(stacked))

    def init(params):
        targets = plan(params)
        flat = {M.path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
        names = sorted({t.main for t in targets} | {n for t in targets for n in t.related})
        return PruneState(jnp.zeros((), jnp.int32), {n: jnp.ones(flat[n].shape, jnp.bool_) for n in names})

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("prune needs the params: call update(updates, state, params)")
        from zjax.compression import schedule
        targets = plan(params)
        flat_p, treedef = jax.tree_util.tree_flatten_with_path(params)
        names = [M.path_name(p) for p, _ in flat_p]
        flat_u = treedef.flatten_up_to(updates)
        p_by = dict(zip(names, (x for _, x in flat_p)))
        u_by = dict(zip(names, flat_u))
        masks = dict(state.masks)
        for target in targets:
            g = target.group
            kind_schedule = target.kind == "sparse"
            end = getattr(g, "schedule_offset_end", None) if kind_schedule else None
            stride = getattr(g, "schedule_offset_stride", 1) if kind_schedule else 1
            # the mask in effect in the forward of step count + 1 is computed in this update (and one
            # due at step 0, before any update, in the first)
            nxt = state.count + 1
            due = (schedule.mask_update_due(nxt, g.schedule_offset, end, stride)
                   | ((state.count == 0) & schedule.mask_update_due(0, g.schedule_offset, end, stride)))
            ratio = schedule.dense_ratio_at(nxt, g.dense_ratio, g.schedule_offset, end, stride)
            heads = getattr(g, "num_heads", None) or num_heads
            kv = getattr(g, "num_kv_heads", None) or num_kv_heads
            kv_groups = kv if kv and heads and kv < heads else 1
            touched = (target.main, *target.related)
            candidate = {n: (p_by[n] + u_by[n].astype(p_by[n].dtype)) * masks[n] for n in touched}

            def compute(candidate=candidate, target=target, ratio=ratio, heads=heads, kv_groups=kv_groups,
                        touched=touched):
                new = _masks_for(target, candidate, ratio, (heads, kv_groups))
                return tuple(masks[n] & new[n] for n in touched)

            kept = lax.cond(due, compute, lambda touched=touched: tuple(masks[n] for n in touched))
            masks.update(zip(touched, kept))
        new_updates = [jnp.where(masks[n], u, -p.astype(u.dtype)) if n in masks else u
                       for n, u, p in zip(names, flat_u, (x for _, x in flat_p))]
        return jax.tree.unflatten(treedef, new_updates), PruneState(state.count + 1, masks)

    return optax.GradientTransformation(init, update)


def sparsity(params: Any, modules=("*",)) -> dict[str, float]:
    """The fraction of exact zeros of each matched matrix (``path -> fraction``)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = M.path_name(path)
        if getattr(x, "ndim", 0) >= 2 and M.matches(modules, name):
            out[name] = float(jnp.mean(jnp.asarray(x) == 0))
    return out
