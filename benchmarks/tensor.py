"""Tensor parallelism (mesh axis ``tensor``) composed with ZeRO over ``data``: memory, collective bytes, step time.

On 8 simulated CPU devices, the reference GPT (configs/tiny.yaml resized by the flags,
float32) is built on three meshes, data=8, data=4 x tensor=2 and data=2 x tensor=4
(``mesh.tensor=T``: Megatron-style, attention heads, MLP width and vocabulary split T
ways), at each ZeRO stage 0-3 (``zero.stage=S``, ZeRO over the data axis inside each
tensor shard), and on the tensor meshes also with Megatron sequence parallelism
(``tensor_sequence_parallel=true``: norms and residual adds split along the sequence
over tensor). Each variant is compiled once (``train.lower(state, batch).compile()``);
for each one this prints
- the TrainState bytes held by device 0 (the sum of the shards of every leaf that live
  on ``jax.devices()[0]``), next to ZeRO's fp32 formula with Ψ_T (the parameters of one
  tensor shard: every matrix split T ways, the RMSNorm scales whole) and D = data devices
  (state/formula above 1: some leaf is not split over tensor as the formula assumes);
- the compiled argument+temp bytes per device (XLA ``memory_analysis()``: arguments,
  which hold the donated state, and temporaries, which hold the activations);
- the collective bytes per device per step, ring-equivalent, read from the compiled HLO
  with ``zjax.analysis.hlo.collectives`` and split by the mesh axes each collective runs
  over: data (ZeRO's gradient reduce-scatter / all-reduce and parameter all-gathers),
  tensor (Megatron's activation all-reduces, or all-gathers and reduce-scatters under
  sequence parallelism) and data+tensor (collectives over all 8 devices at once, e.g.
  scalars such as the loss); next to ZeRO's theory over data, 2G_T at stages
  0-2 and 3G_T at stage 3 with G_T = Ψ_T x 4 B x (D-1)/D, and Megatron's over tensor,
  (8L + 4)M with M = A x (T-1)/T and A the bytes of one device's activations
  [batch/D, seq, d_model] in float32: per layer two all-reduces forward and two backward
  (2M each), plus the vocab-parallel embedding's forward all-reduce and the all-reduce of
  the gradient into the vocab-parallel logits;
- the median step time over ``--repeats`` interleaved windows of ``--steps`` steps of
  the compiled step (after one warm-up step), for the stages in ``--time-stages`` only
  (stages 1 and 3 by default; timing every variant takes too long on a 2-core CPU).
Every column is printed as measured, and as a ratio to the data=8 run of the same stage.

The 8 devices are simulated on the host's CPU cores, which all variants share: tensor
parallelism cannot make a step faster here (it only adds collectives and smaller
matmuls), so the step-time table shows its overhead on this machine, not a speed-up.
The memory and collective columns are the point: they are what the same program holds
and moves per device on a real 8-accelerator host.

Usage:
  .venv/bin/python benchmarks/tensor.py [--d-model 512] [--heads 8] [--kv-heads 4] [--d-ff D]
      [--layers 2] [--vocab 1024] [--seq 256] [--batch 16] [--tensor 2,4] [--stages 0,1,2,3]
      [--time-stages 1,3] [--repeats 5] [--steps 1]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zero import ZeroRun, command_line, memory_formulas, print_table  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
AXES = {("data",): "data", ("tensor",): "tensor", ("data", "tensor"): "data+tensor"}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    n = jax.device_count()
    print(f"$ {command_line()}")
    print(f"jax {jax.__version__}, {n} {jax.devices()[0].platform} devices (simulated on "
          f"{os.cpu_count()} CPU cores), float32")
    cfg = make_config(args, 1, 0, False)
    m, psi = cfg.model, count_params(cfg.model)
    print(f"GPT: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} kv), d_ff {m.d_ff}, "
          f"vocab {m.vocab_size}, seq {args.seq}; global batch {args.batch}")
    print(f"Ψ = {psi:,} parameters; meshes: " + ", ".join(mesh_name(t, n) for t in (1, *args.tensor)))
    batch = {"tokens": np.random.default_rng(0).integers(0, m.vocab_size, (args.batch, args.seq + 1), np.int32)}

    variants = [(t, s, sp) for s in args.stages for t in (1, *args.tensor) for sp in ((False, True) if t > 1 else (False,))]
    rows, timed = {}, {}
    for tensor, stage, sp in variants:
        name = variant_name(tensor, stage, sp, n)
        try:
            run = TensorRun(make_config(args, tensor, stage, sp), batch)
            rows[(tensor, stage, sp)] = measure(run, tensor, stage, n, m)
        except Exception as e:  # report and go on: one broken combination should not hide the others
            print(f"{name}: FAILED {type(e).__name__}: {e}")
            continue
        if stage in args.time_stages:
            timed[(tensor, stage, sp)] = run
        else:
            del run  # frees its state and executable

    print_memory(rows, n)
    print_collectives(rows, n, m.n_layers)
    if timed:
        print_timing(args, timed, n)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=512, help="model width")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (divisible by each tensor size)")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    parser.add_argument("--d-ff", type=int, default=None, help="MLP width (default: 8 x round(d_model / 3))")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=16, help="global batch size (sequences per step)")
    parser.add_argument("--tensor", type=ints, default=(2, 4), help="tensor sizes to run besides 1 (comma list)")
    parser.add_argument("--stages", type=ints, default=(0, 1, 2, 3), help="ZeRO stages (comma list)")
    parser.add_argument("--time-stages", type=ints, default=(1, 3), help="stages whose step time is measured")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per variant")
    parser.add_argument("--steps", type=int, default=1, help="steps per timed window")
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace, tensor: int, stage: int, sp: bool):
    d_ff = args.d_ff if args.d_ff is not None else 8 * round(args.d_model / 3)
    return zjax.load_config(CONFIG, {
        "model.d_model": args.d_model,
        "model.n_heads": args.heads,
        "model.n_kv_heads": args.kv_heads,
        "model.d_ff": d_ff,
        "model.n_layers": args.layers,
        "model.vocab_size": args.vocab,
        "model.max_seq_len": args.seq,
        "data.seq_len": args.seq,
        "batch.global_batch_size": args.batch,
        "precision.compute_dtype": "float32",
        "mesh.tensor": tensor,
        "zero.stage": stage,
        "tensor_sequence_parallel": sp,
    })


def mesh_name(tensor: int, n: int) -> str:
    return f"data={n // tensor}" + (f" x tensor={tensor}" if tensor > 1 else "")


def variant_name(tensor: int, stage: int, sp: bool, n: int) -> str:
    return f"stage {stage}  {mesh_name(tensor, n)}" + (" +SP" if sp else "")


class TensorRun(ZeroRun):
    """benchmarks/zero.py's ZeroRun, stepping its AOT-compiled executable (one compile per variant)."""

    def __init__(self, cfg, batch: dict):
        super().__init__(cfg, batch, lambda cfg: make_gpt(cfg.model, seed=cfg.seed), gpt_loss)
        self.mesh_shape = dict(self.train.mesh.shape)

    def step(self) -> None:
        self.state, _ = self.compiled()(self.state, self.batch)


