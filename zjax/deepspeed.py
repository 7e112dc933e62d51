"""DeepSpeed config keys in zjax terms: what each one maps to, and why the rest are ignored.

A zjax config may use DeepSpeed's own words (``train_micro_batch_size_per_gpu``,
``zero_optimization.stage``, ``fp16.loss_scale_window``, ``scheduler: {type: WarmupLR}``)
next to zjax keys. ``map_deepspeed`` rewrites them onto the zjax schema; keys that mean
nothing here are accepted and listed with a reason instead of being silently dropped.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from zjax.errors import ConfigError

_COLLECTIVES = "XLA schedules and fuses collectives; zjax issues one collective per tensor"
_OFFLOAD = "zjax offloads to host memory only through offload_optimizer/offload_param.device: cpu"
_OFFLOAD_TUNING = "XLA moves the offloaded arrays itself; there are no buffers or pools to tune"
_MONITOR = "metric monitors are not wired into zjax yet; metrics go to the log"
_LR_ONLY = "zjax cycles only the learning rate; momentum stays at optimizer.b1"
_FP32_MASTER = "zjax keeps float32 master params; there is no 16-bit copy to manage"

# Every DeepSpeed key zjax accepts without acting on it, with the reason it is shown.
IGNORED: dict[str, str] = {
    "wall_clock_breakdown": "zjax has no per-phase timers; use jax.profiler for a breakdown",
    "memory_breakdown": "zjax has no per-phase memory report; use jax.profiler",
    "dump_state": "there is no engine state to dump; `zjax config explain` prints the effective config",
    "prescale_gradients": "zjax averages gradients in one reduction; there is no separate pre-division",
    "gradient_predivide_factor": "zjax averages gradients in one reduction; there is no separate pre-division",
    "sparse_gradients": "JAX gradients are dense arrays",
    "zero_allow_untested_optimizer": "every zjax optimizer runs at every ZeRO stage",
    "zero_force_ds_cpu_optimizer": _OFFLOAD,
    "flops_profiler": "use jax.profiler or XLA's cost analysis instead",
    "tensorboard": _MONITOR,
    "wandb": _MONITOR,
    "csv_monitor": _MONITOR,
    "comms_logger": "collectives are compiled into the XLA program; see them in the HLO or a jax.profiler trace",
    "amp": "Apex AMP does not exist in JAX; use bf16 or fp16",
    "activation_checkpointing.partition_activations": (
        "saved activations are already per device: each data-parallel device keeps only its own "
        "micro-batch's, and zjax does not split them further over the tensor axis"
    ),
    "activation_checkpointing.number_checkpoints": "zjax checkpoints every scanned layer; the count is model.n_layers",
    "activation_checkpointing.contiguous_memory_optimization": "XLA owns the layout of activation buffers",
    "activation_checkpointing.synchronize_checkpoint_boundary": (
        "there are no CUDA streams to synchronize; XLA orders the compiled program"
    ),
    "activation_checkpointing.profile": "use zjax.remat.remat_report or jax.profiler instead",
    "checkpoint": "DeepSpeed's checkpoint options do not apply to zjax checkpoints",
    "aio": _OFFLOAD,
    "autotuning": "zjax has no autotuner; set sizes explicitly",
    "elasticity": "elastic batch sizing is not supported; the batch triple is fixed",
    "fp32_allreduce": "set communication_data_type: fp32 instead",
    "disable_allgather": _COLLECTIVES,
    "zero_optimization.reduce_bucket_size": _COLLECTIVES,
    "zero_optimization.allgather_bucket_size": _COLLECTIVES,
    "zero_optimization.overlap_comm": _COLLECTIVES,
    "zero_optimization.contiguous_gradients": "XLA owns the layout of gradient buffers",
    "zero_optimization.reduce_scatter": _COLLECTIVES,
    "zero_optimization.allgather_partitions": _COLLECTIVES,
    "zero_optimization.round_robin_gradients": _COLLECTIVES,
    "zero_optimization.use_multi_rank_bucket_allreduce": _COLLECTIVES,
    "zero_optimization.stage3_prefetch_bucket_size": _COLLECTIVES,
    "zero_optimization.stage3_max_live_parameters": _COLLECTIVES,
    "zero_optimization.stage3_max_reuse_distance": _COLLECTIVES,
    "zero_optimization.stage3_param_persistence_threshold": _COLLECTIVES,
    "zero_optimization.sub_group_size": "the optimizer update is one XLA program; there are no sub-groups to size",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": _FP32_MASTER,
    "zero_optimization.stage3_gather_fp16_weights_on_model_save": _FP32_MASTER,
    "zero_optimization.gather_16bit_weights_on_model_save": _FP32_MASTER,
    "zero_optimization.elastic_checkpoint": "zjax checkpoints are not DeepSpeed's partitioned ZeRO checkpoints",
    "zero_optimization.load_from_fp32_weights": _FP32_MASTER,
    "zero_optimization.cpu_offload": _OFFLOAD,
    "zero_optimization.cpu_offload_params": _OFFLOAD,
    "zero_optimization.cpu_offload_use_pin_memory": _OFFLOAD,
    "zero_optimization.ignore_unused_parameters": "JAX computes a gradient for every parameter",
    "zero_optimization.legacy_stage1": "zjax has one stage-1 implementation",
    "zero_optimization.memory_efficient_linear": "XLA chooses the linear-layer kernels",
    "zero_optimization.zero_hpz_partition_size": "ZeRO++ is not implemented",
    "zero_optimization.zero_quantized_weights": "ZeRO++ is not implemented",
    "zero_optimization.zero_quantized_gradients": "ZeRO++ is not implemented",
    "zero_optimization.mics_shard_size": "MiCS is not implemented",
    "zero_optimization.mics_hierarchical_params_gather": "MiCS is not implemented",
    "fp16.consecutive_hysteresis": "zjax's loss scaler has a single hysteresis rule; it is not switchable",
    "fp16.auto_cast": "zjax casts to precision.compute_dtype itself; there is no autocast switch",
    "fp16.fp16_master_weights_and_grads": _FP32_MASTER,
    "bf16.immediate_grad_update": "zjax applies the update once per optimizer step",
    "bf16.check_grad_overflow": "overflow checks belong to fp16 loss scaling only",
    "optimizer.legacy_fusion": "XLA fuses the optax update",
    "optimizer.params.torch_adam": "optax runs the same Adam on every backend",
    "optimizer.params.set_grad_none": "JAX gradients are values, not buffers to reset",
    "scheduler.params.last_batch_iteration": "the schedule position is the optimizer step count",
    "scheduler.params.cycle_momentum": _LR_ONLY,
    "scheduler.params.cycle_min_mom": _LR_ONLY,
    "scheduler.params.cycle_max_mom": _LR_ONLY,
    "scheduler.params.decay_mom_rate": _LR_ONLY,
}

_BATCH = {
    "train_batch_size": "batch.global_batch_size",
    "train_micro_batch_size_per_gpu": "batch.micro_batch_size_per_device",
    "gradient_accumulation_steps": "batch.grad_accum_steps",
}
_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_OPTIMIZER_PARAMS = {
    "adam": ("lr", "betas", "eps", "weight_decay", "adam_w_mode", "amsgrad", "bias_correction"),
    "adamw": ("lr", "betas", "eps", "weight_decay", "amsgrad", "bias_correction"),
    "sgd": ("lr", "momentum", "nesterov", "weight_decay", "dampening"),
    "lion": ("lr", "betas", "weight_decay"),
    "adafactor": ("lr", "weight_decay"),
}
# DeepSpeed/torch options zjax supports only at their default value.
_DEFAULT_ONLY = {"amsgrad": False, "bias_correction": True, "dampening": 0}
_SCHEDULERS = {
    "warmuplr": "warmup",
    "warmupdecaylr": "warmup_decay",
    "warmupcosinelr": "warmup_cosine",
    "onecycle": "onecycle",
}
_WARMUP = {
    "warmup_min_lr": "schedule.warmup_min_lr",
    "warmup_max_lr": "optimizer.lr",
    "warmup_num_steps": "schedule.warmup_steps",
    "warmup_type": "schedule.warmup_type",
}
_SCHEDULER_PARAMS = {
    "warmup": _WARMUP,
    "warmup_decay": {**_WARMUP, "total_num_steps": "schedule.total_steps"},
    "warmup_cosine": {
        "total_num_steps": "schedule.total_steps",
        "warmup_min_ratio": "schedule.warmup_min_ratio",
        "warmup_num_steps": "schedule.warmup_steps",
        "cos_min_ratio": "schedule.cos_min_ratio",
        "warmup_type": "schedule.warmup_type",
    },
    "onecycle": {
        "cycle_min_lr": "schedule.cycle_min_lr",
        "cycle_max_lr": "schedule.cycle_max_lr",
        "decay_lr_rate": "schedule.decay_lr_rate",
        "cycle_first_step_size": "schedule.cycle_first_step_size",
        "cycle_second_step_size": "schedule.cycle_second_step_size",
        "decay_step_size": "schedule.decay_step_size",
    },
}
# DeepSpeed's class defaults, used where its config leaves a parameter out (zjax's differ).
_SCHEDULER_DEFAULTS = {
    "warmup": {"warmup_num_steps": 1000, "warmup_type": "log"},
    "warmup_decay": {"warmup_num_steps": 1000, "warmup_type": "log", "warmup_max_lr": 0.001},
    "warmup_cosine": {"warmup_num_steps": 1000, "warmup_type": "log", "cos_min_ratio": 0.0001},
    "onecycle": {"cycle_first_step_size": 2000},
}
_AUTO_HINTS = {
    "train_batch_size": "give the global batch size as an integer, e.g. 32",
    "train_micro_batch_size_per_gpu": "give the per-device micro-batch size as an integer, e.g. 4",
    "gradient_accumulation_steps": "give the micro-batches per optimizer step as an integer, e.g. 1",
    "gradient_clipping": "give the max global gradient norm as a number, e.g. 1.0 (0 disables clipping)",
    "zero_optimization.stage": "give the ZeRO stage: 0, 1, 2 or 3",
    "fp16.enabled": "give true or false",
    "bf16.enabled": "give true or false",
    "optimizer.params.lr": "give the learning rate as a number, e.g. 3e-4",
    "optimizer.params.betas": "give [b1, b2], e.g. [0.9, 0.999]",
    "optimizer.params.eps": "give a number, e.g. 1e-8",
    "optimizer.params.weight_decay": "give a number, e.g. 0.0",
    "scheduler.params.warmup_min_lr": "give a number, e.g. 0",
    "scheduler.params.warmup_max_lr": "give the peak learning rate, e.g. 3e-4",
    "scheduler.params.warmup_num_steps": "give the warmup length in optimizer steps, e.g. 100",
    "scheduler.params.total_num_steps": "give the run length in optimizer steps (the run's steps), e.g. 1000",
}


def map_deepspeed(raw: Mapping[str, Any]) -> tuple[dict, list[tuple[str, str]]]:
    """Rewrite the DeepSpeed keys of one config layer onto the zjax schema.

    Args:
      raw: one config layer; DeepSpeed and zjax keys may be mixed.

    Returns:
      ``(layer, ignored)``: the layer with only zjax keys, and ``(key, reason)`` for
      each DeepSpeed key it accepted but ignores.

    Example:
      >>> map_deepspeed({"bf16": {"enabled": True}, "steps": 10})[0]
      {'steps': 10, 'precision': {'compute_dtype': 'bfloat16'}}
    """
    ds_keys = [key for key, value in raw.items() if _is_deepspeed(key, value)]
    if not ds_keys:
        return dict(raw), []
    for key in ds_keys:
        _reject_auto(key, raw[key])
    translation = _Translation()
    for key in sorted(ds_keys, key=_HANDLER_ORDER.index):
        _HANDLERS.get(key, _ignore_top_level)(key, raw[key], translation)
    layer = {key: value for key, value in raw.items() if key not in ds_keys}
    return translation.apply(layer), translation.ignored


class _Translation:
    """Dotted zjax key -> value, collected from DeepSpeed keys, plus the ignored keys."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[Any, str]] = {}
        self.defaults: dict[str, Any] = {}
        self.ignored: list[tuple[str, str]] = []

    def set(self, zjax_key: str, value: Any, ds_key: str) -> None:
        """Record that ``ds_key`` gives ``zjax_key`` the value ``value``."""
        if zjax_key in self.values and self.values[zjax_key][0] != value:
            previous, source = self.values[zjax_key]
            raise ConfigError(
                f"{ds_key} sets {zjax_key}={value!r} but {source} sets it to {previous!r}; keep one of them"
            )
        self.values[zjax_key] = (value, ds_key)

    def default(self, zjax_key: str, value: Any) -> None:
        """Record a value that holds only where no key of this layer sets ``zjax_key``."""
        self.defaults[zjax_key] = value

    def ignore(self, ds_key: str, reason: str | None = None) -> None:
        self.ignored.append((ds_key, reason or IGNORED[ds_key]))

    def apply(self, layer: dict) -> dict:
        """Write the values into ``layer``; a zjax key of the same layer must agree."""
        for zjax_key, (value, ds_key) in self.values.items():
            given = _get(layer, zjax_key)
            if given is not _ABSENT and given != value:
                raise ConfigError(
                    f"{ds_key} sets {zjax_key}={value!r} but the config also sets {zjax_key}={given!r}; "
                    "keep one of them"
                )
            _put(layer, zjax_key, value)
        for zjax_key, value in self.defaults.items():
            if _get(layer, zjax_key) is _ABSENT:
                _put(layer, zjax_key, value)
        return layer


