"""What a remat policy keeps: per tagged activation, from ``saved_residuals`` of each layer
seam (``scan_layers``, ``layer``) traced on one device's micro-batch, next to the compiled
step's temp bytes and FLOPs (``zjax plan`` reads ``layer_residuals`` too)."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import numpy as np

from zjax import layers
from zjax.config.remat import LAYER_INPUT, RematPolicy, remat_policy
from zjax.parallel import zero


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
