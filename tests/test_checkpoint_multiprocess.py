"""Two processes (4 simulated devices each) save; one process with 8 devices restores."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import zjax
from gpt_helpers import token_batches, xla_flags
from zjax.distributed import free_local_port
from zjax.models import gpt_loss, make_gpt

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]),
                           initialization_timeout=60)
sys.path.insert(0, "tests")
import zjax
from gpt_helpers import token_batches
from zjax.models import gpt_loss, make_gpt
cfg = zjax.load_config("configs/tiny.yaml", ["zero.stage=3"])
train = zjax.make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model))
assert train.data_size == 8 and jax.process_count() == 2
state = train.init()
batches = token_batches(3, 16, 32)
for b in batches[:2]:
    state, _ = train(state, b)
ckpt = zjax.Checkpointer(sys.argv[3])
ckpt.save(2, state, extra={"step": 2})
ckpt.wait()
_, metrics = train(state, batches[2])
if jax.process_index() == 0:
    print("NEXT_LOSS", float(metrics["loss"]))
ckpt.close()
"""


def test_two_process_save_restores_on_one_process(tmp_path):
    env = {**os.environ, "XLA_FLAGS": xla_flags(4), "JAX_PLATFORMS": "cpu"}
    address = f"127.0.0.1:{free_local_port()}"
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, address, str(i), str(tmp_path)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300))
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    next_loss = float(outputs[0][0].split("NEXT_LOSS")[1].split()[0])

    cfg = zjax.load_config("configs/tiny.yaml", ["zero.stage=1"])
    train = zjax.make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model))
    state, extra = zjax.Checkpointer(tmp_path).restore(train)
    assert extra == {"step": 2}
    assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(state.params), zjax.load_params(tmp_path)))
    _, metrics = train(state, token_batches(3, 16, 32)[2])
    assert float(metrics["loss"]) == pytest.approx(next_loss, rel=1e-5)
