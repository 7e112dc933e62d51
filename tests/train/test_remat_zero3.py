"""Remat policies compose with ZeRO-3: same numbers, and gathered layers are never saved."""
import jax
import numpy as np
import pytest

from gpt_helpers import gpt_train, token_batches
from zjax.analysis import hlo


def first_step(policy):
    train, state = gpt_train("zero.stage=3", f"remat.policy={policy}")
    batch = token_batches(1, 16, 32)[0]
    text = train.lower(state, batch).compile().as_text()
    state, metrics = train(state, batch)
    return train, float(metrics["loss"]), float(metrics["grad_norm"]), hlo.collectives(text, 8)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_policy_gives_same_step_and_regathers_layers(policy):
    train, loss_none, norm_none, _ = first_step("none")
    _, loss, norm, found = first_step(policy)
    np.testing.assert_allclose([loss, norm], [loss_none, norm_none], rtol=1e-5)
    layers = train.config.model.n_layers
    gathers_in_loop = sum(c.runs for c in found if c.kind == "all-gather" and c.runs >= layers)
    stacked_leaves = sum(lay.stacked for lay in jax.tree.leaves(train.layouts, is_leaf=lambda x: hasattr(x, "stacked")))
    assert gathers_in_loop == 2 * layers * stacked_leaves
