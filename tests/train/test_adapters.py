"""Flax Linen params, plain pytrees with an rng, and user optimizers train through one step."""
import logging

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zjax


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.3)
        h = nn.Dense(24, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")))(x)
        return nn.Dense(3, kernel_init=nn.with_logical_partitioning(init, ("mlp", "vocab")))(jnp.tanh(h))


def config(*overrides):
    return zjax.load_config("configs/tiny.yaml", ["batch.global_batch_size=16", "gradient_clipping=0.5", *overrides])


def data(steps):
    rng = np.random.default_rng(0)
    return [
        {"x": rng.normal(size=(16, 5)).astype(np.float32), "y": rng.integers(0, 3, 16).astype(np.int32)}
        for _ in range(steps)
    ]


def reference(loss, params, tx, batches, clip=0.5):
    opt = tx.init(params)
    losses = []
    for b in batches:
        value, grads = jax.value_and_grad(loss)(params, b)
        norm = optax.tree.norm(grads)
        grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, clip / (norm + 1e-6)), grads)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        losses.append(float(value))
    return losses, params


def test_linen_boxed_params_with_user_optimizer_match_reference():
    module = LinenMLP()
    boxed = module.init(jax.random.key(0), jnp.ones((1, 5)))["params"]
    plain = nn.meta.unbox(boxed)

    def loss(params, batch):
        logits = module.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    batches = data(4)
    ref_losses, ref_params = reference(loss, plain, optax.sgd(0.1, momentum=0.9), batches)
    train = zjax.make_train_step(config("zero.stage=3"), loss, optimizer=optax.sgd(0.1, momentum=0.9))
    state = train.init(boxed)
    losses = []
    for b in batches:
        state, metrics = train(state, b)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), state.params, ref_params)
    assert jax.tree.structure(state.params) == jax.tree.structure(plain)


def test_rng_argument_gets_fresh_deterministic_keys():
    def loss(params, batch, rng):
        keep = jax.random.bernoulli(rng, 0.5, batch["x"].shape)
        return jnp.mean(jnp.square(jnp.where(keep, batch["x"], 0.0) @ params["w"]))

    def run(seed):
        train = zjax.make_train_step(config("zero.stage=2", "batch.grad_accum_steps=2"), loss)
        state = train.init({"w": jnp.ones((5, 2))}, rng=jax.random.key(seed))
        out = []
        for b in data(3):
            state, metrics = train(state, b)
            out.append(float(metrics["loss"]))
        return out

    first, again, other = run(0), run(0), run(1)
    assert first == again
    assert first != other


def test_bad_inputs_raise_config_errors():
    with pytest.raises(zjax.ConfigError, match="loss_fn"):
        zjax.make_train_step(config(), "not a function")
    with pytest.raises(zjax.ConfigError, match="model"):
        zjax.make_train_step(config(), lambda p, b: 0.0, model=object())
    train = zjax.make_train_step(config(), lambda p, b: jnp.sum(p["w"]) * jnp.mean(b["x"]))
    state = train.init({"w": jnp.ones((5,))})
    with pytest.raises(zjax.ConfigError, match="global_batch_size=16"):
        train(state, {"x": np.ones((12, 5), np.float32)})


def test_zero3_stacked_param_used_outside_scan_layers_is_gathered_whole_and_said_so(caplog):
    train = zjax.make_train_step(
        config("zero.stage=3"), lambda p, b: jnp.sum(p["w"][0]) * jnp.mean(b["x"]), logical_axes={"w": ("layers", "embed")}
    )
    state = train.init({"w": jnp.ones((2, 4))})
    with caplog.at_level(logging.WARNING, logger="zjax"):
        state, metrics = train(state, {"x": np.ones((16, 5), np.float32)})
    assert float(metrics["loss"]) == pytest.approx(4.0)
    said = [r.getMessage() for r in caplog.records if "zjax.scan_layers" in r.getMessage()]
    assert len(said) == 1 and "gathers each stack whole" in said[0]

class DropoutMLP(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(5, 3, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.linear(self.dropout(x))


def dropout_loss(model, batch):
    return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]).mean()


def test_an_nnx_model_with_dropout_draws_a_new_mask_each_step():
    """NNX RNG streams are reseeded from the step's key (the module mutating its dropout counter
    inside the step is fine): with lr 0 the same batch gives a different loss at every step, and
    the same losses at stages 0 and 3."""
    batch = data(1)[0]
    runs = []
    for stage in (0, 3):
        model = DropoutMLP(nnx.Rngs(0, dropout=1))
        train = zjax.make_train_step(config(f"zero.stage={stage}"), dropout_loss, model=model,
                                     optimizer=optax.sgd(0.0))
        state = train.init()
        losses = []
        for _ in range(3):
            state, metrics = train(state, batch)
            losses.append(float(metrics["loss"]))
        runs.append(losses)
    assert len(set(runs[0])) == 3, runs[0]
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-6)
