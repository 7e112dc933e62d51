"""ZeRO-Offload: optimizer state and ZeRO-3 shards live in pinned_host memory, results unchanged.

On CPU host and device memory are the same, so this checks the plumbing (memory
kinds, transfers, checkpoints) and the numbers, not a memory saving.
"""
import jax
import numpy as np
import pytest

import zjax
from gpt_helpers import gpt_train, token_batches
from zjax.checkpoint import Checkpointer

OFFLOAD = ("zero.offload_optimizer=cpu",)


def kinds(tree):
    return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


def run(stage, *overrides):
    train, state = gpt_train(f"zero.stage={stage}", "precision.compute_dtype=bfloat16", *overrides)
    losses = []
    for batch in token_batches(3, 16, 32):
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    return train, state, losses


@pytest.mark.parametrize("stage,extra", [(1, ()), (3, ("zero.offload_param=cpu",))])
def test_offloaded_run_is_bit_identical_and_stays_on_host(stage, extra):
    _, plain, plain_losses = run(stage)
    train, offloaded, losses = run(stage, *OFFLOAD, *extra)
    assert losses == plain_losses
    assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(offloaded.params), jax.device_get(plain.params)))
    assert kinds(offloaded.opt_state) == {"pinned_host"}
    assert kinds(offloaded.master) == {"pinned_host"}
    if stage < 3:
        assert kinds(offloaded.replicated) == {"device"}


def test_offloaded_state_keeps_memory_kinds_through_a_checkpoint(tmp_path):
    train, state, _ = run(3, *OFFLOAD, "zero.offload_param=cpu")
    ckpt = Checkpointer(tmp_path)
    ckpt.save(3, state)
    ckpt.wait()
    restored, _ = ckpt.restore(train)
    assert kinds(restored.opt_state) == kinds(restored.master) == {"pinned_host"}
    assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(restored.params), jax.device_get(state.params)))


def test_offload_config_and_deepspeed_keys():
    cfg = zjax.load_config({"train_batch_size": 16, "zero_optimization": {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True}, "offload_param": {"device": "cpu"}}})
    assert (cfg.zero.offload_optimizer, cfg.zero.offload_param) == ("cpu", "cpu")
    assert any(key == "zero_optimization.offload_optimizer.pin_memory" for key, _ in cfg.ignored)
    with pytest.raises(zjax.ConfigError, match="offload_param"):
        zjax.load_config("configs/tiny.yaml", ["zero.stage=2", "zero.offload_param=cpu"])
    with pytest.raises(zjax.ConfigError, match="nvme"):
        zjax.load_config({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}})
