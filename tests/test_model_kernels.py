"""The reference GPT through Pallas kernels (interpret mode) trains like plain XLA under ZeRO-3."""
import numpy as np
import pytest

import zjax
from gpt_helpers import token_batches
from zjax.models import gpt_loss, make_gpt


def two_steps(kernels):
    cfg = zjax.load_config("configs/tiny.yaml", ["zero.stage=3", f"kernels={kernels}"])
    train = zjax.make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model, kernels=kernels))
    state = train.init()
    out = []
    for batch in token_batches(2, 16, 32):
        state, metrics = train(state, batch)
        out += [float(metrics["loss"]), float(metrics["grad_norm"])]
    return out


def test_interpret_kernels_match_xla_in_the_zero3_step():
    np.testing.assert_allclose(two_steps("interpret"), two_steps("xla"), rtol=1e-5)


def test_unknown_kernel_choice_is_a_config_error():
    with pytest.raises(zjax.ConfigError, match="kernels"):
        zjax.load_config("configs/tiny.yaml", ["kernels=cuda"])
