"""Communication compression (ZeRO++ qwZ, hpZ, qgZ + LoCo; MiCS; 1-bit Adam, 0/1 Adam, 1-bit LAMB): bytes and loss.

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

Part 1, the ZeRO++ and MiCS variants (each a set of config overrides on top of ZeRO-3):
- ZeRO-3: plain ``zero.stage=3`` on data=8, the reference of every ratio;
- qwZ: ``zero.quantized_weights=true`` (parameter gathers move int8 blocks of
  ``zero.quantization_block`` = 256 elements, one float32 scale each);
- hpZ: ``zero.hpz_partition_size=4`` (a secondary partition inside each node, saved for the
  backward pass, whose gathers then stay in the node);
- qgZ: ``zero.quantized_gradients=true zero.node_size=4`` (gradient reduce-scatters as two
  int4 all-to-all hops, in-node then cross-node), at block 256 and at ``--small-block`` 32;
- qgZ+LoCo beta 0 and qgZ+LoCo beta 0.8: qgZ at block 256 with ZeRO++'s LoCo error feedback
  (``zero.loco=true``, ``zero.loco_err_beta`` 0.0 and 0.8 (DeepSpeed's err_beta),
  ``zero.loco_reset_steps=0``: never reset): each device keeps a float32 buffer of what its
  int4 quantizers lost and adds it to the next step's gradient before quantizing. The buffers
  stay on the device, so LoCo should move exactly qgZ's bytes: the script compares the two
  programs' collectives (kind, size, device groups, runs per step) and prints whether they are
  identical;
- qgZ+qwZ, qgZ+hpZ, qwZ+hpZ (the cross-node hop of hpZ's gather moves qwZ's int8 blocks) and all
  three together;
- MiCS: ``mesh.replica=2 mesh.data=4``, ZeRO-3 inside each group of 4 devices (a node) and
  the gradient shards all-reduced across the 2 groups.

Part 2, the 1-bit optimizers (``optimizer.type``, zjax/train/onebit.py): they run at
``zero.stage=0`` over a mesh of data alone (data=8), taking each device's local gradient and
doing their own communication. Same model and batches, ``--opt-steps`` (40) steps, lr
``--lr`` constant, ``remat.policy=none`` (nothing is gathered at ZeRO-0, so remat changes no
byte) and ``gradient_clipping=0`` (the 1-bit optimizers clip by the root mean square of the
devices' local gradient norms, Adam by the norm of the mean gradient: the same threshold would
clip them differently; without it 1-bit Adam's exact phase is Adam, which the script checks):
- adam: ``optimizer.type=adam`` (optax.adam; weight_decay is 0, so adamw is the same), its
  gradient averaged by XLA's float32 all-reduce: the reference of part 2;
- 1-bit Adam: ``onebit_adam`` with ``optimizer.freeze_step`` = 20% of ``--opt-steps`` (8 of 40):
  that many exact Adam updates (float32 gradient all-reduce), then the variance freezes and
  the momentum is averaged by the 1-bit compressed all-reduce (error feedback), every step;
- 0/1 Adam: ``zero_one_adam`` with ``optimizer.var_freeze_step`` = 20% of ``--opt-steps`` and
  ``var_update_scaler`` 2, ``local_step_scaler`` 4, ``local_step_clipper`` 4 (with DeepSpeed's
  16 / 32678 / 16, every variance-phase update of a 40-step run would be exact and every local
  step would sync: the local interval would stay 1): exact variance updates
  at intervals that double every 2 of them, 1-bit gradient all-reduces between them, then
  local steps (no communication) with a 1-bit sync whenever the local interval (1, 2, then
  4: doubling every 4 updates, clipped at 4) divides DeepSpeed's step number; the script
  prints how many updates of the run take each branch (``zero_one_adam_schedule``);
- 1-bit LAMB: ``onebit_lamb`` with ``optimizer.freeze_step`` = 20%: exact LAMB, then the
  momentum of all tensors fused into one buffer and averaged 1-bit.

Every variant is initialized (``train.init()``, same seed), compiled once
(``train.lower(state, batch).compile()``) and then stepped ``--steps`` times (40) on the
same batches (part 2: ``--opt-steps``, the first of the same batches), one step at a time,
blocking on ``float(metrics["loss"])`` each step. The
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

The "Read:" lines after table 2 are computed from these numbers, next to what ZeRO++ predicts
for them.

Part 2's programs hold both phases of their optimizer: 1-bit Adam and 1-bit LAMB choose the
exact or the compressed update with one ``lax.cond``, 0/1 Adam one of four updates with one
``lax.switch``, so the compiled module is one HLO ``conditional`` whose branches hold those
phases' collectives. Summing the module's collectives would add phases of which a step runs
one. So each collective is attributed to the branch of that conditional whose computations
reach it (or to none: it runs every step), and split by its element type, read from the shape
the HLO gives its result; ``zjax.analysis.hlo.collectives`` sizes each part (``ring_bytes``,
as in part 1; ``only`` below drops the other collective instructions from the HLO text first,
and the parts are checked to add up to the module's total). Table 3, per variant and branch:
ring-equivalent bytes per device of the uint8 all-to-all and all-gather (the packed signs:
8 per byte, one all-to-all of every device's chunk, one all-gather of the server's signs),
the float32 all-gathers (the scales: one float32 per device, worker and server, per
compressed buffer), the float32 all-reduces (the exact phase's gradient all-reduce) and any
other; its row says what that branch is (from the optimizer's code: ``lax.cond(pred, exact,
onebit)`` lowers to branches (onebit, exact); 0/1 Adam's ``lax.switch`` to its order: variance
update, 1-bit update, local step, local step + sync), and how many of the run's updates take
it (from ``freeze_step`` or ``zero_one_adam_schedule``; the script checks that the branches
it calls exact hold a float32 all-reduce and no uint8, and the 1-bit ones uint8). The
"every step" row holds the collectives outside the conditional: the loss, the gradient norm
and the finite check (scalars). adam has no conditional: its one all-reduce is XLA's
combined float32 all-reduce of the gradients and the scalars.

Table 4, per variant: ``exact`` = the float32 all-reduce bytes of the exact branch (adam:
its all-reduce); ``1-bit`` = the bytes of a compressed branch (uint8 signs + float32 scales;
0/1 Adam's 1-bit update and sync branches move the same); their ratio (DeepSpeed: 1/32 of the
float32 all-reduce, plus the scales and the signs' padding to a multiple of 8 x lcm(8, 8) per
buffer); ``run mean``: the bytes per step averaged over the run's updates, each counting the
branch it takes plus the every-step collectives, and its ratio to adam's; and the loss: the
mean of the last ``--last`` of the ``--opt-steps`` losses, with its rel. diff to adam's.
The "Read:" lines after table 4 compute the ratios above against 1/32 and compare
1-bit Adam's first ``freeze_step`` + 1 losses (before any compressed update) with adam's.

The devices are simulated on the host's CPU cores, so no step time is printed: on
this machine it says nothing about the network. The bytes are what the same program
moves per device on a real 2 x 4-device cluster (part 2: on 8 devices; its groups span
the 2 nodes, so all of part 2's bytes would cross them).

Usage:
  .venv/bin/python benchmarks/comm_compression.py [--d-model 128] [--layers 2] [--heads 4] [--kv-heads 2]
      [--d-ff 352] [--seq 64] [--batch 16] [--steps 40] [--last 10] [--lr 1e-3]
      [--small-block 32] [--data text|random] [--opt-steps 40]
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
import collections
import importlib.util
import math
import re
import statistics
import time

import jax
import numpy as np

import zjax
from zjax.analysis import hlo
from zjax.analysis.hlo import collectives, node_bytes
from zjax.data.corpus import TextCorpus
from zjax.models.gpt import count_params, gpt_loss, make_gpt
from zjax.parallel.zero import is_layout
from zjax.train import onebit

# benchmarks/zero.py's helpers, loaded by path: this folder stays off sys.path (see above).
_spec = importlib.util.spec_from_file_location("zero", HERE / "zero.py")
_zero = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_zero)
command_line, print_table = _zero.command_line, _zero.print_table

CONFIG = HERE.parent / "configs" / "tiny.yaml"
NODE = 4  # devices per node: 8 devices = 2 nodes x 4
KINDS = ("all-gather", "reduce-scatter", "all-to-all", "all-reduce")
QGZ = {"zero.quantized_gradients": True, "zero.node_size": NODE}
LOCO = {**QGZ, "zero.loco": True, "zero.loco_reset_steps": 0}
# Part 2: the 1-bit optimizers run at ZeRO-0 over data alone; no remat (nothing is gathered),
# no clipping (see the docstring)
ZERO0 = {"zero.stage": 0, "mesh.data": 8, "remat.policy": "none", "gradient_clipping": 0.0}
FREEZE = 0.2  # freeze_step and var_freeze_step: this fraction of --opt-steps
# 0/1 Adam's interval knobs, small enough that a 40-step run doubles its variance interval,
# takes local steps and syncs (DeepSpeed's defaults: 16, 32678, 16)
ZERO_ONE = {"optimizer.var_update_scaler": 2, "optimizer.local_step_scaler": 4, "optimizer.local_step_clipper": 4}


def variants(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(name, config overrides on top of ZeRO-3) of every variant, ZeRO-3 first."""
    return [
        ("ZeRO-3", {}),
        ("qwZ", {"zero.quantized_weights": True}),
        ("hpZ", {"zero.hpz_partition_size": NODE}),
        ("qgZ", QGZ),
        ("qgZ+LoCo beta 0", {**LOCO, "zero.loco_err_beta": 0.0}),
        ("qgZ+LoCo beta 0.8", {**LOCO, "zero.loco_err_beta": 0.8}),
        (f"qgZ block {args.small_block}", {**QGZ, "zero.quantization_block": args.small_block}),
        ("qgZ+qwZ", {**QGZ, "zero.quantized_weights": True}),
        ("qgZ+hpZ", {**QGZ, "zero.hpz_partition_size": NODE}),
        ("qwZ+hpZ", {"zero.quantized_weights": True, "zero.hpz_partition_size": NODE}),
        ("qwZ+hpZ+qgZ", {**QGZ, "zero.quantized_weights": True, "zero.hpz_partition_size": NODE}),
        ("MiCS (replica=2 x data=4)", {"mesh.replica": 2, "mesh.data": 4}),
        ("MiCS hierarchical (data=8)", {"zero.hierarchical_gathers": True, "zero.node_size": NODE}),
    ]


