"""The config schema, its loader and the DeepSpeed mapping: values in, values or errors out."""
import json
import logging
from pathlib import Path

import pytest
import yaml

from zjax.config import BatchConfig, Config, MeshConfig, load_config, resolve_mesh_shape
from zjax.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _dotted_keys(tree, prefix=""):
    keys = set()
    for key, value in tree.items():
        if isinstance(value, dict):
            keys |= _dotted_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


# -- files, layering, overrides ---------------------------------------------------------


def test_base_yaml_is_exactly_the_defaults():
    assert load_config(CONFIGS / "base.yaml") == Config()
    raw = yaml.safe_load((CONFIGS / "base.yaml").read_text())
    assert _dotted_keys(raw) == _dotted_keys(Config().model_dump())


def test_tiny_overrides_base():
    cfg = load_config(CONFIGS / "tiny.yaml")
    assert (cfg.model.d_model, cfg.model.d_ff, cfg.model.max_seq_len) == (64, 176, 64)
    assert (cfg.data.seq_len, cfg.batch.global_batch_size, cfg.steps, cfg.zero.stage) == (32, 16, 20, 3)
    assert cfg.precision.compute_dtype == "float32"
    assert cfg.optimizer == Config().optimizer


def test_demo_overrides_base():
    cfg = load_config(str(CONFIGS / "demo.yaml"))
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.n_kv_heads) == (256, 4, 8, 4)
    assert (cfg.precision.compute_dtype, cfg.zero.stage) == ("bfloat16", 3)
    assert (cfg.optimizer.type, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("adamw", 2e-3, 0.1)
    assert (cfg.schedule.type, cfg.schedule.warmup_steps) == ("warmup_cosine", 30)


def test_base_key_is_relative_to_the_file_and_cycles_are_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "parent.yaml").write_text("steps: 7\nmodel: {d_model: 64}\n")
    (tmp_path / "sub" / "child.json").write_text(json.dumps({"base": "../parent.yaml", "model": {"n_layers": 3}}))
    cfg = load_config(tmp_path / "sub" / "child.json")
    assert (cfg.steps, cfg.model.d_model, cfg.model.n_layers) == (7, 64, 3)

    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_string_overrides_are_yaml_scalars():
    cfg = load_config(CONFIGS / "tiny.yaml", ["zero.stage=1", "steps=5", "output_dir=/tmp/x", "optimizer.lr=1e-3"])
    assert (cfg.zero.stage, cfg.steps, cfg.output_dir, cfg.optimizer.lr) == (1, 5, "/tmp/x", 1e-3)
    assert load_config({}, ["batch.micro_batch_size_per_device=null"]).batch.micro_batch_size_per_device is None


def test_dict_overrides_and_overriding_a_loaded_config():
    cfg = load_config({"steps": 3}, {"zero.stage": 2, "model.d_model": 64})
    assert (cfg.steps, cfg.zero.stage, cfg.model.d_model) == (3, 2, 64)
    again = load_config(cfg, ["steps=9"])
    assert (again.steps, again.zero.stage) == (9, 2)


def test_malformed_override_names_itself():
    with pytest.raises(ConfigError, match="'steps' is not key=value"):
        load_config({}, ["steps"])
    with pytest.raises(ConfigError, match="'zero_optimization' is a DeepSpeed key.*zero.stage=3"):
        load_config({}, ["zero_optimization.stage=3"])


def test_to_yaml_reads_back_to_an_equal_config():
    cfg = load_config(CONFIGS / "demo.yaml", ["optimizer.eps=1e-7"])
    assert load_config(yaml.safe_load(cfg.to_yaml())) == cfg


# -- validation errors name the key -----------------------------------------------------


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"zero": {"stage": 4}}, ["zero.stage=4", "0, 1, 2 or 3"]),
        ({"optimizer": {"lr": -1.0}}, ["optimizer.lr=-1.0", "greater than 0"]),
        ({"steps": "abc"}, ["steps='abc'", "integer"]),
        ({"optimizer": {"type": "rmsprop"}}, ["optimizer.type='rmsprop'", "'adamw'"]),
        ({"precision": {"param_dtype": "bfloat16"}}, ["precision.param_dtype", "float32"]),
        ({"optimizer": {"type": "adam", "weight_decay": 0.1}}, ["optimizer", "adamw"]),
        ({"model": {"d_model": 130}}, ["d_model=130", "n_heads=4"]),
        ({"model": {"n_kv_heads": 3}}, ["n_kv_heads=3", "n_heads=4"]),
        ({"data": {"seq_len": 512}}, ["data.seq_len=512", "model.max_seq_len=256"]),
        ({"logical_axis_rules": {"heads": "model"}}, ["logical_axis_rules", "heads='model'", "data, tensor or null"]),
        ({"mesh": {"data": -1, "tensor": -1}}, ["mesh", "more than one -1"]),
    ],
)
def test_invalid_values_raise_config_error_naming_the_key(raw, words):
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize(
    "raw, unknown, nearest",
    [
        ({"optimzer": {"lr": 1.0}}, "optimzer", "optimizer"),
        ({"zero_optimisation": {"stage": 3}}, "zero_optimisation", "zero_optimization"),
        ({"model": {"d_modle": 64}}, "model.d_modle", "model.d_model"),
        ({"zero_optimization": {"stag": 3}}, "zero_optimization.stag", "zero_optimization.stage"),
        ({"optimizer": {"type": "Adam", "params": {"beta": [0.9]}}}, "optimizer.params.beta", "optimizer.params.betas"),
    ],
)
def test_unknown_key_names_the_nearest_valid_key(raw, unknown, nearest):
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    assert f"unknown key {unknown!r}" in str(err.value)
    assert f"did you mean {nearest!r}" in str(err.value)


