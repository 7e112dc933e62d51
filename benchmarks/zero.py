"""ZeRO stages 0-3 on the reference GPT: state bytes, collective bytes and step time.

On 8 simulated CPU devices, for each ZeRO stage this prints
- the TrainState bytes held by one device, next to ZeRO's formula (docs/architecture.md);
- the collective bytes per device per step read from the compiled HLO, next to
  ZeRO's theory in units of G = Ψ x 4 bytes x (N-1)/N (float32 gradients);
- the median step time, relative to a plain jitted optax step on the same model and
  mesh (replicated params, sharded batch, XLA's SPMD partitioner inserting the
  gradient all-reduce): what a user writes without zjax.

Usage:
  .venv/bin/python benchmarks/zero.py [--d-model 192] [--layers 4] [--seq 128]
      [--batch 16] [--repeats 5] [--steps 5] [--precision fp32|bf16] [--accum 1]
"""
from __future__ import annotations

import os

# Before jax is imported: the benchmark is about 8 data-parallel devices.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from zjax import load_config, make_train_step
from zjax.hlo import collective_bytes
from zjax.models.gpt import count_params, gpt_loss, make_gpt

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
STAGES = (0, 1, 2, 3)
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
COLLECTIVES = ("all-reduce", "reduce-scatter", "all-gather")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    n = jax.device_count()
    cfg = make_config(args, stage=0, precision=args.precision)
    psi = count_params(cfg.model)
    batch = {"tokens": np.random.default_rng(0).integers(0, cfg.model.vocab_size, (args.batch, args.seq + 1), np.int32)}

    print(f"$ {command_line()}")
    print(f"jax {jax.__version__}, {n} {jax.devices()[0].platform} devices, precision {args.precision}")
    m = cfg.model
    print(
        f"GPT: d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads ({m.n_kv_heads} kv), d_ff {m.d_ff}, "
        f"vocab {m.vocab_size}, seq {args.seq}; global batch {args.batch}, grad_accum_steps {args.accum}"
    )
    print(f"Ψ = {psi:,} parameters; N = {n} data devices")

    runs = {stage: ZeroRun(make_config(args, stage, args.precision), batch) for stage in STAGES}
    for run in runs.values():
        if run.params_count != psi:
            raise SystemExit(f"state.params holds {run.params_count} parameters, count_params says {psi}")
    baseline = BaselineRun(make_config(args, 0, args.precision), runs[0].train.mesh, batch, args.accum)

    print_memory(runs, baseline, psi, n, args.precision)
    print_collectives(args, batch, runs, baseline, psi, n)
    print_timing(args, runs, baseline)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=192, help="model width (a multiple of 8)")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=16, help="global batch size (sequences per step)")
    parser.add_argument("--repeats", type=int, default=5, help="timed windows per variant")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp32", help="compute dtype")
    parser.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace, stage: int, precision: str):
    """configs/tiny.yaml resized to the benchmark's model, batch, stage and precision."""
    return load_config(
        CONFIG,
        {
            "model.d_model": args.d_model,
            "model.n_layers": args.layers,
            # SwiGLU's usual 8/3 width, rounded to a multiple of 8.
            "model.d_ff": 8 * round(args.d_model / 3),
            "model.max_seq_len": args.seq,
            "data.seq_len": args.seq,
            "batch.global_batch_size": args.batch,
            "batch.grad_accum_steps": args.accum,
            "zero.stage": stage,
            "precision.compute_dtype": DTYPES[precision],
        },
    )


def command_line() -> str:
    python = Path(sys.executable)
    python = python.relative_to(Path.cwd()) if python.is_relative_to(Path.cwd()) else python
    return shlex.join([str(python), *sys.argv])


# -- the variants -------------------------------------------------------------------