def freeze_step(args: argparse.Namespace) -> int:
    return max(1, round(FREEZE * args.opt_steps))


def optimizer_variants(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(name, config overrides on top of part 1's ZeRO-3 config) of part 2's variants, adam first."""
    f = freeze_step(args)
    return [
        ("adam", {**ZERO0, "optimizer.type": "adam"}),
        ("1-bit Adam", {**ZERO0, "optimizer.type": "onebit_adam", "optimizer.freeze_step": f}),
        ("0/1 Adam", {**ZERO0, "optimizer.type": "zero_one_adam", "optimizer.var_freeze_step": f, **ZERO_ONE}),
        ("1-bit LAMB", {**ZERO0, "optimizer.type": "onebit_lamb", "optimizer.freeze_step": f}),
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
        self.text = self.compiled.as_text()
        self.found = found = collectives(self.text, self.n, self.mesh_shape)
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

    runs = run_all(variants(args), args, batches[:args.steps], n)

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
    optimizers(args, batches[:args.opt_steps], n)
    print(f"\n(wall time {time.perf_counter() - start:.0f} s)")
    return 0


def run_all(named: list[tuple[str, dict]], args: argparse.Namespace, batches: list[dict], n: int) -> list[Run]:
    """Build, compile and step every variant on ``batches``; a failure is printed and skipped."""
    runs = []
    for name, overrides in named:
        run = build(name, overrides, args, n)
        if run is None:
            continue
        try:
            run.compile(batches[0])
            for b in batches:
                run.step(b)
        except Exception as e:  # as in build: report and go on
            print(f"{name}: FAILED {type(e).__name__}: {e}")
            continue
        runs.append(run)
        print(f"  {name}: compiled in {run.compile_s:.1f} s, mesh {mesh_text(run.mesh_shape)} (device ids in mesh "
              f"order: {run.in_order}), {run.ops} collectives, loss {run.losses[0]:.4f} -> {run.losses[-1]:.4f}",
              flush=True)
    return runs


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
    parser.add_argument("--opt-steps", type=int, default=40,
                        help="training steps per 1-bit optimizer variant (part 2; freeze steps: 20%% of it)")
    args = parser.parse_args(argv)
    for flag in ("steps", "opt_steps"):
        if args.last > getattr(args, flag):
            parser.error(f"--last {args.last} exceeds --{flag.replace('_', '-')} {getattr(args, flag)}")
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
    """Batch k for step k, as many as the longer part needs (each part takes the first ones)."""
    count = max(args.steps, args.opt_steps)
    if args.data == "text":
        corpus = TextCorpus.stdlib(max_bytes=400_000)
        return [corpus.batch("train", k, args.batch, args.seq, seed=0) for k in range(count)]
    rng = np.random.default_rng(0)
    return [{"tokens": rng.integers(0, vocab, (args.batch, args.seq + 1), np.int32)} for _ in range(count)]


def build(name: str, overrides: dict, args: argparse.Namespace, n: int) -> Run | None:
    try:
        return Run(name, overrides, make_config(args, overrides), n)
    except Exception as e:  # report and go on: one broken variant should not hide the others
        print(f"{name}: FAILED {type(e).__name__}: {e}")
        return None


def mesh_text(shape: dict) -> str:
    return " x ".join(f"{a}={k}" for a, k in shape.items() if k > 1)


def mean_loss(run: Run, args: argparse.Namespace) -> float:
    return statistics.mean(run.losses[-args.last:])


def kib(x: float) -> str:
    return f"{x / 1024:,.1f}"


def ratio(x: float, ref: float) -> str:
    return f"{x / ref:.3f}" if ref else "-"


def inverse(x: float, ref: float) -> str:
    """``x / ref`` as ``1/k``."""
    return f"1/{ref / x:.1f}" if x and ref else "-"


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
    loco = [r for r in runs if r.cfg.zero.loco]
    if loco and "qgZ" in by:
        plain = by["qgZ"]
        gap = abs(mean_loss(plain, args) - mean_loss(ref, args))
        for r in loco:
            same = sorted(r.found) == sorted(plain.found)
            print(f"- {r.name} (err_beta {r.cfg.zero.loco_err_beta:g}, never reset): "
                  + (f"the compiled step's {r.ops} collectives are qgZ's, identical in kind, size, device groups and "
                     f"runs per step: LoCo adds no communication ({kib(r.total)} KiB per step, cross-node "
                     f"{cross(r)}x ZeRO-3's as qgZ)" if same else
                     f"its collectives DIFFER from qgZ's: {r.ops} against {plain.ops}, {kib(r.total)} KiB against "
                     f"{kib(plain.total)} per step, cross-node {cross(r)}x ZeRO-3's")
                  + f"; loss {rel(r, ref, args)} against plain qgZ's {rel(plain, ref, args)}: the gap to ZeRO-3 is "
                  f"{ratio(abs(mean_loss(r, args) - mean_loss(ref, args)), gap)}x qgZ's.")
    for name in ("qgZ+qwZ", "qgZ+hpZ"):
        if name in by:
            r = by[name]
            print(f"- {name}: cross-node {cross(r)}x, in-node {kib(r.bytes['intra'])} KiB, "
                  f"total {ratio(r.total, ref.total)}x ZeRO-3's; loss {rel(r, ref, args)}.")
    qgz = [r for r in runs if r.cfg.zero.quantized_gradients and not r.cfg.zero.loco]
    exact = [r for r in runs if not r.cfg.zero.quantized_gradients]
    if qgz and len(exact) > 1:
        worst = max(exact[1:], key=lambda r: abs(mean_loss(r, args) - mean_loss(ref, args)))
        print(f"- Loss: the variants with exact gradients end within {rel(worst, ref, args)} of ZeRO-3's ({worst.name} "
              f"farthest); the qgZ ones without error feedback (int4 gradients) at "
              + ", ".join(f"{r.name} {rel(r, ref, args)}" for r in qgz)
              + ("; with LoCo at " + ", ".join(f"{r.name} {rel(r, ref, args)}" for r in loco) if loco else "") + ".")
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


# -- Part 2: the 1-bit optimizers ---------------------------------------------------------

# Which computations a line calls, as zjax.analysis.hlo._multipliers reads them
_CALLS = re.compile(r"(?:body|condition|to_apply|calls)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_COLLECTIVE = (*KINDS, "collective-permute")  # every instruction zjax.analysis.hlo.collectives counts
# HLO branch of the step's conditional -> (what the optimizer's code runs there, its role). lax.cond(count <
# freeze_step, exact, onebit) lowers to the branches (onebit, exact); lax.switch keeps its order.
BRANCHES = {
    "onebit_adam": {0: ("1-bit momentum", "1-bit"), 1: ("exact Adam", "exact")},
    "onebit_lamb": {0: ("1-bit momentum", "1-bit"), 1: ("exact LAMB", "exact")},
    "zero_one_adam": {0: ("variance update", "exact"), 1: ("1-bit update", "1-bit"), 2: ("local step", "none"),
                      3: ("local step + sync", "1-bit")},
}
TYPES = {"u8": "uint8", "f32": "float32"}
COLUMNS = (("u8", "all-to-all"), ("u8", "all-gather"), ("f32", "all-gather"), ("f32", "all-reduce"))


def instructions(text: str):
    """``(line, computation, kind, element type)`` of each line of compiled HLO text, read with
    zjax.analysis.hlo's own patterns: kind is the collective's (None for other lines), element
    type the HLO type name of its result's shapes (``mixed`` when a tuple holds several)."""
    comp = None
    for line in text.splitlines():
        header = hlo._HEADER.match(line)
        if header:
            comp = header.group(1)
        m = hlo._NAMED_INSTR.match(line)
        kind = m.group(3).removesuffix("-start") if m else None
        if kind not in _COLLECTIVE:
            yield line, comp, None, None
            continue
        types = {t for t, _ in hlo._SHAPE.findall(m.group(2))}
        yield line, comp, kind, types.pop() if len(types) == 1 else "mixed"


def only(text: str, keep) -> str:
    """``text`` without the collective instructions for which ``keep(computation, element type)``
    is false: ``collectives`` of it counts the kept ones, with the same loop trip counts."""
    return "\n".join(line for line, comp, kind, dtype in instructions(text) if kind is None or keep(comp, dtype))


def branch_of(text: str) -> tuple[dict[str, int], int]:
    """The branch of the module's conditional that reaches each computation (absent: reached by
    none, run every step), and the number of branches (0: no conditional)."""
    comps = hlo._computations(text)
    calls = {name: [c for line in lines for c in _CALLS.findall(line)]
             + [b.strip().lstrip("%") for line in lines for m in _BRANCHES.findall(line) for b in m.split(",")]
             for name, lines in comps.items()}
    conditionals = [[b.strip().lstrip("%") for b in m.split(",")]
                    for lines in comps.values() for line in lines for m in _BRANCHES.findall(line)]
    if len(conditionals) > 1:
        print(f"  note: {len(conditionals)} conditionals in the module; branches are those of the first")
    where: dict[str, int] = {}
    for k, root in enumerate(conditionals[0] if conditionals else ()):
        todo = [root]
        while todo:
            name = todo.pop()
            if name not in where:
                where[name] = k
                todo += calls.get(name, [])
    return where, len(conditionals[0]) if conditionals else 0


def split(run: Run) -> tuple[collections.Counter, int]:
    """Ring bytes per device of ``run``'s collectives by (branch or None, element type, kind)."""
    where, count = branch_of(run.text)
    types = {dtype for _, _, kind, dtype in instructions(run.text) if kind}
    parts = collections.Counter()
    for b in (None, *range(count)):
        for t in types:
            for c in collectives(only(run.text, lambda comp, dtype: where.get(comp) == b and dtype == t), run.n,
                                 run.mesh_shape):
                parts[b, t, c.kind] += c.ring_bytes
    return parts, count


def branch_per_step(run: Run, steps: int) -> list[int | None]:
    """The HLO branch each of the run's updates takes (None: no conditional)."""
    o = run.cfg.optimizer
    t = np.arange(steps)
    if o.type in ("onebit_adam", "onebit_lamb"):
        return [1 if k < o.freeze_step else 0 for k in t]
    if o.type == "zero_one_adam":
        ph = onebit.zero_one_adam_schedule(t, var_freeze_step=o.var_freeze_step, var_update_scaler=o.var_update_scaler,
                                           local_step_scaler=o.local_step_scaler,
                                           local_step_clipper=o.local_step_clipper)
        # as zero_one_adam's update picks its lax.switch index
        return np.where(ph.local_phase, np.where(ph.sync, 3, 2), np.where(ph.variance_update, 0, 1)).tolist()
    return [None] * steps


class Phases:
    """Part 2's byte accounting of one run: by branch, element type and kind."""

    def __init__(self, run: Run, steps: int):
        self.run, self.type = run, run.cfg.optimizer.type
        self.parts, self.count = split(run)
        self.taken = branch_per_step(run, steps)
        self.names = BRANCHES.get(self.type, {})
        self.adds_up = math.isclose(sum(self.parts.values()), sum(c.ring_bytes for c in run.found), rel_tol=1e-12)

    def bytes(self, branch: int | None, dtype: str | None = None, kind: str | None = None) -> float:
        return sum(v for (b, t, k), v in self.parts.items()
                   if b == branch and dtype in (None, t) and kind in (None, k))

    def role(self, role: str) -> list[int]:
        return [b for b, (_, r) in self.names.items() if r == role]

    @property
    def exact(self) -> float:
        """The exact phase's float32 all-reduce (adam: its one all-reduce)."""
        branches = self.role("exact") if self.count else [None]
        return self.bytes(branches[0], "f32", "all-reduce") if branches else 0.0

    @property
    def onebit(self) -> float:
        """A compressed branch's bytes (signs + scales)."""
        branches = self.role("1-bit")
        return self.bytes(branches[0]) if branches else 0.0

    @property
    def signs(self) -> float:
        branches = self.role("1-bit")
        return self.bytes(branches[0], "u8") if branches else 0.0

    @property
    def mean(self) -> float:
        """Bytes per step averaged over the run: every step's collectives plus the branch each update takes."""
        return self.bytes(None) + statistics.mean(self.bytes(b) if b is not None else 0.0 for b in self.taken)

    def mismatches(self) -> list[str]:
        """Branches whose collectives do not fit the role the optimizer's code gives them."""
        out = []
        if self.count != len(self.names):
            out.append(f"{self.count} branches in the HLO, {len(self.names)} in the optimizer's code")
        for b, (name, role) in self.names.items():
            u8, ar = self.bytes(b, "u8"), self.bytes(b, "f32", "all-reduce")
            ok = {"exact": ar > 0 and not u8, "1-bit": u8 > 0 and not ar, "none": not self.bytes(b)}[role]
            if not ok:
                out.append(f"branch {b} ({name}): uint8 {u8:,.0f} B, float32 all-reduce {ar:,.0f} B")
        return out


def optimizers(args: argparse.Namespace, batches: list[dict], n: int) -> None:
    """Part 2: adam, 1-bit Adam, 0/1 Adam and 1-bit LAMB at ZeRO-0 over data=8."""
    steps, f = args.opt_steps, freeze_step(args)
    print()
    print(f"Part 2: 1-bit optimizers at zero.stage=0 over mesh data={n} (remat.policy=none, gradient_clipping=0), "
          f"lr {args.lr:g} constant, {steps} steps on the same batches, loss = mean of the last {args.last}; "
          f"freeze_step = var_freeze_step = {f} ({FREEZE:.0%} of {steps}); 0/1 Adam: "
          + ", ".join(f"{k.split('.')[-1]} {v}" for k, v in ZERO_ONE.items()))
    runs = run_all(optimizer_variants(args), args, batches, n)
    if not runs:
        return
    phases = [Phases(r, steps) for r in runs]
    for ph in phases:
        if ph.count:
            took = collections.Counter(ph.taken)
            print(f"  {ph.run.name}: updates per branch of the step's conditional: "
                  + ", ".join(f"{b} {ph.names.get(b, ('?',))[0]} {took[b]}" for b in range(ph.count)))
    bad = [f"{ph.run.name}: {m}" for ph in phases for m in ph.mismatches()]
    print("  branch roles checked against the HLO (exact: a float32 all-reduce, no uint8; 1-bit: uint8, no float32 "
          "all-reduce; local step: nothing): " + ("all agree" if not bad else "MISMATCH " + "; ".join(bad)))
    print("  the parts add up to the module's collective bytes: "
          + ", ".join(f"{ph.run.name} {ph.adds_up}" for ph in phases))

    print()
    print("3. Collective bytes per device of each branch of the step's conditional (ring-equivalent bytes; every "
          "step: the collectives outside it), by element type and kind; updates: how many of the run's "
          f"{steps} take that branch")
    rows = []
    for ph in phases:
        for b in (None, *range(ph.count)):
            other = ph.bytes(b) - sum(ph.bytes(b, t, k) for t, k in COLUMNS)
            rows.append([ph.run.name, "every step" if b is None else f"{b}: {ph.names.get(b, ('?',))[0]}",
                         str(steps if b is None else ph.taken.count(b)),
                         *(f"{ph.bytes(b, t, k):,.0f}" for t, k in COLUMNS), f"{other:,.0f}",
                         f"{ph.bytes(b):,.0f}"])
    print_table(["variant", "branch", "updates", *(f"{TYPES[t]} {k}" for t, k in COLUMNS), "other", "total"], rows)

    ref = phases[0].run
    ref_loss = mean_loss(ref, args)
    print()
    print("4. Per variant: exact = the exact phase's float32 gradient all-reduce (adam: its all-reduce, the scalars "
          "included), 1-bit = a compressed update's bytes (uint8 signs + float32 scales), both KiB per device per "
          f"step; run mean: KiB per step averaged over the {steps} updates (the branch each takes + every step's); "
          f"loss: mean of the last {args.last} of {steps} steps, rel. diff to adam's")
    print_table(
        ["variant", "exact KiB", "1-bit KiB", "1-bit / exact", "signs / exact", "run mean KiB", "x adam", "loss",
         "rel. diff"],
        [[ph.run.name, kib(ph.exact), kib(ph.onebit) if ph.onebit else "-", inverse(ph.onebit, ph.exact),
          inverse(ph.signs, ph.exact), kib(ph.mean), ratio(ph.mean, phases[0].mean),
          f"{mean_loss(ph.run, args):.4f}", f"{(mean_loss(ph.run, args) - ref_loss) / ref_loss:+.2e}"]
         for ph in phases])
    read_optimizers(args, phases)
    zero1(args, batches, n)


def zero1(args: argparse.Namespace, batches: list[dict], n: int) -> None:
    """Part 3: 1-bit Adam under ZeRO-1 and ZeRO-3 (its moments and master as shards; DeepSpeed
    refuses it), against adam under ZeRO-1 and 1-bit Adam at ZeRO-0: the final losses (the bytes of its
    compressed update are 1/32 of an fp32 all-reduce within 2%, tests/train/test_onebit.py)."""
    f = freeze_step(args)
    zero1 = {**ZERO0, "zero.stage": 1}
    runs = run_all([("adam ZeRO-1", {**zero1, "optimizer.type": "adam"}),
                    ("1-bit Adam ZeRO-1", {**zero1, "optimizer.type": "onebit_adam", "optimizer.freeze_step": f}),
                    ("1-bit Adam ZeRO-3", {**zero1, "zero.stage": 3, "optimizer.type": "onebit_adam",
                                           "optimizer.freeze_step": f}),
                    ("1-bit Adam ZeRO-0", {**ZERO0, "optimizer.type": "onebit_adam", "optimizer.freeze_step": f})],
                   args, batches, n)
    if len(runs) < 4:
        return
    ref = mean_loss(runs[0], args)
    print()
    print(f"5. 1-bit Adam under ZeRO-1 and ZeRO-3 (freeze_step {f}): loss = mean of the last {args.last} of {args.opt_steps} "
          "steps, rel. diff to adam ZeRO-1's")
    print_table(["variant", "loss", "rel. diff"],
                [[r.name, f"{mean_loss(r, args):.4f}", f"{(mean_loss(r, args) - ref) / ref:+.2e}"] for r in runs])


def read_optimizers(args: argparse.Namespace, phases: list[Phases]) -> None:
    adam = phases[0]
    leaves = [math.prod(lay.shape) for lay in jax.tree.leaves(adam.run.train.layouts, is_leaf=is_layout)
              if lay is not None]
    n = adam.run.n
    print()
    print("Read:")
    for ph in phases[1:]:
        r = ph.run
        if not ph.onebit:
            continue
        # the compressed all-reduce's buffers: one per tensor, or one fused (1-bit LAMB)
        buffers = [sum(leaves)] if ph.type == "onebit_lamb" else leaves
        padded = sum(onebit.padded_size(size, n) for size in buffers)
        # signs: an all-to-all and an all-gather of P/8 bytes; scales: two all-gathers of one float32 per device
        theory = 2 * padded / 8 * (n - 1) / n + len(buffers) * 2 * 4 * (n - 1)
        others = {b: ph.bytes(b) for b in ph.role("1-bit")}
        same = len(set(others.values())) == 1
        text = (f"- {r.name}: a compressed update moves {kib(ph.onebit)} KiB per device, the exact phase's float32 "
                f"all-reduce {kib(ph.exact)} KiB: {inverse(ph.onebit, ph.exact)} (signs alone "
                f"{inverse(ph.signs, ph.exact)}; DeepSpeed's 1/32 plus {len(buffers)} buffer"
                f"{'s' if len(buffers) > 1 else ''} of scales and the signs of {padded:,} padded values for Ψ = "
                f"{sum(leaves):,}: theory {kib(theory)} KiB, measured/theory {ph.onebit / theory:.4f})")
        if len(others) > 1:
            text += ("; its 1-bit update and sync branches move the same bytes" if same else
                     "; its compressed branches differ: " + ", ".join(f"{b} {kib(v)} KiB" for b, v in others.items()))
        roles = collections.Counter(ph.names[b][1] for b in ph.taken)
        text += (f"; over the run {roles['exact']} exact, {roles['1-bit']} compressed"
                 + (f" and {roles['none']} silent" if roles['none'] else "")
                 + f" updates: {kib(ph.mean)} KiB per step on average, {ratio(ph.mean, adam.mean)}x adam's; "
                 f"loss {rel(r, adam.run, args)} against adam's.")
        print(text)
    onebit_adam = next((ph for ph in phases if ph.type == "onebit_adam"), None)
    if onebit_adam is not None:
        f = onebit_adam.run.cfg.optimizer.freeze_step
        a, b = np.array(onebit_adam.run.losses[:f + 1]), np.array(adam.run.losses[:f + 1])
        print(f"- 1-bit Adam's exact phase is Adam: its first {f + 1} losses (after 0..{f} exact updates) differ from "
              f"adam's by at most {np.max(np.abs(a - b) / np.abs(b)):.2e} (relative); the last {args.last} "
              f"(compressed phase) by {rel(onebit_adam.run, adam.run, args)} on the mean.")


if __name__ == "__main__":
    sys.exit(main())