def _batch(total, micro, accum):
    return BatchConfig(global_batch_size=total, micro_batch_size_per_device=micro, grad_accum_steps=accum)


def _triple(batch):
    return batch.global_batch_size, batch.micro_batch_size_per_device, batch.grad_accum_steps


def test_batch_resolve_derives_the_missing_size():
    assert _batch(32, None, 1).resolve(8) == (32, 4, 1)
    assert _batch(64, 2, None).resolve(8) == (64, 2, 4)
    assert _batch(None, 2, 3).resolve(4) == (24, 2, 3)
    assert _batch(None, 2, None).resolve(4) == (8, 2, 1)


@pytest.mark.parametrize(
    "sizes, words",
    [
        ((32, 2, 4), ["global_batch_size=32", "micro_batch_size_per_device=2", "grad_accum_steps=4", "(=64)"]),
        ((30, None, 1), ["global_batch_size=30", "multiple of 8"]),
        ((32, 3, None), ["global_batch_size=32", "micro_batch_size_per_device=3", "multiple of 24"]),
        ((None, None, 2), ["global_batch_size", "micro_batch_size_per_device"]),
    ],
)
def test_inconsistent_batch_names_the_numbers(sizes, words):
    with pytest.raises(ConfigError) as err:
        _batch(*sizes).resolve(8)
    for word in words:
        assert word in str(err.value)


def test_mesh_shape_fills_minus_one_and_checks_the_device_count():
    assert resolve_mesh_shape(MeshConfig(), 8) == {"replica": 1, "data": 8, "tensor": 1}
    assert resolve_mesh_shape(MeshConfig(data=-1, tensor=2), 8) == {"replica": 1, "data": 4, "tensor": 2}
    assert resolve_mesh_shape(MeshConfig(replica=2), 8) == {"replica": 2, "data": 4, "tensor": 1}
    with pytest.raises(ConfigError, match=r"mesh \{replica: 1, data: 3, tensor: 1\} needs 3 devices but 8 are available"):
        resolve_mesh_shape(MeshConfig(data=3), 8)
    with pytest.raises(ConfigError, match=r"mesh \{replica: 1, data: -1, tensor: 3\}.*not divisible by 3"):
        resolve_mesh_shape(MeshConfig(tensor=3), 8)


# -- DeepSpeed keys ---------------------------------------------------------------------


def test_deepspeed_batch_triple_leaves_unset_sizes_to_derive():
    two = load_config({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4})
    assert _triple(two.batch) == (None, 2, 4)
    assert two.batch.resolve(8) == (64, 2, 4)
    one = load_config({"train_batch_size": 64})
    assert _triple(one.batch) == (64, None, None)
    assert one.batch.resolve(8) == (64, 8, 1)
    three = load_config({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2})
    assert three.batch.resolve(8) == (64, 4, 2)


def test_deepspeed_zero_stage_maps_and_tuning_keys_are_ignored_with_reasons():
    cfg = load_config({
        "zero_optimization": {
            "stage": 3, "overlap_comm": True, "reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 1e6,
            "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
        }
    })
    assert cfg.zero.stage == 3
    reasons = dict(cfg.ignored)
    assert "XLA schedules and fuses collectives" in reasons["zero_optimization.overlap_comm"]
    assert "zero_optimization.reduce_bucket_size" in reasons
    assert "zero_optimization.stage3_prefetch_bucket_size" in reasons
    assert (cfg.zero.offload_optimizer, cfg.zero.offload_param) == ("cpu", "cpu")
    assert "zero_optimization.offload_optimizer" not in reasons