class ZeroRun:
    """A zjax train step for one config, its state and its (pre-sharded) batch."""

    def __init__(self, cfg, batch: dict):
        self.cfg = cfg
        self.train = make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model, seed=cfg.seed))
        self.state = self.train.init()
        self.batch = self.train.shard_batch(batch)
        self.params_count = sum(x.size for x in jax.tree.leaves(self.state.params))

    def step(self) -> None:
        self.state, _ = self.train(self.state, self.batch)

    def block(self) -> None:
        jax.block_until_ready(self.state)

    def device_bytes(self) -> int:
        return device0_bytes(self.state)

    def hlo(self) -> str:
        return self.train.lower(self.state, self.batch).compile().as_text()


class BaselineRun:
    """A plain jitted optax step: replicated params, batch sharded over every device.

    The same model, optimizer (adamw after global-norm clipping), learning rate and
    compute dtype as the zjax config; XLA's SPMD partitioner inserts the collectives.
    """

    def __init__(self, cfg, mesh, batch: dict, accum: int):
        graphdef, params = nnx.split(make_gpt(cfg.model, seed=cfg.seed), nnx.Param)
        compute = jnp.dtype(cfg.precision.compute_dtype)
        opt = cfg.optimizer
        tx = optax.chain(
            optax.clip_by_global_norm(cfg.gradient_clipping),
            optax.adamw(opt.lr, opt.b1, opt.b2, opt.eps, weight_decay=opt.weight_decay),
        )
        replicated = NamedSharding(mesh, P())
        sharded = NamedSharding(mesh, P("data"))

        def loss_fn(params, batch):
            params = jax.tree.map(lambda p: p.astype(compute), params)
            return gpt_loss(nnx.merge(graphdef, params), batch)[0]

        def grads_fn(params, batch):
            if accum == 1:
                return jax.value_and_grad(loss_fn)(params, batch)
            # Micro-batch i takes rows i, i+accum, ...: each device keeps its own rows.
            micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((-1, accum) + x.shape[1:]), 0, 1), batch)

            def body(acc, mb):
                loss, g = jax.value_and_grad(loss_fn)(params, mb)
                return jax.tree.map(jnp.add, acc, (loss, g)), None

            zeros = (jnp.float32(0), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(body, zeros, micro)
            return loss / accum, jax.tree.map(lambda g: g / accum, grads)

        def step(params, opt_state, batch):
            loss, grads = grads_fn(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self.params = jax.device_put(params, replicated)
        self.opt_state = jax.device_put(tx.init(params), replicated)
        self.batch = jax.device_put(batch, sharded)
        self._step = jax.jit(step, donate_argnums=(0, 1), out_shardings=replicated)

    def step(self) -> None:
        self.params, self.opt_state, _ = self._step(self.params, self.opt_state, self.batch)

    def block(self) -> None:
        jax.block_until_ready((self.params, self.opt_state))

    def device_bytes(self) -> int:
        return device0_bytes((self.params, self.opt_state))

    def hlo(self) -> str:
        return self._step.lower(self.params, self.opt_state, self.batch).compile().as_text()


def device0_bytes(tree: Any) -> int:
    """Bytes of every leaf's shards that live on device 0."""
    device = jax.devices()[0]
    total = 0
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
    return total


# -- the tables ---------------------------------------------------------------------


def print_memory(runs: dict, baseline: BaselineRun, psi: int, n: int, precision: str) -> None:
    print()
    print(f"Per-device TrainState bytes (device 0, sum of addressable_shards nbytes; {precision})")
    formulas = memory_formulas(precision)
    rows = []
    for stage, run in runs.items():
        text, coef = formulas[stage]
        expected = coef(psi, n)
        measured = run.device_bytes()
        rows.append(memory_row(f"zjax stage {stage}", measured, psi, text, expected))
    rows.append(memory_row("optax baseline", baseline.device_bytes(), psi, "12Ψ", 12 * psi))
    print_table(["variant", "measured", "measured/Ψ", "formula", "formula bytes", "measured/formula"], rows)


def memory_row(name: str, measured: int, psi: int, formula: str, expected: float) -> list[str]:
    return [name, f"{measured:,}", f"{measured / psi:.3f}Ψ", formula, f"{expected:,.0f}", f"{measured / expected:.4f}"]


def memory_formulas(precision: str) -> dict[int, tuple[str, Callable[[int, int], float]]]:
    """ZeRO's persistent bytes per device (Adam, float32 master), by stage."""
    if precision == "fp32":
        middle = ("4Ψ + 8Ψ/N", lambda psi, n: 4 * psi + 8 * psi / n)
    else:
        middle = ("2Ψ + 12Ψ/N", lambda psi, n: 2 * psi + 12 * psi / n)
    return {
        0: ("12Ψ", lambda psi, n: 12 * psi),
        1: middle,
        2: middle,
        3: ("12Ψ/N", lambda psi, n: 12 * psi / n),
    }


def print_collectives(args, batch: dict, runs: dict, baseline: BaselineRun, psi: int, n: int) -> None:
    print()
    accum = args.accum
    g = psi * 4 * (n - 1) / n
    note = "" if args.precision == "fp32" else " (from float32 builds: XLA:CPU widens bf16 collectives)"
    print(f"Collective bytes per device per step, ring-equivalent, from the compiled HLO{note}")
    print(f"G = Ψ x 4 B x (N-1)/N = {g:,.0f} B (one float32 gradient reduce-scatter)")
    if args.precision == "fp32":
        hlos = {stage: run.hlo() for stage, run in runs.items()}
        base_hlo = baseline.hlo()
    else:
        hlos = {stage: ZeroRun(make_config(args, stage, "fp32"), batch).hlo() for stage in STAGES}
        base_hlo = BaselineRun(make_config(args, 0, "fp32"), runs[0].train.mesh, batch, accum).hlo()
    theory = collective_theory(accum)
    rows = []
    variants = [(f"zjax stage {s}", hlos[s], theory[s]) for s in STAGES] + [("optax baseline", base_hlo, ("2G", 2))]
    for name, hlo, (text, units) in variants:
        counted = collective_bytes(hlo, n)
        total = sum(counted[k] for k in COLLECTIVES)
        rows.append(
            [name, *(f"{counted[k]:,.0f}" for k in COLLECTIVES), f"{total:,.0f}", f"{total / g:.3f}G", text,
             f"{units * g:,.0f}", f"{total / (units * g):.4f}"]
        )
    print_table(["variant", *COLLECTIVES, "total", "total/G", "theory", "theory bytes", "measured/theory"], rows)
    if accum > 1:
        print(f"(theory with {accum} micro-batches: stage 2 reduce-scatters each one; stage 3 gathers and "
              "reduce-scatters each one)")


def collective_theory(accum: int) -> dict[int, tuple[str, float]]:
    """ZeRO's traffic per step in units of G, for ``accum`` micro-batches."""
    a = accum
    return {
        0: ("2G", 2),
        1: ("2G", 2),
        2: ("2G" if a == 1 else f"({a}+1)G", a + 1),
        3: ("3G" if a == 1 else f"3x{a}G", 3 * a),
    }


def print_timing(args, runs: dict, baseline: BaselineRun) -> None:
    print()
    variants = {"optax baseline": baseline, **{f"zjax stage {s}": run for s, run in runs.items()}}
    for run in variants.values():
        run.step()  # compiles
        run.block()
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.repeats):
        # Round robin, starting one later each time, so machine load hits all alike.
        for name in names[r % len(names):] + names[: r % len(names)]:
            run = variants[name]
            start = time.perf_counter()
            for _ in range(args.steps):
                run.step()
            run.block()
            times[name].append((time.perf_counter() - start) / args.steps)
    print(
        f"Step time ({args.precision}): median over {args.repeats} interleaved windows of {args.steps} steps, "
        "after one compiling warm-up step"
    )
    base = statistics.median(times["optax baseline"])
    rows = []
    for name in names:
        med = statistics.median(times[name])
        rows.append([name, f"{med * 1e3:.1f}", f"{min(times[name]) * 1e3:.1f}", f"{max(times[name]) * 1e3:.1f}",
                     f"{med / base:.3f}"])
    print_table(["variant", "median ms/step", "min", "max", "vs baseline"], rows)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # Names left, numbers right.
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


if __name__ == "__main__":
    main()
