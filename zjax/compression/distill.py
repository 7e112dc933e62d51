"""Layer reduction and knowledge distillation.

``reduce_layers`` starts a shallower student from chosen teacher layers (DeepSpeed's
``layer_reduction``: ``teacher_layer``, ``keep_number_layer``): a stacked ``layers`` tree is
indexed, a Python loop's numbered children are picked and renumbered, everything else (embedding,
final norm, head) is copied, all bit for bit.

``kd_loss`` is the logit distillation term ``T^2 * KL(softmax(t/T) || softmax(s/T))`` per token.
``Distillation`` holds a student and a frozen teacher as one NNX module, so that
``make_train_step(..., model=Distillation(student, teacher), trainable=nnx.PathContains("student"))``
trains the student while the teacher is a frozen model like any other: no optimizer state, no
gradient, split over ``data`` at ZeRO-3 and gathered a layer at a time. ``distillation_loss``
is its loss for the reference GPT.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zjax.errors import ConfigError


def reduce_layers(params: Any, teacher_layer: list[int], *, stacks: tuple[str, ...] = ("blocks", "layers")) -> Any:
    """The student's params: the teacher's ``params`` keeping only layers ``teacher_layer`` (in that
    order) of every stack.

    A stack is a subtree under a key named in ``stacks`` whose leaves share a leading layer axis
    (the reference GPT's ``blocks``, scanned models' ``layers``), or a dict of numbered children
    (``layers/0``, ``layers/1``: a Python loop over blocks), which are picked and renumbered.

    >>> t = {"blocks": {"w": jnp.arange(4.0)[:, None]}, "embedding": jnp.ones(2)}
    >>> reduce_layers(t, [3, 1])["blocks"]["w"].ravel().tolist()
    [3.0, 1.0]
    """
    chosen = [int(i) for i in teacher_layer]
    if not chosen:
        raise ConfigError("teacher_layer is empty; give the teacher layers the student starts from, e.g. [1, 3]")
    found = []

    def walk(node, key):
        if isinstance(node, dict):
            if key in stacks and node and all(re.fullmatch(r"\d+", str(k)) for k in node):
                count = len(node)
                _check(chosen, count, key)
                found.append(key)
                keys = sorted(node, key=int)
                return {str(new) if isinstance(keys[0], str) else new: node[keys[i]] for new, i in enumerate(chosen)}
            if key in stacks:
                leaves = jax.tree.leaves(node)
                counts = {x.shape[0] for x in leaves if getattr(x, "ndim", 0) >= 1}
                if len(counts) == 1:
                    count = counts.pop()
                    _check(chosen, count, key)
                    found.append(key)
                    index = jnp.asarray(chosen)
                    return jax.tree.map(lambda x: jnp.take(x, index, axis=0), node)
            return {k: walk(v, k) for k, v in node.items()}
        return node

    out = walk(dict(params) if not isinstance(params, dict) else params, None)
    if not found:
        raise ConfigError(f"layer reduction found no layer stack (a key named one of {stacks} holding stacked or "
                          "numbered layers) in the teacher's params")
    return out


def _check(chosen: list[int], count: int, key: str) -> None:
    bad = [i for i in chosen if not 0 <= i < count]
    if bad:
        raise ConfigError(f"teacher_layer={chosen}: layers {bad} do not exist; the teacher's '{key}' has {count} "
                          f"layers (0-{count - 1})")


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Per-token ``T^2 * KL(p_teacher || p_student)`` at temperature ``T`` (``[...]``, float32);
    the teacher is not differentiated."""
    t = jnp.float32(temperature)
    teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t, axis=-1)
    student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    return t * t * jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)


class Distillation(nnx.Module):
    """A student and its frozen teacher as one module (train it with
    ``trainable=nnx.PathContains("student")``)."""

    def __init__(self, student: nnx.Module, teacher: nnx.Module):
        self.student = student
        self.teacher = teacher


def distillation_loss(model: Distillation, batch: dict, *, temperature: float = 1.0, alpha: float = 0.5,
                      hidden_weight: float = 0.0) -> tuple[jax.Array, dict]:
    """``(1 - alpha) * cross entropy + alpha * kd_loss`` (+ ``hidden_weight`` x the mean squared
    difference of the final hidden states) over the counted target tokens of ``batch`` (the
    reference GPT's batch, as ``gpt_loss`` reads it); aux ``weight``, ``kd`` and ``task``."""
    from zjax.models.gpt import shifted_batch

    inputs, targets, segment_ids, counted = shifted_batch(batch)
    student, teacher = model.student, model.teacher
    hidden = student.hidden(inputs, segment_ids)
    teacher_hidden = jax.lax.stop_gradient(teacher.hidden(inputs, segment_ids))
    logits = jnp.einsum("btd,dv->btv", hidden, student.output_weights(), preferred_element_type=jnp.float32)
    teacher_logits = jnp.einsum("btd,dv->btv", teacher_hidden, teacher.output_weights(),
                                preferred_element_type=jnp.float32)
    weight = counted.sum()
    denominator = jnp.maximum(weight, 1.0)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    task = (nll * counted).sum() / denominator
    kd = (kd_loss(logits, teacher_logits, temperature) * counted).sum() / denominator
    loss = (1.0 - alpha) * task + alpha * kd
    if hidden_weight:
        if hidden.shape[-1] != teacher_hidden.shape[-1]:
            raise ConfigError(f"compression.distillation.hidden_weight={hidden_weight} matches hidden states, but the "
                              f"student's width {hidden.shape[-1]} differs from the teacher's "
                              f"{teacher_hidden.shape[-1]}; set hidden_weight: 0")
        mse = (jnp.mean(jnp.square(hidden.astype(jnp.float32) - teacher_hidden.astype(jnp.float32)), -1)
               * counted).sum() / denominator
        loss = loss + hidden_weight * mse
    return loss, {"weight": weight, "kd": kd, "task": task}


