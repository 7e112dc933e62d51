"""Communication compression (ZeRO++ qwZ, hpZ, qgZ; MiCS): collective bytes in and across nodes, and the loss.

On 8 simulated CPU devices treated as 2 nodes x 4 (a node is 4 consecutive device ids in
mesh order; ``zero.node_size=4`` where qgZ needs it), the reference GPT (configs/tiny.yaml
resized by the flags: d_model 128, 2 layers, 4 heads (2 kv), d_ff 352, vocab 256 (bytes),
seq 64, global batch 16 by default; ZeRO-3, adamw at ``--lr`` 1e-3 constant, gradient
clipping 1.0) is built once per variant, with ``remat.policy=full`` for every variant (so
that hpZ's backward gathers matter; zjax ZeRO-3 never saves a gathered parameter for the
backward pass anyway, so every variant gathers each layer again there). Compute is float32:
XLA:CPU widens bf16 collectives to float32, so bf16 would print float32 bytes anyway; the
quantized payloads are packed into uint8 (``zjax.parallel.quantize``), so their bytes are
what would cross the wire.

Variants (each a set of config overrides on top of ZeRO-3):
- ZeRO-3: plain ``zero.stage=3`` on data=8, the reference of every ratio;
- qwZ: ``zero.quantized_weights=true`` (parameter gathers move int8 blocks of
  ``zero.quantization_block`` = 256 elements, one float32 scale each);
- hpZ: ``zero.hpz_partition_size=4`` (a secondary partition inside each node, saved for the
  backward pass, whose gathers then stay in the node);
- qgZ: ``zero.quantized_gradients=true zero.node_size=4`` (gradient reduce-scatters as two
  int4 all-to-all hops, in-node then cross-node), at block 256 and at ``--small-block`` 32;
- qgZ+qwZ and qgZ+hpZ (qwZ+hpZ together is refused by the config; the refusal is printed);
- MiCS: ``mesh.replica=2 mesh.data=4``, ZeRO-3 inside each group of 4 devices (a node) and
  the gradient shards all-reduced across the 2 groups.

Every variant is initialized (``train.init()``, same seed), compiled once
(``train.lower(state, batch).compile()``) and then stepped ``--steps`` times (40) on the
same batches, one step at a time, blocking on ``float(metrics["loss"])`` each step. The
batches are real text (``--data text``, the default): ``TextCorpus.stdlib(max_bytes=400_000)``
windows of the Python standard library's source, batch k for step k, as tests/gpt_helpers.py
takes them; ``--data random`` uses uniform random byte tokens instead.

Table 1, per variant: the collective bytes per device per step read from the compiled HLO
(``zjax.analysis.hlo.collectives(text, 8, mesh shape)`` split by
``hlo.node_bytes(..., 4)``): ``intra`` sums the ring-equivalent bytes
(``Collective.ring_bytes``: all-gather / reduce-scatter / all-to-all size x (n-1)/n,
all-reduce twice that, times the loop trip counts) of collectives whose every device group
lies inside one node; ``cross`` those of collectives with a group spanning nodes, counted
whole (a flat 8-device ring's bytes all count as cross-node). Each as KiB and as a ratio
``x Z3`` to plain ZeRO-3's (ZeRO-3 runs no in-node collective, so the in-node bytes are
shown against its total instead: ``/ Z3 total``); their sum; and ``loss``: the mean of the last ``--last`` (10)
losses of the ``--steps`` steps, with ``rel. diff`` = (loss - ZeRO-3's) / ZeRO-3's.

Table 2, per variant: the same bytes (KiB) by collective kind and by intra/cross, so that
one can see which collective moved where (all-to-all: qgZ's hops; all-reduce: MiCS's
cross-group gradient all-reduce, plus the scalars every variant reduces: loss, norms).

The closing "Read:" lines are computed from these numbers, next to what ZeRO++ predicts
for them. 1-bit Adam, 0/1 Adam and 1-bit LAMB exist as optax transforms
(zjax/train/onebit.py) but are not wired into the train step, so they are not measured
here. The devices are simulated on the host's CPU cores, so no step time is printed: on
this machine it says nothing about the network. The bytes are what the same program
moves per device on a real 2 x 4-device cluster.

Usage:
  .venv/bin/python benchmarks/comm_compression.py [--d-model 128] [--layers 2] [--heads 4] [--kv-heads 2]
      [--d-ff 352] [--seq 64] [--batch 16] [--steps 40] [--last 10] [--lr 1e-3]
      [--small-block 32] [--data text|random]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Before jax is imported: the benchmark is about 8 devices.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import importlib.util
import math
import statistics
import time

import jax
import numpy as np

import zjax
from zjax.analysis.hlo import collectives, node_bytes
from zjax.data.corpus import TextCorpus
from zjax.models.gpt import count_params, gpt_loss, make_gpt
from zjax.parallel.zero import is_layout

# benchmarks/zero.py's helpers, loaded by path: this folder stays off sys.path (see above).
_spec = importlib.util.spec_from_file_location("zero", HERE / "zero.py")
_zero = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_zero)
command_line, print_table = _zero.command_line, _zero.print_table

CONFIG = HERE.parent / "configs" / "tiny.yaml"
NODE = 4  # devices per node: 8 devices = 2 nodes x 4
KINDS = ("all-gather", "reduce-scatter", "all-to-all", "all-reduce")
QGZ = {"zero.quantized_gradients": True, "zero.node_size": NODE}


def variants(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(name, config overrides on top of ZeRO-3) of every variant, ZeRO-3 first."""
    return [
        ("ZeRO-3", {}),
        ("qwZ", {"zero.quantized_weights": True}),
        ("hpZ", {"zero.hpz_partition_size": NODE}),
        ("qgZ", QGZ),
        (f"qgZ block {args.small_block}", {**QGZ, "zero.quantization_block": args.small_block}),
        ("qgZ+qwZ", {**QGZ, "zero.quantized_weights": True}),
        ("qgZ+hpZ", {**QGZ, "zero.hpz_partition_size": NODE}),
        ("MiCS (replica=2 x data=4)", {"mesh.replica": 2, "mesh.data": 4}),
    ]