def _map_batch(key: str, value: Any, out: _Translation) -> None:
    out.set(_BATCH[key], _int(key, value), key)
    # DeepSpeed semantics: any two of the triple give the third, so the unset ones are derived.
    for zjax_key in _BATCH.values():
        out.default(zjax_key, None)


def _map_zero(key: str, block: Any, out: _Translation) -> None:
    mapped = ("stage", "offload_optimizer", "offload_param")
    _check_keys(key, block, mapped)
    if "stage" in block:
        out.set("zero.stage", _int("zero_optimization.stage", block["stage"]), "zero_optimization.stage")
    for name in mapped[1:]:
        if name in block:
            _map_offload(f"{key}.{name}", block[name], f"zero.{name}", out)
    _ignore_rest(key, block, mapped, out)


def _map_offload(key: str, block: Any, target: str, out: _Translation) -> None:
    """``offload_*: {device: cpu|none, pin_memory, buffer_count, ...}``: only ``device`` acts."""
    if not isinstance(block, Mapping):
        raise ConfigError(f"{key}={block!r} must be a block, e.g. {key}: {{device: cpu}}")
    device = block.get("device", "none")
    if device not in ("cpu", "none"):
        raise ConfigError(f"{key}.device={device!r}: zjax offloads to host memory only; use device: cpu or none")
    out.set(target, device, f"{key}.device")
    for name in block:
        if name != "device":
            out.ignore(f"{key}.{name}", _OFFLOAD_TUNING)


