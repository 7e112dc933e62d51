"""The ``zjax`` command line: what ``train`` writes, what ``config explain`` prints, and clear errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gpt_helpers import xla_flags
from zjax.cli import main, simulate_cpu_devices

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
STEP_KEYS = ["step", "loss", "grad_norm", "lr", "loss_scale", "skipped", "tokens_per_s"]


def _zjax(*args, timeout=300):
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "zjax", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_train_writes_one_metrics_line_per_step_and_val_losses(tmp_path):
    out = tmp_path / "run"
    result = _zjax("train", str(TINY), "steps=3", "log_every=2", f"output_dir={out}")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [list(r) for r in steps] == [STEP_KEYS] * 3
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["skipped"] == 0 and r["tokens_per_s"] > 0 and r["loss"] > 0 for r in steps)
    assert [r["step"] for r in evals] == [0, 3]
    assert records[0] == evals[0] and records[-1] == evals[-1]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["steps"] == 3 and written["output_dir"] == str(out)
    assert "val loss" in result.stdout


def test_train_logs_the_moe_dropped_fraction(tmp_path):
    """A scalar the loss reports beside its weight (the MoE GPT's dropped-assignment fraction)
    is a step metric and a metrics.jsonl column."""
    out = tmp_path / "run"
    result = _zjax("train", str(TINY), "steps=2", "eval_every=0", "model.moe.num_experts=4", "model.moe.top_k=2",
                   f"output_dir={out}")
    assert result.returncode == 0, result.stderr
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [list(r) for r in steps] == [STEP_KEYS[:-1] + ["moe_dropped_fraction", "tokens_per_s"]] * 2
    assert all(0 <= r["moe_dropped_fraction"] < 1 for r in steps)


def test_explain_prints_the_effective_config_with_overrides(capsys):
    assert main(["config", "explain", str(TINY)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["zero"]["stage"] == 3
    assert main(["config", "explain", str(TINY), "zero.stage=1", "steps=7"]) == 0
    explained = capsys.readouterr().out
    assert "stage: 1" in explained
    assert yaml.safe_load(explained)["steps"] == 7


def test_explain_lists_ignored_deepspeed_keys(tmp_path, capsys):
    ds = tmp_path / "ds_config.json"
    ds.write_text(json.dumps({
        "train_batch_size": 64,
        "zero_optimization": {"stage": 2, "overlap_comm": True},
        "bf16": {"enabled": True},
    }))
    assert main(["config", "explain", str(ds)]) == 0
    explained = capsys.readouterr().out
    config = yaml.safe_load(explained)
    assert (config["zero"]["stage"], config["batch"]["global_batch_size"]) == (2, 64)
    assert config["precision"]["compute_dtype"] == "bfloat16"
    ignored = explained[explained.index("# DeepSpeed keys zjax ignores"):]
    assert "zero_optimization.overlap_comm" in ignored


def test_unknown_key_exits_2_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["config", "explain", str(TINY), "zero.stag=1"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: unknown key 'zero.stag'")


def test_unknown_key_in_a_subprocess_has_no_traceback(tmp_path):
    result = _zjax("train", str(TINY), "zero.stag=1", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "zero.stag" in result.stderr and "zero.stage" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_output_dir_that_is_a_file_is_a_config_error(tmp_path, capsys):
    taken = tmp_path / "run"
    taken.write_text("not a directory")
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(TINY), f"output_dir={taken}"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: output_dir='{taken}' is an existing file")
    assert taken.read_text() == "not a directory"


def test_pallas_kernels_without_a_pallas_backend_name_the_key_and_what_works(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(TINY), "kernels=pallas"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: kernels='pallas': the 'cpu' backend has no Pallas kernel")
    assert all(f"kernels={works}" in err for works in ("auto", "interpret", "xla"))


@pytest.mark.parametrize("environ, flags", [
    ({}, "--xla_force_host_platform_device_count=8"),
    ({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_foo"},
     "--xla_cpu_foo --xla_force_host_platform_device_count=8"),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, "--xla_force_host_platform_device_count=2"),
    ({"JAX_PLATFORMS": "cuda"}, None),
])
def test_simulated_cpu_devices_unless_a_count_or_accelerator_is_set(environ, flags):
    simulate_cpu_devices(environ)
    assert environ.get("XLA_FLAGS") == flags


def test_train_under_sequence_parallelism_matches_data_parallelism(tmp_path):
    """`zjax train` with mesh.sequence: the loop hands each device its slice of every row
    (shifted inputs and targets) and the losses are the data-parallel run's."""
    losses = {}
    for name, extra in (("data", []), ("sequence", ["mesh.sequence=2", "sequence_parallel=ring"])):
        out = tmp_path / name
        assert main(["train", str(TINY), "steps=2", "eval_every=0", "precision.compute_dtype=float32",
                     f"output_dir={out}", *extra]) == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in records if "loss" in r]
    assert losses["sequence"] == pytest.approx(losses["data"], rel=1e-5)
