"""Pipeline parallelism (mesh axis ``stage``; GPipe, 1F1B and interleaved 1F1B) against data=8 at the same global batch.

On 8 simulated CPU devices, the reference GPT (configs/tiny.yaml resized by the flags:
8 layers, d_model 128, seq 128, vocab 256, 4 heads (2 kv) by default; float32, ZeRO-1 unless
``--zero``, remat none) is built with ``mesh.stage`` = P in ``--stages`` (2, 4; data = 8/P;
embedding and head replicated on every stage) and ``pipeline.microbatches`` = M = f x P for
f in ``--factors`` (1, 2, 4), on each of the three schedules (``pipeline.schedule`` =
``gpipe`` | ``1f1b`` | ``interleaved``, the tables of ``zjax.parallel.pipeline.make_schedule``).
GPipe and 1F1B split the layer stack into P contiguous stages; interleaved runs with
``pipeline.repeats`` = V = ``--virtual`` (2): the stack is cut into V x P chunks, chunk
v x P + s on stage s, and activations go round the ring of stages V times. Interleaved needs
the layer count to divide by P x V (8 layers: P = 2 and 4 at V = 2); where it does not, that
P's interleaved variants are skipped and the reason printed. The pipeline micro-batch is fixed
(``--micro-rows``, 2 rows), so a data group's rows are micro_rows x M and the global batch
is micro_rows x M x (8/P): a larger M means more micro-batches of the same size, i.e. a
larger batch. For every distinct global batch a data=8 step without a pipeline is built
too (the baseline), and every pipeline is compared with the baseline *at its own global
batch*.

Each variant is compiled once (``train.lower(state, batch).compile()``; the executable
``train`` then runs). For each one this prints
- rows/device (the rows a data device holds: a pipeline stage works on all of its data
  group's rows, micro-batch by micro-batch) and the compiled argument and temp bytes per
  device (XLA ``memory_analysis()``: arguments hold the donated TrainState and the batch,
  temporaries everything else the step allocates), temp as a ratio to the data=8 baseline
  at the same global batch. The pipeline recomputes each stage's forward in its backward
  slot (a checkpoint per stage; per chunk, interleaved) while data=8 runs with remat none,
  so this ratio mixes the pipeline's split with that recomputation;
- V (the chunks per stage: 1, or ``--virtual`` for interleaved), the ticks of the schedule
  table (GPipe 2(M + P - 1), 1F1B M + 2(P - 1), interleaved V x M + (V + 1) x P - 2) and
  the stash it predicts: a stage keeps only the inputs of the micro-batches (of the chunks,
  interleaved) between their forward and their backward, so max over stages of
  ``Schedule.in_flight()`` activations A_mb = micro_rows x seq x d_model x 4
  bytes (a chunk's input is one A_mb too; GPipe: M; 1F1B: min(M, 2P - 3) whatever M is, the
  most on stage 1, 2(P - s) - 1 on stage s >= 1, while stage 0 recomputes its input from the
  batch; interleaved: the table's count, which stops growing once M reaches 2P: 3 at P = 2,
  9 at P = 4 with V = 2), and the buffer the executor allocates for it,
  (``Schedule.slots`` + 1) x A_mb (one scratch slot for ticks that keep nothing);
- the bubble: ``bubble_fraction(P, M, V)`` = (P - 1) / (V x M + P - 1) (V = 1 for GPipe and
  1F1B) beside ``Schedule.idle_fraction()`` counted from the table (a tick lasts as long as
  its slowest stage; a chunk's forward 1/V, its backward 2/V);
- matmul FLOPs per device per step from the compiled HLO (``zjax.analysis.hlo.matmul_flops``,
  loop trip counts included) as a ratio to the baseline's. The executor's slots are
  conditionals inside the tick loop and ``matmul_flops`` counts every branch of a
  conditional as run at every tick, so this is an upper bound that grows with the ticks.
  Next to it, the FLOPs executed: each branch of the tick loop's conditionals is counted
  alone (``matmul_flops`` of that branch and the computations it calls) and weighted by how
  often the table runs it on each stage (the forward slot at every forward but the model's
  last chunk's, the stage backward at every backward but the last chunk's, the backward
  with head and loss at the last chunk's: GPipe and 1F1B run a whole stage per slot, M times
  each on stages 0..P-2 and the head backward M times on the last stage; interleaved runs one
  of V chunks per slot, V x M times), the rest of the program once; the most loaded stage is
  printed (the least loaded in brackets). GPipe and 1F1B run the same slots in another order,
  so they should agree; a ratio above 1 is expected (each stage's forward runs twice; the
  last stage computes the head and loss for all of its data group's rows, P times a data=8
  device's). Interleaved need not agree with them: its last stage recomputes its first V - 1
  chunks in their backward slots (only the model's last chunk runs its forward inside its
  backward), and where a chunk is one layer (P = 4, V = 2, 8 layers) XLA unrolls the chunk's
  layer scan and drops the recomputed matmul whose result only fed the chunk's output, which
  the backward slot discards (the last layer's down-projection: one fewer dot per stage
  backward than three forwards' worth), so its other stages execute less;
- the traffic over the stage axis, from the compiled HLO (``zjax.analysis.hlo.collectives``
  with the mesh shape, keeping those whose devices differ along ``stage``): the bytes of
  each collective-permute in the tick loop (each should be one A_mb), the sends the table
  executes (``Schedule.sends()``: a forward send at every tick where some stage runs a
  forward of any chunk but the model's last, a backward send where some stage runs a
  backward of any chunk but the model's first; with interleaved's ring the last stage also
  sends to the first) times those bytes, next to the HLO's upper bound (the permutes sit in
  conditionals: runs = ticks each), and the all-reduce bytes over stage (ring-equivalent:
  the gradients of what lives outside the stack, embedding and norms, summed once per
  step, and the loss);
- the step time: every variant is initialized (``train.init()``, same seed) and given the
  first rows of the same random int32 tokens [batch, seq + 1]; after one warm-up step each
  (step 1; its loss is printed, and a pipeline computes the same function as data=8 at
  its global batch, so the largest relative difference is printed and the script exits
  non-zero if it exceeds 1e-4), ``--repeats`` interleaved rounds over all variants (each
  round starting one variant later) of ``--steps`` steps each, blocking on
  ``float(metrics["loss"])``: median and min seconds per step and their ratios to the
  baseline at the same global batch.

What the numbers mean here: all 8 simulated devices share the host's CPU cores (2 on the
machine this was written on), so the stages never run side by side and the speed-up a
pipeline gets on P accelerators (P stages at once, minus the bubble) cannot show: the step
time is how long this host takes for all 8 devices' work, the pipeline's extra work
(recomputation, the head on P times the rows, per-tick conditionals and permutes) on
smaller matmuls against data=8's step with remat none; which way that comes out is
measured, not assumed. The memory and the bubble are what the schedules differ in, and the
closing "Read:" lines say, from the measurements, whether each schedule's temp stayed flat
as M grew (1F1B's and interleaved's should, GPipe's should not), whether the gap between
GPipe and 1F1B is the stash buffers' difference, and what interleaved costs and saves against
1F1B at the same P, M (temp beside the buffers' difference, sends, and the idle fraction).

Usage:
  .venv/bin/python benchmarks/pipeline.py [--stages 2,4] [--factors 1,2,4] [--micro-rows 2]
      [--virtual 2] [--zero 1] [--layers 8] [--d-model 128] [--seq 128] [--heads 4] [--kv-heads 2] [--d-ff D]
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
import re
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
from zjax.parallel.pipeline import SCHEDULES, bubble_fraction

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from zero import command_line, print_table  # noqa: E402

DEVICES = 8
PERMUTE = "collective-permute"
LOSS_TOLERANCE = 1e-4  # relative: a pipeline's step-1 loss against data=8's at the same global batch


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if jax.device_count() != DEVICES:
        raise SystemExit(f"needs {DEVICES} devices, found {jax.device_count()} "
                         f"(XLA_FLAGS={os.environ.get('XLA_FLAGS')})")
    start = time.perf_counter()
    print(f"$ {command_line()}")
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices (simulated on "
          f"{os.cpu_count()} CPU cores), float32, ZeRO-{args.zero}")
    cfg0 = make_config(args, 1, 1, "gpipe", args.micro_rows * DEVICES)
    m = cfg0.model
    print(f"GPT: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads ({m.n_kv_heads} kv), d_ff {m.d_ff}, "
          f"vocab {m.vocab_size}, seq {args.seq}; Ψ = {count_params(m):,} parameters; remat {cfg0.remat.policy}; "
          f"pipeline micro-batch {args.micro_rows} rows (A_mb = {act_mb(args):,} bytes)")
    pipes = [(p, f * p, s) for p in args.stages for f in args.factors for s in SCHEDULES
             if s != "interleaved" or not args.layers % (p * args.virtual)]
    batches = sorted({global_batch(args, p, mb) for p, mb, _ in pipes})
    keys = [("data", b) for b in batches] + pipes
    print("variants: data=8 at global batch " + ", ".join(map(str, batches)) + "; mesh.stage=P x data=8/P with "
          "pipeline.microbatches=M, global batch micro_rows x M x 8/P: "
          + ", ".join(f"P={p} M={mb} (batch {global_batch(args, p, mb)})" for p, mb, s in pipes if s == SCHEDULES[0])
          + "; each on " + ", ".join(SCHEDULES))
    print(f"interleaved: pipeline.repeats V={args.virtual}, the {args.layers} layers in V x P chunks: "
          + ", ".join(f"{args.layers // (p * args.virtual)} layer{'s' * (args.layers // (p * args.virtual) > 1)} "
                      f"each at P={p}" if not args.layers % (p * args.virtual) else
                      f"none at P={p} (skipped: {args.layers} layers do not divide by P x V = {p * args.virtual})"
                      for p in args.stages))
    tokens = np.random.default_rng(0).integers(0, m.vocab_size, (max(batches), args.seq + 1), dtype=np.int32)

    rows, runs, notes = {}, {}, []
    for key in keys:
        t0 = time.perf_counter()
        try:
            run, row = build(args, key, tokens)
        except ConfigError as e:  # a combination zjax refuses: say why, go on
            notes.append(f"{name(key)}: ConfigError: {e}")
            print(f"  {name(key)}: n/a (ConfigError: {e})")
            continue
        rows[key], runs[key] = row, run
        print(f"  built {name(key)} in {time.perf_counter() - t0:.1f} s")

    print()
    print_memory(args, rows)
    print()
    print_work(rows)
    print()
    print_traffic(rows)
    print()
    times, losses = print_timing(args, rows, runs)
    print()
    worst = print_losses(rows, losses)
    print()
    read(args, rows, times)
    for note in notes:
        print(f"n/a: {note}")
    print(f"\n(total {time.perf_counter() - start:.0f} s)")
    if worst is None or worst > LOSS_TOLERANCE:
        raise SystemExit(f"FAIL: a pipeline's step-1 loss differs from data=8's at the same global batch by "
                         f"{'(no comparison)' if worst is None else f'{worst:.2e}'} relative "
                         f"(tolerance {LOSS_TOLERANCE:g})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=ints, default=(2, 4), help="pipeline stage counts P (comma list; divide 8)")
    parser.add_argument("--factors", type=ints, default=(1, 2, 4),
                        help="micro-batches per stage: M = factor x P (comma list)")
    parser.add_argument("--micro-rows", type=int, default=2,
                        help="rows of one pipeline micro-batch; global batch = micro_rows x M x 8/P")
    parser.add_argument("--virtual", type=int, default=2,
                        help="pipeline.repeats V of the interleaved schedule (virtual stages per device)")
    parser.add_argument("--zero", type=int, default=1, choices=(0, 1, 2, 3), help="ZeRO stage (every variant)")
    parser.add_argument("--layers", type=int, default=8,
                        help="transformer blocks (divisible by every P; interleaved needs P x V)")
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
        if args.layers % p:
            parser.error(f"--layers {args.layers} must be divisible by every stage count (got {p})")
    if args.virtual < 2:
        parser.error("--virtual must be at least 2 (V=1 interleaved is 1F1B)")
    if any(f < 1 for f in args.factors):
        parser.error("--factors must be positive")
    if args.micro_rows < 1:
        parser.error("--micro-rows must be positive")
    if any(global_batch(args, p, f * p) % DEVICES for p in args.stages for f in args.factors):
        parser.error("every global batch micro_rows x M x 8/P must divide by 8 (the data=8 baseline)")
    return args


def global_batch(args: argparse.Namespace, p: int, mb: int) -> int:
    return args.micro_rows * mb * (DEVICES // p)


def act_mb(args: argparse.Namespace) -> int:
    """Bytes of one pipeline micro-batch's activation [micro_rows, seq, d_model] in float32."""
    return args.micro_rows * args.seq * args.d_model * 4


