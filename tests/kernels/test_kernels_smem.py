"""Triton kernels size their blocks to a program's shared memory: the default blocks fit
``SMEM_BUDGET``, and a shape or explicit block that cannot fit is declined up front (``auto``
uses XLA; ``pallas`` raises naming the shared memory) instead of failing at launch, as it
did on an H200 (benchmarks/RESULTS-gpu.md)."""
import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import attention, cross_entropy, dispatch, flash_attention, softmax_cross_entropy


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setattr(dispatch, "backend", lambda: "gpu")


@pytest.mark.parametrize("head_dim, dtype", [(64, jnp.bfloat16), (128, jnp.bfloat16), (128, jnp.float32),
                                             (256, jnp.float32)])
def test_default_attention_blocks_fit_the_budget(head_dim, dtype):
    blocks = attention._default_blocks(head_dim, jnp.dtype(dtype).itemsize)
    assert blocks is not None
    assert attention._smem_bytes(head_dim, jnp.dtype(dtype).itemsize, *blocks) <= dispatch.SMEM_BUDGET
    # The block the H200 sweep measured fastest at head_dim 128 in bf16.
    if (head_dim, dtype) == (128, jnp.bfloat16):
        assert blocks == (64, 64)


def test_attention_blocks_over_the_budget_are_declined(gpu):
    q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"block_sizes=\(128, 128\).*KiB of shared memory"):
        jax.eval_shape(lambda q: flash_attention(q, q, q, impl="pallas", block_sizes=(128, 128)), q)
    assert dispatch.resolve_impl("flash_attention", "auto",
                                 attention._unsupported(q, (128, 128), "gpu")) == "xla"


def test_cross_entropy_blocks_shrink_with_d_model_and_wide_models_use_xla(gpu):
    itemsize = jnp.dtype(jnp.bfloat16).itemsize
    wide, narrow = cross_entropy._default_blocks(4096, itemsize), cross_entropy._default_blocks(512, itemsize)
    assert wide is None and narrow is not None
    assert cross_entropy._smem_bytes(512, itemsize, *narrow) <= dispatch.SMEM_BUDGET
    h = jax.ShapeDtypeStruct((64, 4096), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4096, 1000), jnp.bfloat16)
    labels = jax.ShapeDtypeStruct((64,), jnp.int32)
    with pytest.raises(ValueError, match="d_model 4096 need about .* KiB of shared memory"):
        jax.eval_shape(lambda h, w, l: softmax_cross_entropy(h, w, l, impl="pallas"), h, w, labels)
