"""Long context: the longest sequence each kind of sequence parallelism fits in a fixed per-device budget.

On 8 simulated CPU devices, the reference GPT (configs/tiny.yaml resized by the flags:
d_model 64, 8 heads, 4 kv heads, 2 layers, vocabulary 256; float32, XLA attention) is
built for data=8 (no sequence parallelism) and for ``mesh.sequence`` = P in 2, 4, 8
(data = 8/P) with each ``sequence_parallel`` mode (``all_gather``: K/V gathered;
``ulysses``: all-to-all to whole sequences on H/P heads; ``ring``: K/V blocks rotated in
zig-zag order). This prints three tables.

1. Fixed length (``--fixed-seq``, 0 skips it; the table the README quotes): ZeRO-0,
   remat none, global batch ``--fixed-batch`` (8), every variant at the same length, so
   every device holds the same tokens. Compiled (``train.lower(state, batch).compile()``,
   nothing runs) temp and argument bytes per device (``memory_analysis()``), and temp as
   a ratio to data=8.

2. Budget search (the issue's measure): ZeRO-3 (its group includes the sequence axis,
   so the state is split over all 8 devices), remat ``--remat`` (``full`` by default: each
   block recomputed in the backward pass, as long-context training is run; what is left
   is one block's attention scores), and a global batch of 8/P rows, so that each
   sequence group holds ONE row (data=8: one whole row per device). For each variant,
   without tiling and with ``tiling.mlp_tiles = tiling.loss_tiles = --tiles`` (ALST's
   tiled MLP and loss, ``zjax.layers.tiled``), a search by AOT compile finds the longest
   ``data.seq_len`` (= ``model.max_seq_len``), a multiple of 2P x ``--chunk`` tokens
   (ring's 2P zig-zag chunks and Ulysses' P shards divide it, and ``--tiles`` divides
   the 2 x ``--chunk`` x k tokens a device holds), up to ``--max-seq``, whose compiled
   argument + temp bytes per device fit ``--budget`` (1 GiB by default: data=8 then fits a
   few thousand tokens of the default model). The search guesses from data=8's
   result (P times it, the goal), predicts the next length from the last one assuming
   memory grows with the square of the length (the score matrices), keeps a bracket
   (longest that fits, shortest that does not) and bisects every third try, until the
   bracket is one granule wide. Columns: the longest length, its ratio to data=8's (same
   tiling) and to P x data=8's (1.0 = the length grows linearly with P), and the bytes
   per device at that length.

3. Step time at one common length (``--time-seq``; 0 = the longest length data=8 fits
   untiled; the default is shorter than that because a data=8 step at its longest length
   takes most of a minute on a 2-core CPU, its [S, S] score matrices far out of cache):
   each variant and tiling of table 2 (same config and global batch 8/P, so a step holds
   8/P rows) is initialized (``train.init()``) and run on random int32 tokens
   ``[8/P, seq + 1]``; after one warm-up step each, ``--repeats`` rounds over all
   variants of ``--steps`` steps each, blocking on the loss; the median seconds per step,
   its ratio to data=8's and the time per token as a ratio to data=8's (step time x P /
   data=8's: data=8 runs 8 rows a step, the others 8/P). All 8 simulated devices share
   the host's CPU cores, so the time per token is the total work of a step; it cannot
   show sequence parallelism's speed-up, only its overhead (and this CPU's cache and
   allocation effects on large score matrices).

A mode that does not apply (``zjax.errors.ConfigError``, e.g. Ulysses with heads that do
not divide by P) is printed as ``n/a [i]``, its reason under the table.

Usage:
  .venv/bin/python benchmarks/long_context.py [--budget 1GiB] [--tiles 8] [--chunk 64]
      [--max-seq 65536] [--remat full] [--time-seq 1024] [--repeats 3] [--steps 2]
      [--fixed-seq 1024] [--fixed-batch 8] [--d-model 64] [--heads 8] [--kv-heads 4]
      [--layers 2] [--vocab 256]
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
from zjax.errors import ConfigError
from zjax.models.gpt import gpt_loss, make_gpt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from zero import command_line, print_table  # noqa: E402

MODES = ("all_gather", "ulysses", "ring")
SEQUENCE = (2, 4, 8)
DEVICES = 8
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
         "kib": 2**10, "mib": 2**20, "gib": 2**30}

# A variant: (P, mode); P = 1 is data=8 (no sequence parallelism, the mode unused).
VARIANTS = [(1, "ulysses")] + [(p, mode) for p in SEQUENCE for mode in MODES]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if jax.device_count() != DEVICES:
        raise SystemExit(f"needs {DEVICES} devices, found {jax.device_count()} "
                         f"(XLA_FLAGS={os.environ.get('XLA_FLAGS')})")
    print(f"$ {command_line()}")
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices (simulated on "
          f"{os.cpu_count()} CPU cores), float32, XLA attention; GPT d_model {args.d_model}, {args.heads} heads "
          f"({args.kv_heads} kv), {args.layers} layers, vocabulary {args.vocab}")
    start = time.perf_counter()
    if args.fixed_seq:
        print()
        fixed_length(args)
    print()
    longest = budget_search(args)
    print()
    step_times(args, longest)
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use bytes, or a number with one of {', '.join(u for u in UNITS if u)}")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=parse_bytes, default="1GiB",
                        help="compiled argument + temp bytes per device (e.g. 1GiB, 512MiB, 300000000)")
    parser.add_argument("--tiles", type=int, default=8, help="tiling.mlp_tiles = tiling.loss_tiles when tiled")
    parser.add_argument("--chunk", type=int, default=64,
                        help="tokens per zig-zag chunk: lengths are multiples of 2P x chunk")
    parser.add_argument("--max-seq", type=int, default=65536, help="the longest length the search tries")
    parser.add_argument("--remat", default="full", help="remat.policy of the search and the timing")
    parser.add_argument("--time-seq", type=int, default=1024,
                        help="length of the step-time table (0: the longest data=8 fits untiled)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds over all variants")
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--fixed-seq", type=int, default=1024, help="length of the fixed-length table (0 skips it)")
    parser.add_argument("--fixed-batch", type=int, default=8, help="global batch of the fixed-length table")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=256)
    args = parser.parse_args(argv)
    if args.tiles < 1 or (2 * args.chunk) % args.tiles:
        parser.error(f"--tiles {args.tiles} must divide 2 x --chunk = {2 * args.chunk} (the tokens a device holds "
                     "come in multiples of it)")
    return args


# -- building and measuring one variant ---------------------------------------------------


def make_config(args, *, seq: int, batch: int, p: int = 1, mode: str = "ulysses", tiles: int = 1,
                stage: int = 3, remat: str | None = None):
    return load_config(ROOT / "configs" / "tiny.yaml", [
        "precision.compute_dtype=float32", f"zero.stage={stage}", f"remat.policy={remat or args.remat}",
        f"data.seq_len={seq}", f"model.max_seq_len={seq}", f"batch.global_batch_size={batch}",
        f"model.d_model={args.d_model}", f"model.n_heads={args.heads}", f"model.n_kv_heads={args.kv_heads}",
        f"model.n_layers={args.layers}", f"model.vocab_size={args.vocab}",
        f"mesh.sequence={p}", f"sequence_parallel={mode}",
        f"tiling.mlp_tiles={tiles}", f"tiling.loss_tiles={tiles}"])


def compiled_memory(cfg) -> tuple[int, int]:
    """(temp, argument) bytes per device of the compiled step; nothing runs."""
    train = make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model))
    train.prepare()
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         train.abstract_state, train.state_sharding)
    batch = {"tokens": np.zeros((cfg.batch.global_batch_size, cfg.data.seq_len + 1), np.int32)}
    memory = train.lower(state, batch).compile().memory_analysis()
    return int(memory.temp_size_in_bytes), int(memory.argument_size_in_bytes)


def variant_name(p: int, mode: str) -> str:
    return f"data={DEVICES}" if p == 1 else f"sequence={p} x data={DEVICES // p} {mode}"


def tiling_name(tiles: int) -> str:
    return "none" if tiles == 1 else f"{tiles} tiles"


class Notes:
    """Reasons a variant does not apply, printed under a table as ``[i] reason``; cells say ``n/a [i]``."""

    def __init__(self):
        self.reasons: list[str] = []

    def cell(self, error: Exception) -> str:
        if str(error) not in self.reasons:
            self.reasons.append(str(error))
        return f"n/a [{self.reasons.index(str(error)) + 1}]"

    def print(self) -> None:
        for i, reason in enumerate(self.reasons, 1):
            print(f"[{i}] {reason}")


def ratio(x: float | None, ref: float | None) -> str:
    return "-" if x is None or not ref else f"{x / ref:.3f}"


# -- 1. fixed length ----------------------------------------------------------------------


def fixed_length(args) -> None:
    print(f"Fixed length: sequence {args.fixed_seq}, global batch {args.fixed_batch} (every device holds the same "
          f"tokens), ZeRO-0, remat none; compiled bytes per device")
    rows, base, notes = [], None, Notes()
    for p, mode in VARIANTS:
        cfg = make_config(args, seq=args.fixed_seq, batch=args.fixed_batch, p=p, mode=mode, stage=0, remat="none")
        try:
            temp, arg = compiled_memory(cfg)
        except ConfigError as e:
            rows.append([variant_name(p, mode), notes.cell(e), "", ""])
            continue
        base = temp if p == 1 else base
        rows.append([variant_name(p, mode), f"{temp:,}", f"{arg:,}", ratio(temp, base)])
    print_table(["variant", "temp bytes", "argument bytes", "temp x data=8"], rows)
    notes.print()


# -- 2. the longest length within the budget ----------------------------------------------


class Search:
    """The longest multiple of ``granule`` up to ``max_seq`` whose step fits ``budget``
    bytes per device (argument + temp), for one variant; ``tries`` maps each length compiled
    to its bytes. Raises ConfigError when the variant does not build."""

    def __init__(self, args, p: int, mode: str, tiles: int):
        self.args, self.p, self.mode, self.tiles = args, p, mode, tiles
        self.granule = 2 * p * args.chunk
        self.tries: dict[int, int] = {}

    def bytes_at(self, seq: int) -> int:
        if seq not in self.tries:
            cfg = make_config(self.args, seq=seq, batch=DEVICES // self.p, p=self.p, mode=self.mode, tiles=self.tiles)
            temp, arg = compiled_memory(cfg)
            self.tries[seq] = temp + arg
        return self.tries[seq]

    def run(self, guess: int) -> int:
        """Returns the longest length that fits (0: not even one granule; ``max_k`` granules:
        the bound, which may be too short)."""
        budget, g = self.args.budget, self.granule
        max_k = self.args.max_seq // g
        lo, hi = 0, max_k + 1  # lo granules fit (0: none known), hi do not (max_k + 1: none known)
        k = min(max(guess // g, 1), max_k)
        tries = 0
        while True:
            used = self.bytes_at(k * g)
            lo, hi = (k, hi) if used <= budget else (lo, k)
            if hi - lo <= 1:
                return lo * g
            tries += 1
            if tries % 3 == 0:
                k = (lo + hi) // 2
            else:  # memory ~ length^2 (the score matrices): where would it meet the budget?
                k = min(max(int(k * math.sqrt(budget / used)), lo + 1), hi - 1)


def budget_search(args) -> dict:
    searches = {(p, mode, tiles): Search(args, p, mode, tiles) for tiles in (1, args.tiles) for p, mode in VARIANTS}
    reference = searches[(1, "ulysses", 1)].bytes_at(1024)  # also the data=8 search's first guess
    print(f"Budget search: {args.budget:,} bytes ({args.budget / 2**30:.3f} GiB) argument + temp per device "
          f"(data=8 needs {reference:,} at 1024 tokens); ZeRO-3 over all 8 devices, remat {args.remat}, global "
          f"batch 8/P (one row per sequence group); lengths multiples of 2P x {args.chunk}, up to {args.max_seq}")
    longest: dict[tuple, int | str] = {}
    rows, notes = [], Notes()
    t0 = time.perf_counter()
    for (p, mode, tiles), search in searches.items():
        name = variant_name(p, mode)
        base = longest.get((1, "ulysses", tiles))
        base = base if isinstance(base, int) and base else None
        untiled = longest.get((p, mode, 1))
        # The first guess: the untiled result (tiling changes little), else P x data=8's (the goal).
        guess = untiled if isinstance(untiled, int) and untiled else p * base if base else 1024
        try:
            length = search.run(guess)
        except ConfigError as e:
            longest[(p, mode, tiles)] = f"n/a ({e})"
            rows.append([name, tiling_name(tiles), notes.cell(e), "", "", "", str(len(search.tries))])
            continue
        longest[(p, mode, tiles)] = length
        base = length if p == 1 else base
        shown = (f">= {length}" if length + search.granule > args.max_seq else
                 f"< {search.granule}" if length == 0 else f"{length}")
        rows.append([name, tiling_name(tiles), shown, ratio(length, base), ratio(length, p * base if base else None),
                     f"{search.tries[length]:,}" if length else "-", str(len(search.tries))])
    print_table(["variant", "tiling", "longest", "x data=8", "x P*data=8", "bytes at longest", "compiles"], rows)
    notes.print()
    print(f"({sum(len(s.tries) for s in searches.values())} compiles in {time.perf_counter() - t0:.0f} s; "
          f"granule 2P x {args.chunk} tokens: {', '.join(str(2 * p * args.chunk) for p in (1, *SEQUENCE))})")
    return longest


# -- 3. step time at one length -----------------------------------------------------------


def step_times(args, longest: dict) -> None:
    seq = args.time_seq or longest.get((1, "ulysses", 1))
    if not isinstance(seq, int) or seq <= 0:
        print(f"Step time: skipped (no length: data=8's longest is {seq})")
        return
    print(f"Step time at sequence {seq} (global batch 8/P, remat {args.remat}, ZeRO-3; all 8 simulated devices "
          f"sharing {os.cpu_count()} CPU cores): median over {args.repeats} interleaved rounds of {args.steps} "
          f"steps, after a warm-up step")
    runs, failed, notes = {}, {}, Notes()
    rng = np.random.default_rng(0)
    for tiles in (1, args.tiles):
        for p, mode in VARIANTS:
            key = (p, mode, tiles)
            cfg = make_config(args, seq=seq, batch=DEVICES // p, p=p, mode=mode, tiles=tiles)
            try:
                train = make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model))
                state = train.init()
                batch = train.shard_batch(
                    {"tokens": rng.integers(0, args.vocab, (DEVICES // p, seq + 1), dtype=np.int32)})
                state, metrics = train(state, batch)  # warm-up (compiles)
                float(metrics["loss"])
            except ConfigError as e:
                failed[key] = notes.cell(e)
                continue
            runs[key] = [train, state, batch, metrics]
    times: dict[tuple, list[float]] = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, run in runs.items():
            train, state, batch, _ = run
            start = time.perf_counter()
            for _ in range(args.steps):
                state, metrics = train(state, batch)
            loss = float(metrics["loss"])
            jax.block_until_ready(state)
            times[key].append((time.perf_counter() - start) / args.steps)
            run[1], run[3] = state, metrics
            if not math.isfinite(loss):
                raise RuntimeError(f"{key}: loss {loss}")
    rows = []
    for tiles in (1, args.tiles):
        ref = times.get((1, "ulysses", tiles))
        ref = statistics.median(ref) if ref else None
        for p, mode in VARIANTS:
            key = (p, mode, tiles)
            if key in failed:
                rows.append([variant_name(p, mode), tiling_name(tiles), failed[key], "", "", "", ""])
                continue
            med = statistics.median(times[key])
            rows.append([variant_name(p, mode), tiling_name(tiles), f"{med:.3f}", f"{min(times[key]):.3f}",
                         f"{max(times[key]):.3f}", ratio(med, ref), ratio(med * p, ref)])
    print_table(["variant", "tiling", "median s/step", "min", "max", "x data=8", "per token x data=8"], rows)
    notes.print()


if __name__ == "__main__":
    main()