class Run:
    """One variant: its compiled step, state, collective bytes and losses."""

    def __init__(self, name: str, overrides: dict, cfg, n: int):
        self.name, self.overrides, self.cfg = name, overrides, cfg
        self.train = zjax.make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model, seed=cfg.seed))
        self.state = self.train.init()
        self.mesh_shape = dict(self.train.mesh.shape)
        # node_bytes reads the HLO's device ids (mesh positions) as nodes of 4 consecutive ids
        self.in_order = [d.id for d in self.train.mesh.devices.flat] == list(range(n))
        self.losses: list[float] = []
        self.compiled = None
        self.n = n

    def compile(self, batch: dict) -> None:
        start = time.perf_counter()
        self.compiled = self.train.lower(self.state, self.train.shard_batch(batch)).compile()
        self.compile_s = time.perf_counter() - start
        found = collectives(self.compiled.as_text(), self.n, self.mesh_shape)
        self.bytes = node_bytes(found, NODE)
        self.by_kind = {(kind, where): node_bytes([c for c in found if c.kind == kind], NODE)[where]
                        for kind in KINDS for where in ("intra", "cross")}
        self.ops = len(found)

    def step(self, batch: dict) -> None:
        self.state, metrics = self.compiled(self.state, self.train.shard_batch(batch))
        self.losses.append(float(metrics["loss"]))  # blocks on the step

    @property
    def total(self) -> float:
        return self.bytes["intra"] + self.bytes["cross"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n = jax.device_count()
    start = time.perf_counter()
    print(f"$ {command_line()}")
    print(f"jax {jax.__version__}, {n} {jax.devices()[0].platform} devices (simulated on {os.cpu_count()} CPU "
          f"cores) as {n // NODE} nodes x {NODE} consecutive devices, float32 (XLA:CPU widens bf16 collectives to "
          "float32)")
    base = make_config(args, {})
    m = base.model
    psi = count_params(m)
    print(f"GPT: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} kv), d_ff {m.d_ff}, "
          f"vocab {m.vocab_size}, seq {args.seq}; global batch {args.batch}; Ψ = {psi:,} parameters "
          f"(Ψ x 4 B = {psi * 4 / 1024:,.1f} KiB); ZeRO-3, remat.policy=full, adamw lr {args.lr:g}; "
          f"{args.steps} steps on {'real text (stdlib source)' if args.data == 'text' else 'random tokens'}, "
          f"loss = mean of the last {args.last}")
    batches = make_batches(args, m.vocab_size)

    runs = []
    for name, overrides in variants(args):
        run = build(name, overrides, args, n)
        if run is None:
            continue
        run.compile(batches[0])
        for b in batches:
            run.step(b)
        runs.append(run)
        print(f"  {name}: compiled in {run.compile_s:.1f} s, mesh {mesh_text(run.mesh_shape)} (device ids in mesh "
              f"order: {run.in_order}), {run.ops} collectives, loss {run.losses[0]:.4f} -> {run.losses[-1]:.4f}",
              flush=True)
    refused = refusal(args)
    print(f"qwZ+hpZ: refused by the config: {refused}")
    print("1-bit Adam, 0/1 Adam and 1-bit LAMB: optax transforms in zjax/train/onebit.py, not wired into the "
          "train step (optimizer.type does not offer them): not measured here")

    ref = runs[0]
    ref_loss = mean_loss(ref, args)
    print()
    print(f"1. Collective bytes per device per step from the compiled HLO (ring-equivalent KiB; intra: every group "
          f"inside one node of {NODE} consecutive devices, cross: a group spans nodes), x Z3: ratio to ZeRO-3's "
          f"(/ Z3 total: to ZeRO-3's intra + cross, where it has no in-node bytes); "
          f"loss: mean of the last {args.last} of {args.steps} steps, rel. diff to ZeRO-3's")
    # ZeRO-3 runs no collective inside a node: then in-node bytes are shown against its total
    intra_ref = ref.bytes["intra"] or ref.total
    print_table(
        ["variant", "intra KiB", "x Z3" if ref.bytes["intra"] else "/ Z3 total", "cross KiB", "x Z3", "total KiB",
         "x Z3", "loss", "rel. diff"],
        [[r.name, kib(r.bytes["intra"]), ratio(r.bytes["intra"], intra_ref), kib(r.bytes["cross"]),
          ratio(r.bytes["cross"], ref.bytes["cross"]), kib(r.total), ratio(r.total, ref.total),
          f"{mean_loss(r, args):.4f}", f"{(mean_loss(r, args) - ref_loss) / ref_loss:+.2e}"] for r in runs])
    print()
    print("2. The same bytes by collective kind, intra / cross node (KiB per device per step)")
    print_table(
        ["variant", *(f"{k} {w}" for k in KINDS for w in ("intra", "cross"))],
        [[r.name, *(kib(r.by_kind[k, w]) for k in KINDS for w in ("intra", "cross"))] for r in runs])
    read(args, runs, psi)
    print(f"\n(wall time {time.perf_counter() - start:.0f} s)")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=128, help="model width")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    parser.add_argument("--d-ff", type=int, default=352, help="MLP hidden width")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=16, help="global batch size (sequences per step)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per variant")
    parser.add_argument("--last", type=int, default=10, help="losses averaged at the end")
    parser.add_argument("--lr", type=float, default=1e-3, help="adamw learning rate (constant)")
    parser.add_argument("--small-block", type=int, default=32, help="the second qgZ quantization_block (even)")
    parser.add_argument("--data", choices=("text", "random"), default="text",
                        help="real text batches (stdlib source) or random byte tokens")
    args = parser.parse_args(argv)
    if args.last > args.steps:
        parser.error(f"--last {args.last} exceeds --steps {args.steps}")
    return args