def _map_fp16(key: str, block: Any, out: _Translation) -> None:
    mapped = ("enabled", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale")
    _check_keys(key, block, mapped)
    if _bool("fp16.enabled", block.get("enabled", False)):
        out.set("precision.compute_dtype", "float16", "fp16.enabled")
        out.set("loss_scale.enabled", True, "fp16.enabled")
    if "loss_scale" in block:
        scale = _number("fp16.loss_scale", block["loss_scale"])
        # DeepSpeed: loss_scale 0 selects dynamic scaling, a positive value a fixed scale.
        out.set("loss_scale.dynamic", scale == 0, "fp16.loss_scale")
        if scale != 0:
            out.set("loss_scale.static_scale", scale, "fp16.loss_scale")
    for name, convert in (
        ("initial_scale_power", _int),
        ("loss_scale_window", _int),
        ("hysteresis", _int),
        ("min_loss_scale", _number),
    ):
        if name in block:
            out.set(f"loss_scale.{name}", convert(f"fp16.{name}", block[name]), f"fp16.{name}")
    _ignore_rest(key, block, mapped, out)


def _map_bf16(key: str, block: Any, out: _Translation) -> None:
    _check_keys(key, block, ("enabled",))
    if _bool("bf16.enabled", block.get("enabled", False)):
        out.set("precision.compute_dtype", "bfloat16", "bf16.enabled")
    _ignore_rest(key, block, ("enabled",), out)


def _map_optimizer(key: str, block: Any, out: _Translation) -> None:
    _check_keys(key, block, ("type", "params"))
    given_type = block.get("type", "Adam")
    name = str(given_type).lower()
    if name not in _OPTIMIZER_PARAMS:
        raise ConfigError(
            f"optimizer.type={given_type!r} is not supported; use one of Adam, AdamW, SGD, Lion, Adafactor"
        )
    params = block.get("params") or {}
    _check_keys("optimizer.params", params, _OPTIMIZER_PARAMS[name], f" for {given_type}")
    for option, default in _DEFAULT_ONLY.items():
        if option in params and params[option] != default:
            raise ConfigError(
                f"optimizer.params.{option}={params[option]!r} is not supported by zjax's {name}; "
                f"remove it or set {option}: {default!r}"
            )
    weight_decay = _number("optimizer.params.weight_decay", params.get("weight_decay", 0.0))
    zjax_type = _adam_flavour(params, weight_decay) if name == "adam" else name
    out.set("optimizer.type", zjax_type, "optimizer.type")
    if "betas" in params:
        b1, b2 = _betas(params["betas"])
        out.set("optimizer.b1", b1, "optimizer.params.betas")
        out.set("optimizer.b2", b2, "optimizer.params.betas")
    for option, convert in (("lr", _number), ("eps", _number), ("weight_decay", _number),
                            ("momentum", _number), ("nesterov", _bool)):
        if option in params:
            ds_key = f"optimizer.params.{option}"
            out.set(f"optimizer.{option}", convert(ds_key, params[option]), ds_key)
    _ignore_rest("optimizer.params", params, _OPTIMIZER_PARAMS[name], out)
    _ignore_rest(key, block, ("type", "params"), out)


def _adam_flavour(params: Mapping[str, Any], weight_decay: float) -> str:
    """DeepSpeed's "Adam" is FusedAdam with adam_w_mode=True: its weight decay is AdamW's."""
    adam_w_mode = _bool("optimizer.params.adam_w_mode", params.get("adam_w_mode", True))
    if weight_decay > 0 and not adam_w_mode:
        raise ConfigError(
            f"optimizer.params.adam_w_mode=False with weight_decay={weight_decay} is L2-coupled Adam, which "
            "zjax does not implement; use adam_w_mode: true (decoupled, AdamW) or weight_decay: 0"
        )
    return "adamw" if weight_decay > 0 else "adam"


def _betas(value: Any) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"optimizer.params.betas={value!r} must be a pair [b1, b2], e.g. [0.9, 0.999]")
    return _number("optimizer.params.betas", value[0]), _number("optimizer.params.betas", value[1])


