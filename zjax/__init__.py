"""zjax: DeepSpeed for JAX.

One validated config turns a loss function and parameters into a sharded,
mixed-precision, ZeRO training step::

    cfg = zjax.load_config("configs/tiny.yaml")
    train = zjax.make_train_step(cfg, loss_fn)
    state = train.init(params_or_init_fn)
    state, metrics = train(state, batch)
"""
from zjax.checkpoint import Checkpointer, load_params
from zjax.config import Config, load_config
from zjax.errors import CheckpointError, ConfigError, LossScaleError
from zjax.layers import scan_layers
from zjax.train import TrainState, TrainStep, make_train_step

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "Config",
    "ConfigError",
    "LossScaleError",
    "TrainState",
    "TrainStep",
    "load_config",
    "load_params",
    "make_train_step",
    "scan_layers",
]
