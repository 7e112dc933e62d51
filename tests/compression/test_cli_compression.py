"""``zjax train`` with a compression config, ``zjax compress clean`` and serving what they write."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from gpt_helpers import xla_flags
from zjax.checkpoint import load_params
from zjax.cli import main
from zjax.compression import clean
from zjax.inference.engine import Engine
from zjax.inference.sampling import SamplingParams
from zjax.models.gpt import count_params

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
PRUNE = ["compression.row_pruning=[{modules: [mlp/w_up], related_modules: [mlp/w_down], dense_ratio: 0.5, "
         "schedule_offset: 1}]",
         # DeepSpeed's learned-score head pruning beside magnitude row pruning
         "compression.head_pruning=[{modules: [attn/wo], related_modules: ['attn/w[qkv]'], dense_ratio: 0.5, "
         "num_heads: 4, num_kv_heads: 2, schedule_offset: 1, method: topk}]"]


def _zjax(*args, timeout=300):
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "zjax", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned")
    result = _zjax("train", TINY, "steps=3", "eval_every=0", f"output_dir={out}", *PRUNE)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def greedy(engine, n=8):
    return engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=n, temperature=0.0))[0].token_ids


def test_compress_clean_writes_a_smaller_model_that_generates_the_same(pruned_run, tmp_path, capsys):
    to = tmp_path / "clean"
    assert main(["compress", "clean", str(pruned_run), "--to", str(to)]) == 0
    printed = capsys.readouterr().out
    params = load_params(pruned_run / "checkpoints")
    small = Engine.from_safetensors(to / "model.safetensors", _config(to).model)
    cfg = _config(to).model
    assert (cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (88, 2, 2, 16)
    assert count_params(cfg) == clean.parameter_count(small.params)
    assert f"{clean.parameter_count(params):,} -> {count_params(cfg):,} parameters" in printed
    assert greedy(small) == greedy(Engine.from_checkpoint(pruned_run))
    # generate reads it with its config
    assert main(["generate", str(to / "model.safetensors"), "--config", str(to / "config.yaml"), "--prompt", "def",
                 "--max-tokens", "4"]) == 0


def _config(directory):
    import zjax

    return zjax.load_config(directory / "config.yaml")


def test_train_distills_a_layer_reduced_student_from_a_run(pruned_run, tmp_path):
    out = tmp_path / "student"
    result = _zjax("train", TINY, "steps=2", "eval_every=2", f"output_dir={out}", "model.n_layers=1",
                   "compression.layer_reduction.enabled=true", "compression.layer_reduction.teacher_layer=[1]",
                   f"compression.distillation.teacher={pruned_run}", "compression.distillation.alpha=0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all("kd" in r and "task" in r and r["kd"] >= 0 for r in steps)
    # the reported validation loss is the student's own cross entropy
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2]
    saved = load_params(out / "checkpoints")
    teacher = load_params(pruned_run / "checkpoints")
    assert set(saved) == {"student", "teacher"}
    np.testing.assert_array_equal(saved["teacher"]["blocks"]["mlp"]["w_up"], teacher["blocks"]["mlp"]["w_up"])
    assert jax.tree.leaves(saved["student"]["blocks"])[0].shape[0] == 1
    assert len(greedy(Engine.from_checkpoint(out), 4)) == 4  # serves the student


def test_a_layer_reduction_without_teacher_and_a_mismatched_student_are_clear_errors(pruned_run, tmp_path):
    result = _zjax("train", TINY, "steps=1", f"output_dir={tmp_path / 'a'}", "compression.layer_reduction.enabled=true",
                   "compression.layer_reduction.teacher_layer=[0, 1]")
    assert result.returncode != 0 and "compression.distillation.teacher" in result.stderr
    result = _zjax("train", TINY, "steps=1", f"output_dir={tmp_path / 'b'}", "compression.layer_reduction.enabled=true",
                   "compression.layer_reduction.teacher_layer=[1]", f"compression.distillation.teacher={pruned_run}")
    assert result.returncode != 0 and "model.n_layers=2" in result.stderr
    assert "Traceback" not in result.stderr