def test_deepspeed_fp16_dynamic_scaling():
    cfg = load_config({"fp16": {
        "enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 500,
        "hysteresis": 3, "min_loss_scale": 2, "consecutive_hysteresis": False, "auto_cast": False,
    }})
    assert cfg.precision.compute_dtype == "float16"
    ls = cfg.loss_scale
    assert (ls.enabled, ls.dynamic, ls.initial_scale_power, ls.loss_scale_window, ls.hysteresis, ls.min_loss_scale) == (
        True, True, 12, 500, 3, 2.0)
    assert {"fp16.consecutive_hysteresis", "fp16.auto_cast"} <= set(dict(cfg.ignored))


def test_deepspeed_fp16_positive_loss_scale_is_static():
    ls = load_config({"fp16": {"enabled": True, "loss_scale": 128}}).loss_scale
    assert (ls.enabled, ls.dynamic, ls.static_scale) == (True, False, 128.0)


def test_deepspeed_bf16_and_both_half_precisions():
    assert load_config({"bf16": {"enabled": True}}).precision.compute_dtype == "bfloat16"
    assert load_config({"bf16": {"enabled": False}}).precision.compute_dtype == "float32"
    with pytest.raises(ConfigError, match="fp16.enabled") as err:
        load_config({"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    assert "bf16.enabled" in str(err.value)


def test_deepspeed_key_that_contradicts_a_zjax_key_is_an_error():
    with pytest.raises(ConfigError, match="bf16.enabled sets precision.compute_dtype='bfloat16'.*'float32'"):
        load_config({"bf16": {"enabled": True}, "precision": {"compute_dtype": "float32"}})


def test_deepspeed_adam_with_weight_decay_is_adamw():
    cfg = load_config({"optimizer": {"type": "Adam", "params": {
        "lr": 1e-3, "betas": [0.8, 0.98], "eps": 1e-6, "weight_decay": 0.01, "torch_adam": True}}})
    o = cfg.optimizer
    assert (o.type, o.lr, o.b1, o.b2, o.eps, o.weight_decay) == ("adamw", 1e-3, 0.8, 0.98, 1e-6, 0.01)
    assert "optimizer.params.torch_adam" in dict(cfg.ignored)
    assert load_config({"optimizer": {"type": "adam", "params": {"lr": 1e-3}}}).optimizer.type == "adam"
    with pytest.raises(ConfigError, match="adam_w_mode"):
        load_config({"optimizer": {"type": "Adam", "params": {"weight_decay": 0.01, "adam_w_mode": False}}})


def test_deepspeed_sgd_lion_and_adafactor():
    params = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}
    sgd = load_config({"optimizer": {"type": "SGD", "params": params}}).optimizer
    assert (sgd.type, sgd.lr, sgd.momentum, sgd.nesterov, sgd.weight_decay) == ("sgd", 0.1, 0.9, True, 1e-4)
    lion = load_config({"optimizer": {"type": "Lion", "params": {"lr": 1e-4, "betas": [0.9, 0.99]}}})
    assert (lion.optimizer.type, lion.optimizer.b2) == ("lion", 0.99)
    assert load_config({"optimizer": {"type": "Adafactor", "params": {"lr": 1e-2}}}).optimizer.type == "adafactor"


def test_deepspeed_unknown_optimizer_type_or_param():
    with pytest.raises(ConfigError, match="optimizer.type='Lamb'.*Adam, AdamW, SGD, Lion, Adafactor"):
        load_config({"optimizer": {"type": "Lamb", "params": {}}})
    with pytest.raises(ConfigError, match="unknown key 'optimizer.params.momentum' for Adam"):
        load_config({"optimizer": {"type": "Adam", "params": {"momentum": 0.9}}})
    with pytest.raises(ConfigError, match="amsgrad"):
        load_config({"optimizer": {"type": "AdamW", "params": {"amsgrad": True}}})


def test_deepspeed_warmup_lr_peak_replaces_the_optimizer_lr():
    cfg = load_config({
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "scheduler": {"type": "WarmupLR", "params": {
            "warmup_min_lr": 1e-5, "warmup_max_lr": 2e-3, "warmup_num_steps": 50}},
    })
    s = cfg.schedule
    assert (s.type, s.warmup_min_lr, s.warmup_steps, s.warmup_type) == ("warmup", 1e-5, 50, "log")
    assert cfg.optimizer.lr == 2e-3
    assert "warmup_max_lr" in dict(cfg.ignored)["optimizer.params.lr"]


def test_deepspeed_warmup_decay_lr():
    cfg = load_config({"scheduler": {"type": "WarmupDecayLR", "params": {
        "total_num_steps": 500, "warmup_num_steps": 20, "warmup_max_lr": 1e-3, "warmup_type": "linear"}}})
    s = cfg.schedule
    assert (s.type, s.total_steps, s.warmup_steps, s.warmup_type) == ("warmup_decay", 500, 20, "linear")
    assert cfg.optimizer.lr == 1e-3
    # DeepSpeed's own default peak when neither the scheduler nor the optimizer gives one.
    assert load_config({"scheduler": {"type": "WarmupDecayLR", "params": {}}}).optimizer.lr == 0.001


def test_deepspeed_warmup_cosine_lr_fills_deepspeed_defaults():
    cfg = load_config({
        "optimizer": {"type": "AdamW", "params": {"lr": 5e-4}},
        "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 300, "warmup_min_ratio": 0.1}},
    })
    s = cfg.schedule
    assert (s.type, s.total_steps, s.warmup_min_ratio, s.warmup_steps, s.cos_min_ratio, s.warmup_type) == (
        "warmup_cosine", 300, 0.1, 1000, 0.0001, "log")
    assert cfg.optimizer.lr == 5e-4


def test_deepspeed_one_cycle():
    cfg = load_config({"scheduler": {"type": "OneCycle", "params": {
        "cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3, "cycle_first_step_size": 10, "cycle_second_step_size": 30,
        "decay_lr_rate": 0.5, "decay_step_size": 5, "cycle_momentum": True, "cycle_first_stair_count": 0}}})
    s = cfg.schedule
    assert (s.type, s.cycle_min_lr, s.cycle_max_lr, s.cycle_first_step_size, s.cycle_second_step_size) == (
        "onecycle", 1e-4, 1e-3, 10, 30)
    assert (s.decay_lr_rate, s.decay_step_size) == (0.5, 5)
    assert "scheduler.params.cycle_momentum" in dict(cfg.ignored)
    with pytest.raises(ConfigError, match="cycle_first_stair_count=4"):
        load_config({"scheduler": {"type": "OneCycle", "params": {"cycle_first_stair_count": 4}}})


def test_deepspeed_unknown_scheduler_type():
    with pytest.raises(ConfigError, match="scheduler.type='LRRangeTest'.*WarmupLR"):
        load_config({"scheduler": {"type": "LRRangeTest", "params": {}}})


def test_deepspeed_clipping_dtypes_and_print_interval():
    cfg = load_config({
        "gradient_clipping": 0.5, "steps_per_print": 7, "communication_data_type": "bf16",
        "data_types": {"grad_accum_dtype": "fp16"},
    })
    assert (cfg.gradient_clipping, cfg.log_every) == (0.5, 7)
    assert (cfg.precision.reduce_dtype, cfg.precision.accum_dtype) == ("bfloat16", "float16")
    with pytest.raises(ConfigError, match="communication_data_type='int8'.*fp32, fp16, bf16"):
        load_config({"communication_data_type": "int8"})


def test_deepspeed_and_zjax_keys_mix():
    cfg = load_config({"zero_optimization": {"stage": 2}, "model": {"d_model": 64}, "steps": 12})
    assert (cfg.zero.stage, cfg.model.d_model, cfg.steps) == (2, 64, 12)


def test_meaningless_keys_are_recorded_and_logged_once(caplog):
    ds = {
        "wall_clock_breakdown": False, "tensorboard": {"enabled": True}, "prescale_gradients": False,
        "activation_checkpointing": {"partition_activations": True},
        "zero_optimization": {"stage": 1, "overlap_comm": True},
    }
    with caplog.at_level(logging.WARNING, logger="zjax"):
        cfg = load_config(ds)
    reasons = dict(cfg.ignored)
    assert set(reasons) == {"wall_clock_breakdown", "tensorboard", "prescale_gradients",
                            "activation_checkpointing.partition_activations", "zero_optimization.overlap_comm"}
    assert all(reasons.values())
    assert "per device" in reasons["activation_checkpointing.partition_activations"]
    warnings = [r for r in caplog.records if r.name == "zjax"]
    assert len(warnings) == 1
    assert all(key in warnings[0].getMessage() for key in reasons)


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"train_micro_batch_size_per_gpu": "auto"},
         ["train_micro_batch_size_per_gpu", "per-device micro-batch size as an integer, e.g. 4"]),
        ({"train_batch_size": "auto"}, ["train_batch_size", "global batch size"]),
        ({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, ["optimizer.params.lr", "e.g. 3e-4"]),
        ({"optimizer": {"type": "AdamW", "params": {"betas": "auto"}}}, ["optimizer.params.betas", "[0.9, 0.999]"]),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}},
         ["scheduler.params.warmup_num_steps", "e.g. 100"]),
        ({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}},
         ["zero_optimization.reduce_bucket_size", "delete"]),
    ],
)
def test_auto_is_rejected_with_the_key_and_the_number_to_give(raw, words):
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    assert "'auto'" in str(err.value)
    for word in words:
        assert word in str(err.value)
