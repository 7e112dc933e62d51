"""Reference models trained by zjax."""
from zjax.models.gpt import (
    ACTIVATION_NAMES,
    GPT,
    count_params,
    gpt_loss,
    logical_axes,
    make_gpt,
)
