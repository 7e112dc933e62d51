"""Mixture-of-Experts (``model.moe``; mesh axis ``expert``): dense vs MoE, expert parallelism, capacity vs dropless.

On 8 simulated CPU devices, the reference GPT (configs/tiny.yaml resized by the flags:
d_model 128, 2 layers, 4 heads (2 kv), d_ff F = 256, vocab 256, seq 64, global batch 16 by
default; float32, ZeRO-3 as tiny.yaml, remat as tiny.yaml) is built in three groups of
variants. Every variant is initialized (``train.init()``, same seed), given the same random
int32 tokens [batch, seq + 1] and compiled once (``train.lower(state, batch).compile()``;
the executable is then stepped). Where a table prints bytes they are XLA's
``memory_analysis()`` of that executable, per device: arguments (the donated TrainState and
the batch) and temporaries (activations, gradients, the MoE's dispatch/combine tensors and
slots). Where it prints time, each variant of the table runs one warm-up step (step 1) and
then ``--repeats`` interleaved rounds over the table's variants (each round starting one
variant later) of ``--steps`` steps each, blocking on ``float(metrics["loss"])``; the median
seconds per step is printed with tokens/s = batch x seq / that median.

1. Dense vs MoE at equal active parameters, on data=8 (mesh.expert=1): a dense GPT with
   d_ff = F against MoE GPTs with ``model.moe.num_experts`` E in ``--experts`` (8, 16),
   ``model.moe.top_k=1`` and ``model.moe.d_ff=F``. Top-1 runs each token through one expert
   of width F, so the MLP parameters a token uses (and its MLP matmul FLOPs) equal the dense
   MLP's, while the total parameters grow by about E x the MLP (+ the router). Printed: total
   parameters (``zjax.models.gpt.count_params``), argument and temp bytes, step time and
   tokens/s, each also as a ratio to the dense run, and the MoE runs' measured
   ``moe_dropped_fraction``. Capacity is DeepSpeed's default here (``drop_tokens=true``,
   capacity_factor 1), so the dense GShard dispatch computes E x C slots, C = ceil(S / E),
   S = the tokens one device routes (batch x seq / 8: on every mesh here each device routes
   its own rows, as DeepSpeed routes each rank's): the expert matmuls cost about what the
   dense MLP's do, plus the dispatch/combine einsums over [S, E, C].
2. Expert parallelism: MoE with E = ``--ep-experts`` (8), top-1, on mesh.expert = X in
   ``--expert-sizes`` (1, 2, 4, 8), data = 8 / X, ZeRO-3 (``zero.stage=3``), with
   ``model.moe.use_rts=false model.moe.second_expert_sampling=false`` so that routing is
   deterministic. Printed: argument and temp bytes, step time, and the all-to-all bytes per
   step over the ``expert`` axis read from the compiled HLO
   (``zjax.analysis.hlo.collectives(hlo, 8, mesh shape)``: the all-to-alls whose devices
   differ along ``expert``, summing ``full_bytes x runs``, i.e. each device's [E, C_l, d]
   slot buffer (C_l: the capacity for the S_l = batch x seq / 8 tokens it routes) every time the
   program runs an all-to-all: forward dispatch and combine, their transposes in the
   backward, and the forward again where the remat policy recomputes it). Next to it the
   count of all-to-alls that makes (the bytes / (E x C_l x d x 4); 4 per layer unless
   something is recomputed). Each device routes the same rows on every mesh (data x expert
   = 8), so the routing, and so the loss, should not change with X. The step-1 losses are
   compared with the expert=1 run's: the largest relative difference is printed and the
   script exits non-zero if it exceeds ``--tolerance`` (1e-4).
3. Capacity vs dropless: MoE with E = 8, ``model.moe.top_k=2`` on data=8, with
   ``model.moe.drop_tokens=true`` at capacity_factor in ``--factors`` (0.5, 1.0, 1.25, 2.0),
   with ``drop_tokens=false`` (dense slots: capacity = every routed token, C = S), and with
   ``model.moe.dispatch=ragged drop_tokens=false`` (tokens sorted by expert, grouped matmuls,
   no slots). Printed: the capacity C = ceil(S / E x factor x 2) (at least min_capacity) for
   the S = batch x seq / 8 tokens a device routes, the measured ``moe_dropped_fraction`` of the step's
   metrics (token-to-expert assignments dropped over all layers; the mean over every step
   run, warm-up included, i.e. 1 + repeats x steps steps of training from the same init),
   temp bytes and step time, each as a ratio to the dropless dense-slot run.

The closing "Read:" lines are computed from these numbers. What they can mean here: the 8
devices are simulated on the host's CPU cores (2 on the machine this was written on) and
share them, so no variant runs its devices' work side by side: expert parallelism cannot
make a step faster here (it only adds all-to-alls), and MoE's step time is how long this
host takes for the gate, the dispatch/combine einsums and the experts of all 8 devices.
The bytes are what the same program holds and moves per device on a real 8-device host.

Usage:
  .venv/bin/python benchmarks/moe.py [--d-model 128] [--layers 2] [--heads 4] [--kv-heads 2]
      [--d-ff 256] [--vocab 256] [--seq 64] [--batch 16] [--experts 8,16] [--ep-experts 8]
      [--expert-sizes 1,2,4,8] [--factors 0.5,1.0,1.25,2.0] [--repeats 3] [--steps 1]
      [--tolerance 1e-4]
"""
from __future__ import annotations

