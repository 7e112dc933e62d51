"""SIGTERM or SIGINT at any moment of ``zjax train`` ends it with exit 0 and the newest step saved.

``ZJAX_TEST_SIGNAL_AT=PHASE:N:SIGNAL`` makes the run signal itself the N-th time it reaches
PHASE, so each test hits one moment exactly. Most run ``train_run`` in this process (its
handler owns the signals while it runs); one runs the command for its exit status.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import zjax
from zjax.checkpoint import Checkpointer
from zjax.train.loop import SIGNAL_AT_VAR, train_run

ROOT = Path(__file__).resolve().parents[2]


def run(tmp_path, monkeypatch, signal_at, *overrides):
    monkeypatch.setenv(SIGNAL_AT_VAR, signal_at)
    cfg = zjax.load_config(ROOT / "configs" / "tiny.yaml", ["steps=4", "log_every=1", "eval_batches=2",
                                                             f"output_dir={tmp_path}", *overrides])
    return train_run(cfg)


def logged(out: Path, key: str) -> list[int]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if key in r]


@pytest.mark.parametrize("signal_at", ["start:1:SIGTERM", "eval:1:SIGINT"])
def test_a_signal_before_the_first_step_saves_nothing(tmp_path, monkeypatch, capsys, signal_at):
    result = run(tmp_path, monkeypatch, signal_at)
    assert result["stopped"] == signal_at.split(":")[2] and result["steps"] == 0
    assert "before the first step; nothing to save" in capsys.readouterr().out
    assert Checkpointer(tmp_path / "checkpoints").committed_steps() == []


@pytest.mark.parametrize("signal_at, overrides, saved", [
    ("step:3:SIGTERM", [], 3),                  # while step 3 runs: step 3 is saved, not step 4
    ("eval:2:SIGINT", ["eval_every=2"], 2),     # during the evaluation after step 2
    ("eval:2:SIGTERM", [], 4),                  # during the final evaluation
])
def test_a_signal_during_the_run_saves_the_newest_step(tmp_path, monkeypatch, capsys, signal_at, overrides, saved):
    result = run(tmp_path, monkeypatch, signal_at, *overrides)
    assert result["stopped"] == signal_at.split(":")[2] and result["steps"] == saved
    assert f"after step {saved}; saved to" in capsys.readouterr().out
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == saved
    assert logged(tmp_path, "loss") == list(range(1, saved + 1))
    assert logged(tmp_path, "val_loss") == [0]  # the evaluation a signal cut short writes nothing


def test_sigterm_during_the_final_save_exits_zero_with_the_step_saved(tmp_path):
    env = {**os.environ, SIGNAL_AT_VAR: "save:1:SIGTERM"}
    result = subprocess.run([sys.executable, "-m", "zjax", "train", "configs/tiny.yaml", "steps=3", "eval_batches=1",
                             f"output_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "SIGTERM came after the last step" in result.stdout
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 3
    assert logged(tmp_path, "val_loss") == [0, 3]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_command_starts_up_exits_zero(tmp_path, signum):
    """Before train_run owns the signals (Python start-up, importing JAX, reading the config) the
    command has trained nothing: it ends with exit 0 and says so, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "zjax", "train", str(ROOT / "configs" / "tiny.yaml"),
                             f"output_dir={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.6)  # the command's own handler is in place after ~0.1 s; importing JAX takes longer
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    assert f"stopped by {signal.Signals(signum).name} before training started" in err
    assert "Traceback" not in err