def _map_scheduler(key: str, block: Any, out: _Translation) -> None:
    _check_keys(key, block, ("type", "params"))
    given_type = block.get("type")
    name = _SCHEDULERS.get(str(given_type).lower())
    if name is None:
        raise ConfigError(
            f"scheduler.type={given_type!r} is not supported; use one of WarmupLR, WarmupDecayLR, "
            "WarmupCosineLR, OneCycle"
        )
    params = block.get("params") or {}
    mapping = _SCHEDULER_PARAMS[name]
    stairs = ("cycle_first_stair_count", "cycle_second_stair_count") if name == "onecycle" else ()
    _check_keys("scheduler.params", params, (*mapping, *stairs), f" for {given_type}")
    out.set("schedule.type", name, "scheduler.type")
    for ds_name, value in _SCHEDULER_DEFAULTS[name].items():
        if ds_name not in params:
            out.default(mapping[ds_name], value)
    for ds_name, zjax_key in mapping.items():
        if ds_name not in params:
            continue
        value = _scalar(f"scheduler.params.{ds_name}", params[ds_name])
        if zjax_key == "optimizer.lr":
            _set_peak_lr(_number(f"scheduler.params.{ds_name}", value), out)
        else:
            out.set(zjax_key, value, f"scheduler.params.{ds_name}")
    if "cycle_max_lr" in params and "optimizer.lr" in out.values:
        out.ignored.append(("optimizer.params.lr", "OneCycle peaks at scheduler.params.cycle_max_lr"))
    for stair in stairs:
        if params.get(stair) not in (None, 0):
            raise ConfigError(
                f"scheduler.params.{stair}={params[stair]!r}: stair-case OneCycle is not implemented; "
                f"remove {stair} or set it to 0"
            )
    _ignore_rest("scheduler.params", params, (*mapping, *stairs), out)


