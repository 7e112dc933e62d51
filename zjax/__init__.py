"""zjax: DeepSpeed for JAX.

One validated config turns a loss function and parameters into a sharded,
mixed-precision, ZeRO training step::

    cfg = zjax.load_config("configs/tiny.yaml")
    train = zjax.make_train_step(cfg, loss_fn)
    state = train.init(params_or_init_fn)
    state, metrics = train(state, batch)

The names below load on first use, so ``import zjax.cli`` (the ``zjax`` command) starts
without importing JAX: the command can take over SIGTERM and SIGINT before the heavy
imports begin.
"""
import importlib

_EXPORTS = {
    "CheckpointError": "zjax.errors",
    "Checkpointer": "zjax.checkpoint",
    "Config": "zjax.config.schema",
    "ConfigError": "zjax.errors",
    "LossScaleError": "zjax.errors",
    "TrainState": "zjax.train.step",
    "TrainStep": "zjax.train.step",
    "load_config": "zjax.config.schema",
    "load_params": "zjax.checkpoint",
    "make_train_step": "zjax.train.step",
    "layer": "zjax.layers",
    "scan_layers": "zjax.layers",
    "shard": "zjax.parallel.sharding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    try:
        return importlib.import_module(f"zjax.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"zjax.{name}":
            raise
        raise AttributeError(f"module 'zjax' has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
