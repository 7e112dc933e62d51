"""Models written as their authors write them (tests/third_party_models.py) train through zjax:
an element-wise optimizer at every ZeRO stage equals the plain optax loop, and per-device state
bytes follow ZeRO's table (docs/architecture.md) though no layer goes through ``zjax.scan_layers``."""
import jax
import numpy as np
import optax
import pytest

import third_party_models as tpm
from gpt_helpers import device0_bytes

N = 8
STEPS = 4
RTOL = 1e-5
MODELS = tpm.MODELS
# bytes per parameter on one device in fp32 with Adam: (replicated part, part divided by N)
ZERO_TABLE = {0: (12, 0), 1: (4, 8), 2: (4, 8), 3: (0, 12)}


train_step = tpm.train_step


def test_the_models_are_what_the_tests_need():
    """A Python loop over >= 4 blocks, an indivisible vocabulary, a Linen stack named `layers`, one bare array."""
    nnx_params = tpm.plain_params(tpm.init_nnx_loop())
    assert len(nnx_params["layers"]) >= 4
    assert nnx_params["embed"]["embedding"].shape[0] % N != 0
    axes = tpm.linen_logical_axes(tpm.init_linen_scan())
    assert axes["layers"]["Dense_0"]["kernel"] == ("layers", "embed", "mlp")
    assert axes["layers"]["LayerNorm_0"]["scale"] == ("layers", "embed")
    assert tpm.plain_params(tpm.init_linen_scan())["layers"]["Dense_0"]["kernel"].shape[0] == tpm.N_LAYERS
    assert len(jax.tree.leaves(tpm.init_single())) == 1


_REFERENCES = {}


def adam_reference(model):
    """(initial params, losses, params) of the plain optax loop with Adam, computed once per model."""
    if model not in _REFERENCES:
        init, loss_fn, make_batches = MODELS[model]
        given = init()
        initial = tpm.plain_params(given)
        _REFERENCES[model] = (initial, *tpm.optax_loop(
            initial, tpm.plain_loss(given, loss_fn), optax.adam(1e-3), make_batches(STEPS)
        ))
    return _REFERENCES[model]


# The stacks scanned by Linen's nn.scan and NNX's nnx.scan (not zjax.scan_layers) included; the
# models whose loop calls zjax.layer at ZeRO-3 (where the seam gathers per block; below it is a call).
SEAM_MODELS = ("nnx_layer", "dict_layer")
ADAM_CASES = [(m, s) for m in MODELS if m not in SEAM_MODELS for s in (0, 1, 2, 3)]
ADAM_CASES += [(m, 3) for m in SEAM_MODELS]


@pytest.mark.parametrize("model,stage", ADAM_CASES)
def test_element_wise_adam_equals_plain_optax_loop(model, stage):
    initial, ref_losses, ref_params = adam_reference(model)
    train, state = train_step(model, stage, optax.adam(1e-3))
    losses = []
    for batch in MODELS[model][2](STEPS):
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    np.testing.assert_array_less(np.abs(np.array(losses) - ref_losses) / np.abs(ref_losses), RTOL)
    params = jax.device_get(state.params)
    assert jax.tree.structure(params) == jax.tree.structure(ref_params)
    for (path, a), b, p0 in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params), jax.tree.leaves(initial)
    ):
        assert np.linalg.norm(b - p0) > 1e-3 * np.linalg.norm(b), (jax.tree_util.keystr(path), "did not train")
        rel = float(np.linalg.norm(a - b) / np.linalg.norm(b))
        assert rel < RTOL, (jax.tree_util.keystr(path), rel)


@pytest.mark.parametrize("stage", sorted(ZERO_TABLE))
def test_nnx_loop_state_bytes_match_zero_table(stage):
    """fp32 AdamW (masked by ndim): within 1% of ZeRO's formula, vocabulary 257 included."""
    tx = optax.adamw(1e-3, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    _, state = train_step("nnx_loop", stage, tx)
    psi = sum(x.size for x in jax.tree.leaves(state.params))
    replicated, sharded = ZERO_TABLE[stage]
    expected = replicated * psi + sharded * psi / N
    measured = device0_bytes(state)
    assert abs(measured - expected) / expected < 0.01, (measured, expected)
