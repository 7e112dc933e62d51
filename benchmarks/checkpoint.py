"""Checkpoint timing: time blocked in an async save, full save time, restore time.

Run: .venv/bin/python benchmarks/checkpoint.py [--mparams 8] [--repeats 5] [--stage 3]

A plain-pytree model of --mparams million fp32 parameters with AdamW (state ≈ 12
bytes per parameter: about 100 MB at the default), on 8 simulated CPU devices.
Prints medians over --repeats saves and restores into a fresh temporary directory.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

import zjax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mparams", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stage", type=int, default=3)
    args = parser.parse_args()
    print("$ " + " ".join([os.path.basename(sys.executable), *sys.argv]))

    width = 1024
    rows = int(args.mparams * 1e6 / width / 8) * 8

    def init(rng):
        return {"w": jax.random.normal(rng, (rows, width)) * 0.01, "b": jnp.zeros((width,))}

    cfg = zjax.load_config("configs/tiny.yaml", [f"zero.stage={args.stage}", "batch.global_batch_size=8"])
    train = zjax.make_train_step(cfg, lambda p, b: jnp.mean(b["x"] @ p["w"][:width]) + jnp.sum(p["b"]))
    state = train.init(init)
    total = sum(s.data.nbytes for x in jax.tree.leaves(state) for s in x.addressable_shards)
    print(f"jax {jax.__version__}, {jax.device_count()} devices, ZeRO-{args.stage}, "
          f"{rows * width + width:,} params, TrainState {total / 2**20:.1f} MiB over all devices")

    blocked, full, restore = [], [], []
    for _ in range(args.repeats):
        directory = tempfile.mkdtemp(prefix="zjax_ckpt_bench_")
        try:
            ckpt = zjax.Checkpointer(directory)
            t0 = time.perf_counter()
            ckpt.save(1, state)
            t1 = time.perf_counter()
            ckpt.wait()
            t2 = time.perf_counter()
            restored, _ = zjax.Checkpointer(directory).restore(train)
            jax.block_until_ready(restored)
            t3 = time.perf_counter()
            blocked.append(t1 - t0)
            full.append(t2 - t0)
            restore.append(t3 - t2)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    med = statistics.median
    print(f"median over {args.repeats} runs")
    print(f"  blocked in save (async): {med(blocked) * 1e3:8.1f} ms")
    print(f"  save until committed:    {med(full) * 1e3:8.1f} ms   (blocked / full = {med(blocked) / med(full):.2f})")
    print(f"  restore:                 {med(restore) * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