def make_config(args: argparse.Namespace, overrides: dict):
    return zjax.load_config(CONFIG, {
        "model.d_model": args.d_model,
        "model.n_layers": args.layers,
        "model.n_heads": args.heads,
        "model.n_kv_heads": args.kv_heads,
        "model.d_ff": args.d_ff,
        "model.vocab_size": 256,
        "model.max_seq_len": args.seq,
        "data.seq_len": args.seq,
        "batch.global_batch_size": args.batch,
        "precision.compute_dtype": "float32",
        "optimizer.lr": args.lr,
        "zero.stage": 3,
        "remat.policy": "full",
        **overrides,
    })


def make_batches(args: argparse.Namespace, vocab: int) -> list[dict]:
    if args.data == "text":
        corpus = TextCorpus.stdlib(max_bytes=400_000)
        return [corpus.batch("train", k, args.batch, args.seq, seed=0) for k in range(args.steps)]
    rng = np.random.default_rng(0)
    return [{"tokens": rng.integers(0, vocab, (args.batch, args.seq + 1), np.int32)} for _ in range(args.steps)]


def build(name: str, overrides: dict, args: argparse.Namespace, n: int) -> Run | None:
    try:
        return Run(name, overrides, make_config(args, overrides), n)
    except Exception as e:  # report and go on: one broken variant should not hide the others
        print(f"{name}: FAILED {type(e).__name__}: {e}")
        return None


