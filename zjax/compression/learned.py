"""DeepSpeed's learned-score pruning (``method: topk``) as an optax transform around the optimizer.

DeepSpeed's ``topk`` (``deepspeed/compression/basic_layer.py``, movement pruning) gives each pruned
matrix a trained score per weight (``sparse_pruning``), per output row (``row_pruning``), per input
channel or per attention head (``head_pruning``, rows of the output projection), initialized
``kaiming_uniform_(a=sqrt(5))``. From ``schedule_offset`` on, every forward uses ``W * mask`` with
``mask = TopKBinarizer(scores, dense_ratio)``: the top ``ceil(dense_ratio * n)`` scores. The
binarizer is straight-through, so ``dL/dW = dL/d(W*mask) * mask`` and ``dL/dscores =
dL/d(W*mask) * W`` (summed over a row's or a head's weights): a masked-out weight keeps its value
and comes back when its score climbs into the top k. The scores are trained by the model's
optimizer (they are ``nn.Parameter``s of the model).

``learned_prune(inner, groups)`` does this for any model, through its parameter paths, without
touching the model: the params the loss reads are ``W * mask`` (pruned weights exactly 0.0, as
``zjax.compression.prune`` leaves them, so ``redundancy_clean`` and the inference engine see a
pruned model), and the transform's state keeps what DeepSpeed's module keeps -- the scores, the
scores' optimizer state -- plus the dense values of the masked-out weights (``dense``, one more
copy of each pruned matrix: DeepSpeed keeps them in the weight itself and masks in the forward).
The gradient the step hands it is ``dL/d(W*mask)``; each update

1. runs ``inner`` (the model's optimizer) on the dense weights with the gradient times the mask
   in effect;
2. trains the scores of every group whose mask was in that forward with
   ``g * W_dense`` and ``score_tx`` (the scores' own optimizer state, per group: like a torch
   parameter without a gradient, a group's scores and their optimizer state do not move before
   its mask is in the forward, and their schedule counts from there);
3. takes the next forward's masks from the new scores and returns updates that leave
   ``W_new * mask_new`` (``params + update`` equals ``W + u`` exactly where a weight stays kept,
   ``W_new`` where it comes back, 0.0 where it is masked out).

Steps count as in ``zjax.compression.pruning``: the mask of the forward of step ``s`` is computed in
the update of step ``s - 1``, so the forward of ``max(schedule_offset, 1)`` is the first to see it.
``related_modules`` (the other side of a pruned row, head or channel: the MLP's down projection, the
q/k/v projections) are not masked while training, as in DeepSpeed, whose forward masks only the
pruned module: a masked-out feature is zero anyway (a SwiGLU product or an attention head whose
output rows are zero), and the other side's weights carry the gradient that lets its score rise
again (masking them would keep a pruned row pruned for good). ``zjax compress clean`` drops both
sides, as DeepSpeed's ``redundancy_clean`` does. Grouped KV heads keep the same number of query
heads per KV group (DeepSpeed had no GQA).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from zjax.compression import masks as M
from zjax.compression import pruning
from zjax.errors import ConfigError


class ScorePruneState(NamedTuple):
    count: jax.Array  # updates applied so far
    inner: Any  # the wrapped optimizer's state
    scores: dict  # "kind:path" -> float32 scores
    score_opt: dict  # "kind:path" -> score_tx's state for those scores
    masks: dict  # pruned parameter's path -> bool mask of its shape in effect in the next forward
    dense: dict  # pruned parameter's path -> its dense values (masked-out ones included)


def _key(target) -> str:
    return f"{target.kind}:{target.main}"


def _heads(target, num_heads, num_kv_heads) -> tuple[int, int]:
    heads = getattr(target.group, "num_heads", None) or num_heads
    if heads is None:
        raise ConfigError("head_pruning needs num_heads (the model's attention heads), e.g. num_heads: 12")
    kv = getattr(target.group, "num_kv_heads", None) or num_kv_heads
    return heads, (kv if kv and kv < heads else 1)


def _score_shape(kind: str, shape: tuple, heads: int | None) -> tuple:
    stack = shape[:-2]
    return {"sparse": shape, "row": stack + (shape[-1],), "channel": stack + (shape[-2],),
            "head": stack + (heads,)}[kind]


def _fan_in(kind: str, shape: tuple, heads: int | None) -> int:
    """torch's fan-in of DeepSpeed's score tensor: ``[out, in]`` (sparse), ``[out, 1]`` (row),
    ``[channels, 1, 1, 1]``, ``[1, heads]``."""
    return {"sparse": shape[-2], "row": 1, "channel": 1, "head": heads}[kind]


def _score_grad(kind: str, g: jax.Array, w: jax.Array, heads: int | None) -> jax.Array:
    gw = g.astype(jnp.float32) * w.astype(jnp.float32)
    if kind == "sparse":
        return gw
    if kind == "row":
        return gw.sum(-2)
    if kind == "channel":
        return gw.sum(-1)
    return gw.reshape(gw.shape[:-2] + (heads, gw.shape[-2] // heads, gw.shape[-1])).sum((-2, -1))


def scores_mask(kind: str, scores: jax.Array, dense_ratio: float, groups: int = 1) -> jax.Array:
    """The top ``ceil(dense_ratio * n)`` scores (``TopKBinarizer``): over each matrix (sparse) or
    its features (row/channel/head; heads in ``groups`` equal groups, each keeping its share)."""
    if kind == "sparse":
        return M.top_k_mask(scores, math.ceil(dense_ratio * scores.shape[-2] * scores.shape[-1]), axes=2)
    grouped = scores.reshape(scores.shape[:-1] + (groups, scores.shape[-1] // groups))
    return M.top_k_mask(grouped, math.ceil(dense_ratio * grouped.shape[-1])).reshape(scores.shape)


def _check_group(kind: str, group: Any) -> None:
    if kind == "sparse" and getattr(group, "pattern", None):
        raise ConfigError(f"sparse_pruning method 'topk' (learned scores) with pattern={group.pattern!r}: DeepSpeed's "
                          "topk scores single weights; use method: l1 for block and N:M patterns")
    if getattr(group, "schedule_offset_end", None) is not None:
        raise ConfigError(f"sparse_pruning method 'topk' with schedule_offset_end={group.schedule_offset_end}: the "
                          "learned scores keep dense_ratio from schedule_offset on (DeepSpeed's topk); the gradual "
                          "schedule is method l1's")


def learned_prune(inner: optax.GradientTransformation, groups: list[tuple[str, Any]], *,
                  score_tx: optax.GradientTransformation | None = None, num_heads: int | None = None,
                  num_kv_heads: int | None = None, stacked=(), seed: int = 0) -> optax.GradientTransformation:
    """``inner`` (the model's optimizer) with DeepSpeed's learned-score pruning of ``groups``.

    Args:
      inner: the optimizer of the weights; it sees the dense weights and the masked gradient.
      groups: ``(kind, group)`` pairs (kind ``sparse``, ``row``, ``channel`` or ``head``; groups as
        for ``zjax.compression.prune``: ``modules``, ``dense_ratio``, ``schedule_offset``,
        ``related_modules``, ``num_heads``, ``num_kv_heads``).
      score_tx: the scores' optimizer (each group's scores have their own state); default ``inner``.
        The train step passes its config's optimizer with weight decay on every leaf, as the scores
        of DeepSpeed's examples are in the decayed parameter group.
      num_heads, num_kv_heads: defaults for head groups that give none.
      stacked: the paths of leaves whose first axis is a ``layers`` stack.
      seed: the scores' initialization (``kaiming_uniform_(a=sqrt(5))``: uniform within
        ``1/sqrt(fan_in)``).

    Example:
      >>> import types
      >>> g = types.SimpleNamespace(modules=["w"], dense_ratio=0.5, schedule_offset=0, pattern=None)
      >>> tx = learned_prune(optax.sgd(0.1), [("sparse", g)])
      >>> p = {"w": jnp.ones((4, 4))}
      >>> u, state = tx.update({"w": jnp.ones((4, 4))}, tx.init(p), p)
      >>> int((optax.apply_updates(p, u)["w"] != 0).sum())  # the next forward's weights: 8 of 16
      8
    """
    for kind, group in groups:
        _check_group(kind, group)
    score_tx = inner if score_tx is None else score_tx

    def plan(params):
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        names = [M.path_name(p) for p, _ in flat]
        shapes = {M.path_name(p): tuple(x.shape) for p, x in flat}
        targets = pruning._plan(groups, names, shapes, frozenset(stacked))
        heads = {_key(t): _heads(t, num_heads, num_kv_heads) if t.kind == "head" else (None, 1) for t in targets}
        return targets, heads, shapes

    def init(params):
        targets, heads, shapes = plan(params)
        flat = {M.path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
        key = jax.random.key(seed)
        scores = {}
        for i, t in enumerate(targets):
            h = heads[_key(t)][0]
            shape = _score_shape(t.kind, shapes[t.main], h)
            bound = 1.0 / math.sqrt(_fan_in(t.kind, shapes[t.main], h))
            scores[_key(t)] = jax.random.uniform(jax.random.fold_in(key, i), shape, jnp.float32, -bound, bound)
        names = sorted({t.main for t in targets})
        try:
            score_opt = {k: score_tx.init(s) for k, s in scores.items()}
        except (ValueError, TypeError) as err:
            raise ConfigError(f"learned-score pruning trains its scores with the given optimizer, which cannot take "
                              f"them ({type(err).__name__}: {err}); use an optimizer that is not tied to the "
                              "params' tree (no tree-shaped masks) or method: l1") from None
        return ScorePruneState(jnp.zeros((), jnp.int32), inner.init(params), scores, score_opt,
                               {n: jnp.ones(flat[n].shape, jnp.bool_) for n in names},
                               {n: flat[n] for n in names})

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("learned_prune needs the params: call update(updates, state, params)")
        targets, heads, _ = plan(params)
        flat_p, treedef = jax.tree_util.tree_flatten_with_path(params)
        names = [M.path_name(p) for p, _ in flat_p]
        p_by = dict(zip(names, (x for _, x in flat_p)))
        g_by = dict(zip(names, treedef.flatten_up_to(updates)))
        masks = state.masks
        dense = {n: jnp.where(masks[n], p_by[n], state.dense[n]) for n in masks}
        # 1. the optimizer on the dense weights, with the gradient of the masked forward times its mask
        inner_params = jax.tree.unflatten(treedef, [dense.get(n, p_by[n]) for n in names])
        inner_grads = jax.tree.unflatten(treedef, [jnp.where(masks[n], g_by[n], 0).astype(g_by[n].dtype)
                                                   if n in masks else g_by[n] for n in names])
        u, inner_state = inner.update(inner_grads, state.inner, inner_params)
        # Each value below is used twice (the state and the update): materialized once, as XLA may
        # otherwise recompute an element-wise chain in each consumer with other rounding (seen on
        # XLA:CPU), and a score at the threshold would then be kept by one and dropped by the other.
        u = lax.optimization_barrier(u)
        u_by = dict(zip(names, treedef.flatten_up_to(u)))
        # 2. the scores of the groups whose mask was in this forward; 3. the next forward's masks
        count = state.count
        scores, score_opt = dict(state.scores), dict(state.score_opt)
        new_masks = {n: jnp.ones_like(m) for n, m in masks.items()}
        # The groups' computations run one after the other, after the whole optimizer update (each
        # starts from a barrier on what came before): their reductions over sharded weights are
        # collectives, and independent collectives of one program can wait on each other's
        # threads on XLA:CPU (a deadlock).
        done = jax.tree.leaves(u)
        for t in targets:
            k, (h, kv_groups) = _key(t), heads[_key(t)]
            start = max(t.group.schedule_offset, 1)
            g_main, w_main, _ = lax.optimization_barrier((g_by[t.main], dense[t.main], done))
            grad = _score_grad(t.kind, g_main, w_main, h)
            su, so = score_tx.update(grad, state.score_opt[k], state.scores[k])
            trained = count >= start
            scores[k] = lax.optimization_barrier(
                jnp.where(trained, optax.apply_updates(state.scores[k], su), state.scores[k]))
            score_opt[k] = jax.tree.map(lambda new, old: jnp.where(trained, new, old), so, state.score_opt[k])
            mask = scores_mask(t.kind, scores[k], t.group.dense_ratio, kv_groups)
            if t.kind != "sparse":
                side = "out" if t.kind == "row" else "in"
                rows = dense[t.main].shape[-2] // h if t.kind == "head" else None
                mask = pruning._lay(t.kind, mask, dense[t.main], side=side, heads=rows)
            new_masks[t.main] = new_masks[t.main] & (mask | ~(count + 1 >= start))
            done = [new_masks[t.main], scores[k]]
        new_masks = lax.optimization_barrier(new_masks)
        out, new_dense = [], {}
        for n in names:
            if n not in masks:
                out.append(u_by[n])
                continue
            w_new = dense[n] + u_by[n].astype(dense[n].dtype)
            new_dense[n] = w_new
            kept = jnp.where(masks[n], u_by[n], w_new.astype(u_by[n].dtype))  # kept stays p + u; back: W_new
            out.append(jnp.where(new_masks[n], kept, -p_by[n].astype(u_by[n].dtype)))
        return (jax.tree.unflatten(treedef, out),
                ScorePruneState(count + 1, inner_state, scores, score_opt, new_masks, new_dense))

    return optax.GradientTransformation(init, update)


def dense_values(state: Any) -> dict:
    """The dense weights (``path -> array``) a ``learned_prune`` state holds, found anywhere in an
    optimizer state (a chain's tuple): what the masked-out weights would be if their scores rose."""
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ScorePruneState))
             if isinstance(s, ScorePruneState)]
    if not found:
        raise ValueError("the optimizer state holds no learned-score pruning (compression method topk)")
    return found[0].dense


__all__ = ["ScorePruneState", "dense_values", "learned_prune", "scores_mask"]