def make_config(args: argparse.Namespace, p: int, mb: int, schedule: str, batch: int, repeats: int = 1):
    d_ff = args.d_ff if args.d_ff is not None else 8 * round(args.d_model / 3)
    return load_config(ROOT / "configs" / "tiny.yaml", [
        "precision.compute_dtype=float32", f"zero.stage={args.zero}",
        f"model.n_layers={args.layers}", f"model.d_model={args.d_model}", f"model.n_heads={args.heads}",
        f"model.n_kv_heads={args.kv_heads}", f"model.d_ff={d_ff}", f"model.vocab_size={args.vocab}",
        f"model.max_seq_len={args.seq}", f"data.seq_len={args.seq}", f"batch.global_batch_size={batch}",
        f"mesh.stage={p}", f"pipeline.microbatches={mb}", f"pipeline.schedule={schedule}",
        f"pipeline.repeats={repeats}"])


def name(key: tuple) -> str:
    if key[0] == "data":
        return f"data={DEVICES}, batch {key[1]}"
    p, mb, schedule = key
    return f"{schedule} stage={p} x data={DEVICES // p}, M={mb}"


def virtual(args: argparse.Namespace, schedule: str) -> int:
    """V: the chunks per stage (``pipeline.repeats``) a schedule runs with."""
    return args.virtual if schedule == "interleaved" else 1


