"""``zjax profile``: what one training step of the reference GPT costs, and what to change.

From the compiled step (nothing guessed): FLOPs, every collective with its bytes set
against ZeRO's theory and whether it is asynchronous and overlapped, and the memory
breakdown. From running it: median step time, tokens/s and MFU. Then the same step
compiled for the other ZeRO stages and another remat policy, and the recommendations
those figures support.

Facts this module relies on (measured with jax 0.10.2 on 8 simulated CPU devices):

- ``cost_analysis()`` of the shard_map'd step is per device (the tiny config's step:
  27,277,620 FLOPs on each of 8 devices, 218,195,632 on one device: 8.0x) and counts
  the body of a ``while`` loop once (doubling ``model.n_layers`` from 2 to 4 moved it
  by 1.5%), so it misses most of a scanned model. The hardware FLOPs here are
  therefore counted from the compiled HLO: every ``dot`` times the trip counts of the
  loops around it, per device, times the devices. XLA's own figure is kept alongside.
- XLA:CPU runs collectives synchronously (no ``-start``/``-done`` pairs); GPU and TPU
  programs split them into start and done, and the compute scheduled between the two
  is what overlaps communication.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from zjax.analysis import hlo

from zjax.parallel import zero
from zjax.config.schema import Config, load_config
from zjax.errors import ConfigError
from zjax.models.gpt import count_params, gpt_loss, make_gpt
from zjax.analysis.plan import ITEMSIZE, abstract_step, zjax_bytes
from zjax.train.step import make_train_step

# Published dense bf16 peak FLOP/s per chip, matched in order against
# ``jax.devices()[0].device_kind`` (lower case); more specific names first.
PEAK_FLOPS = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),
    ("h200", 989e12),
    ("a100", 312e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
    ("tpu v6 lite", 918e12),
)
STATE_FIELDS = ("replicated", "master", "opt_state", "loss_scale", "step", "rng")
MIB = 2**20


def profile(config: Any, overrides=None, *, steps: int = 5, trace_dir: str | Path | None = None,
            compare: bool = True, peak_matmul_size: int = 1024) -> dict:
    """Compiles, runs and measures the reference GPT's training step for ``config``.

    Args:
      config: a config path, dict or ``Config``.
      overrides: ``key=value`` overrides, as for ``load_config``.
      steps: timed steps, after one warm-up step.
      trace_dir: when set, a ``jax.profiler`` trace of up to 3 further steps is written
        there (TensorBoard's profile plugin or Perfetto open it).
      compare: also compile the other ZeRO stages and one other remat policy, and
        derive recommendations from them.
      peak_matmul_size: on hardware without a published peak (CPU), each device
        multiplies two float32 matrices of this size, all devices at once, to
        measure the peak.

    Returns:
      A dict with ``config``, ``flops``, ``collectives``, ``memory``, ``timing``,
      ``peak``, ``mfu``, ``trace``, ``compare`` and ``recommendations`` (see
      ``format_profile``).

    Example:
      >>> result = profile("configs/tiny.yaml", steps=2, compare=False)  # doctest: +SKIP
      >>> 0 < result["mfu"] < 1  # doctest: +SKIP
      True
    """
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--steps={steps!r}: profile needs at least 1 timed step, e.g. --steps 5")
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    train = make_train_step(cfg, gpt_loss, model=make_gpt(cfg.model, seed=cfg.seed, kernels=cfg.kernels))
    with _runtime_errors(cfg, train, "initialize its state"):
        state = train.init()
    batch = train.shard_batch(_random_batch(cfg, train.global_batch_size))
    analysis = analyze_step(cfg, train, state, batch)
    compiled = analysis.pop("compiled")
    state_bytes = _state_bytes(state)

    with _runtime_errors(cfg, train, "run"):
        timing = _time_steps(compiled, state, batch, steps, trace_dir)
    trace = timing.pop("trace")
    timing["compile_s"] = analysis["compile_s"]
    peak = peak_flops(peak_matmul_size, cfg.precision.compute_dtype)
    n = jax.device_count()
    model_per_s = analysis["flops"]["model"] / timing["median_s"]
    mfu = model_per_s / (peak["per_device"] * n)
    timing["tokens_per_s"] = analysis["flops"]["tokens"] / timing["median_s"]
    timing["model_flops_per_s"] = model_per_s

    psi = analysis["flops"]["params"]
    memory = analysis["memory"]
    memory["state_measured"] = state_bytes
    # bytes_limit of the accelerator; CPU devices report no memory stats.
    memory["device_capacity"] = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    memory["state_predicted"] = {k: v for k, v in zjax_bytes(cfg, psi, train.data_size, cfg.zero.stage).items()
                                 if v is not None}
    result = {
        "config": {
            "stage": cfg.zero.stage, "remat": cfg.remat.policy, "compute_dtype": cfg.precision.compute_dtype,
            "devices": n, "data_devices": train.data_size, "platform": jax.devices()[0].platform,
            "device_kind": jax.devices()[0].device_kind, "global_batch_size": train.global_batch_size,
            "seq_len": cfg.data.seq_len, "grad_accum_steps": train.grad_accum_steps, "output_dir": cfg.output_dir,
        },
        "flops": analysis["flops"],
        "collectives": analysis["collectives"],
        "memory": memory,
        "timing": timing,
        "peak": peak,
        "mfu": mfu,
        "trace": trace,
        "compare": [],
        "recommendations": [],
    }
    if compare:
        result["compare"] = _compare(cfg, analysis)
        result["recommendations"] = recommendations(result)
    return result


def analyze_step(cfg: Config, train: Any, state: Any, batch: Any) -> dict:
    """Compiles ``train``'s step and reads FLOPs, collectives and memory from it.

    Args:
      cfg: the config ``train`` was built from.
      train: a ``TrainStep`` after ``init`` or ``prepare``.
      state: its state (arrays or ``ShapeDtypeStruct`` with shardings).
      batch: a global batch.

    Returns:
      ``{"compiled", "compile_s", "flops", "collectives", "memory"}``; ``compiled``
      is the compiled step, the rest are plain numbers.
    """
    start = time.perf_counter()
    with _runtime_errors(cfg, train, "compile"):
        compiled = train.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    n = jax.device_count()
    text = compiled.as_text()
    tokens = train.global_batch_size * cfg.data.seq_len
    model = model_flops(cfg.model, train.global_batch_size, cfg.data.seq_len)
    hardware = hlo.matmul_flops(text) * n
    xla = float(compiled.cost_analysis()["flops"]) * n
    memory = compiled.memory_analysis()
    mem = {
        "argument": int(memory.argument_size_in_bytes),
        "output": int(memory.output_size_in_bytes),
        "alias": int(memory.alias_size_in_bytes),
        "temp": int(memory.temp_size_in_bytes),
        "generated_code": int(memory.generated_code_size_in_bytes),
    }
    # Donated outputs alias their arguments: count those bytes once.
    mem["total"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
    return {
        "compiled": compiled,
        "compile_s": compile_s,
        "flops": {
            "params": model["params"],
            "tokens": tokens,
            "model": model["total"],
            "model_formula": model["formula"],
            "hardware": hardware,
            "hardware_over_model": hardware / model["total"],
            "convolutions_not_counted": text.count(" convolution("),
            "xla_cost_analysis": xla,
        },
        "collectives": collective_report(text, n, cfg, train),
        "memory": mem,
    }


def model_flops(m: Any, batch_size: int, seq_len: int) -> dict:
    """Model FLOPs of one training step (forward + backward), without recomputation.

    ``6·Ψ_mm·B·T + 12·L·T²·d·B``: per token, 2 FLOPs per matmul parameter in the
    forward pass and 4 in the backward pass (input and weight gradients), plus the attention scores and their
    product with V (``QKᵀ`` and ``AV``: 4·T·d per token per layer forward, three times
    that with the backward pass), counted over the full T x T matrix as XLA computes it.
    Ψ_mm is Ψ less what no matmul reads: the RMSNorm weights ((2·L + 1)·d) and an
    untied input embedding (a lookup).

    Args:
      m: the ``model`` config block.
      batch_size: sequences per step (the global batch, accumulation included).
      seq_len: tokens per sequence.

    Returns:
      ``{"params", "total", "formula"}``.
    """
    psi = count_params(m)
    norms = (2 * m.n_layers + 1) * m.d_model
    matmul_params = psi - norms - (0 if m.tie_embeddings else m.vocab_size * m.d_model)
    attn_width = m.n_heads * (m.d_model // m.n_heads)
    total = 6 * matmul_params * batch_size * seq_len + 12 * m.n_layers * seq_len**2 * attn_width * batch_size
    return {
        "params": psi,
        "total": float(total),
        "formula": f"6·{matmul_params:,}·{batch_size}·{seq_len} + 12·{m.n_layers}·{seq_len}²·{attn_width}·{batch_size}",
    }


def collective_report(text: str, num_devices: int, cfg: Config, train: Any) -> dict:
    """Collectives of compiled HLO text by kind, against ZeRO's theory for the config.

    Returns:
      ``{"by_kind": {kind: {"instructions", "runs", "bytes", "async", "overlapped"}},
      "total_bytes", "node_devices", "intra_node_bytes", "cross_node_bytes", "theory_bytes", "theory",
      "ratio", "note"}``; bytes are
      ring-equivalent per device per step (``zjax.analysis.hlo``); ``async`` counts instructions
      split into start and done, ``overlapped`` those with compute scheduled between.
    """
    by_kind: dict[str, dict] = {}
    found = hlo.collectives(text, num_devices)
    for c in found:
        row = by_kind.setdefault(c.kind, {"instructions": 0, "runs": 0, "bytes": 0.0, "async": 0, "overlapped": 0})
        row["instructions"] += 1
        row["runs"] += c.runs
        row["bytes"] += c.ring_bytes
    for kind, is_async, compute_between in hlo.collective_schedule(text):
        row = by_kind.get(kind)
        if row is not None:
            row["async"] += is_async
            row["overlapped"] += compute_between > 0
    total = sum(r["bytes"] for r in by_kind.values())
    theory, formula = zero_theory_bytes(cfg, train)
    if not by_kind:
        note = "no collectives in this HLO"
    elif any(r["async"] for r in by_kind.values()):
        note = "async: start/done pairs in the HLO; overlapped: compute scheduled between start and done"
    else:
        note = "every collective is synchronous in this HLO (no start/done pairs): none overlaps compute"
    if train.mesh.devices.flat[0].platform == "cpu" and cfg.precision.compute_dtype != "float32":
        note += "; XLA:CPU widens bf16/fp16 collectives to f32, so bytes exceed the theory here"
    # a node: zero.node_size data devices (default: all of them) with everything minor to data
    shape = dict(train.mesh.shape)
    minor = math.prod(list(shape.values())[list(shape).index("data") + 1:])
    node_devices = (cfg.zero.node_size or shape["data"]) * minor
    return {
        "by_kind": by_kind,
        "total_bytes": total,
        "node_devices": node_devices,
        **{f"{where}_node_bytes": b for where, b in hlo.node_bytes(found, node_devices).items()},
        "theory_bytes": theory,
        "theory": formula,
        # One data device: no collective is needed and there is no ratio.
        "ratio": total / theory if theory else None,
        "note": note,
    }


def zero_theory_bytes(cfg: Config, train: Any) -> tuple[float, str]:
    """ZeRO's collective bytes per device per step for the config, ring-equivalent.

    As ``benchmarks/zero.py``, f = (N-1)/N, a = gradient accumulation steps, r the
    reduce dtype's bytes, g the gathered params' bytes: stage 0 all-reduces 2Ψ·r·f;
    stage 1 reduce-scatters Ψ·r·f and all-gathers Ψ·g·f; stage 2 reduce-scatters every
    micro-batch (a·Ψ·r·f + Ψ·g·f); stage 3 gathers the scanned layers (Ψ_L) in the
    forward and again in the backward pass of every micro-batch, the other parameters
    (Ψ_o = Ψ - Ψ_L) once per step, kept for the backward pass, and reduce-scatters every
    micro-batch: (Ψ_o·g + 2a·Ψ_L·g + a·Ψ·r)·f. That is DeepSpeed's 3Ψ when every
    parameter is in the scanned stack and a = 1 (measured on the tiny GPT: within 0.1% at
    a = 1 and a = 2).

    Returns:
      ``(bytes, formula text)``.
    """
    layouts = jax.tree.leaves(train.layouts, is_leaf=zero.is_layout)
    psi = sum(math.prod(lay.shape) for lay in layouts)
    psi_layers = sum(math.prod(lay.shape) for lay in layouts if lay.stacked)
    n, a = train.data_size, train.grad_accum_steps
    f = (n - 1) / n
    p = cfg.precision
    r = ITEMSIZE[p.reduce_dtype or p.compute_dtype]
    g = ITEMSIZE[p.compute_dtype] if train.keeps_master else ITEMSIZE[p.param_dtype]
    z = train.zero
    if not z.partitioned:
        return 2 * psi * r * f, f"2Ψ·{r}B·(N-1)/N"
    if not z.reduces_in_backward:
        return (psi * r + psi * g) * f, f"(Ψ·{r}B + Ψ·{g}B)·(N-1)/N"
    if not z.gathers_for_loss:
        return (a * psi * r + psi * g) * f, f"({a}·Ψ·{r}B + Ψ·{g}B)·(N-1)/N"
    other = psi - psi_layers
    return ((other * g + 2 * a * psi_layers * g + a * psi * r) * f,
            f"(Ψ_other·{g}B + 2·{a}·Ψ_layers·{g}B + {a}·Ψ·{r}B)·(N-1)/N")


def peak_flops(matmul_size: int = 1024, compute_dtype: str = "bfloat16") -> dict:
    """Peak FLOP/s per device: the published figure for the chip, else measured.

    Measured: every device multiplies two float32 ``matmul_size``² matrices at the same
    time (one sharded batched matmul), median of 3 after a warm-up; the per-device
    peak is the total FLOP/s divided by the number of devices. On CPU the simulated devices share the host's
    cores, so this is the host's matmul throughput divided evenly among them, and MFU
    against it is the step's model FLOP/s over the host's measured matmul FLOP/s.

    Args:
      matmul_size: the side of the matrices multiplied to measure a peak.
      compute_dtype: the step's compute dtype, named in the source when a published
        bf16 peak stands for another dtype.

    Returns:
      ``{"per_device", "source"}``.
    """
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS:
        if name in kind.lower():
            other = "" if compute_dtype == "bfloat16" else f"; this step computes in {compute_dtype}"
            return {"per_device": flops, "source": f"published dense bf16 peak of {kind} ({name}){other}"}
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jax.device_put(jnp.ones((n, matmul_size, matmul_size), jnp.float32), NamedSharding(mesh, P("d")))
    matmul = jax.jit(lambda a: jnp.einsum("bij,bjk->bik", a, a))
    matmul(x).block_until_ready()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        times.append(time.perf_counter() - start)
    total = 2 * n * matmul_size**3 / statistics.median(times)
    return {
        "per_device": total / n,
        "source": f"measured: {n} x float32 {matmul_size}² matmul on all {n} {kind} devices at once, "
                  f"median of 3 = {total / 1e9:.1f} GFLOP/s in total",
    }


def recommendations(result: dict) -> list[str]:
    """What the compared compiles show, one sentence each; nothing they do not show."""
    current = {"stage": result["config"]["stage"], "remat": result["config"]["remat"],
               "memory": result["memory"]["total"], "temp": result["memory"]["temp"],
               "bytes": result["collectives"]["total_bytes"], "flops": result["flops"]["hardware"]}
    capacity = result["memory"]["device_capacity"]
    where = f"in the device's {_mib(capacity)}" if capacity else "in the same memory"
    out = []
    stages = [row for row in result["compare"] if row["remat"] == current["remat"]]
    for alt in stages:
        # A stage that another one beats on both memory and bytes is not worth a sentence.
        if alt["current"] or any(_dominates(other, alt) for other in stages):
            continue
        mem, moved = alt["memory"] / current["memory"] - 1, _relative(alt["bytes"], current["bytes"])
        # Without a known capacity (CPU) only what fits in the current step's memory surely fits.
        fits = alt["memory"] <= capacity if capacity else mem <= 0
        name, sizes = f"zero.stage={alt['stage']}", f"({_mib(alt['memory'])} vs {_mib(current['memory'])} per device)"
        if fits and moved < -0.05:
            out.append(f"{name} fits {where} {sizes} and moves {-moved:.0%} fewer collective bytes per step "
                       f"than zero.stage={current['stage']}")
        elif mem < -0.05 and moved <= 0.05:
            out.append(f"{name} needs {-mem:.0%} less memory {sizes} and moves {_more_or_fewer(moved)} "
                       "collective bytes per step")
        elif mem < -0.05:
            out.append(f"{name} needs {-mem:.0%} less memory {sizes} for {moved:.0%} more collective bytes per step")
        elif moved < -0.05:
            out.append(f"{name} moves {-moved:.0%} fewer collective bytes per step for {mem:.0%} more memory {sizes}")
    if not out and len(stages) > 1:
        out.append(f"zero.stage={current['stage']} is the best stage here: every other one needs more memory "
                   "and moves no fewer collective bytes")
    for alt in result["compare"]:
        if alt["remat"] == current["remat"]:
            continue
        temp, flops = alt["temp"] - current["temp"], alt["flops"] / current["flops"] - 1
        out.append(
            f"remat.policy={alt['remat']} would use {_mib(abs(temp))} {'more' if temp >= 0 else 'less'} temp memory "
            f"per device ({_mib(alt['temp'])} vs {_mib(current['temp'])}) and {abs(flops):.1%} "
            f"{'more' if flops >= 0 else 'fewer'} hardware FLOPs than remat.policy={current['remat']}"
        )
    return out


def format_profile(result: dict) -> str:
    """The profile as text: FLOPs, collectives, memory, timing, MFU and recommendations."""
    c, f, col, mem, t = (result[k] for k in ("config", "flops", "collectives", "memory", "timing"))
    lines = [
        f"ZeRO-{c['stage']}, remat {c['remat']}, {c['compute_dtype']}; {c['devices']} {c['platform']} devices "
        f"({c['device_kind']}); global batch {c['global_batch_size']} x {c['seq_len']} tokens, "
        f"grad_accum_steps {c['grad_accum_steps']}",
        "",
        f"FLOPs per step (all devices), Ψ = {f['params']:,}, {f['tokens']:,} tokens",
        f"  model     {f['model']:>16,.0f}  = {f['model_formula']}",
        f"  hardware  {f['hardware']:>16,.0f}  dots in the compiled HLO x loop trip counts "
        f"({f['hardware_over_model']:.3f}x model: recomputation included)",
        f"  XLA cost  {f['xla_cost_analysis']:>16,.0f}  cost_analysis()['flops'] x devices (loop bodies counted once)",
    ]
    if f["convolutions_not_counted"]:
        lines.append(f"  ({f['convolutions_not_counted']} convolution instructions are not in the hardware count)")
    lines += [
        "",
        "Collectives per device per step (ring-equivalent bytes, from the compiled HLO)",
        f"  {'kind':<16}{'instr':>6}{'runs':>6}{'bytes':>14}{'async':>7}{'overlap':>9}",
    ]
    for kind, r in col["by_kind"].items():
        lines.append(f"  {kind:<16}{r['instructions']:>6}{r['runs']:>6}{r['bytes']:>14,.0f}{r['async']:>7}"
                     f"{r['overlapped']:>9}")
    lines += [
        f"  total {col['total_bytes']:,.0f} B; ZeRO theory {col['theory']} = {col['theory_bytes']:,.0f} B; "
        f"measured/theory {_ratio(col['ratio'])}",
        f"  intra-node {col['intra_node_bytes']:,.0f} B, cross-node {col['cross_node_bytes']:,.0f} B "
        f"(a node: {col['node_devices']} devices, zero.node_size data devices)",
        f"  {col['note']}",
        "",
        "Memory per device (compiled memory_analysis)",
        "  " + ", ".join(f"{k} {_mib(mem[k])}" for k in ("argument", "output", "alias", "temp")),
        f"  argument + output - alias + temp = {_mib(mem['total'])}",
        "  TrainState on device 0: " + ", ".join(f"{k} {_mib(v)}" for k, v in mem["state_measured"].items()),
        "  zjax.analysis.plan prediction:   " + ", ".join(f"{k} {_mib(v)}" for k, v in mem["state_predicted"].items()),
        "",
        f"Timing: {t['steps']} steps after one warm-up; compile {t['compile_s']:.2f} s, warm-up {t['warmup_s']:.3f} s",
        f"  median {t['median_s'] * 1e3:.1f} ms/step (min {t['min_s'] * 1e3:.1f}, max {t['max_s'] * 1e3:.1f}); "
        f"{t['tokens_per_s']:,.0f} tokens/s; {t['model_flops_per_s'] / 1e9:.2f} model GFLOP/s",
        f"  peak {result['peak']['per_device'] / 1e9:,.1f} GFLOP/s per device ({result['peak']['source']})",
        f"  MFU {result['mfu']:.2%} (model FLOP/s / (peak per device x {c['devices']} devices))",
    ]
    if result["trace"]:
        lines.append(f"  trace: {result['trace']['dir']} ({len(result['trace']['files'])} files, "
                     f"{result['trace']['steps']} steps)")
    if result["compare"]:
        lines += ["", "Compared (compiled, not run)",
                  f"  {'stage':>5}  {'remat':<10}{'memory':>12}{'temp':>12}{'coll. bytes':>14}{'ratio':>8}"
                  f"{'hw FLOPs':>16}"]
        for a in result["compare"]:
            lines.append(f"  {a['stage']:>5}  {a['remat']:<10}{_mib(a['memory']):>12}{_mib(a['temp']):>12}"
                         f"{a['bytes']:>14,.0f}{_ratio(a['ratio']):>8}{a['flops']:>16,.0f}")
    if result["recommendations"]:
        lines += ["", "Recommendations"] + [f"  - {r}" for r in result["recommendations"]]
    return "\n".join(lines)


def write_png(result: dict, path: str | Path) -> Path:
    """Bar charts of the memory breakdown, the FLOPs and the step time; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem, f, t = result["memory"], result["flops"], result["timing"]
    fig, (ax_mem, ax_flops, ax_time) = plt.subplots(1, 3, figsize=(15, 4.5))
    mem_rows = {**{k: mem[k] for k in ("argument", "output", "alias", "temp")},
                # scalars (step, rng, loss scale) would be invisible bars
                **{f"state.{k}": v for k, v in mem["state_measured"].items() if v >= 1024}}
    ax_mem.barh(list(mem_rows), [v / MIB for v in mem_rows.values()], color="tab:blue")
    ax_mem.set_xlabel("MiB per device")
    ax_mem.set_title("memory (compiled) and TrainState")
    flops_rows = {"model": f["model"], "hardware\n(HLO dots)": f["hardware"],
                  "XLA\ncost_analysis": f["xla_cost_analysis"]}
    ax_flops.bar(list(flops_rows), [v / 1e9 for v in flops_rows.values()], color="tab:orange")
    ax_flops.set_ylabel("GFLOP per step")
    ax_flops.set_title("FLOPs per step, all devices")
    peak_total = result["peak"]["per_device"] * result["config"]["devices"]
    time_rows = {"measured\n(median)": t["median_s"], "model FLOPs\nat peak": f["model"] / peak_total,
                 "hardware FLOPs\nat peak": f["hardware"] / peak_total}
    ax_time.bar(list(time_rows), [v * 1e3 for v in time_rows.values()], color="tab:green")
    ax_time.set_ylabel("ms per step")
    ax_time.set_title(f"step time (MFU {result['mfu']:.1%})")
    for ax in (ax_flops, ax_time):
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path


# -- helpers --------------------------------------------------------------------------


@contextlib.contextmanager
def _runtime_errors(cfg: Config, train, doing: str):
    """Turns XLA's failures (out of memory, above all) into a ConfigError naming the knobs that help."""
    try:
        yield
    except jax.errors.JaxRuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(
            f"the step of this config (zero.stage={cfg.zero.stage}, remat.policy={cfg.remat.policy}, "
            f"batch.global_batch_size={train.global_batch_size}, data.seq_len={cfg.data.seq_len}) failed to "
            f"{doing} here: {first}; a higher zero.stage, remat.policy=full or a smaller batch needs less memory"
        ) from None


def _random_batch(cfg: Config, batch_size: int) -> dict:
    """Random tokens: step time does not depend on the text, so no corpus is loaded."""
    rng = np.random.default_rng(cfg.seed)
    return {"tokens": rng.integers(0, cfg.model.vocab_size, (batch_size, cfg.data.seq_len + 1), dtype=np.int32)}


def _time_steps(compiled, state, batch, steps: int, trace_dir) -> dict:
    """Runs one warm-up step, ``steps`` timed steps and an optional traced window."""
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    warmup = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    trace = None
    if trace_dir is not None:
        trace_dir = Path(trace_dir)
        traced = min(steps, 3)
        # A separate window: the profiler's overhead stays out of the timed steps.
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            for _ in range(traced):
                state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
        files = sorted(str(p) for p in trace_dir.rglob("*") if p.is_file())
        trace = {"dir": str(trace_dir), "steps": traced, "files": files}
    return {
        "steps": steps,
        "times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "warmup_s": warmup,
        "trace": trace,
    }


def _state_bytes(state) -> dict[str, int]:
    """Bytes of each TrainState field held by device 0."""
    device = jax.devices()[0]
    out = {}
    for field in STATE_FIELDS:
        total = 0
        for leaf in jax.tree.leaves(getattr(state, field)):
            if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
        out[field] = total
    return out


def _compare(cfg: Config, current: dict) -> list[dict]:
    """The same step compiled for every other ZeRO stage and for one other remat policy."""
    variants = [{"zero.stage": s} for s in (0, 1, 2, 3) if s != cfg.zero.stage]
    variants.append({"remat.policy": "selective" if cfg.remat.policy == "none" else "none"})
    rows = [_row(cfg.zero.stage, cfg.remat.policy, current, current=True)]
    for change in variants:
        alt = load_config(cfg, change)
        train, state, batch = abstract_step(alt)
        analysis = analyze_step(alt, train, state, batch)
        rows.append(_row(alt.zero.stage, alt.remat.policy, analysis))
    return rows


def _row(stage: int, remat: str, analysis: dict, current: bool = False) -> dict:
    col = analysis["collectives"]
    return {"stage": stage, "remat": remat, "current": current, "memory": analysis["memory"]["total"],
            "temp": analysis["memory"]["temp"], "bytes": col["total_bytes"], "theory_bytes": col["theory_bytes"],
            "ratio": col["ratio"], "flops": analysis["flops"]["hardware"]}


def _dominates(a: dict, b: dict) -> bool:
    """``a`` needs no more memory than ``b`` and moves no more bytes (1% slack), and is better in one."""
    if a is b or a["memory"] > b["memory"] or a["bytes"] > 1.01 * b["bytes"]:
        return False
    return a["memory"] < b["memory"] or a["bytes"] < 0.99 * b["bytes"]


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _relative(a: float, b: float) -> float:
    return a / b - 1 if b else 0.0


def _more_or_fewer(x: float) -> str:
    if abs(x) < 0.005:
        return "the same"
    return f"{abs(x):.0%} {'more' if x > 0 else 'fewer'}"


def _mib(nbytes: float) -> str:
    return f"{nbytes / MIB:.2f} MiB"
