"""The TPU path of flash attention, run on CPU in TPU interpret mode, and TPU dispatch.

``_tpu_flash_attention`` puts our layout and semantics (grouped kv heads, lengths that
are not multiples of 128, segment ids, causal) through the upstream Mosaic kernel
``jax.experimental.pallas.ops.tpu.flash_attention``; under
``pltpu.force_tpu_interpret_mode()`` that kernel runs on CPU. Values and gradients are
compared with ``attention_reference`` in float32: 1e-5 of the largest reference
magnitude (at least 1) for outputs, 5e-5 for gradients.
"""
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import attention_reference, dispatch, flash_attention, rms_norm
from pallas_kernels.attention import _tpu_flash_attention

CASES = {
    # name: (batch, q_len, kv_len, heads, kv_heads, head_dim, causal, segments)
    "len100-gqa-causal-segments": (1, 100, 100, 4, 2, 32, True, True),
    "q37-kv150-mqa-d160": (1, 37, 150, 2, 1, 160, False, False),
}


def inputs(batch, q_len, kv_len, heads, kv_heads, head_dim, segments):
    keys = jax.random.split(jax.random.key(q_len + head_dim), 5)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim))
    k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, head_dim))
    v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, head_dim))
    segment_ids = (jnp.sort(jax.random.randint(keys[3], (batch, q_len), 0, 3), axis=1)
                   if segments else None)
    return q, k, v, segment_ids, jax.random.normal(keys[4], q.shape)


def output_and_grads(attention, q, k, v, cotangent):
    def f(q, k, v):
        out, vjp = jax.vjp(attention, q, k, v)
        return out, vjp(cotangent)
    return jax.jit(f)(q, k, v)


def assert_close(actual, expected, tol, what):
    err = float(np.abs(np.float32(actual) - np.float32(expected)).max())
    bound = tol * max(1.0, float(np.abs(np.float32(expected)).max()))
    assert err <= bound, f"{what}: max error {err} > {bound}"


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_upstream_tpu_kernel_matches_reference(case):
    batch, q_len, kv_len, heads, kv_heads, head_dim, causal, segments = case
    q, k, v, segment_ids, cotangent = inputs(batch, q_len, kv_len, heads, kv_heads, head_dim,
                                             segments)
    scale = 1 / np.sqrt(head_dim)

    def tpu(q, k, v):
        return _tpu_flash_attention(q, k, v, causal=causal, segment_ids=segment_ids, scale=scale)

    def reference(q, k, v):
        return attention_reference(q, k, v, causal=causal, segment_ids=segment_ids, scale=scale)

    with pltpu.force_tpu_interpret_mode():
        out, grads = output_and_grads(tpu, q, k, v, cotangent)
    ref, ref_grads = output_and_grads(reference, q, k, v, cotangent)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, 1e-5, "output")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.shape == r.shape
        assert_close(g, r, 5e-5, f"d{name}")


@pytest.fixture
def on_tpu(monkeypatch):
    """The default backend reported as TPU, and the fallback log forgotten."""
    monkeypatch.setattr(dispatch, "backend", lambda: "tpu")
    monkeypatch.setattr(dispatch, "_logged", set())


def test_on_tpu_auto_attention_calls_the_upstream_kernel(on_tpu):
    q, k, v, segment_ids, _ = inputs(1, 20, 20, 2, 1, 32, True)
    jaxpr = str(jax.make_jaxpr(
        lambda q, k, v, s: flash_attention(q, k, v, causal=True, segment_ids=s))(
            q, k, v, segment_ids))
    # The upstream custom_vjp is named _flash_attention; ours are zjax_flash_attention_*.
    assert re.search(r"name=_flash_attention\b", jaxpr) and "zjax_flash_attention" not in jaxpr


def test_on_tpu_blocks_that_are_not_lane_multiples_fall_back_or_raise(on_tpu, caplog):
    q = jnp.ones((1, 4, 2, 32))
    with pytest.raises(ValueError, match=r"impl='pallas' cannot serve.*64.*multiple of 128"):
        flash_attention(q, q, q, impl="pallas", block_sizes=(64, 64))
    with caplog.at_level(logging.INFO, logger="zjax"):
        out = flash_attention(q, q, q, block_sizes=(64, 64))
    np.testing.assert_array_equal(out, attention_reference(q, q, q))
    assert "multiple of 128" in caplog.text


def test_on_tpu_kernels_without_a_mosaic_kernel_fall_back_or_raise(on_tpu, caplog):
    x, scale = jnp.ones((2, 16)), jnp.ones(16)
    with pytest.raises(ValueError, match=r"rms_norm: impl='pallas' needs a backend in "
                                         r"\('gpu',\).*'tpu'"):
        rms_norm(x, scale, impl="pallas")
    with caplog.at_level(logging.INFO, logger="zjax"):
        np.testing.assert_array_equal(rms_norm(x, scale), rms_norm(x, scale, impl="xla"))
        rms_norm(x, scale)
    notes = [r.getMessage() for r in caplog.records if r.name == "zjax"]
    assert notes == ["rms_norm: impl='auto' uses the XLA reference (no Pallas kernel for "
                     "backend 'tpu')"]


def test_gpu_gets_the_triton_style_kernels_except_those_measured_slower(monkeypatch):
    monkeypatch.setattr(dispatch, "backend", lambda: "gpu")
    slower = {kernel for kernel, backend in dispatch.AUTO_PREFERS_XLA if backend == "gpu"}
    assert slower and slower < set(dispatch.KERNEL_BACKENDS)
    for kernel in dispatch.KERNEL_BACKENDS:
        assert dispatch.resolve_impl(kernel, "auto") == ("xla" if kernel in slower else "pallas")
        assert dispatch.resolve_impl(kernel, "pallas") == "pallas"
