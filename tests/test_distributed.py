"""Multi-process training on one machine: ``zjax.distributed`` and ``zjax train --local-processes``."""
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import zjax
from gpt_helpers import xla_flags
from zjax.distributed import _supervise, initialize
from zjax.errors import ConfigError
from zjax.train.loop import train_run

ROOT = Path(__file__).resolve().parents[1]
ZJAX = [sys.executable, "-m", "zjax"]


def losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def cli_env():
    return {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}


def test_two_processes_train_like_one_and_resume_on_one(tmp_path):
    overrides = ["steps=10", "zero.stage=3", "log_every=1", "checkpoints.every_steps=5", "checkpoints.keep=2"]
    proc = subprocess.run([*ZJAX, "train", "configs/tiny.yaml", "--local-processes", "2", *overrides,
                           f"output_dir={tmp_path / 'two'}"], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "started 2 processes (4 CPU devices each)" in proc.stdout
    train_run(zjax.load_config("configs/tiny.yaml", [*overrides, f"output_dir={tmp_path / 'one'}"]))
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(two) == len(one) == 10
    assert two == pytest.approx(one, rel=1e-5)
    assert two[-1] < two[0]

    # The two-process run's step-5 checkpoint (params and data iterator) resumes on one process.
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "10")
    train_run(zjax.load_config("configs/tiny.yaml", [*overrides, f"output_dir={tmp_path / 'resumed'}"]))
    assert losses(tmp_path / "resumed") == pytest.approx(one, rel=1e-5)


def test_one_replica_per_process_trains_like_one_process(tmp_path):
    # the hybrid mesh across hosts: ZeRO-3 inside each process, an all-reduce between them
    overrides = ["steps=4", "zero.stage=3", "log_every=1", "mesh.replica=2"]
    proc = subprocess.run([*ZJAX, "train", "configs/tiny.yaml", "--local-processes", "2", *overrides,
                           f"output_dir={tmp_path / 'two'}"], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]
    train_run(zjax.load_config("configs/tiny.yaml", ["steps=4", "zero.stage=3", "log_every=1",
                                                     f"output_dir={tmp_path / 'one'}"]))
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


def test_a_killed_process_stops_the_run_with_a_clear_error(tmp_path):
    out = tmp_path / "run"
    # one replica per process: the hybrid mesh (ZeRO inside a host, all-reduce across hosts)
    launcher = subprocess.Popen([*ZJAX, "train", "configs/tiny.yaml", "--local-processes", "2", "steps=100000",
                                 "mesh.replica=2", "log_every=1", f"output_dir={out}"], cwd=ROOT, env=cli_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = launcher.stdout.readline()
        assert first.startswith("started 2 processes"), first
        victim = int(first.split("pids")[1].split()[1])
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").exists() or len(losses(out)) < 3:
            assert time.monotonic() < deadline and launcher.poll() is None, "training never started"
            time.sleep(0.5)
        killed_at = time.monotonic()
        os.kill(victim, 9)
        rest = launcher.communicate(timeout=60)[0]
        elapsed = time.monotonic() - killed_at
    finally:
        launcher.kill()
    assert launcher.returncode == 1
    assert "error: process 1 of 2 exited with signal SIGKILL" in rest
    assert elapsed < 40


@pytest.mark.parametrize("env, match", [
    ({"ZJAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "ZJAX_NUM_PROCESSES": "2"}, "ZJAX_PROCESS_ID is not set"),
    ({"ZJAX_COORDINATOR_ADDRESS": "localhost", "ZJAX_NUM_PROCESSES": "2", "ZJAX_PROCESS_ID": "0"},
     "ZJAX_COORDINATOR_ADDRESS='localhost' is not host:port"),
    ({"ZJAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "ZJAX_NUM_PROCESSES": "two", "ZJAX_PROCESS_ID": "0"},
     "ZJAX_NUM_PROCESSES='two' is not an integer"),
    ({"ZJAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "ZJAX_NUM_PROCESSES": "2", "ZJAX_PROCESS_ID": "2"},
     r"ZJAX_PROCESS_ID=2 is out of range for ZJAX_NUM_PROCESSES=2; use 0..1"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID is not set"),
])
def test_bad_environment_names_the_variable(env, match):
    with pytest.raises(ConfigError, match=match):
        initialize(environ=env)


def test_single_process_environments_are_a_no_op():
    assert initialize(environ={}).method == "single"  # not a Cloud TPU VM
    info = initialize(environ={"ZJAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "ZJAX_NUM_PROCESSES": "1",
                               "ZJAX_PROCESS_ID": "0"})
    assert (info.process_id, info.num_processes) == (0, 1)
    assert initialize(environ={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}).num_processes == 1
    with pytest.raises(ConfigError, match="got coordinator_address but not num_processes, process_id"):
        initialize("127.0.0.1:1234")


def test_local_processes_must_divide_the_devices(tmp_path):
    proc = subprocess.run([*ZJAX, "train", "configs/tiny.yaml", "--local-processes", "3"], cwd=ROOT,
                          env=cli_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--local-processes=3 does not divide the 8 simulated devices" in proc.stderr


def test_a_process_left_running_after_its_peers_finished_is_stopped():
    procs = [subprocess.Popen(["true"]), subprocess.Popen(["sleep", "60"])]
    out = io.StringIO()
    started = time.monotonic()
    assert _supervise(procs, grace_s=1, out=out, lock=threading.Lock(), finish_timeout_s=1) == 1
    assert time.monotonic() - started < 10
    assert procs[1].returncode is not None
    assert "error: process 1 of 2 was still running 1 s after process 0 finished" in out.getvalue()