def measure(run: TensorRun, tensor: int, stage: int, n: int, m) -> dict:
    """Everything but time, from one built variant."""
    data = run.mesh_shape["data"]
    assert run.mesh_shape["tensor"] == tensor and data * tensor == n, run.mesh_shape
    mem = run.compiled().memory_analysis()
    axes = dict.fromkeys(AXES.values(), 0.0)
    for c in collectives(run.hlo(), n, run.mesh_shape):
        key = AXES.get(c.axes, "+".join(c.axes) or "none")
        axes[key] = axes.get(key, 0.0) + c.ring_bytes
    # One tensor shard's parameters: every matrix split T ways, the RMSNorm scales whole.
    norms = (2 * m.n_layers + 1) * m.d_model
    psi_t = (count_params(m) - norms) / tensor + norms
    return dict(state=run.device_bytes(), argument=mem.argument_size_in_bytes, temp=mem.temp_size_in_bytes,
                axes=axes, data=data, psi_t=psi_t,
                # one device's activations [batch/D, seq, d_model], float32
                act=run.train.global_batch_size // data * run.cfg.data.seq_len * m.d_model * 4)


def ratio(x: float, ref: float | None) -> str:
    return "-" if not ref else f"{x / ref:.3f}"


def print_memory(rows: dict, n: int) -> None:
    print()
    print("Per-device memory: TrainState bytes on device 0 (sum of its shards' nbytes) next to ZeRO's fp32 formula "
          "over D data devices with Ψ_T parameters per tensor shard; compiled argument+temp bytes (XLA "
          "memory_analysis). x d8: ratio to data=8 at the same stage")
    formulas = memory_formulas("fp32")
    table = []
    for (tensor, stage, sp), r in rows.items():
        ref = rows.get((1, stage, False))
        text, coef = formulas[stage]
        expected = coef(r["psi_t"], r["data"])
        total = r["argument"] + r["temp"]
        ref_total = ref["argument"] + ref["temp"] if ref else None
        table.append([variant_name(tensor, stage, sp, n), f"{r['state']:,}", ratio(r["state"], ref and ref["state"]),
                      text.replace("Ψ", "Ψ_T").replace("N", "D"), f"{r['state'] / expected:.4f}",
                      f"{r['argument']:,}", f"{r['temp']:,}", f"{total:,}", ratio(total, ref_total),
                      ratio(r["temp"], ref and ref["temp"])])
    print_table(["variant", "state bytes", "state x d8", "formula", "state/formula", "argument", "temp",
                 "argument+temp", "arg+temp x d8", "temp x d8"], table)


def print_collectives(rows: dict, n: int, layers: int) -> None:
    print()
    print("Collective bytes per device per step, ring-equivalent, from the compiled HLO, by the mesh axes they "
          "run over. x d8: ratio to data=8 at the same stage")
    print(f"ZeRO over data: G_T = Ψ_T x 4 B x (D-1)/D, theory 2G_T (stages 0-2), 3G_T (stage 3); Megatron over "
          f"tensor: M = A x (T-1)/T, A = bytes of [batch/D, seq, d_model] fp32, theory (8L + 4)M = {8 * layers + 4}M")
    table = []
    for (tensor, stage, sp), r in rows.items():
        ref = rows.get((1, stage, False))
        axes = r["axes"]
        total = sum(axes.values())
        ref_total = sum(ref["axes"].values()) if ref else None
        d = r["data"]
        g_t = r["psi_t"] * 4 * (d - 1) / d
        m_t = r["act"] * (tensor - 1) / tensor
        table.append([variant_name(tensor, stage, sp, n), f"{axes['data']:,.0f}", f"{axes['tensor']:,.0f}",
                      f"{axes['data+tensor']:,.0f}", f"{total:,.0f}", ratio(axes["data"], ref and ref["axes"]["data"]),
                      ratio(total, ref_total), f"{axes['data'] / g_t:.3f}G_T" if g_t else "-",
                      "3G_T" if stage == 3 else "2G_T", f"{axes['tensor'] / m_t:.2f}M" if m_t else "-"])
        extra = set(axes) - set(AXES.values())
        if extra:
            table[-1][0] += "  (also: " + ", ".join(f"{a} {axes[a]:,.0f}" for a in sorted(extra)) + ")"
    print_table(["variant", "data", "tensor", "data+tensor", "total", "data x d8", "total x d8", "data/G_T",
                 "theory", "tensor/M"], table)


def print_timing(args: argparse.Namespace, runs: dict, n: int) -> None:
    """Median step time of each variant over interleaved windows of the compiled step."""
    print()
    for run in runs.values():
        run.step()  # warm-up
        run.block()
    times = {key: [] for key in runs}
    keys = list(runs)
    for r in range(args.repeats):
        # Round robin, starting one later each time, so machine load hits all alike.
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:
            run = runs[key]
            start = time.perf_counter()
            for _ in range(args.steps):
                run.step()
            run.block()
            times[key].append((time.perf_counter() - start) / args.steps)
    print(f"Step time (fp32, all 8 simulated devices sharing {os.cpu_count()} CPU cores): median over "
          f"{args.repeats} interleaved windows of {args.steps} steps, after a warm-up step. x d8: ratio to data=8 "
          "at the same stage")
    table = []
    for (tensor, stage, sp) in keys:
        med = statistics.median(times[(tensor, stage, sp)])
        ref = times.get((1, stage, False))
        table.append([variant_name(tensor, stage, sp, n), f"{med * 1e3:.1f}",
                      f"{min(times[(tensor, stage, sp)]) * 1e3:.1f}", f"{max(times[(tensor, stage, sp)]) * 1e3:.1f}",
                      ratio(med, ref and statistics.median(ref))])
    print_table(["variant", "median ms/step", "min", "max", "x d8"], table)


if __name__ == "__main__":
    main()