def baseline(key: tuple, args: argparse.Namespace) -> tuple:
    return key if key[0] == "data" else ("data", global_batch(args, key[0], key[1]))


def build(args: argparse.Namespace, key: tuple, tokens: np.ndarray) -> tuple[dict, dict]:
    """One variant: initialized state, sharded batch, and everything measured from its compiled step."""
    if key[0] == "data":
        p, mb, schedule, batch = 1, 1, "gpipe", key[1]
    else:
        (p, mb, schedule), batch = key, global_batch(args, key[0], key[1])
    v = 1 if key[0] == "data" else virtual(args, schedule)
    cfg = make_config(args, p, mb, schedule, batch, repeats=v)
    train = make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model))
    state = train.init()
    data = train.shard_batch({"tokens": tokens[:batch]})
    shape = dict(train.mesh.shape)
    assert shape.get("stage", 1) == p and shape["data"] * p == DEVICES, shape
    compiled = train.lower(state, data).compile()
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    del compiled
    table = train.schedule_table
    row = dict(p=p, mb=mb, batch=batch, rows=batch // shape["data"], temp=memory.temp_size_in_bytes,
               argument=memory.argument_size_in_bytes, flops=matmul_flops(text))
    over_stage = [c for c in collectives(text, DEVICES, shape) if "stage" in c.axes]
    row["stage_all_reduce"] = sum(c.ring_bytes for c in over_stage if c.kind == "all-reduce")
    row["stage_other"] = sum(c.ring_bytes for c in over_stage if c.kind not in (PERMUTE, "all-reduce"))
    if table is not None:
        assert (table.name, table.stages, table.microbatches, table.repeats) == (schedule, p, mb, v), table
        in_loop = [c for c in over_stage if c.kind == PERMUTE and c.runs == table.ticks]
        sends_f, sends_b = table.sends()
        row.update(
            schedule=table, v=v, ticks=table.ticks, in_flight=max(table.in_flight()), slots=table.slots,
            bubble=bubble_fraction(p, mb, v), idle=table.idle_fraction(),
            sends_f=int(sends_f.sum()), sends_b=int(sends_b.sum()),
            permutes=sorted(c.full_bytes for c in in_loop), permute_bound=sum(c.ring_bytes for c in in_loop),
            permute_outside=sum(c.ring_bytes for c in over_stage if c.kind == PERMUTE and c.runs != table.ticks),
            executed=executed_flops(text, table))
    return dict(train=train, state=state, batch=data), row


