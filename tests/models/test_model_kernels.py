"""The reference GPT through Pallas kernels (interpret mode) trains like plain XLA under ZeRO-3."""
import jax
import numpy as np
import pytest
from flax import nnx

import zjax
from gpt_helpers import token_batches
from zjax.models import gpt_loss, make_gpt
from zjax.models.gpt import ACTIVATION_NAMES


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


def test_interpret_model_runs_every_kernel_forward_and_backward():
    cfg = zjax.load_config("configs/tiny.yaml", ["kernels=interpret"])
    graphdef, params = nnx.split(make_gpt(cfg.model, kernels="interpret"))
    batch = {"tokens": np.zeros((2, 9), np.int32)}
    jaxpr = str(jax.make_jaxpr(jax.grad(
        lambda p: gpt_loss(nnx.merge(graphdef, p), batch)[0]))(params))
    kernels = ("rms_norm_fwd", "rms_norm_bwd", "flash_attention_fwd", "flash_attention_dq",
               "flash_attention_dkv", "swiglu_fwd", "swiglu_bwd", "cross_entropy_fwd",
               "cross_entropy_dhidden", "cross_entropy_dw")
    assert [k for k in kernels if f"zjax_{k}" not in jaxpr] == []
    # The gate and up projections live inside the fused SwiGLU: only they lose their tag.
    tagged = {name for name in ACTIVATION_NAMES if f"name[name={name}]" in jaxpr}
    assert tagged == set(ACTIVATION_NAMES) - {"mlp_gate", "mlp_up"}


def test_unknown_kernel_choice_is_a_config_error():
    with pytest.raises(zjax.ConfigError, match="kernels"):
        zjax.load_config("configs/tiny.yaml", ["kernels=cuda"])
