"""Pipeline parallelism (mesh axis ``stage``, GPipe): memory, stage-axis traffic, wasted work, step time.

On 8 simulated CPU devices, the reference GPT (configs/tiny.yaml resized by the flags:
8 layers, d_model 128, seq 128 by default; float32, ZeRO-1, remat none) is built for
data=8 (no pipeline, the baseline) and for ``mesh.stage`` = P in 2, 4 (data = 8/P: the
layer stack split into P contiguous stages, embedding and head replicated on every
stage) with ``pipeline.microbatches`` = M in P, 2P, 4P (GPipe over M micro-batches,
``zjax.parallel.pipeline.gpipe``). The global batch is fixed (32 rows by default), so a
data device holds 32/(8/P) rows and a micro-batch holds 1/M of them: a larger M means
more, smaller micro-batches over the same rows. Each variant is compiled once
(``train.lower(state, batch).compile()``, the executable ``train`` then runs); for each
one this prints
- the compiled argument and temp bytes per device (XLA ``memory_analysis()``: arguments
  hold the donated TrainState and the batch, temporaries the activations kept for the
  backward pass and everything else the step allocates), temp as a ratio to data=8's;
- the bubble fraction ``bubble_fraction(P, M)`` = (P - 1) / (M + P - 1) of the M + P - 1
  ticks, and the work it costs: in this formulation every stage computes at every tick,
  on zeros in its idle ticks, so a stage's layers run (M + P - 1)/M times the useful
  work (= 1 / (1 - bubble)); next to it the matmul FLOPs per device per step counted in
  the compiled HLO (``zjax.analysis.hlo.matmul_flops``, loop trip counts included) as a
  ratio to data=8's, which also counts the head and loss that every stage repeats for
  all of its data group's rows (P times data=8's rows per device);
- the collective-permute bytes per device per step over the stage axis, from the compiled
  HLO (``zjax.analysis.hlo.collectives`` with the mesh shape: every collective-permute
  whose pair differs along ``stage``, times its loop trip count), split into those in the
  tick loop (expressed in micro-batch activations A_mb = [rows/M, seq, d_model] fp32 per
  tick; GPipe's minimum is 2, one forward shift and one backward) and those outside it
  (in local-batch activations A = [rows, seq, d_model]); and the all-reduce bytes over
  the stage axis (ring-equivalent), which a pipeline adds as well;
- the step time: every variant is initialized (``train.init()``, same seed) and given the
  same random int32 tokens [batch, seq + 1]; after one warm-up step each (its loss is
  printed: the pipelines compute the same function, so it should match data=8's to
  float32 rounding), ``--repeats`` interleaved rounds over all variants (each round
  starting one variant later) of ``--steps`` steps each, blocking on
  ``float(metrics["loss"])``; the median seconds per step and its ratio to data=8's, and
  the ratio of the fastest rounds (less hit by other load on a shared host).

What the numbers mean here: all 8 simulated devices share the host's CPU cores (2 on the
machine this was written on), so the stages do not run concurrently on separate
hardware and a pipeline cannot show a speed-up; the step time shows its overhead (the
bubble's wasted work on zeros, the head repeated per stage, the permutes and the
smaller matmuls of each micro-batch). GPipe is usually said to need memory growing with
M: with a fixed micro-batch size, all M micro-batches' activations are kept for the
backward pass. Here the global batch is fixed, so the M micro-batches together are the
same rows at every M, and what M changes is the bubble's share; whether the compiled
temp grows or shrinks with M is printed as measured, and the closing "Read:" lines say
which it did.

Usage:
  .venv/bin/python benchmarks/pipeline.py [--stages 2,4] [--factors 1,2,4] [--batch 32]
      [--layers 8] [--d-model 128] [--seq 128] [--heads 4] [--kv-heads 2] [--d-ff D]
      [--vocab 256] [--repeats 5] [--steps 2]
"""
from __future__ import annotations

import os

# Before jax is imported: the benchmark is about 8 devices.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

from zjax import load_config, make_train_step
from zjax.analysis.hlo import collectives, matmul_flops
from zjax.errors import ConfigError
from zjax.models.gpt import count_params, gpt_loss, make_gpt
from zjax.parallel.pipeline import bubble_fraction

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from zero import command_line, print_table  # noqa: E402