# -- FLOPs executed: the tick loop's conditionals, weighted by the table ----------------------

_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")


def _blocks(text: str) -> dict[str, list[str]]:
    """Each computation of the HLO text as its lines, header and closing brace included."""
    blocks, current = {}, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            blocks[current] = [line]
        elif current is not None:
            blocks[current].append(line)
            if line.strip() == "}":
                current = None
    return blocks


def _branches(line: str) -> list[str]:
    return [b.strip().lstrip("%") for group in re.findall(r"branch_computations=\{([^}]*)\}", line)
            for b in group.split(",")]


def _flops_of(blocks: dict[str, list[str]], root: str) -> float:
    """Matmul FLOPs of one run of computation ``root`` and everything it calls."""
    seen, todo = [], [root]
    while todo:
        comp = todo.pop()
        if comp in seen or comp not in blocks:
            continue
        seen.append(comp)
        for line in blocks[comp]:
            todo += re.findall(r"(?:body|condition|to_apply|calls)=%?([\w.\-]+)", line) + _branches(line)
    return matmul_flops("\n".join(line for comp in seen for line in blocks[comp]))


def executed_flops(text: str, table) -> dict | None:
    """Per stage, the matmul FLOPs the table runs: ``matmul_flops(text)`` (every branch of the
    tick loop's conditionals at every tick) less those branches, plus each branch times the
    ticks it runs on that stage. None when the loop is not the one expected."""
    blocks = _blocks(text)
    # the tick loop: ticks trips and conditionals in its body (a stage's layer scan may have as many trips)
    bodies = [re.search(r"body=%?([\w.\-]+)", line).group(1) for lines in blocks.values() for line in lines
              if " while(" in line and f'"known_trip_count":{{"n":"{table.ticks}"}}' in line]
    bodies = [b for b in bodies if any(" conditional(" in line for line in blocks.get(b, ()))]
    if len(bodies) != 1:
        return None
    p, last, v = table.stages, table.stages - 1, table.repeats
    # the slots the executor runs: the model's last chunk (last stage, chunk V-1) runs its forward
    # inside its backward (head and loss); every other chunk has a forward slot and a stage backward
    end_f = np.zeros(table.forward.shape, bool)
    end_f[:, last] = table.forward_chunk[:, last] == v - 1
    end_b = np.zeros(table.backward.shape, bool)
    end_b[:, last] = table.backward_chunk[:, last] == v - 1
    fwd = ((table.forward >= 0) & ~end_f).sum(axis=0).tolist()
    bwd = ((table.backward >= 0) & ~end_b).sum(axis=0).tolist()
    bwd_last = ((table.backward >= 0) & end_b).sum(axis=0).tolist()
    total = matmul_flops(text)
    per_stage = [total] * p
    found = set()
    for line in blocks[bodies[0]]:
        if " conditional(" not in line:
            continue
        flops = [_flops_of(blocks, b) for b in _branches(line)]
        if not any(flops):
            continue  # the permutes' conditionals and any without matmuls
        if len(flops) == 2 and flops[0] == 0:    # lax.cond(f >= 0 & ~last, forward, zeros)
            runs, role = [[0, f] for f in fwd], "forward"
        elif len(flops) == 3 and flops[0] == 0:  # lax.switch: idle, stage backward, last stage's backward
            runs, role = [[0, bwd[s], bwd_last[s]] for s in range(p)], "backward"
        else:
            return None
        found.add(role)
        for s in range(p):
            per_stage[s] += sum(f * (n - table.ticks) for f, n in zip(flops, runs[s]))
    if found != {"forward", "backward"}:
        return None
    return dict(per_stage=per_stage, max=max(per_stage), min=min(per_stage))