import os

# Before jax is imported: the benchmark is about 8 devices.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np

import zjax
from zjax.analysis.hlo import collectives
from zjax.models.gpt import count_params, gpt_loss, make_gpt
from zjax.models.moe import capacity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zero import command_line, print_table  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


class Run:
    """One variant: its train step, state, sharded batch, executable and what its steps reported."""

    def __init__(self, name: str, cfg, batch: dict):
        self.name, self.cfg = name, cfg
        self.train = zjax.make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model, seed=cfg.seed))
        self.state = self.train.init()
        self.batch = self.train.shard_batch(batch)
        self.mesh_shape = dict(self.train.mesh.shape)
        self.compiled = self.train.lower(self.state, self.batch).compile()
        mem = self.compiled.memory_analysis()
        self.argument, self.temp = mem.argument_size_in_bytes, mem.temp_size_in_bytes
        self.params = count_params(cfg.model)
        self.losses, self.dropped, self.times = [], [], []

    def step(self) -> None:
        self.state, metrics = self.compiled(self.state, self.batch)
        self.losses.append(float(metrics["loss"]))  # blocks on the step
        if "moe_dropped_fraction" in metrics:
            self.dropped.append(float(metrics["moe_dropped_fraction"]))

    def time_steps(self, steps: int) -> None:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.times.append((time.perf_counter() - start) / steps)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n = jax.device_count()
    print(f"$ {command_line()}")
    print(f"jax {jax.__version__}, {n} {jax.devices()[0].platform} devices (simulated on "
          f"{os.cpu_count()} CPU cores), float32")
    m = make_config(args).model
    print(f"GPT: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} kv), d_ff F = {m.d_ff}, "
          f"vocab {m.vocab_size}, seq {args.seq}; global batch {args.batch} ({args.batch * args.seq:,} tokens/step); "
          f"ZeRO-3; timing: warm-up + {args.repeats} rounds x {args.steps} step(s)")
    batch = {"tokens": np.random.default_rng(0).integers(0, m.vocab_size, (args.batch, args.seq + 1), np.int32)}
    tokens = args.batch * args.seq

    dense_moe = table_dense_moe(args, batch, tokens)
    ep, ok = table_expert_parallel(args, batch, n)
    cap = table_capacity(args, batch, tokens, n)
    read(args, dense_moe, ep, cap)
    return 0 if ok else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
    floats = lambda s: tuple(float(x) for x in s.split(",") if x)  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=128, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    parser.add_argument("--d-ff", type=int, default=256, help="F: the dense MLP's width and each expert's")
    parser.add_argument("--vocab", type=int, default=256, help="vocabulary size")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=16, help="global batch size (sequences per step)")
    parser.add_argument("--experts", type=ints, default=(8, 16), help="E for the dense-vs-MoE table (comma list)")
    parser.add_argument("--ep-experts", type=int, default=8, help="E for the expert-parallel table")
    parser.add_argument("--expert-sizes", type=ints, default=(1, 2, 4, 8), help="mesh.expert sizes (comma list)")
    parser.add_argument("--factors", type=floats, default=(0.5, 1.0, 1.25, 2.0), help="capacity factors (comma list)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per table")
    parser.add_argument("--steps", type=int, default=1, help="steps per variant per round")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative step-1 loss difference "
                        "allowed between expert sizes")
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace, **overrides):
    return zjax.load_config(CONFIG, {
        "model.d_model": args.d_model,
        "model.n_layers": args.layers,
        "model.n_heads": args.heads,
        "model.n_kv_heads": args.kv_heads,
        "model.d_ff": args.d_ff,
        "model.vocab_size": args.vocab,
        "model.max_seq_len": args.seq,
        "data.seq_len": args.seq,
        "batch.global_batch_size": args.batch,
        "precision.compute_dtype": "float32",
        "zero.stage": 3,
        **overrides,
    })


