"""The training step and what it is made of: ``step`` (``make_train_step``, ``TrainStep``,
``TrainState``), ``adapters`` (NNX, Linen, pytrees, ``trainable=``), ``optim``, ``loss_scale``,
and ``loop`` (the ``zjax train`` run: data, evaluation, checkpoints, signals)."""
from zjax.train.step import METRICS, TrainState, TrainStep, make_train_step

__all__ = ["METRICS", "TrainState", "TrainStep", "make_train_step"]
