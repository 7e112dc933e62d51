"""The mesh comes from the config and the same run trains on 1 to 8 devices."""
import jax
import numpy as np
import pytest

import zjax
from gpt_helpers import token_batches
from zjax.models import gpt_loss, make_gpt


def losses_on(devices, stage):
    cfg = zjax.load_config("configs/tiny.yaml", [f"zero.stage={stage}"])
    train = zjax.make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model), devices=devices)
    state = train.init()
    out = []
    for b in token_batches(3, 16, 32):
        state, metrics = train(state, b)
        out.append(float(metrics["loss"]))
    return train, out


def test_same_losses_on_1_2_and_8_devices():
    devices = jax.devices()
    train8, on8 = losses_on(devices, 3)
    assert train8.mesh.shape == {"replica": 1, "data": 8, "stage": 1, "tensor": 1, "sequence": 1, "expert": 1}
    for n in (1, 2):
        train_n, on_n = losses_on(devices[:n], 3)
        assert train_n.mesh.shape["data"] == n
        np.testing.assert_allclose(on_n, on8, rtol=1e-5)


def test_mesh_that_does_not_match_device_count():
    cfg = zjax.load_config("configs/tiny.yaml", ["mesh.data=3"])
    with pytest.raises(zjax.ConfigError, match="mesh"):
        zjax.make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model))
