"""Errors zjax raises for user mistakes."""


class ConfigError(ValueError):
    """A config key, value or argument that zjax cannot use.

    The message names the key, the value received and what would work.
    """


class LossScaleError(FloatingPointError):
    """fp16 gradients overflowed at the minimum loss scale (``loss_scale.at_min: error``)."""


class CheckpointError(RuntimeError):
    """No intact checkpoint to restore, or one that does not fit the model."""
