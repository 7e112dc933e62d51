"""Remat policies: which tagged activations the backward pass keeps, offloads or recomputes.

Models tag activations with ``jax.ad_checkpoint.checkpoint_name``; the reference GPT's
tags are ``zjax.models.gpt.ACTIVATION_NAMES`` and ``scan_layers`` tags every layer's
input ``layer_input``. A policy name from ``remat.policy`` (plus ``remat.names`` for
``custom``) becomes a ``RematPolicy``; ``scan_layers`` turns it into the
``jax.checkpoint`` policy of each layer.

Offloaded activations go to ``pinned_host`` memory. On CPU the offload is dropped when
lowering: the numbers are right but host and device are the same memory, so it saves
nothing there.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from zjax import zero
from zjax.errors import ConfigError

POLICIES = ("none", "full", "full_offload", "selective", "selective_offload", "dots", "dots_no_batch", "custom")
ACTIONS = ("save", "remat", "offload")
LAYER_INPUT = "layer_input"

# Kept by `selective`: every matmul output the backward pass reads (q/k/v, the
# attention result, its projection, the MLP gate and up), in all about an eighth of
# what `none` keeps. Recomputed: the norms, rotary, silu(gate) * up (elementwise) and
# the attention scores and softmax: the T x T arrays that dominate `none` at long
# sequences, at the cost of one T x T matmul. `mlp_out` only feeds the residual sum,
# so nothing in the backward pass needs it. On the reference model at seq 512 this
# keeps 13.5% of `none`'s activations for 6.8% more FLOPs (benchmarks/remat.py).
SELECTIVE_NAMES = ("q_proj", "k_proj", "v_proj", "attn_out", "attn_proj", "mlp_gate", "mlp_up")

_JAX_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class RematPolicy:
    """A resolved remat policy: its config name and the tagged names it saves or offloads.

    Attributes:
      name: one of ``POLICIES``.
      save: tagged names kept in device memory (``selective`` and ``custom``).
      offload: tagged names kept in ``pinned_host`` memory.
    """

    name: str = "none"
    save: tuple[str, ...] = ()
    offload: tuple[str, ...] = ()

    def jax_policy(self):
        """The ``jax.checkpoint`` policy; None for ``none`` (save everything)."""
        if self.name in _JAX_POLICIES:
            return _JAX_POLICIES[self.name]
        if self.name == "none":
            return None
        if not self.offload:
            return jax.checkpoint_policies.save_only_these_names(*self.save)
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=list(self.save),
            names_which_can_be_offloaded=list(self.offload),
            offload_src="device",
            offload_dst="pinned_host",
        )


def remat_policy(remat: Any) -> RematPolicy:
    """The ``RematPolicy`` for a policy name or a ``remat`` config block.

    Args:
      remat: a name from ``POLICIES``, a ``RematPolicy``, or an object with ``policy``,
        ``names`` and ``extra_names`` (the ``remat`` block; ``custom`` needs it).

    Example:
      >>> remat_policy("selective_offload").offload
      ('q_proj', 'k_proj', 'v_proj', 'attn_out', 'attn_proj', 'mlp_gate', 'mlp_up')
    """
    if isinstance(remat, RematPolicy):
        return remat
    if isinstance(remat, str):
        if remat == "custom":
            raise ConfigError(
                "remat.policy='custom' needs its remat.names; pass the whole remat config block "
                "(config.remat), not only the policy name"
            )
        name, names, extra = remat, {}, ()
    else:
        name, names, extra = remat.policy, dict(remat.names), tuple(remat.extra_names)
    check_policy(name, names, extra)
    if name == "selective":
        return RematPolicy(name, save=SELECTIVE_NAMES)
    if name == "selective_offload":
        return RematPolicy(name, offload=SELECTIVE_NAMES)
    if name == "full_offload":
        return RematPolicy(name, offload=(LAYER_INPUT,))
    if name == "custom":
        return RematPolicy(
            name,
            save=tuple(n for n, action in names.items() if action == "save"),
            offload=tuple(n for n, action in names.items() if action == "offload"),
        )
    return RematPolicy(name)


def check_policy(policy: str, names: Mapping[str, str], extra_names: Iterable[str] = ()) -> None:
    """Raises ``ConfigError`` for an unknown policy, activation name or action.

    Valid names are the reference model's ``ACTIVATION_NAMES``, ``layer_input`` and
    ``extra_names`` (the tags of a user model).
    """
    if policy not in POLICIES:
        raise ConfigError(f"remat.policy={policy!r} is not a policy; use one of {', '.join(POLICIES)}")
    if names and policy != "custom":
        raise ConfigError(
            f"remat.names={dict(names)!r} applies only to remat.policy=custom, not {policy!r}; "
            "set policy: custom or remove the names"
        )
    valid = activation_names(extra_names)
    for name, action in names.items():
        if name not in valid:
            raise ConfigError(
                f"remat.names.{name}: {name!r} is not a tagged activation; valid names: {', '.join(valid)} "
                "(a model with other checkpoint_name tags lists them in remat.extra_names)"
            )
        if action not in ACTIONS:
            raise ConfigError(f"remat.names.{name}={action!r} is not an action; use one of {', '.join(ACTIONS)}")


def activation_names(extra_names: Iterable[str] = ()) -> tuple[str, ...]:
    """Every name ``remat.names`` may use: the reference model's tags, ``layer_input``, ``extra_names``."""
    # Imported here: the model imports zjax.layers, which imports this module.
    from zjax.models.gpt import ACTIVATION_NAMES

    return tuple(dict.fromkeys((*ACTIVATION_NAMES, LAYER_INPUT, *extra_names)))