def time_runs(args: argparse.Namespace, runs: list[Run]) -> None:
    """Warm-up step each, then interleaved rounds, each starting one variant later."""
    for run in runs:
        run.step()
    for r in range(args.repeats):
        for i in range(len(runs)):
            runs[(r + i) % len(runs)].time_steps(args.steps)


def mb(x: float) -> str:
    return f"{x / 2**20:,.2f}"


def ratio(x: float, ref: float) -> str:
    return f"{x / ref:.2f}" if ref else "-"


def build(name: str, cfg, batch: dict) -> Run | None:
    try:
        return Run(name, cfg, batch)
    except Exception as e:  # report and go on: one broken variant should not hide the others
        print(f"{name}: FAILED {type(e).__name__}: {e}")
        return None


# -- 1. dense vs MoE -------------------------------------------------------------------


def table_dense_moe(args: argparse.Namespace, batch: dict, tokens: int) -> list[Run]:
    runs = [build(f"dense d_ff={args.d_ff}", make_config(args), batch)]
    for e in args.experts:
        runs.append(build(f"MoE E={e} top-1 d_ff={args.d_ff}", make_config(
            args, **{"model.moe.num_experts": e, "model.moe.top_k": 1, "model.moe.d_ff": args.d_ff}), batch))
    runs = [r for r in runs if r is not None]
    for r in runs:
        r.num_e = r.cfg.model.moe.num_experts
    time_runs(args, runs)
    ref = runs[0]
    print()
    print("1. Dense vs MoE at equal active parameters (top-1, each expert of width F), data=8: total parameters, "
          "compiled argument/temp MiB per device, median step time and tokens/s; x dense: ratio to the dense run")
    print_table(
        ["variant", "params", "x dense", "argument MiB", "temp MiB", "x dense", "step ms", "x dense", "tokens/s",
         "dropped"],
        [[r.name, f"{r.params:,}", ratio(r.params, ref.params), mb(r.argument), mb(r.temp), ratio(r.temp, ref.temp),
          f"{r.median * 1e3:.1f}", ratio(r.median, ref.median), f"{tokens / r.median:,.0f}",
          f"{statistics.mean(r.dropped):.3f}" if r.dropped else "-"] for r in runs])
    return runs


# -- 2. expert parallelism -----------------------------------------------------------------


