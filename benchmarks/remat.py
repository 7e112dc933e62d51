"""Remat policies on the reference GPT at sequence length 512: memory, FLOPs, step time.

For each policy this prints what ``zjax.analysis.activations.remat_report`` measures: the activation
bytes the backward pass keeps (saved residuals of every layer, per device), the
compiled step's temp bytes and FLOPs, and the median step time, each relative to
``none``. It checks the issue's target for ``selective``: at least 40% less
activation memory for at most 10% more FLOPs.

It runs on one CPU device; offload policies run there but save nothing (host and
device are the same memory), so they are left out by default.

Usage:
  .venv/bin/python benchmarks/remat.py [--d-model 128] [--layers 4] [--seq 512]
      [--batch 4] [--repeats 5] [--steps 3] [--policies none,selective,full,dots]
      [--names mlp_gate=save,...]   # with custom in --policies
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from zjax import load_config, make_train_step
from zjax.models.gpt import gpt_loss, make_gpt
from zjax.analysis.activations import format_report, remat_report

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    policies = args.policies.split(",")
    names = dict(pair.split("=") for pair in args.names.split(",")) if args.names else {}
    print(f"$ {shlex.join(['python', *sys.argv])}")
    cfg = make_config(args, "none", {})
    m = cfg.model
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s); GPT d_model {m.d_model}, "
          f"{m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} kv), d_ff {m.d_ff}, vocab {m.vocab_size}, "
          f"seq {args.seq}, batch {args.batch}, float32, ZeRO stage 0")
    batch = {"tokens": np.random.default_rng(0).integers(0, m.vocab_size, (args.batch, args.seq + 1), np.int32)}

    runs = {}
    for policy in policies:
        train = make_train_step(make_config(args, policy, names if policy == "custom" else {}), gpt_loss,
                                model=make_gpt(cfg.model, seed=0))
        state = train.init()
        runs[policy] = (train, state, remat_report(train, state, batch))
    times = step_times(runs, batch, args.repeats, args.steps)

    print(format_report(report for _, _, report in runs.values()))
    base = runs[policies[0]][2]
    print(f"\nrelative to {base.policy}:")
    print(f"{'policy':<18}{'saved act.':>12}{'temp bytes':>12}{'FLOPs':>10}{'step time':>12}")
    for policy, (_, _, report) in runs.items():
        print(f"{policy:<18}{report.saved_bytes / base.saved_bytes:>12.3f}{report.temp_bytes / base.temp_bytes:>12.3f}"
              f"{report.flops / base.flops:>10.3f}{times[policy] / times[policies[0]]:>12.3f}")
    print(f"(median step times: {', '.join(f'{p} {t * 1e3:.0f} ms' for p, t in times.items())})")
    if "selective" in runs and base.policy == "none":
        sel = runs["selective"][2]
        memory = 1 - sel.saved_bytes / base.saved_bytes
        temp = 1 - sel.temp_bytes / base.temp_bytes
        flops = sel.flops / base.flops - 1
        met = memory >= 0.40 and flops <= 0.10
        print(f"\ntarget for selective (>= 40% less activation memory, <= 10% more FLOPs): "
              f"{memory:.1%} less saved activations ({temp:.1%} less temp), {flops:+.1%} FLOPs: "
              f"{'met' if met else 'NOT met'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=128, help="model width")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks")
    parser.add_argument("--seq", type=int, default=512, help="sequence length")
    parser.add_argument("--batch", type=int, default=4, help="global batch (sequences)")
    parser.add_argument("--repeats", type=int, default=5, help="timing windows per policy")
    parser.add_argument("--steps", type=int, default=3, help="steps per timing window")
    parser.add_argument("--policies", default="none,selective,full,dots", help="comma-separated; the first is the baseline")
    parser.add_argument("--names", default="", help="remat.names for custom, e.g. mlp_gate=save,q_proj=save")
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace, policy: str, names: dict):
    d = args.d_model
    return load_config(CONFIG, {
        "zero.stage": 0, "batch.global_batch_size": args.batch, "data.seq_len": args.seq,
        "model.max_seq_len": args.seq, "model.d_model": d, "model.n_layers": args.layers,
        "model.n_heads": max(2, d // 32), "model.n_kv_heads": max(1, d // 64), "model.d_ff": 11 * d // 4,
        "remat.policy": policy, "remat.names": names,
    })


def step_times(runs: dict, batch: dict, repeats: int, steps: int) -> dict[str, float]:
    """Median seconds per step; the policies' windows interleave so machine load hits them alike."""
    windows: dict[str, list[float]] = {policy: [] for policy in runs}
    states = {}
    for policy, (train, state, _) in runs.items():
        states[policy], _ = train(state, batch)
    for _ in range(repeats):
        for policy, (train, _, _) in runs.items():
            state = states[policy]
            start = time.perf_counter()
            for _ in range(steps):
                state, metrics = train(state, batch)
            jax.block_until_ready(metrics)
            windows[policy].append((time.perf_counter() - start) / steps)
            states[policy] = state
    return {policy: statistics.median(w) for policy, w in windows.items()}


if __name__ == "__main__":
    main()