class RematRow(NamedTuple):
    """What a policy keeps of one tagged activation, per device over all layers.

    ``name`` is a tag, ``layer_input``, or ``untagged`` (kept values that carry no
    tag, e.g. the softmax of ``none``); ``memory`` is ``device`` or ``pinned_host``.
    """

    name: str
    memory: str
    bytes: int


class RematReport(NamedTuple):
    """What a train step's remat policy keeps, and what its compiled step costs.

    Attributes:
      policy: the policy name.
      rows: one ``RematRow`` per kept name, largest first.
      temp_bytes: the compiled step's ``memory_analysis().temp_size_in_bytes``.
      flops: the compiled step's ``cost_analysis()["flops"]``.
    """

    policy: str
    rows: list[RematRow]
    temp_bytes: int
    flops: float

    @property
    def saved_bytes(self) -> int:
        """Bytes of activations kept in device memory for the backward pass."""
        return sum(row.bytes for row in self.rows if row.memory == "device")

    @property
    def offloaded_bytes(self) -> int:
        """Bytes of activations kept in host memory."""
        return sum(row.bytes for row in self.rows if row.memory == "pinned_host")


def remat_report(train: Any, state: Any, batch: Any) -> RematReport:
    """What ``train``'s remat policy keeps per tagged name, and the compiled step's cost.

    The kept residuals come from ``saved_residuals`` of one layer of every
    ``scan_layers`` call, traced on one device's micro-batch, times the layer count;
    parameters are not counted (they live in the train state). The temp bytes and
    FLOPs are those of the whole compiled step on ``batch``.

    Args:
      train: a ``TrainStep``.
      state: its ``TrainState`` (only shapes are read for the residuals).
      batch: a global batch, as for ``train(state, batch)``.

    Example:
      >>> report = remat_report(train, state, batch)  # doctest: +SKIP
      >>> print(format_report([report]))  # doctest: +SKIP
    """
    policy = remat_policy(train.config.remat)
    totals: dict[tuple[str, str], int] = {}
    for n_layers, named in layer_residuals(train, batch, policy, train.dtypes.compute):
        for name, nbytes in named:
            memory = "pinned_host" if name in policy.offload else "device"
            totals[name, memory] = totals.get((name, memory), 0) + nbytes * n_layers
    rows = sorted((RematRow(n, m, b) for (n, m), b in totals.items()), key=lambda r: (-r.bytes, r.name))
    compiled = train.lower(state, batch).compile()
    return RematReport(
        policy.name, rows, int(compiled.memory_analysis().temp_size_in_bytes), float(compiled.cost_analysis()["flops"])
    )


def layer_residuals(train: Any, batch: Any, policy: RematPolicy, dtype: Any) -> list[tuple[int, list[tuple[str, int]]]]:
    """Per ``scan_layers`` call: its layer count and the ``(tag, bytes)`` one layer keeps under ``policy``.

    Traced (not compiled) on one device's micro-batch with parameters in ``dtype``;
    parameters and constants carry no tag and are left out (they live in the train state).
    """
    from zjax import layers  # layers imports this module

    # Offloaded residuals lose their tag in the jaxpr; trace them as saved to name them.
    visible = dataclasses.replace(policy, save=policy.save + policy.offload, offload=())
    params = jax.tree.map(lambda lay: jax.ShapeDtypeStruct(lay.shape, dtype), train.all_layouts, is_leaf=zero.is_layout)
    micro = jax.tree.map(lambda x: jax.ShapeDtypeStruct((train.micro_batch_size,) + x.shape[1:], x.dtype), batch)
    key = jax.eval_shape(lambda: jax.random.key(0))
    found: list = []
    with layers.layer_context(visible, residuals=found, gathered={}):
        def loss(p, b, k):
            layers.note_params(p)
            return train.adapter.loss_fn(p, b, k)

        jax.eval_shape(loss, params, micro, key)
    return [
        (n_layers, [(name, math.prod(aval.shape) * np.dtype(aval.dtype).itemsize)
                    for aval, source in residuals if (name := residual_name(source)) is not None])
        for n_layers, residuals in found
    ]


def residual_name(source: str) -> str | None:
    """The tag of a residual from its ``saved_residuals`` description; None for parameters and constants."""
    if source.startswith("named '"):
        return source.split("'")[1]
    if source.startswith("from the argument"):
        # scan_layers' layer function is layer(c, p): c is the layer input, p the parameters.
        return LAYER_INPUT if source.split()[3].startswith("c") else None
    if source.startswith(("from a constant", "from a literal")):
        return None
    return "untagged"


def format_report(reports: Iterable[RematReport]) -> str:
    """A text table of reports: kept bytes per name, then temp bytes and FLOPs of each step."""
    lines = []
    for report in reports:
        lines.append(
            f"{report.policy}: saved {_mib(report.saved_bytes)}, offloaded {_mib(report.offloaded_bytes)}, "
            f"compiled temp {_mib(report.temp_bytes)}, {report.flops / 1e9:.3f} GFLOP"
        )
        lines.extend(f"  {row.name:<12} {row.memory:<12} {_mib(row.bytes):>12}" for row in report.rows)
    return "\n".join(lines)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"
