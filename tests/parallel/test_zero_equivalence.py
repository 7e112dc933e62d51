"""Every ZeRO stage trains exactly like a plain single-device optax loop."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gpt_helpers import gpt_params, gpt_train, rel_norm, tiny_config, token_batches
from zjax.models import gpt_loss

STEPS = 10
LR, WD, CLIP = 3e-3, 0.1, 1.0
COMMON = (f"optimizer.lr={LR}", f"optimizer.weight_decay={WD}", f"gradient_clipping={CLIP}", "precision.compute_dtype=float32")


def reference_run(batches):
    """Hand-written: one device, whole global batch, adamw, DeepSpeed-style clipping."""
    cfg = tiny_config(*COMMON)
    graphdef, params = gpt_params(cfg)
    # decay only matrices: a stacked norm scale [layers, d] is a vector per layer
    mask = jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim - (1 if "blocks" in jax.tree_util.keystr(path) else 0) >= 2, params
    )
    tx = optax.adamw(LR, b1=cfg.optimizer.b1, b2=cfg.optimizer.b2, eps=cfg.optimizer.eps, weight_decay=WD, mask=mask)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch):
        loss, grads = jax.value_and_grad(lambda p: gpt_loss(nnx.merge(graphdef, p), batch)[0])(params)
        norm = optax.tree.norm(grads)
        grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, CLIP / (norm + 1e-6)), grads)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    losses = []
    for b in batches:
        params, opt, loss = step(params, opt, b)
        losses.append(float(loss))
    return np.array(losses), params


@pytest.fixture(scope="module")
def reference():
    batches = token_batches(STEPS, 16, 32)
    return batches, *reference_run(batches)


def run_zjax(batches, *overrides):
    train, state = gpt_train(*COMMON, *overrides)
    losses = []
    for b in batches:
        state, metrics = train(state, b)
        losses.append(float(metrics["loss"]))
    return np.array(losses), state.params


def assert_close(losses, params, ref_losses, ref_params):
    np.testing.assert_array_less(np.abs(losses - ref_losses) / np.abs(ref_losses), 1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params)):
        rel = rel_norm(a, b)
        assert rel < 1e-5, (jax.tree_util.keystr(path), rel)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("accum", [1, 2])
def test_stage_matches_plain_optax(reference, stage, accum):
    batches, ref_losses, ref_params = reference
    losses, params = run_zjax(batches, f"zero.stage={stage}", f"batch.grad_accum_steps={accum}")
    assert losses[-1] < losses[0]
    assert_close(losses, params, ref_losses, ref_params)


@pytest.mark.parametrize("stage", [2, 3])
def test_micro_1_accum_8_equals_micro_8_accum_1(stage):
    batches = token_batches(3, 64, 32, seed=1)
    base = (f"zero.stage={stage}", "batch.global_batch_size=64")
    a_losses, a_params = run_zjax(batches, *base, "batch.grad_accum_steps=8")
    b_losses, b_params = run_zjax(batches, *base, "batch.grad_accum_steps=1")
    assert_close(a_losses, a_params, b_losses, b_params)