def _set_peak_lr(lr: float, out: _Translation) -> None:
    """As in DeepSpeed, WarmupLR's warmup_max_lr replaces the optimizer's own lr."""
    previous = out.values.pop("optimizer.lr", None)
    if previous is not None and previous[0] != lr:
        out.ignored.append((previous[1], "scheduler.params.warmup_max_lr sets the peak learning rate"))
    out.set("optimizer.lr", lr, "scheduler.params.warmup_max_lr")


def _map_activation_checkpointing(key: str, block: Any, out: _Translation) -> None:
    """DeepSpeed checkpoints each layer, keeping its input: ``full``; on the host with ``cpu_checkpointing``."""
    _check_keys(key, block, ("cpu_checkpointing",))
    to_host = _bool(f"{key}.cpu_checkpointing", block.get("cpu_checkpointing", False))
    if to_host:
        out.set("remat.policy", "full_offload", f"{key}.cpu_checkpointing")
    else:
        # The block alone only says how checkpoints behave; a remat.policy of the same layer wins.
        out.default("remat.policy", "full")
    _ignore_rest(key, block, ("cpu_checkpointing",), out)


def _map_data_types(key: str, block: Any, out: _Translation) -> None:
    _check_keys(key, block, ("grad_accum_dtype",))
    if "grad_accum_dtype" in block:
        ds_key = "data_types.grad_accum_dtype"
        out.set("precision.accum_dtype", _dtype(ds_key, block["grad_accum_dtype"]), ds_key)


