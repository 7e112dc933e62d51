"""Remat policies: which tagged activations the backward pass keeps, offloads or recomputes.

Models tag activations with ``jax.ad_checkpoint.checkpoint_name``; the reference GPT's
tags are ``ACTIVATION_NAMES`` (below) and ``scan_layers`` tags every layer's
input ``layer_input``. A policy name from ``remat.policy`` (plus ``remat.names`` for
``custom``) becomes a ``RematPolicy``; ``scan_layers`` turns it into the
``jax.checkpoint`` policy of each layer.

Offloaded activations go to ``pinned_host`` memory. On CPU the offload is dropped when
lowering: the numbers are right but host and device are the same memory, so it saves
nothing there.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax

from zjax.errors import ConfigError

POLICIES = ("none", "full", "full_offload", "selective", "selective_offload", "dots", "dots_no_batch", "custom")
ACTIONS = ("save", "remat", "offload")
LAYER_INPUT = "layer_input"
# The tags the reference GPT (zjax.models.gpt) puts on its activations.
ACTIVATION_NAMES = (
    "attn_norm",
    "q_proj",
    "k_proj",
    "v_proj",
    "attn_out",
    "attn_proj",
    "mlp_norm",
    "mlp_gate",
    "mlp_up",
    "mlp_hidden",
    "mlp_out",
)

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
    return tuple(dict.fromkeys((*ACTIVATION_NAMES, LAYER_INPUT, *extra_names)))
