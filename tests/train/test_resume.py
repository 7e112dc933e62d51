"""`zjax train` survives SIGKILL, SIGTERM and a kill during a save, and resumes bit-exactly."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import jax

from gpt_helpers import xla_flags
from zjax.checkpoint import Checkpointer, load_params

ROOT = Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, "-m", "zjax", "train", "configs/tiny.yaml", "log_every=1", "checkpoints.every_steps=4"]
ENV = {**os.environ, "XLA_FLAGS": xla_flags(8)}


def run(*args, timeout=300):
    return subprocess.run([*TRAIN, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def start(*args):
    return subprocess.Popen([*TRAIN, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def steps_logged(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return [r for r in records if "loss" in r]


def wait_for(proc, condition, timeout=240):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run("steps=16", f"output_dir={straight}")
    assert done.returncode == 0, done.stderr[-2000:]

    kill_after = random.Random(os.getpid()).randint(6, 14)
    proc = start("steps=16", f"output_dir={killed}")
    ckpts = killed / "checkpoints"
    wait_for(proc, lambda: len(steps_logged(killed)) >= kill_after and Checkpointer(ckpts).committed_steps())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    resumed = run("steps=16", f"output_dir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step" in resumed.stdout

    a, b = steps_logged(straight), steps_logged(killed)
    assert [r["step"] for r in b] == list(range(1, 17)), f"killed after {kill_after}"
    assert [r["loss"] for r in a] == [r["loss"] for r in b], f"killed after {kill_after}"
    pa, pb = load_params(straight / "checkpoints"), load_params(killed / "checkpoints")
    assert jax.tree.all(jax.tree.map(np.array_equal, pa, pb))


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path):
    proc = start("steps=500", f"output_dir={tmp_path}")
    wait_for(proc, lambda: len(steps_logged(tmp_path)) >= 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out and "saved to" in out
    last = steps_logged(tmp_path)[-1]["step"]
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == last


KILL_DURING_SAVE = """
import os, signal, sys
import zjax
from zjax.checkpoint import Checkpointer
from zjax.models import gpt_loss, make_gpt
cfg = zjax.load_config("configs/tiny.yaml")
train = zjax.make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model))
state = train.init()
ckpt = Checkpointer(sys.argv[1])
ckpt.save(1, state, extra={"step": 1})
ckpt.wait()
state, _ = train(state, {"tokens": __import__("numpy").zeros((16, 33), "int32")})
ckpt.save(2, state, extra={"step": 2})
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_kill_during_save_leaves_the_previous_step(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest_step() == 1
    assert ckpt.committed_steps() == [1]
