"""``mesh.replica``: ZeRO inside each replica, one all-reduce of the shards across replicas."""
import jax
import numpy as np
import pytest

from gpt_helpers import device0_bytes, gpt_train, token_batches
from zjax.analysis import hlo
from zjax.errors import ConfigError


def run(stage, replica, steps=3):
    train, state = gpt_train(f"zero.stage={stage}", f"mesh.replica={replica}")
    losses = []
    for batch in token_batches(steps, 16, 32):
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    return train, state, losses


@pytest.mark.parametrize("stage", [1, 3])
def test_replicas_train_like_one_data_axis(stage):
    flat_train, flat_state, flat_losses = run(stage, 1)
    train, state, losses = run(stage, 2)
    assert dict(train.mesh.shape) == {"replica": 2, "data": 4, "stage": 1, "tensor": 1, "sequence": 1, "expert": 1}
    assert (train.global_batch_size, train.micro_batch_size) == (16, 2)
    assert losses == pytest.approx(flat_losses, rel=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(flat_state.params))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # ZeRO shards over the 4 devices of a replica: twice the per-device state of 8-way ZeRO
    assert device0_bytes(state.opt_state) == pytest.approx(2 * device0_bytes(flat_state.opt_state), rel=0.02)


def test_replicas_all_reduce_only_the_shards():
    train, state = gpt_train("zero.stage=3", "mesh.replica=2")
    text = train.lower(state, token_batches(1, 16, 32)[0]).compile().as_text()
    found = [c for c in hlo.collectives(text, 8) if c.full_bytes > 64]  # not the loss/weight scalars
    psi = sum(x.size for x in jax.tree.leaves(state.params))
    across = [c for c in found if c.group == 2]
    inside = [c for c in found if c.group == 4]
    assert len(across) + len(inside) == len(found)
    assert {c.kind for c in across} == {"all-reduce"}
    # one all-reduce of this device's fp32 gradient shard (Psi/4, plus layout padding)
    assert sum(c.full_bytes * c.runs for c in across) == pytest.approx(4 * psi / 4, rel=0.05)
    assert {c.kind for c in inside} >= {"all-gather", "reduce-scatter"}


def test_replica_must_divide_the_devices():
    with pytest.raises(ConfigError, match="mesh"):
        gpt_train("mesh.replica=3")