def load_teacher(source: str, step: int | None = None) -> dict:
    """The reference GPT's params (host numpy) from ``source``: a zjax run's output_dir or checkpoints
    directory, or a safetensors file (``zjax export``); a distillation run's student."""
    from pathlib import Path

    path = Path(source)
    if path.is_file() and path.suffix == ".safetensors":
        from zjax.export import load_safetensors

        return student_params(load_safetensors(path))
    if path.is_dir():
        from zjax.checkpoint import load_params

        return student_params(load_params(path / "checkpoints" if (path / "checkpoints").is_dir() else path, step))
    raise ConfigError(f"compression.distillation.teacher={source!r} is neither a directory (a run's output_dir or "
                      "checkpoints) nor a .safetensors file")


def student_params(params: dict) -> dict:
    """A distillation run's params hold ``student`` and ``teacher``: the student's; others as they are."""
    return params["student"] if isinstance(params, dict) and set(params) == {"student", "teacher"} else params


def gpt_setup(cfg: Any, model: nnx.Module) -> dict:
    """What ``zjax train`` hands ``make_train_step`` for the reference GPT under ``cfg.compression``:
    ``{"model", "loss_fn", "eval_loss_fn", "trainable"}``. Layer reduction sets ``model``'s layers
    from the teacher's ``teacher_layer``; distillation (a teacher and ``alpha`` or ``hidden_weight``
    above 0) wraps it with the frozen teacher in a ``Distillation``."""
    from zjax.config.schema import ModelConfig
    from zjax.models.gpt import gpt_loss, make_gpt

    comp = cfg.compression
    reduction, kd = comp.layer_reduction, comp.distillation
    lora = cfg.model.lora  # only the LoRA adapters train (DeepSpeed-Chat's only_optimize_lora)
    out = {"model": model, "loss_fn": gpt_loss, "eval_loss_fn": None,
           "trainable": nnx.LoRAParam if lora.rank > 0 and lora.only_optimize else None}
    if not (reduction.enabled or kd.teacher):
        return out
    if kd.teacher is None:
        raise ConfigError("compression.layer_reduction starts the student from a teacher: set "
                          "compression.distillation.teacher (a run's output_dir, checkpoints or a .safetensors file)")
    teacher_params = load_teacher(kd.teacher)
    stack = jax.tree.leaves(teacher_params["blocks"])[0].shape[0] if "blocks" in teacher_params else None
    # the teacher is a plain GPT (the student's LoRA adapters are the student's)
    fields = {**cfg.model.model_dump(exclude={"lora"}), **({"n_layers": stack} if stack else {}),
              **(kd.teacher_model or {})}
    try:
        teacher_cfg = ModelConfig.model_validate(fields)
    except Exception as err:  # noqa: BLE001 - pydantic's error, re-raised naming the key
        raise ConfigError(f"compression.distillation.teacher_model: {err}") from None
    if reduction.enabled:
        if len(reduction.teacher_layer) != cfg.model.n_layers:
            raise ConfigError(f"compression.layer_reduction.teacher_layer={reduction.teacher_layer} gives "
                              f"{len(reduction.teacher_layer)} layers but model.n_layers={cfg.model.n_layers}; give "
                              "one teacher layer per student layer")
        student = reduce_layers(teacher_params, reduction.teacher_layer)
        _load_into(model, student, "the layer-reduced student")
    if kd.alpha == 0 and kd.hidden_weight == 0:
        return out
    teacher = make_gpt(teacher_cfg, seed=0, kernels=cfg.kernels)
    _load_into(teacher, teacher_params, f"the teacher {kd.teacher}")
    out.update(
        model=Distillation(model, teacher),
        loss_fn=lambda m, batch: distillation_loss(m, batch, temperature=kd.temperature, alpha=kd.alpha,
                                                   hidden_weight=kd.hidden_weight),
        eval_loss_fn=lambda m, batch: gpt_loss(m.student, batch),
        trainable=nnx.PathContains("student") if out["trainable"] is None
        else nnx.All(nnx.PathContains("student"), out["trainable"]),
    )
    return out


def _load_into(model: nnx.Module, params: dict, what: str) -> None:
    """Sets ``model``'s ``nnx.Param`` values to ``params`` (same tree and shapes, else a ConfigError)."""
    state = nnx.state(model, nnx.Param)
    expected = jax.tree.map(lambda x: tuple(x.shape), nnx.to_pure_dict(state))
    given = jax.tree.map(lambda x: tuple(np.shape(x)), params)
    if expected != given:
        raise ConfigError(f"{what} does not fit the model: its params' shapes {given} differ from the model's "
                          f"{expected}; set compression.distillation.teacher_model (or model) to its shape")
    dtypes = jax.tree.map(lambda x: x.dtype, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x, d: jnp.asarray(x, d), params, dtypes))
    nnx.update(model, state)
