"""Fused Pallas kernels for zjax, each with a custom VJP and an XLA reference.

Every kernel takes ``impl="auto" | "pallas" | "interpret" | "xla"``; see
``pallas_kernels.dispatch``. ``shard_over_batch`` runs a kernel once per batch shard.
"""
from pallas_kernels.attention import BlockSizes, attention_reference, flash_attention
from pallas_kernels.dispatch import IMPLS, resolve_impl, shard_over_batch
from pallas_kernels.norms import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference

__all__ = [
    "BlockSizes",
    "attention_reference",
    "flash_attention",
    "IMPLS",
    "layer_norm",
    "layer_norm_reference",
    "resolve_impl",
    "rms_norm",
    "rms_norm_reference",
    "shard_over_batch",
]
