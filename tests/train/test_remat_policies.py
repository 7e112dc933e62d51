"""Every remat policy computes the same loss and gradients; they differ in what they keep."""
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from gpt_helpers import gpt_params, gpt_train, tiny_config, token_batches
from zjax import layers
from zjax.analysis import hlo
from zjax.models import gpt_loss
from zjax.analysis.activations import remat_report
from zjax.config.remat import POLICIES, SELECTIVE_NAMES

CUSTOM = {"mlp_hidden": "save", "q_proj": "offload", "attn_out": "remat"}


@functools.lru_cache(maxsize=None)
def loss_and_grads(policy):
    cfg = tiny_config(f"remat.policy={policy}", f"remat.names={CUSTOM if policy == 'custom' else {}}")
    graphdef, params = gpt_params(cfg)
    batch = token_batches(1, 16, 32)[0]

    def loss(params):
        with layers.layer_context(cfg.remat):
            return gpt_loss(nnx.merge(graphdef, params), batch)[0]

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "none"])
def test_policy_gives_the_loss_and_gradients_of_none(policy):
    (loss, grads), (loss_none, grads_none) = loss_and_grads(policy), loss_and_grads("none")
    np.testing.assert_allclose(loss, loss_none, rtol=1e-5)
    norm, norm_none = (np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(t))) for t in (grads, grads_none))
    np.testing.assert_allclose(norm, norm_none, rtol=1e-5)
    jax.tree.map(lambda g, g0: np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-7), grads, grads_none)


def test_zero3_step_with_offloaded_names_matches_and_regathers_layers():
    train, state = gpt_train("zero.stage=3", "remat.policy=selective_offload")
    batch = token_batches(1, 16, 32)[0]
    compiled = train.lower(state, batch).compile()
    _, metrics = compiled(state, train.shard_batch(batch))
    loss_none, grads_none = loss_and_grads("none")
    norm_none = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads_none)))
    np.testing.assert_allclose([metrics["loss"], metrics["grad_norm"]], [loss_none, norm_none], rtol=1e-5)
    # Gathered parameters are not kept: each stacked leaf is gathered again per layer in the backward pass.
    layers_ = train.config.model.n_layers
    stacked = sum(lay.stacked for lay in jax.tree.leaves(train.layouts, is_leaf=lambda x: hasattr(x, "stacked")))
    found = hlo.collectives(compiled.as_text(), 8)
    assert sum(c.runs for c in found if c.kind == "all-gather" and c.runs >= layers_) == 2 * layers_ * stacked


@pytest.fixture
def report():
    """remat_report of a one-device, stage-0 train step of the tiny GPT."""
    def build(*overrides):
        train, state = gpt_train("zero.stage=0", *overrides, devices=jax.devices()[:1])
        return remat_report(train, state, token_batches(1, 16, 32)[0])

    return build


def test_saved_bytes_fall_and_flops_rise_from_none_to_selective_to_full(report):
    none, selective, full = (report(f"remat.policy={p}") for p in ("none", "selective", "full"))
    assert none.saved_bytes > selective.saved_bytes > full.saved_bytes > 0
    assert none.temp_bytes > selective.temp_bytes
    assert none.flops < selective.flops < full.flops
    assert {row.name for row in selective.rows} == {*SELECTIVE_NAMES, "layer_input"}
    assert [row.name for row in full.rows] == ["layer_input"]


def test_custom_keeps_exactly_what_it_names(report):
    kept = report("remat.policy=custom", f"remat.names={CUSTOM}")
    rows = {row.name: row for row in kept.rows}
    # layer_input stays: the scan keeps each layer's input to recompute the rest from.
    assert set(rows) == {"mlp_hidden", "q_proj", "layer_input"}
    assert (rows["mlp_hidden"].memory, rows["q_proj"].memory) == ("device", "pinned_host")
    model = tiny_config().model
    tokens = model.n_layers * 16 * 32
    assert rows["mlp_hidden"].bytes == kept.saved_bytes - rows["layer_input"].bytes == tokens * model.d_ff * 4
    assert rows["q_proj"].bytes == kept.offloaded_bytes == tokens * model.d_model * 4