def refusal(args: argparse.Namespace) -> str:
    """What the config says to qwZ and hpZ together."""
    try:
        make_config(args, {"zero.quantized_weights": True, "zero.hpz_partition_size": NODE})
    except Exception as e:
        lines = [line.strip() for line in str(e).splitlines() if "hpz" in line.lower() or "not built" in line]
        return lines[-1] if lines else f"{type(e).__name__}: {e}"
    return "NOT refused (the config accepted zero.quantized_weights=true with zero.hpz_partition_size=4)"


def mesh_text(shape: dict) -> str:
    return " x ".join(f"{a}={k}" for a, k in shape.items() if k > 1)


def mean_loss(run: Run, args: argparse.Namespace) -> float:
    return statistics.mean(run.losses[-args.last:])


def kib(x: float) -> str:
    return f"{x / 1024:,.1f}"


def ratio(x: float, ref: float) -> str:
    return f"{x / ref:.3f}" if ref else "-"


# -- Read: ------------------------------------------------------------------------------


def read(args: argparse.Namespace, runs: list[Run], psi: int) -> None:
    by = {r.name: r for r in runs}
    ref = runs[0]
    n, nodes = ref.n, ref.n // NODE
    block = ref.cfg.zero.quantization_block

    def gathers(r: Run, where: str | None = None) -> float:
        return sum(r.by_kind["all-gather", w] for w in ((where,) if where else ("intra", "cross")))

    def grads(r: Run, where: str) -> float:
        return r.by_kind["reduce-scatter", where] + r.by_kind["all-to-all", where]

    def cross(r: Run) -> str:
        return ratio(r.bytes["cross"], ref.bytes["cross"])

    layouts = [lay for lay in jax.tree.leaves(ref.train.layouts, is_leaf=is_layout) if lay is not None]
    psi_l = sum(math.prod(lay.shape) for lay in layouts if lay.stacked)  # the scanned layers' parameters
    psi_o = sum(math.prod(lay.shape) for lay in layouts if not lay.stacked)  # embedding, final norm
    g = psi * 4 * (n - 1) / n
    theory = (3 * psi_l + 2 * psi_o) * 4 * (n - 1) / n
    print()
    print("Read:")
    print(f"- ZeRO-3: {kib(ref.total)} KiB per device per step = {ref.total / g:.2f} G (G = Ψ x 4 B x 7/8, one fp32 "
          f"gradient reduce-scatter). Theory: 3G for the Ψ_L = {psi_l:,} parameters of the layer scan (forward "
          f"gather, backward re-gather, reduce-scatter) and 2G for the other Ψ_o = {psi_o:,} (embedding, final norm: "
          f"gathered once, outside the scan) = {kib(theory)} KiB, measured/theory {ref.total / theory:.4f}; "
          f"{ref.bytes['cross'] / ref.total:.0%} of it counted cross-node (every group spans both nodes).")
    if "qwZ" in by:
        r = by["qwZ"]
        print(f"- qwZ: all-gather bytes {ratio(gathers(r), gathers(ref))}x ZeRO-3's (int8 + one fp32 scale per "
              f"{block} against fp32: (1 + 4/{block}) / 4 = {(1 + 4 / block) / 4:.3f}; ZeRO++ quotes 1/2, from fp16); "
              f"cross-node {cross(r)}x, total {ratio(r.total, ref.total)}x; loss {rel(r, ref, args)}.")
    if "hpZ" in by:
        r = by["hpZ"]
        ideal = (psi / NODE * (nodes - 1) / nodes + psi * (n - 1) / n) / ((3 * psi_l + 2 * psi_o) * (n - 1) / n)
        print(f"- hpZ: cross-node {cross(r)}x ZeRO-3's, cross-node all-gather bytes "
              f"{ratio(gathers(r, 'cross'), gathers(ref, 'cross'))}x, in-node all-gather {kib(gathers(r, 'intra'))} "
              f"KiB (ZeRO++: the backward gathers stay in the node; the forward's cross hop moves 1/{NODE} of the "
              f"parameters over groups of {nodes}, then the fp32 reduce-scatter: ideal cross ratio {ideal:.3f}); "
              f"loss {rel(r, ref, args)}"
              f"{' (bit-identical losses)' if r.losses == ref.losses else ''}.")
    for name in ("qgZ", f"qgZ block {args.small_block}"):
        if name not in by:
            continue
        r = by[name]
        b = r.cfg.zero.quantization_block
        ideal = (0.5 + 4 / b) / 4 / NODE * (nodes - 1) / nodes / ((n - 1) / n)
        print(f"- {name}: cross-node gradient bytes (reduce-scatter + all-to-all) {kib(grads(r, 'cross'))} KiB vs "
              f"ZeRO-3's {kib(grads(ref, 'cross'))}: {ratio(grads(r, 'cross'), grads(ref, 'cross'))}x (ideal, "
              f"without padding: int4 + an fp32 scale per {b}, 1/{NODE} of it crossing: {ideal:.4f}x); in-node "
              f"gradient bytes {kib(grads(r, 'intra'))} KiB; cross-node total {cross(r)}x (the fp32 gathers stay); "
              f"loss {rel(r, ref, args)}.")
    for name in ("qgZ+qwZ", "qgZ+hpZ"):
        if name in by:
            r = by[name]
            print(f"- {name}: cross-node {cross(r)}x, in-node {kib(r.bytes['intra'])} KiB, "
                  f"total {ratio(r.total, ref.total)}x ZeRO-3's; loss {rel(r, ref, args)}.")
    qgz = [r for r in runs if r.cfg.zero.quantized_gradients]
    exact = [r for r in runs if not r.cfg.zero.quantized_gradients]
    if qgz and len(exact) > 1:
        worst = max(exact[1:], key=lambda r: abs(mean_loss(r, args) - mean_loss(ref, args)))
        print(f"- Loss: the variants with exact gradients end within {rel(worst, ref, args)} of ZeRO-3's ({worst.name} "
              f"farthest); the qgZ ones (int4 gradients, no error feedback) at "
              + ", ".join(f"{r.name} {rel(r, ref, args)}" for r in qgz) + ".")
    mics = next((r for r in runs if r.name.startswith("MiCS")), None)
    if mics is not None:
        ar = mics.by_kind["all-reduce", "cross"]
        print(f"- MiCS: cross-node {cross(mics)}x ZeRO-3's, {ar / mics.bytes['cross']:.1%} of it all-reduce "
              f"({kib(ar)} KiB; the gradient shards all-reduced over the 2 groups ideally move Ψ/4 x 4 B x 2 x 1/2 = "
              f"{kib(psi)} KiB); in-node {kib(mics.bytes['intra'])} KiB; loss {rel(mics, ref, args)}.")
    best = min(runs[1:], key=lambda r: r.bytes["cross"], default=None)
    if best is not None:
        print(f"- Fewest cross-node bytes: {best.name}, {cross(best)}x ZeRO-3's (ZeRO++ quotes 4x less cross-node "
              "traffic for qwZ + hpZ + qgZ together, a combination the config refuses here).")


def rel(r: Run, ref: Run, args: argparse.Namespace) -> str:
    a, b = mean_loss(r, args), mean_loss(ref, args)
    return f"{(a - b) / b:+.2e}"


if __name__ == "__main__":
    sys.exit(main())
