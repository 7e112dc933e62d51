"""``zjax plan``: per-device memory of every ZeRO stage, before anything runs.

Two accountings side by side (Ψ parameters, N data devices):

- the ZeRO paper's (Rajbhandari et al. 2020, Table 1): fp16 params (2Ψ) and grads
  (2Ψ) plus K = 12 bytes of Adam state per parameter; stage 1 is 4Ψ + 12Ψ/N,
  stage 2 is 2Ψ + 14Ψ/N, stage 3 is 16Ψ/N;
- zjax's own: what its ``TrainState`` holds (``zjax.train``'s table; DESIGN.md) plus
  the gradient buffers its step allocates: a full local accumulator in
  ``precision.accum_dtype`` for stages 0-1, a sharded one (Ψ/N) for stages 2-3.

For a config whose step can be compiled here, ``plan`` also lowers and compiles the
reference GPT's step for each stage and sets the prediction (state + gradient
buffers + the activations the remat policy keeps) against
``memory_analysis()``: argument plus temp bytes, both per device.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from zjax.config import Config, load_config
from zjax.errors import ConfigError

GB = 1e9
STAGES = (0, 1, 2, 3)
STAGE_NAMES = ("baseline", "optimizer states", "+ gradients", "+ parameters")
PAPER_ROWS = ("params", "gradients", "optimizer state")
ZJAX_ROWS = ("compute params", "master params", "moments", "gradients", "activations")
# Bytes of optimizer moments per parameter: Adam keeps m and v in fp32, Lion one momentum.
_MOMENT_BYTES = {"adam": 8, "adamw": 8, "lion": 4}
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass
class StagePlan:
    """Per-device bytes of one ZeRO stage.

    Attributes:
      stage: the ZeRO stage.
      paper: the ZeRO paper's rows (``PAPER_ROWS``) in bytes.
      zjax: zjax's rows (``ZJAX_ROWS``) in bytes; ``activations`` is None without a compile.
      compiled: from the compiled step, else None: ``argument`` and ``temp`` bytes of
        ``memory_analysis()``, ``total`` (their sum), ``predicted`` (zjax's total) and
        ``ratio`` (predicted / compiled).
    """

    stage: int
    paper: dict[str, float]
    zjax: dict[str, float | None]
    compiled: dict[str, float] | None = None

    @property
    def paper_total(self) -> float:
        return sum(self.paper.values())

    @property
    def zjax_total(self) -> float:
        return sum(v for v in self.zjax.values() if v is not None)


@dataclasses.dataclass
class Plan:
    """The plan of a config: its size, chosen stage and one ``StagePlan`` per stage."""

    params: int
    devices: int
    chosen_stage: int
    compute_dtype: str
    remat: str
    stages: list[StagePlan]
    note: str = ""

    def to_json(self) -> dict:
        return {
            "params": self.params,
            "devices": self.devices,
            "chosen_stage": self.chosen_stage,
            "compute_dtype": self.compute_dtype,
            "remat": self.remat,
            "note": self.note,
            "stages": [
                {
                    "stage": s.stage,
                    "paper": {**s.paper, "total": s.paper_total},
                    "zjax": {**s.zjax, "total": s.zjax_total},
                    "compiled": s.compiled,
                }
                for s in self.stages
            ],
        }


def plan(config: Any = "configs/base.yaml", overrides=None, *, params: float | None = None,
         devices: int | None = None, compile: bool = True) -> Plan:
    """The per-device memory of every ZeRO stage for ``config``.

    Args:
      config: a config path, dict or ``Config``.
      overrides: ``key=value`` overrides, as for ``load_config``.
      params: a parameter count to plan for instead of the config's reference GPT;
        analytic only (nothing is compiled).
      devices: the number of data-parallel devices (default: the visible devices).
      compile: compile each stage's step when the config's model can be built here.

    Returns:
      A ``Plan``.

    Example:
      >>> p = plan(params=7.5e9, devices=64)
      >>> [round(s.paper_total / 1e9, 2) for s in p.stages]
      [120.0, 31.41, 16.64, 1.88]
    """
    cfg = config if isinstance(config, Config) else load_config(config, overrides)
    import jax

    visible = len(jax.devices())
    n = visible if devices is None else int(devices)
    if n < 1:
        raise ConfigError(f"--devices={devices}: the device count must be at least 1")
    note = ""
    if params is None:
        from zjax.models.gpt import count_params

        psi = count_params(cfg.model)
        if compile and n != visible:
            note = (f"compiled: n/a (--devices={n} but {visible} devices are visible; "
                    f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} on CPU)")
            compile = False
    else:
        psi = int(params)
        if psi < 1:
            raise ConfigError(f"--params={params}: the parameter count must be at least 1")
        compile = False
        note = "analytic only (--params): activations n/a"
    data = n // (cfg.mesh.tensor if cfg.mesh.tensor > 0 else 1)
    stages = [
        StagePlan(s, paper_bytes(psi, data, s), zjax_bytes(cfg, psi, data, s)) for s in STAGES
    ]
    if compile:
        for s in stages:
            s.compiled, activations = compiled_memory(cfg, s.stage)
            s.zjax["activations"] = activations
            s.compiled["predicted"] = s.zjax_total
            s.compiled["ratio"] = s.zjax_total / s.compiled["total"]
    return Plan(psi, n, cfg.zero.stage, cfg.precision.compute_dtype, cfg.remat.policy, stages, note)


def paper_bytes(psi: float, n: int, stage: int) -> dict[str, float]:
    """The ZeRO paper's per-device bytes: fp16 params and grads, K = 12 bytes of Adam state."""
    return {
        "params": 2 * psi / (n if stage >= 3 else 1),
        "gradients": 2 * psi / (n if stage >= 2 else 1),
        "optimizer state": 12 * psi / (n if stage >= 1 else 1),
    }


def zjax_bytes(cfg: Config, psi: float, n: int, stage: int) -> dict[str, float | None]:
    """What zjax's TrainState holds per device at ``stage``, plus its gradient buffers.

    Mirrors ``TrainStep.keeps_replicated`` / ``keeps_master``: stages 0-2 keep the
    params replicated (in the compute dtype when a sharded fp32 master exists, else
    as the fp32 master itself); stage 3, and mixed-precision stages 1-2, keep a sharded
    fp32 master. Moments are sharded from stage 1.
    """
    p = cfg.precision
    param, compute, accum = (_ITEMSIZE[d] for d in (p.param_dtype, p.compute_dtype, p.accum_dtype))
    shards = n if stage > 0 else 1
    keeps_master = stage == 3 or (stage > 0 and p.compute_dtype != p.param_dtype)
    replicated = 0.0
    if stage < 3:
        replicated = psi * (compute if keeps_master else param)
    return {
        "compute params": replicated if keeps_master else 0.0,
        "master params": psi * param / shards if keeps_master else replicated,
        "moments": psi * _moment_bytes(cfg) / shards,
        "gradients": psi * accum / (n if stage >= 2 else 1),
        "activations": None,
    }


def _moment_bytes(cfg: Config) -> int:
    opt = cfg.optimizer
    if opt.type == "sgd":
        return 4 if opt.momentum > 0 else 0
    if opt.type == "adafactor":
        # Factored second moments: O(rows + cols) per matrix, negligible against Ψ.
        return 0
    return _MOMENT_BYTES[opt.type]


def compiled_memory(cfg: Config, stage: int) -> tuple[dict[str, float], int]:
    """Compiles the reference GPT's step at ``stage``; returns its memory and the kept activations.

    Nothing runs: the state is abstract (shapes and shardings) and the batch is zeros.
    ``argument_size_in_bytes`` and ``temp_size_in_bytes`` are per device (measured:
    stage 0's argument bytes are 12Ψ, stage 3's 12Ψ/N on 8 CPU devices).

    Returns:
      ``({"argument", "temp", "total"}, activation bytes kept by the remat policy)``.
    """
    import jax
    import numpy as np

    from zjax.models import gpt_loss, make_gpt
    from zjax.remat import remat_report
    from zjax.train import make_train_step

    staged = load_config(cfg, {"zero.stage": stage})
    model = make_gpt(staged.model, seed=staged.seed, kernels=staged.kernels)
    train = make_train_step(staged, gpt_loss, model=model)
    train.prepare()
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), train.abstract_state, train.state_sharding
    )
    batch = {"tokens": np.zeros((train.global_batch_size, staged.data.seq_len + 1), np.int32)}
    report = remat_report(train, state, batch)
    # remat_report compiled this same step; the second compile hits JAX's cache.
    memory = train.lower(state, batch).compile().memory_analysis()
    argument, temp = int(memory.argument_size_in_bytes), int(memory.temp_size_in_bytes)
    return {"argument": argument, "temp": temp, "total": argument + temp}, report.saved_bytes


