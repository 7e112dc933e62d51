"""The README's Flax NNX block runs as written, and zjax reads the logical axes it declares."""
import re
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

ROOT = Path(__file__).resolve().parents[2]
HEADING = "### Flax NNX: declaring logical axes"


@pytest.fixture(scope="module")
def readme_block():
    """The names the README's NNX block defines, after running it (one ZeRO-3 step on 8 devices)."""
    section = (ROOT / "README.md").read_text().split(HEADING, 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    names = {}
    exec(compile(code, "README.md (Flax NNX block)", "exec"), names)
    return names


def test_eager_sharding_without_a_mesh_is_the_error_the_readme_avoids():
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
    with pytest.raises(ValueError, match="auto mesh context"):
        nnx.Linear(16, 64, kernel_init=init, rngs=nnx.Rngs(0))


def test_the_declared_axes_are_read(readme_block):
    train = readme_block["train"]
    assert train.adapter.logical_axes(None) == {
        "up": {"kernel": ("embed", "mlp"), "bias": ()},
        "down": {"kernel": ("mlp", "embed"), "bias": ()},
        "layers": ("layers", "mlp", "mlp"),
    }
    # 'layers' first makes a scanned stack: ZeRO-3 splits each layer's (64, 64) over 8 devices.
    assert train.layouts["layers"].stacked and train.layouts["layers"].local_shape == (4, 8, 64)
    assert not train.layouts["up"]["kernel"].stacked
    assert train.state_sharding.master["layers"].spec == P(None, "data")


def test_the_block_trains(readme_block):
    train, state, metrics = readme_block["train"], readme_block["state"], readme_block["metrics"]
    x = readme_block["x"]
    batch = {"x": x, "y": np.sin(x.sum(axis=1))}
    losses = [float(metrics["loss"])]
    for _ in range(2):
        state, metrics = train(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert losses[2] < losses[0]
    assert state.params["layers"].shape == (4, 64, 64)
