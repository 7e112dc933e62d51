"""On a GPU: the Pallas kernels compiled by Triton match their references on the awkward
shapes of the interpret-mode tests, and the reference GPT trains the same with them as with XLA.

These run only where JAX sees a GPU (``make gpu-check`` runs them with ``ZJAX_REQUIRE_GPU=1``,
where no GPU is a failure, not a skip). Errors are ``|out - ref| / |ref|`` against a
float32 reference at ``highest`` matmul precision: Triton's float32 dots may use TF32.
"""
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import attention_reference, flash_attention

pytestmark = pytest.mark.gpu
TOLERANCE = {jnp.float32: 2e-3, jnp.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def gpu():
    if jax.default_backend() != "gpu":
        message = f"needs a GPU; the default JAX backend is {jax.default_backend()!r}"
        if os.environ.get("ZJAX_REQUIRE_GPU") == "1":
            pytest.fail(message)
        pytest.skip(message)


def relative(x, ref) -> float:
    """Largest error over the largest reference magnitude (at least 1): a gradient that is
    exactly 0 in the reference (one key per query) is met by TF32 noise, not by 0."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(x - ref).max() / max(1.0, np.abs(ref).max()))


def test_flash_attention_pallas_matches_reference_on_awkward_shapes():
    from test_kernels_attention import CASES, inputs
    for name, case in CASES.items():
        batch, q_len, kv_len, heads, kv_heads, head_dim, causal, segments, blocks, dtype = case
        q, k, v, segment_ids, cotangent = inputs(batch, q_len, kv_len, heads, kv_heads, head_dim,
                                                 segments, dtype)

        def run(attention, *xs):
            out, vjp = jax.vjp(attention, *xs)
            return (out, *vjp(cotangent.astype(out.dtype)))

        got = jax.jit(lambda q, k, v: run(lambda *x: flash_attention(
            *x, causal=causal, segment_ids=segment_ids, impl="pallas", block_sizes=blocks), q, k, v))(q, k, v)
        with jax.default_matmul_precision("highest"):
            up = [x.astype(jnp.float32) for x in (q, k, v)]
            want = jax.jit(lambda q, k, v: run(lambda *x: attention_reference(
                *x, causal=causal, segment_ids=segment_ids), q, k, v))(*up)
        for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            assert relative(g, w) <= TOLERANCE[dtype], f"{name} {what}: {relative(g, w):.2e}"


def test_gpt_trains_the_same_with_pallas_kernels_as_with_xla():
    import zjax
    from zjax.models.gpt import gpt_loss, make_gpt

    losses = {}
    for kernels in ("pallas", "xla"):
        cfg = zjax.load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml", [f"kernels={kernels}", "precision.compute_dtype=bfloat16",
                                                     "zero.stage=0"])
        train = zjax.make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model, seed=0, kernels=kernels))
        state = train.init()
        rng = np.random.default_rng(0)
        batch = train.shard_batch({"tokens": rng.integers(0, cfg.model.vocab_size,
                                                          (train.global_batch_size, cfg.data.seq_len + 1),
                                                          dtype=np.int32)})
        losses[kernels] = []
        for _ in range(4):
            state, metrics = train(state, batch)
            losses[kernels].append(float(metrics["loss"]))
    assert losses["pallas"][-1] < losses["pallas"][0]
    np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=2e-2)