DEVICES = 8
PERMUTE = "collective-permute"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if jax.device_count() != DEVICES:
        raise SystemExit(f"needs {DEVICES} devices, found {jax.device_count()} "
                         f"(XLA_FLAGS={os.environ.get('XLA_FLAGS')})")
    start = time.perf_counter()
    print(f"$ {command_line()}")
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices (simulated on "
          f"{os.cpu_count()} CPU cores), float32, ZeRO-1")
    m = make_config(args, 1, 1).model
    print(f"GPT: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads ({m.n_kv_heads} kv), d_ff {m.d_ff}, "
          f"vocab {m.vocab_size}, seq {args.seq}; Ψ = {count_params(m):,} parameters; global batch {args.batch}; "
          f"remat {make_config(args, 1, 1).remat.policy}")
    variants = [(1, 1)] + [(p, f * p) for p in args.stages for f in args.factors]
    print("variants: data=8, then mesh.stage=P x data=8/P with pipeline.microbatches=M: "
          + ", ".join(variant_name(p, mb) for p, mb in variants[1:]))
    tokens = np.random.default_rng(0).integers(0, m.vocab_size, (args.batch, args.seq + 1), dtype=np.int32)

    rows, runs, notes = {}, {}, []
    for p, mb in variants:
        t0 = time.perf_counter()
        try:
            run, row = build(args, p, mb, tokens)
        except ConfigError as e:  # a combination zjax refuses (e.g. M not dividing the rows): say why, go on
            notes.append(f"{variant_name(p, mb)}: ConfigError: {e}")
            print(f"  {variant_name(p, mb)}: n/a (ConfigError: {e})")
            continue
        rows[(p, mb)], runs[(p, mb)] = row, run
        print(f"  built {variant_name(p, mb)} in {time.perf_counter() - t0:.1f} s")
    if (1, 1) not in rows:
        raise SystemExit("the data=8 baseline did not build; nothing to compare with")

    print()
    print_memory(rows)
    print()
    print_traffic(rows)
    print()
    times = print_timing(args, runs)
    print()
    read(rows, times)
    for note in notes:
        print(f"n/a: {note}")
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=ints, default=(2, 4), help="pipeline stage counts P (comma list; divide 8)")
    parser.add_argument("--factors", type=ints, default=(1, 2, 4),
                        help="micro-batches per stage: M = factor x P (comma list)")
    parser.add_argument("--batch", type=int, default=32,
                        help="global batch (rows); batch/(8/P) must divide by every M")
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks (divisible by every P)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128, help="tokens per row")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--d-ff", type=int, default=None, help="MLP width (default: 8 x round(d_model / 3))")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds over all variants")
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    args = parser.parse_args(argv)
    for p in args.stages:
        if p < 2 or DEVICES % p:
            parser.error(f"--stages: {p} must be at least 2 and divide {DEVICES}")
    if any(f < 1 for f in args.factors):
        parser.error("--factors must be positive")
    return args


def make_config(args: argparse.Namespace, p: int, mb: int):
    d_ff = args.d_ff if args.d_ff is not None else 8 * round(args.d_model / 3)
    return load_config(ROOT / "configs" / "tiny.yaml", [
        "precision.compute_dtype=float32", "zero.stage=1",
        f"model.n_layers={args.layers}", f"model.d_model={args.d_model}", f"model.n_heads={args.heads}",
        f"model.n_kv_heads={args.kv_heads}", f"model.d_ff={d_ff}", f"model.vocab_size={args.vocab}",
        f"model.max_seq_len={args.seq}", f"data.seq_len={args.seq}", f"batch.global_batch_size={args.batch}",
        f"mesh.stage={p}", f"pipeline.microbatches={mb}"])


def variant_name(p: int, mb: int) -> str:
    return f"data={DEVICES}" if p == 1 else f"stage={p} x data={DEVICES // p}, M={mb}"


