"""Fused kernels for zjax, each with a custom VJP and a plain-XLA reference.

Every kernel takes ``impl="auto" | "pallas" | "interpret" | "xla"`` (see
``pallas_kernels.dispatch``); ``shard_over_batch`` runs a kernel once per batch shard.
Pallas kernels (Triton-style, for GPU): ``rms_norm``, ``layer_norm``,
``flash_attention``, ``swiglu``, ``geglu``, ``softmax_cross_entropy`` (its ``"xla"``
impl is a chunked XLA loop) and ``unscale_and_check``. On TPU only ``flash_attention``
has a kernel: the upstream Mosaic one. They have run in Pallas interpret mode only.
"""
from pallas_kernels.attention import BlockSizes, attention_reference, flash_attention
from pallas_kernels.cross_entropy import cross_entropy_reference, softmax_cross_entropy
from pallas_kernels.dispatch import IMPLS, KERNEL_BACKENDS, resolve_impl, shard_over_batch
from pallas_kernels.norms import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference
from pallas_kernels.quantized_matmul import (
    int4_matmul, int4_matmul_reference, int8_matmul, int8_matmul_reference, pack_int4, quantize_rows,
    unpack_int4, w8a8_matmul, w8a8_matmul_reference,
)
from pallas_kernels.swiglu import geglu, geglu_reference, swiglu, swiglu_reference
from pallas_kernels.unscale import unscale_and_check, unscale_and_check_reference

__all__ = [
    "BlockSizes",
    "IMPLS",
    "KERNEL_BACKENDS",
    "attention_reference",
    "cross_entropy_reference",
    "flash_attention",
    "geglu",
    "geglu_reference",
    "int4_matmul",
    "int4_matmul_reference",
    "int8_matmul",
    "int8_matmul_reference",
    "layer_norm",
    "layer_norm_reference",
    "pack_int4",
    "paged_attention",
    "paged_attention_reference",
    "quantize_rows",
    "resolve_impl",
    "rms_norm",
    "rms_norm_reference",
    "shard_over_batch",
    "softmax_cross_entropy",
    "swiglu",
    "swiglu_reference",
    "unpack_int4",
    "unscale_and_check",
    "unscale_and_check_reference",
    "w8a8_matmul",
    "w8a8_matmul_reference",
]