# -- tables ----------------------------------------------------------------------------------


def ratio(x: float | None, ref: float | None) -> str:
    return "-" if x is None or not ref else f"{x / ref:.3f}"


def ordered(rows: dict) -> list[tuple]:
    """Baselines first (by batch), then each P, M with its schedules side by side."""
    return [k for k in rows if k[0] == "data"] + [k for k in rows if k[0] != "data"]


def print_memory(args: argparse.Namespace, rows: dict) -> None:
    a = act_mb(args)
    print(f"Per-device memory (compiled, XLA memory_analysis) and the schedule. x d8: ratio to data=8 at the same "
          f"global batch. stash = max over stages of in_flight x A_mb (A_mb = {a:,} B), buffer = (slots + 1) x A_mb; "
          "V = chunks per stage; bubble = (P-1)/(V M+P-1), idle = Schedule.idle_fraction() (a chunk's forward 1/V, "
          "backward 2/V)")
    table = []
    for key in ordered(rows):
        r = rows[key]
        ref = rows.get(baseline(key, args))
        cells = [name(key), f"{r['batch']}", f"{r['rows']}", f"{r['argument']:,}", f"{r['temp']:,}",
                 ratio(r["temp"], ref and ref["temp"])]
        if key[0] == "data":
            table.append(cells + ["-"] * 7)
            continue
        table.append(cells + [f"{r['v']}", f"{r['ticks']}", f"{r['in_flight']}", f"{r['in_flight'] * a:,}",
                              f"{(r['slots'] + 1) * a:,}", f"{r['bubble']:.3f}", f"{r['idle']:.3f}"])
    print_table(["variant", "batch", "rows/device", "argument bytes", "temp bytes", "temp x d8", "V", "ticks",
                 "in flight", "stash bytes", "buffer bytes", "bubble", "idle"], table)