def build(args: argparse.Namespace, p: int, mb: int, tokens: np.ndarray) -> tuple[dict, dict]:
    """One variant: initialized state, sharded batch, and everything measured from its compiled step."""
    cfg = make_config(args, p, mb)
    train = make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model))
    state = train.init()
    batch = train.shard_batch({"tokens": tokens})
    shape = dict(train.mesh.shape)
    assert shape["stage"] == p and shape["data"] * p == DEVICES, shape
    compiled = train.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    del compiled
    rows = args.batch // shape["data"]           # rows a data device holds
    act = rows * args.seq * args.d_model * 4     # A: those rows' [rows, seq, d_model] in float32
    ticks = mb + p - 1
    over_stage = [c for c in collectives(text, DEVICES, shape) if "stage" in c.axes]
    in_loop = sum(c.ring_bytes for c in over_stage if c.kind == PERMUTE and p > 1 and c.runs == ticks)
    permute = sum(c.ring_bytes for c in over_stage if c.kind == PERMUTE)
    row = dict(p=p, mb=mb, temp=memory.temp_size_in_bytes, argument=memory.argument_size_in_bytes,
               flops=matmul_flops(text), bubble=bubble_fraction(p, mb) if p > 1 else 0.0, ticks=ticks,
               rows=rows, act=act, act_mb=act / mb, permute=permute, in_loop=in_loop, outside=permute - in_loop,
               stage_all_reduce=sum(c.ring_bytes for c in over_stage if c.kind == "all-reduce"),
               all_reduce_loop=sum(c.ring_bytes for c in over_stage
                                   if c.kind == "all-reduce" and p > 1 and c.runs == ticks),
               stage_other=sum(c.ring_bytes for c in over_stage if c.kind not in (PERMUTE, "all-reduce")))
    return dict(train=train, state=state, batch=batch), row


def ratio(x: float | None, ref: float | None) -> str:
    return "-" if x is None or not ref else f"{x / ref:.3f}"


def print_memory(rows: dict) -> None:
    ref = rows[(1, 1)]
    print("Per-device memory and work (compiled; XLA memory_analysis and matmul FLOPs in the HLO). x d8: ratio to "
          "data=8. layer work = (M+P-1)/M = 1/(1-bubble): every stage computes at every tick, on zeros when idle")
    table = []
    for (p, mb), r in rows.items():
        table.append([variant_name(p, mb), f"{r['rows']}", f"{r['argument']:,}", f"{r['temp']:,}",
                      ratio(r["temp"], ref["temp"]), f"{r['bubble']:.3f}" if p > 1 else "-",
                      f"{r['ticks'] / r['mb']:.3f}" if p > 1 else "1.000", f"{r['flops'] / 1e9:.3f}",
                      ratio(r["flops"], ref["flops"])])
    print_table(["variant", "rows/device", "argument bytes", "temp bytes", "temp x d8", "bubble",
                 "layer work x d8", "matmul GFLOP", "FLOP x d8"], table)


def print_traffic(rows: dict) -> None:
    print("Collective bytes per device per step over the stage axis, from the compiled HLO (ring-equivalent, loop "
          "trip counts included). A_mb = one micro-batch's activation [rows/M, seq, d_model] fp32, A = the "
          "device's rows' [rows, seq, d_model]; GPipe's minimum is 2 A_mb per tick (one shift forward, one back)")
    table = []
    for (p, mb), r in rows.items():
        if p == 1:
            table.append([variant_name(p, mb)] + ["-"] * 2 + [f"{r['permute']:,.0f}"] + ["-"] * 3
                         + [f"{r['stage_all_reduce']:,.0f}", "-"])
            continue
        table.append([variant_name(p, mb), f"{r['ticks']}", f"{r['act_mb']:,.0f}", f"{r['permute']:,.0f}",
                      f"{r['in_loop']:,.0f}", f"{r['in_loop'] / (r['ticks'] * r['act_mb']):.2f}",
                      f"{r['outside'] / r['act']:.2f}", f"{r['stage_all_reduce']:,.0f}",
                      f"{r['all_reduce_loop'] / (r['ticks'] * r['act_mb']):.2f}"])
        if r["stage_other"]:
            table[-1][0] += f"  (also {r['stage_other']:,.0f} B of other collectives over stage)"
    print_table(["variant", "ticks", "A_mb bytes", "permute bytes", "in tick loop", "A_mb per tick",
                 "outside loop in A", "all-reduce over stage", "of it in loop, A_mb per tick"], table)


