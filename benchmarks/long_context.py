"""Long context: per-device compiled memory of sequence parallelism at one sequence length.

On 8 simulated CPU devices, the reference GPT (configs/tiny.yaml resized by the flags,
float32, ZeRO-0, remat none, XLA attention) is compiled (nothing runs) for data=8 (no
sequence parallelism) and for ``mesh.sequence`` = P in 2, 4, 8 (data = 8/P) with each
``sequence_parallel`` mode, at the same global batch and sequence length, so every device
holds the same number of tokens. It prints the compiled temp and argument bytes per
device (``memory_analysis()``) and temp as a ratio to data=8: what attention costs per
device when the score matrices dominate. Ulysses needs the heads to divide by P (with
8 heads all P here do).

Not yet: the issue's binary search for the longest sequence that fits a budget per
mode, tiled MLP and loss, and step times.

Usage:
  .venv/bin/python benchmarks/long_context.py [--seq 1024] [--batch 8] [--d-model 64]
      [--heads 8] [--kv-heads 4] [--layers 2]
"""
from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

from zjax import load_config, make_train_step
from zjax.models.gpt import gpt_loss, make_gpt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from zero import print_table  # noqa: E402

MODES = ("all_gather", "ulysses", "ring")


def compiled(args, *overrides) -> tuple[int, int]:
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "precision.compute_dtype=float32", "zero.stage=0", "remat.policy=none",
        f"data.seq_len={args.seq}", f"model.max_seq_len={args.seq}", f"batch.global_batch_size={args.batch}",
        f"model.d_model={args.d_model}", f"model.n_heads={args.heads}", f"model.n_kv_heads={args.kv_heads}",
        f"model.n_layers={args.layers}", *overrides])
    train = make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model))
    train.prepare()
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         train.abstract_state, train.state_sharding)
    batch = {"tokens": np.zeros((args.batch, args.seq + 1), np.int32)}
    memory = train.lower(state, batch).compile().memory_analysis()
    return int(memory.temp_size_in_bytes), int(memory.argument_size_in_bytes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"$ .venv/bin/python benchmarks/long_context.py {' '.join(argv or sys.argv[1:])}".rstrip())
    print(f"jax {jax.__version__}, {len(jax.devices())} {jax.devices()[0].platform} devices, float32; GPT d_model "
          f"{args.d_model}, {args.heads} heads ({args.kv_heads} kv), {args.layers} layers; sequence {args.seq}, "
          f"global batch {args.batch} (the same tokens per device in every row)")
    base_temp, base_arg = compiled(args)
    rows = [["data=8", f"{base_temp:,}", f"{base_arg:,}", "1.000"]]
    for p in (2, 4, 8):
        for mode in MODES:
            temp, arg = compiled(args, f"mesh.sequence={p}", f"sequence_parallel={mode}")
            rows.append([f"sequence={p} x data={8 // p} {mode}", f"{temp:,}", f"{arg:,}", f"{temp / base_temp:.3f}"])
    print_table(["variant", "temp bytes", "argument bytes", "temp x data=8"], rows)


if __name__ == "__main__":
    main()
