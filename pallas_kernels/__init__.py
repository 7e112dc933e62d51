"""Fused kernels for zjax, each with a custom VJP and a plain-XLA reference.

Every kernel takes ``impl="auto" | "pallas" | "interpret" | "xla"`` (see
``pallas_kernels.dispatch``); ``shard_over_batch`` runs a kernel once per batch shard.
Pallas kernels: ``rms_norm``, ``layer_norm``, ``flash_attention``.
``softmax_cross_entropy`` is a chunked XLA loop with a custom VJP.
"""
from pallas_kernels.attention import BlockSizes, attention_reference, flash_attention
from pallas_kernels.cross_entropy import cross_entropy_reference, softmax_cross_entropy
from pallas_kernels.dispatch import IMPLS, resolve_impl, shard_over_batch
from pallas_kernels.norms import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from pallas_kernels.swiglu import geglu, geglu_reference, swiglu, swiglu_reference
from pallas_kernels.unscale import unscale_and_check, unscale_and_check_reference

__all__ = [
    "BlockSizes",
    "IMPLS",
    "attention_reference",
    "cross_entropy_reference",
    "flash_attention",
    "geglu",
    "geglu_reference",
    "layer_norm",
    "layer_norm_reference",
    "resolve_impl",
    "rms_norm",
    "rms_norm_reference",
    "shard_over_batch",
    "softmax_cross_entropy",
    "swiglu",
    "swiglu_reference",
    "unscale_and_check",
    "unscale_and_check_reference",
]