def print_timing(args: argparse.Namespace, runs: dict) -> dict:
    """Median seconds per step of each variant over interleaved rounds; prints the table, returns the medians."""
    losses = {}
    for key, run in runs.items():  # warm-up: one step each (compiled above; this one runs it)
        run["state"], metrics = run["train"](run["state"], run["batch"])
        losses[key] = float(metrics["loss"])
    keys = list(runs)
    times: dict[tuple, list[float]] = {key: [] for key in keys}
    for r in range(args.repeats):
        # Round robin, starting one later each round, so machine load hits all alike.
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            run = runs[key]
            start = time.perf_counter()
            for _ in range(args.steps):
                run["state"], metrics = run["train"](run["state"], run["batch"])
            loss = float(metrics["loss"])
            times[key].append((time.perf_counter() - start) / args.steps)
            if not math.isfinite(loss):
                raise RuntimeError(f"{variant_name(*key)}: loss {loss}")
    print(f"Step time (fp32, all {DEVICES} simulated devices sharing {os.cpu_count()} CPU cores): median over "
          f"{args.repeats} interleaved rounds of {args.steps} steps, after a warm-up step. x d8: ratio to data=8")
    medians = {key: statistics.median(t) for key, t in times.items()}
    ref = medians.get((1, 1))
    ref_min = min(times[(1, 1)]) if (1, 1) in times else None
    table = [[variant_name(*key), f"{medians[key]:.3f}", f"{min(times[key]):.3f}", f"{max(times[key]):.3f}",
              ratio(medians[key], ref), ratio(min(times[key]), ref_min), f"{losses[key]:.6f}"] for key in keys]
    print_table(["variant", "median s/step", "min", "max", "x d8", "min x d8", "loss of step 1"], table)
    spread = max(max(t) / min(t) for t in times.values())
    if spread > 1.3:
        print(f"(noisy: a variant's slowest round took {spread:.1f}x its fastest; the host is shared, so compare "
              "the median and min ratios and rerun with more --repeats before quoting one)")
    return medians


def read(rows: dict, medians: dict) -> None:
    """The closing interpretation; the memory sentence says what was measured."""
    trends = []
    for p in sorted({p for p, _ in rows if p > 1}):
        temps = [(mb, rows[(p, mb)]["temp"]) for q, mb in sorted(rows) if q == p]
        if len(temps) < 2:
            continue
        values = [t for _, t in temps]
        if all(b > a for a, b in zip(values, values[1:])):
            word = "grows"
        elif all(b < a for a, b in zip(values, values[1:])):
            word = "shrinks"
        else:
            word = "is not monotonic"
        trends.append(f"P={p}: temp {word} with M ("
                      + ", ".join(f"M={mb} {t / rows[(1, 1)]['temp']:.2f}x" for mb, t in temps) + " of data=8)")
    slowest = max((k for k in medians if k != (1, 1)), key=medians.get, default=None)
    fastest = min((k for k in medians if k != (1, 1)), key=medians.get, default=None)
    print("Read: all 8 simulated devices share the host's CPU cores, so the stages never run side by side and a "
          "pipeline cannot be faster here: its step time is data=8's plus its overhead, chiefly the bubble "
          "(every stage computes on zeros in its idle ticks: layer work (M+P-1)/M of data=8's), the head and "
          "loss repeated on every stage, the stage-axis permutes and all-reduces, and smaller per-tick matmuls.")
    if fastest is not None:
        print(f"Read: step time x d8 ranges from {medians[fastest] / medians[(1, 1)]:.2f} "
              f"({variant_name(*fastest)}) to {medians[slowest] / medians[(1, 1)]:.2f} ({variant_name(*slowest)}); "
              "more micro-batches shrink the bubble, which is what a real multi-accelerator run would gain from.")
    if trends:
        pipes = [(k, r) for k, r in rows.items() if k[0] > 1]
        print("Read: memory, as measured: " + "; ".join(trends) + ". temp x d8 next to layer work (M+P-1)/M: "
              + ", ".join(f"P={p} M={mb} {r['temp'] / rows[(1, 1)]['temp']:.2f} vs {r['ticks'] / mb:.2f}"
                          for (p, mb), r in pipes)
              + ". With the global batch fixed, the M micro-batches kept for the backward pass are the same rows "
              "at every M (the micro-batch shrinks as M grows); what M changes is the bubble's share, and the "
              "bubble's ticks keep residuals (of zeros) too. GPipe's memory growing with M is at a fixed "
              "micro-batch size, i.e. a global batch growing with M, which this table does not vary.")
        per_tick = sorted({round(r["in_loop"] / (r["ticks"] * r["act_mb"]), 2) for _, r in pipes})
        outside = sorted({round(r["outside"] / r["act"], 2) for _, r in pipes})
        ar_tick = sorted({round(r["all_reduce_loop"] / (r["ticks"] * r["act_mb"]), 2) for _, r in pipes})
        print(f"Read: traffic over stage, as measured: {'/'.join(map(str, per_tick))} micro-batch activations "
              f"permuted per tick (GPipe's minimum: 2, one shift forward and one back), "
              f"{'/'.join(map(str, outside))} local-batch activations permuted outside the tick loop, and "
              f"all-reduces over stage, {'/'.join(map(str, ar_tick))} A_mb ring-equivalent per tick in the loop; "
              "permute bytes fall with M (smaller micro-batches over more ticks: (M+P-1)/M A per direction).")


if __name__ == "__main__":
    main()