def print_work(rows: dict) -> None:
    print("Matmul FLOPs per device per step. HLO: matmul_flops of the compiled program (every branch of the tick "
          "loop's conditionals counted at every tick: an upper bound growing with the ticks); executed: each "
          "branch weighted by the ticks the table runs it, most loaded stage (least loaded in brackets). "
          "x d8: ratio to data=8 at the same global batch")
    table = []
    for key in ordered(rows):
        r = rows[key]
        ref = rows[("data", r["batch"])]["flops"] if ("data", r["batch"]) in rows else None
        if key[0] == "data":
            table.append([name(key), f"{r['flops'] / 1e9:.3f}", "1.000", f"{r['flops'] / 1e9:.3f}", "1.000", "-"])
            continue
        ex = r["executed"]
        table.append([name(key), f"{r['flops'] / 1e9:.3f}", ratio(r["flops"], ref),
                      "n/a" if ex is None else f"{ex['max'] / 1e9:.3f} ({ex['min'] / 1e9:.3f})",
                      "n/a" if ex is None else ratio(ex["max"], ref), f"{r['ticks']}"])
    print_table(["variant", "HLO GFLOP", "HLO x d8", "executed GFLOP", "executed x d8", "ticks"], table)


def print_traffic(rows: dict) -> None:
    print("Traffic over the stage axis per device per step, from the compiled HLO (collectives whose devices differ "
          "along stage). permute bytes: each collective-permute in the tick loop; executed = sends the table runs "
          "(Schedule.sends(), forward + backward) x those bytes; HLO bound = every permute at every tick; all-reduce over stage "
          "ring-equivalent, once per step")
    table = []
    for key in ordered(rows):
        r = rows[key]
        if key[0] == "data":
            table.append([name(key), "-", "-", "-", "-", "-"])
            continue
        per = r["permutes"]
        sizes = "/".join(f"{b:,.0f}" for b in sorted(set(per))) if per else "none"
        executed = per[0] * (r["sends_f"] + r["sends_b"]) if per and len(set(per)) == 1 else None
        table.append([name(key), f"{len(per)} x {sizes}", f"{r['sends_f']} + {r['sends_b']}",
                      "n/a" if executed is None else f"{executed:,.0f}", f"{r['permute_bound']:,.0f}",
                      f"{r['stage_all_reduce']:,.0f}"])
        extra = [f"{b:,.0f} B of permutes outside the loop" for b in [r["permute_outside"]] if b]
        extra += [f"{b:,.0f} B of other collectives" for b in [r["stage_other"]] if b]
        if extra:
            table[-1][0] += "  (also " + ", ".join(extra) + " over stage)"
    print_table(["variant", "permute bytes", "sends fwd + bwd", "executed bytes", "HLO bound", "all-reduce bytes"],
                table)


def print_timing(args: argparse.Namespace, rows: dict, runs: dict) -> tuple[dict, dict]:
    """Seconds per step of each variant over interleaved rounds; prints the table, returns times and losses."""
    losses = {}
    for key, run in runs.items():  # warm-up, step 1: compiled above, this runs it
        run["state"], metrics = run["train"](run["state"], run["batch"])
        losses[key] = float(metrics["loss"])
    keys = ordered(runs)
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
                raise RuntimeError(f"{name(key)}: loss {loss}")
    print(f"Step time (fp32, all {DEVICES} simulated devices sharing {os.cpu_count()} CPU cores): over "
          f"{args.repeats} interleaved rounds of {args.steps} steps, after a warm-up step. x d8: ratio to data=8 at "
          "the same global batch (median to median, min to min)")
    table = []
    for key in keys:
        ref = baseline(key, args)
        med, fast = statistics.median(times[key]), min(times[key])
        table.append([name(key), f"{med:.3f}", f"{fast:.3f}", f"{max(times[key]):.3f}",
                      ratio(med, statistics.median(times[ref]) if ref in times else None),
                      ratio(fast, min(times[ref]) if ref in times else None)])
    print_table(["variant", "median s/step", "min", "max", "x d8", "min x d8"], table)
    spread = max(max(t) / min(t) for t in times.values())
    if spread > 1.3:
        print(f"(noisy: a variant's slowest round took {spread:.1f}x its fastest; the host is shared, so compare "
              "the median and min ratios and rerun with more --repeats before quoting one)")
    return times, losses


def print_losses(rows: dict, losses: dict) -> float | None:
    """Step-1 losses against data=8's at the same global batch; returns the largest relative difference."""
    print(f"Step-1 loss (the warm-up step), against data=8 at the same global batch (tolerance {LOSS_TOLERANCE:g} "
          "relative)")
    table, worst = [], None
    for key in ordered(losses):
        ref = losses.get(("data", rows[key]["batch"]))
        diff = None if key[0] == "data" or ref is None else abs(losses[key] - ref) / abs(ref)
        if diff is not None:
            worst = diff if worst is None else max(worst, diff)
        table.append([name(key), f"{losses[key]:.7f}", "-" if diff is None else f"{diff:.1e}",
                      "" if diff is None else "ok" if diff <= LOSS_TOLERANCE else "MISMATCH"])
    print_table(["variant", "loss", "rel. diff to d8", ""], table)
    if worst is not None:
        print(f"largest relative difference: {worst:.1e}")
    return worst