def format_plan(p: Plan) -> str:
    """The plan as text: one block per stage, paper and zjax columns, GB = 1e9 bytes."""
    lines = [
        f"params {p.params:,} ({p.params / 1e9:.3g}B) on {p.devices} data-parallel devices; "
        f"compute {p.compute_dtype}, remat {p.remat}; per-device memory, GB = 1e9 bytes",
        "paper: fp16 params + fp16 grads + 12 bytes/param Adam state (ZeRO, Table 1); "
        "zjax: what its TrainState holds + its gradient buffers",
    ]
    if p.note:
        lines.append(p.note)
    for s in p.stages:
        mark = "  <- config" if s.stage == p.chosen_stage else ""
        lines.append("")
        lines.append(f"stage {s.stage} ({STAGE_NAMES[s.stage]}){mark}")
        lines.append(f"  {'paper':<18}{'bytes':>16}{'GB':>10}    {'zjax':<16}{'bytes':>16}{'GB':>10}")
        paper = list(s.paper.items())
        mine = list(s.zjax.items())
        for i in range(len(mine)):
            left = _cell(*paper[i], 18) if i < len(paper) else " " * 44
            lines.append(f"  {left}    {_cell(*mine[i], 16)}")
        lines.append(f"  {_cell('total', s.paper_total, 18)}    {_cell('total', s.zjax_total, 16)}")
        if s.compiled:
            c = s.compiled
            lines.append(
                f"  compiled: argument {_gb(c['argument'])} + temp {_gb(c['temp'])} = {_gb(c['total'])} GB; "
                f"predicted {_gb(c['predicted'])} GB ({c['ratio']:.0%} of compiled)"
            )
    return "\n".join(lines)


def _cell(name: str, value: float | None, width: int) -> str:
    """``name bytes GB``, fixed width; ``n/a`` for a figure only a compile gives."""
    if value is None:
        return f"{name:<{width}}{'n/a':>16}{'n/a':>10}"
    return f"{name:<{width}}{value:>16,.0f}{_gb(value):>10}"


def _gb(value: float) -> str:
    if value == 0:
        return "0"
    return f"{value / GB:.3g}" if value >= 1e6 else f"{value / GB:.2e}"
