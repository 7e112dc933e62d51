"""zjax from your own JAX code: a plain-pytree MLP trained with ZeRO-3 on 8 simulated devices.

Run: .venv/bin/python examples/quickstart.py
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np

import zjax

cfg = zjax.load_config(
    {
        # DeepSpeed's words work as they are ...
        "train_batch_size": 64,
        "gradient_accumulation_steps": 2,
        "zero_optimization": {"stage": 3, "overlap_comm": True},
        "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
        "gradient_clipping": 1.0,
        # ... next to zjax's own keys
        "steps": 50,
    }
)


def init(rng):
    k1, k2 = jax.random.split(rng)
    return {"w1": jax.random.normal(k1, (16, 64)) * 0.2, "w2": jax.random.normal(k2, (64, 1)) * 0.2}


def loss_fn(params, batch):
    hidden = jax.nn.gelu(batch["x"].astype(params["w1"].dtype) @ params["w1"])
    pred = (hidden @ params["w2"]).astype(jnp.float32)[:, 0]
    return jnp.mean(jnp.square(pred - batch["y"]))


train = zjax.make_train_step(cfg, loss_fn)
state = train.init(init)  # runs under jit: each device only ever holds its shard
rng = np.random.default_rng(0)
for step in range(cfg.steps):
    x = rng.normal(size=(train.global_batch_size, 16)).astype(np.float32)
    state, metrics = train(state, {"x": x, "y": np.sin(x.sum(axis=1))})
    if step % 10 == 0 or step == cfg.steps - 1:
        print(step, {k: round(float(v), 4) for k, v in metrics.items()})
print("micro-batch per device:", train.micro_batch_size, "accumulation:", train.grad_accum_steps)
print("w1 master shard on one device:", state.master["w1"].addressable_shards[0].data.shape)