def read(args: argparse.Namespace, rows: dict, times: dict) -> None:
    """The closing interpretation, computed from the measurements."""
    a = act_mb(args)
    pipes = [k for k in rows if k[0] != "data"]
    lines, growth = [], {}
    for p in sorted({k[0] for k in pipes}):
        parts = []
        for schedule in SCHEDULES:
            series = sorted((k[1], rows[k]) for k in pipes if k[0] == p and k[2] == schedule)
            if len(series) < 2:
                continue
            # growth in micro-batch activations (the unit the stash grows in), step by step, next to the table's
            steps = [((r1["temp"] - r0["temp"]) / a, r1["slots"] - r0["slots"]) for (_, r0), (_, r1) in
                     zip(series, series[1:])]
            flat = [abs(d) < 0.5 for d, _ in steps]  # flat: within half an A_mb
            first_flat = next((i for i in range(len(flat)) if all(flat[i:])), None)
            (m0, r0), (m1, r1) = series[0], series[-1]
            word = ("stays flat" if first_flat == 0 else f"is flat from M={series[first_flat][0]} on"
                    if first_flat is not None else "grows" if r1["temp"] > r0["temp"] else "does not grow")
            growth[(p, schedule)] = f"{word} ({r1['temp'] / r0['temp']:.3f}x from M={m0} to M={m1})"
            parts.append(f"{schedule} {word} ({r1['temp'] / r0['temp']:.3f}x from M={m0} to M={m1}; per step of M "
                         + ", ".join(f"{d:+.1f}" for d, _ in steps) + " A_mb, the table's stash buffer "
                         + ", ".join(f"{k:+d}" for _, k in steps) + ")")
        if parts:
            lines.append(f"P={p}: " + "; ".join(parts))
    if lines:
        print("Read: temp as M grows at a fixed micro-batch (the global batch grows with it; flat = within half an "
              "A_mb per step): " + ". ".join(lines) + ".")
    gaps = []
    for p, mb, schedule in pipes:
        if schedule != "gpipe" or (p, mb, "1f1b") not in rows:
            continue
        g, o = rows[(p, mb, "gpipe")], rows[(p, mb, "1f1b")]
        gaps.append(f"P={p} M={mb} {g['temp'] - o['temp']:,} vs {(g['slots'] - o['slots']) * a:,}")
    if gaps:
        print("Read: gpipe's temp minus 1f1b's at the same P, M, against the difference of their stash buffers "
              "((slots + 1) x A_mb): " + "; ".join(gaps) + ".")
    inter = [(p, mb) for p, mb, schedule in pipes if schedule == "interleaved" and (p, mb, "1f1b") in rows]
    if inter:
        v = args.virtual
        temp, idle, sends, rest = [], [], [], {}
        for p, mb in inter:
            i, o = rows[(p, mb, "interleaved")], rows[(p, mb, "1f1b")]
            temp.append(f"P={p} M={mb} {i['temp'] - o['temp']:+,} vs {(i['slots'] - o['slots']) * a:+,}")
            rest.setdefault(p, []).append(i["temp"] - o["temp"] - (i["slots"] - o["slots"]) * a)
            # interleaving V chunks at M should idle like 1F1B at V x M, where that was measured
            at_vm = rows.get((p, v * mb, "1f1b"))
            idle.append(f"P={p} M={mb} {i['idle']:.3f} vs {o['idle']:.3f}"
                        + (f" (1f1b at M={v * mb}: {at_vm['idle']:.3f})" if at_vm else ""))
            sends.append(f"P={p} M={mb} {i['sends_f']} vs {o['sends_f']}")
        formula = all(abs(rows[(p, mb, "interleaved")]["idle"] - rows[(p, mb, "interleaved")]["bubble"]) < 1e-9
                      for p, mb in inter)
        flat = "; ".join(f"P={p} {growth[(p, 'interleaved')]}" for p in sorted({p for p, _ in inter})
                         if (p, "interleaved") in growth)
        print(f"Read: interleaved (V={v}) against 1f1b at the same P, M. Its temp as M grows: {flat or 'one M only'}. "
              "Its temp minus 1f1b's, against the difference of their stash buffers: " + "; ".join(temp)
              + "; the rest (temp difference less buffer difference) "
              + "; ".join(f"P={p} {min(r):+,} to {max(r):+,} ("
                          + ("one M" if len(r) < 2 else "constant in M within half an A_mb: not the stash; a slot "
                             "runs 1/V of a stage's layers" if max(r) - min(r) < a / 2 else "varies with M") + ")"
                          for p, r in rest.items())
              + ". Idle fraction counted from the tables, interleaved vs 1f1b: " + "; ".join(idle)
              + f" (interleaved's {'equals' if formula else 'does not equal'} (P-1)/(V M+P-1) at every P, M). "
              "The price: sends each way, interleaved vs 1f1b: " + "; ".join(sends) + ".")
    d8 = [k for k in rows if k[0] == "data"]
    below = [k for k in pipes if rows[k]["temp"] < rows[("data", rows[k]["batch"])]["temp"]]
    if d8:
        print(f"Read: {len(below)} of {len(pipes)} pipelines compile to less temp than data=8 at the same global batch "
              f"(temp x d8 from {min(rows[k]['temp'] / rows[baseline(k, args)]['temp'] for k in pipes):.2f} to "
              f"{max(rows[k]['temp'] / rows[baseline(k, args)]['temp'] for k in pipes):.2f}); data=8 runs with remat "
              "none while a pipeline recomputes each stage in its backward slot, so part of that gap is the "
              "recomputation, not the split.")
    ex = [rows[k]["executed"]["max"] / rows[baseline(k, args)]["flops"] for k in pipes if rows[k]["executed"]]
    hlo = [rows[k]["flops"] / rows[baseline(k, args)]["flops"] for k in pipes]
    def executed(p, mb, schedule):
        return rows[(p, mb, schedule)]["executed"] if (p, mb, schedule) in rows else None

    pairs = [(p, mb) for p, mb, s in pipes if s == "gpipe" and executed(p, mb, "gpipe") and executed(p, mb, "1f1b")]
    same = all(executed(p, mb, "gpipe")["max"] == executed(p, mb, "1f1b")["max"] for p, mb in pairs)
    inter = [(p, mb) for p, mb, s in pipes if s == "interleaved" and executed(p, mb, s) and executed(p, mb, "1f1b")]
    if ex:
        print(f"Read: matmul FLOPs executed on the most loaded stage are {min(ex):.2f}-{max(ex):.2f}x data=8's at the "
              "same batch" + (f" ({'equal' if same else 'not equal'} for gpipe and 1f1b at the same P, M: the same "
                              "slots in another order)" if pairs else "")
              + (". Interleaved against 1f1b, most loaded stage (least loaded) in GFLOP: " + "; ".join(
                  f"P={p} M={mb} {executed(p, mb, 'interleaved')['max'] / 1e9:.3f} "
                  f"({executed(p, mb, 'interleaved')['min'] / 1e9:.3f}) vs {executed(p, mb, '1f1b')['max'] / 1e9:.3f} "
                  f"({executed(p, mb, '1f1b')['min'] / 1e9:.3f})" for p, mb in inter) if inter else "")
              + f". The HLO's upper bound, every branch at every tick, is {min(hlo):.2f}-{max(hlo):.2f}x.")
    med = {k: statistics.median(t) for k, t in times.items()}
    speed = {k: med[k] / med[baseline(k, args)] for k in pipes if k in med and baseline(k, args) in med}
    if speed:
        fastest, slowest = min(speed, key=speed.get), max(speed, key=speed.get)
        faster = [k for k in speed if speed[k] < 1]
        head = (f"Read: step time x d8 ranges from {speed[fastest]:.2f} ({name(fastest)}) to {speed[slowest]:.2f} "
                f"({name(slowest)}). All {DEVICES} simulated devices share {os.cpu_count()} CPU cores, so the stages "
                "never run side by side and a pipeline cannot be faster for the reason it is on P accelerators; ")
        if faster:
            print(head + f"{len(faster)} of {len(speed)} still measured faster than data=8 at the same batch: not "
                  "concurrency, so the same host ran the pipeline's work (more matmul FLOPs, see above, but on "
                  f"{args.micro_rows}-row micro-batches with less temp) in less time than data=8's; this run does not "
                  "measure why.")
        else:
            print(head + "none did: each pays its recomputation, the head on P times the rows, and the per-tick "
                  "conditionals and permutes.")
        for schedule in SCHEDULES:
            pairs = [(k, speed[k]) for k in speed if k[2] == schedule]
            if pairs:
                print(f"      {schedule}: median x d8 " + ", ".join(f"P={k[0]} M={k[1]} {v:.2f}" for k, v in pairs))


if __name__ == "__main__":
    main()