def _map_communication_dtype(key: str, value: Any, out: _Translation) -> None:
    out.set("precision.reduce_dtype", _dtype(key, value), key)


def _map_steps_per_print(key: str, value: Any, out: _Translation) -> None:
    out.set("log_every", _int(key, value), key)


def _ignore_top_level(key: str, value: Any, out: _Translation) -> None:
    out.ignore(key)


_HANDLERS: dict[str, Callable[[str, Any, _Translation], None]] = {
    **dict.fromkeys(_BATCH, _map_batch),
    "zero_optimization": _map_zero,
    "fp16": _map_fp16,
    "bf16": _map_bf16,
    # The optimizer goes before the scheduler, whose peak lr replaces the optimizer's.
    "optimizer": _map_optimizer,
    "scheduler": _map_scheduler,
    "data_types": _map_data_types,
    "activation_checkpointing": _map_activation_checkpointing,
    "communication_data_type": _map_communication_dtype,
    "steps_per_print": _map_steps_per_print,
}
_TOP_LEVEL_IGNORED = tuple(key for key in IGNORED if "." not in key)
_HANDLER_ORDER = (*_HANDLERS, *_TOP_LEVEL_IGNORED)
TOP_LEVEL_KEYS: tuple[str, ...] = _HANDLER_ORDER


def _is_deepspeed(key: str, value: Any) -> bool:
    if key == "optimizer":
        # zjax's own optimizer block is flat; DeepSpeed's nests its settings under params.
        return isinstance(value, Mapping) and "params" in value
    return key in _HANDLER_ORDER


def _reject_auto(key: str, value: Any) -> None:
    """Raise on the first ``"auto"`` value: it is the HF Trainer's placeholder, not a number."""
    if isinstance(value, Mapping):
        for name, child in value.items():
            _reject_auto(f"{key}.{name}", child)
    elif value == "auto" or (isinstance(value, (list, tuple)) and "auto" in value):
        if key in IGNORED:
            hint = f"zjax ignores {key} ({IGNORED[key]}); delete the key"
        else:
            hint = _AUTO_HINTS.get(key, "give a concrete value")
        raise ConfigError(f"{key}='auto': zjax does not fill in 'auto' values (the HF Trainer does); {hint}")


def _check_keys(block_key: str, block: Any, mapped: Iterable[str], context: str = "") -> None:
    """A DeepSpeed block must be a mapping of keys zjax maps or knowingly ignores."""
    if not isinstance(block, Mapping):
        raise ConfigError(f"{block_key}={block!r} must be a block of keys, e.g. {block_key}: {{...}}")
    known = [*mapped, *(key.rsplit(".", 1)[1] for key in IGNORED if key.rsplit(".", 1)[0] == block_key)]
    for name in block:
        if name not in known:
            match = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {f'{block_key}.{match[0]}'!r}? " if match else ""
            raise ConfigError(
                f"unknown key {f'{block_key}.{name}'!r}{context}; {hint}valid keys: {', '.join(mapped)}"
            )


def _ignore_rest(block_key: str, block: Mapping[str, Any], mapped: Iterable[str], out: _Translation) -> None:
    for name in block:
        if name not in mapped:
            out.ignore(f"{block_key}.{name}")


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={value!r} must be an integer, e.g. {key}: 4")
    return value


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} must be a number, e.g. {key}: 1.0")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    return value


def _scalar(key: str, value: Any) -> Any:
    """Numbers and strings pass through for the schema to check; blocks and lists are errors."""
    if isinstance(value, (Mapping, list, tuple)):
        raise ConfigError(f"{key}={value!r} must be a single value, not a block or list")
    return value


def _dtype(key: str, value: Any) -> str:
    if value not in _DTYPES:
        raise ConfigError(f"{key}={value!r} is not a DeepSpeed dtype name; use one of {', '.join(_DTYPES)}")
    return _DTYPES[value]


_ABSENT = object()


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for name in dotted.split("."):
        if not isinstance(node, Mapping) or name not in node:
            return _ABSENT
        node = node[name]
    return node


def _put(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        tree = tree.setdefault(name, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"{name}={tree!r} must be a block of keys to hold {dotted}")
    tree[leaf] = value
