"""Frozen parameters (issue 12, item 4): ``make_train_step(..., trainable=...)`` trains a subset.

Frozen leaves stay bit for bit, hold no master copy or optimizer state, move no gradient bytes,
live in the compute dtype (split over ``data`` at ZeRO-3) and round-trip through checkpoints; the
trainable ones equal a single-device optax loop that trains only them."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import third_party_models as tpm
import zjax
from gpt_helpers import device0_bytes
from zjax.analysis.hlo import collective_bytes

N = 8
STEPS = 3


def only_blocks(path, leaf):
    """Train the blocks; freeze the embedding, final norm and head (a plain predicate on the path)."""
    return path[0] == "layers"


def step_for(stage, trainable=only_blocks, *overrides):
    model = tpm.init_nnx_loop()
    train = zjax.make_train_step(tpm.zero_config(stage, *overrides), tpm.nnx_loop_loss, model=model,
                                 optimizer=optax.adam(1e-3), trainable=trainable)
    return train, train.init(), model


def reference():
    """optax over the blocks only (multi_transform with set_to_zero for the rest)."""
    given = tpm.init_nnx_loop()
    params = tpm.plain_params(given)
    labels = {k: jax.tree.map(lambda _: "train" if k == "layers" else "frozen", v) for k, v in params.items()}
    tx = optax.multi_transform({"train": optax.adam(1e-3), "frozen": optax.set_to_zero()}, labels)
    return params, tpm.optax_loop(params, tpm.plain_loss(given, tpm.nnx_loop_loss), tx, tpm.lm_batches(STEPS))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_frozen_params_stay_and_the_rest_trains_as_optax(stage):
    initial, (ref_losses, ref_params) = reference()
    train, state, _ = step_for(stage)
    losses = []
    for batch in tpm.lm_batches(STEPS):
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    params = jax.device_get(state.params)
    for key in ("embed", "final_norm", "head"):
        for a, b in zip(jax.tree.leaves(params[key]), jax.tree.leaves(initial[key])):
            np.testing.assert_array_equal(a, b)  # bit for bit
    for a, b in zip(jax.tree.leaves(params["layers"]), jax.tree.leaves(ref_params["layers"])):
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5  # as tests/train/test_third_party_models.py
    # nothing of the frozen leaves in the master copy or the optimizer state
    frozen_count = sum(x.size for k in ("embed", "final_norm", "head") for x in jax.tree.leaves(initial[k]))
    psi = sum(x.size for x in jax.tree.leaves(initial))
    trained = psi - frozen_count
    per_param = {0: 12, 1: 4 + 8 / N, 2: 4 + 8 / N, 3: 12 / N}[stage]
    frozen_bytes = 4 * frozen_count / (N if stage == 3 else 1)
    expected = per_param * trained + frozen_bytes
    assert abs(device0_bytes(state) - expected) / expected < 0.01, (device0_bytes(state), expected)


def test_frozen_params_move_no_gradient_bytes():
    train, state, _ = step_for(2)
    psi_trained = sum(x.size for x in jax.tree.leaves(tpm.plain_params(tpm.init_nnx_loop())["layers"]))
    hlo = train.lower(state, tpm.lm_batches(1)[0]).compile().as_text()
    moved = collective_bytes(hlo, N)
    g = 4 * psi_trained * (N - 1) / N
    assert abs(moved["reduce-scatter"] - g) / g < 0.01 and abs(moved["all-gather"] - g) / g < 0.01, (moved, g)


def test_frozen_params_are_kept_in_the_compute_dtype_and_split_at_stage_3():
    train, state, _ = step_for(3, only_blocks, "precision.compute_dtype=bfloat16")
    head = state.frozen["head"]["kernel"]
    assert head.dtype == jnp.bfloat16 and state.replicated is None
    assert head.sharding.spec != jax.sharding.PartitionSpec()  # split over data
    assert not jax.tree.leaves(state.master["head"]) and not jax.tree.leaves(state.frozen["layers"])


def test_nnx_filters_pytrees_of_bools_and_bad_filters():
    lora_like = nnx.PathContains("layers")
    train, state, _ = step_for(1, lora_like)
    assert state.frozen["head"]["kernel"] is not None and not jax.tree.leaves(state.frozen["layers"])
    tree = {"embed": False, "final_norm": False, "head": False, "layers": True}
    train2, state2, _ = step_for(1, tree)
    assert jax.tree.structure(state2.frozen) == jax.tree.structure(state.frozen)
    with pytest.raises(zjax.ConfigError, match="selects none of the"):
        step_for(1, lambda path, leaf: False)
    with pytest.raises(zjax.ConfigError, match="does not match the params' tree"):
        step_for(1, {"embed": False})


def test_a_checkpoint_keeps_frozen_params_across_stages(tmp_path):
    train, state, _ = step_for(3)
    state, _ = train(state, tpm.lm_batches(1)[0])
    ckpt = zjax.Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, state)
    ckpt.wait()
    saved = jax.device_get(state.params)
    fresh = zjax.make_train_step(tpm.zero_config(1), tpm.nnx_loop_loss, model=tpm.init_nnx_loop(seed=5),
                                 optimizer=optax.adam(1e-3), trainable=only_blocks)
    restored, _ = ckpt.restore(fresh)
    for a, b in zip(jax.tree.leaves(jax.device_get(restored.params)), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)
    assert not jax.tree.leaves(restored.frozen["layers"]) and not jax.tree.leaves(restored.replicated["head"])
    ckpt.close()
    fresh(restored, tpm.lm_batches(1)[0])


def test_a_plain_pytree_with_a_python_loop_seam_freezes_at_stage_3():
    """A dict model through zjax.layer, its embedding and head frozen: frozen leaves are gathered per
    block like trainable ones, and only the blocks change."""
    given = tpm.init_dict_layer()
    train = zjax.make_train_step(tpm.zero_config(3), tpm.dict_layer_loss, optimizer=optax.adam(1e-3),
                                 trainable=lambda path, leaf: path[0] == "blocks")
    state = train.init(given)
    for batch in tpm.lm_batches(2):
        state, _ = train(state, batch)
    params = jax.device_get(state.params)
    np.testing.assert_array_equal(params["head"], np.asarray(given["head"]))
    assert not np.array_equal(params["blocks"][0]["w1"], np.asarray(given["blocks"][0]["w1"]))