def table_expert_parallel(args: argparse.Namespace, batch: dict, n: int) -> tuple[list[Run], bool]:
    e = args.ep_experts
    runs = []
    for x in args.expert_sizes:
        run = build(f"E={e} expert={x} data={n // x}", make_config(args, **{
            "model.moe.num_experts": e, "model.moe.top_k": 1, "model.moe.d_ff": args.d_ff,
            "model.moe.use_rts": False, "model.moe.second_expert_sampling": False,
            "mesh.expert": x, "mesh.data": n // x}), batch)
        if run is None:
            continue
        assert run.mesh_shape.get("expert", 1) == x, run.mesh_shape
        a2a = [c for c in collectives(run.compiled.as_text(), n, run.mesh_shape)
               if c.kind == "all-to-all" and "expert" in c.axes]
        run.a2a_bytes = sum(c.full_bytes * c.runs for c in a2a)
        # One device's slot buffer [E, C_l, d] float32, C_l for the tokens it routes (its own rows).
        s_local = args.batch * args.seq // n
        run.slot_bytes = e * capacity(s_local, e, 1, run.cfg.model.moe.capacity_factor,
                                      run.cfg.model.moe.min_capacity) * args.d_model * 4
        runs.append(run)
    time_runs(args, runs)
    ref = runs[0]
    worst = max(abs(r.losses[0] - ref.losses[0]) / abs(ref.losses[0]) for r in runs)
    print()
    print(f"2. Expert parallelism, E={e} top-1 (use_rts and second_expert_sampling off), ZeRO-3: compiled "
          "argument/temp MiB per device, all-to-all bytes per step over the expert axis (HLO full_bytes x runs) "
          "and that as a count of [E, C_l, d_model] fp32 slot buffers, median step time, step-1 loss; "
          "x e1: ratio to expert=1")
    print_table(
        ["variant", "argument MiB", "x e1", "temp MiB", "x e1", "all-to-all MiB", "/ slot buffer", "step ms", "x e1",
         "step-1 loss", "dropped"],
        [[r.name, mb(r.argument), ratio(r.argument, ref.argument), mb(r.temp), ratio(r.temp, ref.temp),
          mb(r.a2a_bytes), f"{r.a2a_bytes / r.slot_bytes:.1f}" if r.a2a_bytes else "-",
          f"{r.median * 1e3:.1f}", ratio(r.median, ref.median), f"{r.losses[0]:.6f}",
          f"{statistics.mean(r.dropped):.3f}"] for r in runs])
    ok = worst <= args.tolerance
    print(f"step-1 loss vs expert=1: largest relative difference {worst:.2e} "
          f"({'OK' if ok else 'FAIL'}, tolerance {args.tolerance:g})")
    return runs, ok


# -- 3. capacity vs dropless ---------------------------------------------------------------


def table_capacity(args: argparse.Namespace, batch: dict, tokens: int, n: int) -> list[Run]:
    base = {"model.moe.num_experts": 8, "model.moe.top_k": 2, "model.moe.d_ff": args.d_ff}
    runs = []
    for f in args.factors:
        run = build(f"dense slots, capacity_factor {f:g}", make_config(
            args, **base, **{"model.moe.drop_tokens": True, "model.moe.capacity_factor": f}), batch)
        if run is not None:
            run.capacity = capacity(tokens // n, 8, 2, f, run.cfg.model.moe.min_capacity)
            runs.append(run)
    run = build("dense slots, dropless (C = S)", make_config(args, **base, **{"model.moe.drop_tokens": False}), batch)
    if run is not None:
        run.capacity = tokens // n
        runs.append(run)
    run = build("ragged (grouped matmuls), dropless", make_config(
        args, **base, **{"model.moe.drop_tokens": False, "model.moe.dispatch": "ragged"}), batch)
    if run is not None:
        run.capacity = None
        runs.append(run)
    time_runs(args, runs)
    ref = next((r for r in runs if r.name.startswith("dense slots, dropless")), runs[-1])
    print()
    print(f"3. Capacity vs dropless, E=8 top-2, data=8: capacity C per expert for the S = {tokens // n:,} tokens a "
          f"device routes (ceil(S / E x factor x 2), at least min_capacity), measured moe_dropped_fraction (mean of "
          f"{len(ref.dropped)} steps), compiled temp MiB per device, median step time; x dropless: ratio to the "
          f"dense-slot dropless run")
    print_table(
        ["variant", "C", "dropped", "temp MiB", "x dropless", "step ms", "x dropless", "tokens/s"],
        [[r.name, f"{r.capacity:,}" if r.capacity is not None else "-", f"{statistics.mean(r.dropped):.4f}",
          mb(r.temp), ratio(r.temp, ref.temp), f"{r.median * 1e3:.1f}", ratio(r.median, ref.median),
          f"{tokens / r.median:,.0f}"] for r in runs])
    return runs


# -- Read: ------------------------------------------------------------------------------


def read(args: argparse.Namespace, dense_moe: list[Run], ep: list[Run], cap: list[Run]) -> None:
    print()
    print("Read:")
    dense = dense_moe[0]
    for r in dense_moe[1:]:
        print(f"- {r.name}: {r.params / dense.params:.2f}x the dense parameters for the same active MLP "
              f"parameters; argument bytes {r.argument / dense.argument:.2f}x, temp {r.temp / dense.temp:.2f}x and "
              f"step time {r.median / dense.median:.2f}x the dense run's ({statistics.mean(r.dropped):.1%} of "
              f"assignments dropped at capacity_factor {r.cfg.model.moe.capacity_factor:g}).")
    if len(dense_moe) >= 3:
        a, b = dense_moe[1], dense_moe[2]
        print(f"- {a.name.split()[1]} -> {b.name.split()[1]}: {b.num_e / a.num_e:.0f}x the experts gave "
              f"{b.params / a.params:.2f}x the parameters, {b.temp / a.temp:.2f}x the temp and {b.median / a.median:.2f}x "
              "the step time at the same active parameters: top-1 at capacity_factor 1 keeps E x C ~ S slots "
              "whatever E, so what grows is what every expert holds (weights, their gradients, ZeRO-3's gathers).")
    if len(ep) > 1:
        e1, last = ep[0], ep[-1]
        print(f"- Expert parallelism ({e1.name.split()[1]} -> {last.name.split()[1]}): arguments per device "
              f"{last.argument / e1.argument:.2f}x (ZeRO-3 shards over data = 8/X devices and the experts are split "
              "over expert, so the non-expert state is held X times), temp "
              f"{last.temp / e1.temp:.2f}x, step time "
              f"{last.median / e1.median:.2f}x; all-to-all bytes per step over expert: "
              + ", ".join(f"{r.name.split()[1]} {r.a2a_bytes / 2**10:,.0f} KiB ({r.a2a_bytes / r.slot_bytes:.0f} "
                          "slot buffers)" for r in ep[1:])
              + ". Each all-to-all moves one device's whole [E, C_l, d] buffer, whose size does not depend on X, "
              "so the bytes per device stay flat while the share that leaves the device, (X-1)/X, grows.")
    drops = [r for r in cap if "capacity_factor" in r.name]
    dropless = [r for r in cap if r not in drops]
    if drops:
        print("- Dropped fraction by capacity factor (top-2, E=8): "
              + ", ".join(f"{r.cfg.model.moe.capacity_factor:g} -> {statistics.mean(r.dropped):.1%}" for r in drops)
              + "; dropless: " + ", ".join(f"{statistics.mean(r.dropped):.1%}" for r in dropless) + ".")
        lo, hi = drops[0], drops[-1]
        print(f"- Temp grew with the capacity: C={lo.capacity} {mb(lo.temp)} MiB -> C={hi.capacity} {mb(hi.temp)} MiB "
              f"({hi.temp / lo.temp:.2f}x), step time {hi.median / lo.median:.2f}x; against capacity_factor "
              f"{hi.cfg.model.moe.capacity_factor:g}: "
              + "; ".join(f"{r.name} temp {r.temp / hi.temp:.2f}x, step time {r.median / hi.median:.2f}x"
                          for r in dropless) + ".")
    print(f"- All 8 devices are simulated on {os.cpu_count()} CPU cores and share them: no parallel speed-up can "
          "show: a variant that is faster here does less work on this host (e.g. fewer or smaller ZeRO-3 gathers), "
          "not work side by side; step times compare the work this host does, "
          "and the bytes are what each device would hold and move on a real 8-device host.")


if __name__ == "__main__":
    sys.exit(main())
