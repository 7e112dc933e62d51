"""Compiled temp memory of flash attention and chunked cross entropy against full matrices.

Prints, from ``jax.jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes``
(forward and backward, nothing is run):
- attention at sequence lengths 1k to 8k: the Pallas flash kernel (lowered in interpret
  mode on CPU, where each kernel becomes an XLA loop over its grid: the block structure
  and what is saved for the backward pass are the kernel's, but a GPU's Triton kernel
  keeps its tiles in registers/shared memory instead) against the jnp reference, which
  holds the [heads, q_len, kv_len] scores;
- cross entropy at vocabularies 32k to 128k: the Pallas kernel (interpret mode on CPU,
  as above) and the chunked XLA loop against full logits.
Times per call are not measured here: interpret mode on CPU says nothing about kernel
speed. On a GPU pass ``--impl pallas``.

Usage:
  .venv/bin/python benchmarks/kernels.py [--impl interpret|pallas] [--heads 4]
      [--head-dim 64] [--tokens 2048] [--d-model 256] [--chunk 8192] [--kernel-chunk 128]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from pallas_kernels import (attention_reference, cross_entropy_reference, flash_attention,
                            softmax_cross_entropy)

MIB = 1 << 20


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, kernel impl {args.impl!r}")
    print(f"\nattention fwd+bwd, batch 1, {args.heads} heads, head_dim {args.head_dim}, causal, fp32")
    print(f"{'seq':>6} {'flash MiB':>10} {'reference MiB':>14} {'scores MiB':>11}")
    for seq in (1024, 2048, 4096, 8192):
        shape = jax.ShapeDtypeStruct((1, seq, args.heads, args.head_dim), jnp.float32)
        flash = attention_temp(lambda q, k, v: flash_attention(q, k, v, causal=True, impl=args.impl), shape)
        ref = attention_temp(lambda q, k, v: attention_reference(q, k, v, causal=True), shape)
        scores = args.heads * seq * seq * 4
        print(f"{seq:>6} {flash / MIB:>10.1f} {ref / MIB:>14.1f} {scores / MIB:>11.1f}")

    print(f"\ncross entropy fwd+bwd, {args.tokens} tokens, d_model {args.d_model}, fp32")
    kernel_col = f"kernel chunk {args.kernel_chunk} MiB"
    xla_col = f"xla chunk {args.chunk} MiB"
    print(f"{'vocab':>7} {kernel_col:>22} {xla_col:>19} {'full logits MiB':>16} {'logits MiB':>11}")
    for vocab in (32768, 65536, 131072):
        kernel = loss_temp(lambda h, w, l: softmax_cross_entropy(
            h, w, l, impl=args.impl, chunk=args.kernel_chunk), args.tokens, args.d_model, vocab)
        chunked = loss_temp(lambda h, w, l: softmax_cross_entropy(h, w, l, impl="xla",
                                                                  chunk=args.chunk),
                            args.tokens, args.d_model, vocab)
        full = loss_temp(cross_entropy_reference, args.tokens, args.d_model, vocab)
        logits = args.tokens * vocab * 4
        print(f"{vocab:>7} {kernel / MIB:>22.1f} {chunked / MIB:>19.1f} {full / MIB:>16.1f} "
              f"{logits / MIB:>11.1f}")


def attention_temp(attention, shape) -> int:
    grad = jax.grad(lambda q, k, v: attention(q, k, v).sum(), argnums=(0, 1, 2))
    return jax.jit(grad).lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes


def loss_temp(loss, tokens, d_model, vocab) -> int:
    hidden = jax.ShapeDtypeStruct((tokens, d_model), jnp.float32)
    w_vocab = jax.ShapeDtypeStruct((d_model, vocab), jnp.float32)
    labels = jax.ShapeDtypeStruct((tokens,), jnp.int32)
    grad = jax.grad(lambda h, w, l: loss(h, w, l).sum(), argnums=(0, 1))
    return jax.jit(grad).lower(hidden, w_vocab, labels).compile().memory_analysis().temp_size_in_bytes


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", default="interpret", choices=("interpret", "pallas"))
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=8192, help="the XLA loop's vocabulary chunk")
    parser.add_argument("--kernel-chunk", type=int, default=128,
                        help="the Pallas cross-entropy kernel's vocabulary chunk")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
