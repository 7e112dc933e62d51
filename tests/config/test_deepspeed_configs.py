"""Real DeepSpeed configs (tests/config/deepspeed_configs/, sources in SOURCES.md) load with DeepSpeed's meaning.

Each config's summary is what DeepSpeed would run: ZeRO stage, offload, dtype, the fp16
loss scaler, optimizer, schedule, the batch triple resolved on the device count given,
clipping and remat. Configs DeepSpeed would refuse, or that switch on a feature zjax
lacks, must be refused with an error naming the key.
"""
import json
import re
from pathlib import Path

import pytest

from zjax.cli import main
from zjax.config.schema import load_config
from zjax.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent / "deepspeed_configs"


def _summary(cfg, devices):
    ls, o, s = cfg.loss_scale, cfg.optimizer, cfg.schedule
    return {
        "stage": cfg.zero.stage,
        "offload": (cfg.zero.offload_optimizer, cfg.zero.offload_param),
        "dtype": cfg.precision.compute_dtype,
        "loss_scale": (ls.enabled, ls.dynamic, ls.initial_scale_power, ls.loss_scale_window, ls.hysteresis,
                       ls.min_loss_scale),
        "optimizer": (o.type, o.lr, o.b1, o.b2, o.weight_decay),
        "schedule": (s.type, s.warmup_steps, s.warmup_type, s.warmup_min_lr),
        "batch": cfg.batch.resolve(devices),
        "clipping": cfg.gradient_clipping,
        "remat": cfg.remat.policy,
    }


ZJAX_ADAMW = ("adamw", 3e-4, 0.9, 0.999, 0.0)  # no optimizer block: the script's own optimizer; zjax's default
NO_SCHEDULE = ("constant", 0, "linear", 0.0)
FP16_GIVEN = (True, True, 16, 1000, 2, 1.0)  # FP16_*_DEFAULT of runtime/constants.py where the block gives some

LOADS = {
    # name: (devices, expected summary)
    "dse_cifar_ds_config.json": (1, dict(
        stage=2, offload=("cpu", "none"), dtype="float16", loss_scale=(True, True, 15, 500, 2, 1.0),
        optimizer=("adamw", 0.001, 0.8, 0.999, 3e-7), schedule=("warmup", 1000, "log", 0), batch=(4, 4, 1),
        clipping=1.0, remat="none")),
    "dse_megatron_ds_zero2_cpu_offload_config.json": (8, dict(
        stage=2, offload=("cpu", "none"), dtype="float16", loss_scale=FP16_GIVEN,
        optimizer=("adam", 0.00015, 0.9, 0.999, 0.0), schedule=NO_SCHEDULE, batch=(16, 2, 1), clipping=1.0,
        remat="full")),
    "dse_pipeline_parallelism_ds_config.json": (8, dict(
        stage=0, offload=("none", "none"), dtype="float32", optimizer=("adam", 0.001, 0.9, 0.999, 0.0),
        schedule=NO_SCHEDULE, batch=(256, 8, 4), clipping=0.0, remat="none")),
    "dse_gan_deepspeed_config.json": (8, dict(
        stage=0, dtype="float32", optimizer=("adam", 0.0002, 0.5, 0.999, 0.0), batch=(64, 8, 1), clipping=0.0)),
    "dse_compression_gpt2_ds_config.json": (2, dict(
        stage=0, dtype="float16", loss_scale=(True, True, 16, 1000, 1, 1.0),
        optimizer=("adamw", 0.001, 0.8, 0.999, 3e-7), batch=(8, 4, 1), clipping=1.0)),
    "mds_finetune_hf_llama_ds_config.json": (8, dict(
        stage=0, dtype="bfloat16", optimizer=ZJAX_ADAMW, batch=(256, 16, 2), clipping=0.0)),
    "mds_universal_checkpointing_ds_config.json": (1, dict(
        stage=1, dtype="bfloat16", optimizer=ZJAX_ADAMW, batch=(16, 16, 1), clipping=0.0)),
    "mds_data_efficiency_eval_dummy.json": (8, dict(
        stage=0, dtype="float32", loss_scale=(None, True, 11, 500, 2, 1.0), batch=(2048, 16, 16), clipping=1.0)),
    "ds_tests_hybrid_engine_config.json": (8, dict(
        stage=0, offload=("none", "none"), dtype="float16", loss_scale=(True, True, 16, 100, 2, 1.0),
        batch=(32, 2, 2), clipping=1.0)),
    "ds_tests_megatron_gpt2_bs8_zero2_offload.json": (8, dict(
        stage=2, offload=("cpu", "none"), dtype="float16", loss_scale=FP16_GIVEN, batch=(8, 1, 1), clipping=1.0,
        remat="full")),
    "ds_tests_megatron_gpt2_scheduler.json": (4, dict(
        stage=2, dtype="float16", loss_scale=FP16_GIVEN, optimizer=("adamw", 0.001, 0.9, 0.999, 0.0),
        schedule=("warmup", 10, "log", 0), batch=(4, 1, 1), clipping=1.0)),
    "ds_tests_megatron_gpt2_bs8_zero0_gas3.json": (8, dict(
        stage=0, dtype="float16", loss_scale=FP16_GIVEN, batch=(192, 8, 3), clipping=1.0, remat="full")),
    "ds_tests_megatron_gpt2_perf_bs16.json": (8, dict(
        stage=1, dtype="float16", loss_scale=FP16_GIVEN, batch=(16, 2, 1), clipping=1.0)),
    "ds_tests_torch_compile_z3.json": (8, dict(
        stage=3, offload=("none", "none"), dtype="bfloat16", optimizer=("adamw", 0.001, 0.8, 0.999, 3e-7),
        schedule=("warmup", 1000, "log", 0), batch=(8, 1, 1), clipping=1.0)),
    "dse_bing_bert_onebitadam_nccl.json": (8, dict(
        stage=0, dtype="float16", loss_scale=FP16_GIVEN, optimizer=("onebit_adam", 4e-4, 0.9, 0.999, 0.01),
        batch=(4096, 16, 32), clipping=1.0)),
    "ds_tests_unit_ds_batch_config.json": (2, dict(
        stage=0, dtype="float16", loss_scale=(True, True, 16, 1000, 1, 1.0),
        optimizer=("adam", 0.00015, 0.9, 0.999, 0.0), batch=(2, 1, 1), clipping=1.0)),
}

REFUSED = {
    # name: words of the error (DeepSpeed refuses the first two too)
    "dse_megatron_zero3_ds_zero_stage_3_config.json": (
        "unknown key 'zero_optimization.stage3_param_persitence_threshold'; "
        "did you mean 'zero_optimization.stage3_param_persistence_threshold'?"),
    "mds_curriculum_zero1_baseline.json": "optimizer.params.max_grad_norm=1.0: DeepSpeed refuses it too",
    "dse_bingbertsquad_bsz24.json": "optimizer.params.bias_correction=False is not supported",
    "dse_bing_bert_progressive_layer_drop.json": "progressive_layer_drop: progressive layer drop",
    "dse_bing_bert_lamb_seq128.json": "optimizer.type='Lamb': LAMB is not implemented in zjax",
    "dse_data_efficiency_vit_cifar_random_ltd.json": "data_efficiency: data efficiency",
    "ds_tests_bingbertsquad_eigenvalue_quantize.json": (
        "quantize_training: MoQ quantize-aware training\n  eigenvalue: eigenvalue computation"),
}

# What the HF Trainer writes over each "auto" (its own defaults: lr 5e-5, no decay, clipping 1.0).
HF_FILL = {
    "fp16.enabled": True, "bfloat16.enabled": True, "optimizer.params.lr": 5e-5,
    "optimizer.params.betas": [0.9, 0.999], "optimizer.params.eps": 1e-8, "optimizer.params.weight_decay": 0.0,
    "scheduler.params.warmup_min_lr": 0, "scheduler.params.warmup_max_lr": 5e-5,
    "scheduler.params.warmup_num_steps": 500, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
    "train_batch_size": 64, "train_micro_batch_size_per_gpu": 4,
    "zero_optimization.reduce_bucket_size": 1048576, "zero_optimization.stage3_prefetch_bucket_size": 943718,
    "zero_optimization.stage3_param_persistence_threshold": 10240,
}
HF = {
    # name: (autos, expected summary after HF_FILL, on 8 devices)
    "hf_ds_config_zero2.json": (12, dict(
        stage=2, offload=("cpu", "none"), dtype="float16", loss_scale=FP16_GIVEN,
        optimizer=("adam", 5e-5, 0.9, 0.999, 0.0), schedule=("warmup", 500, "log", 0), batch=(64, 4, 2),
        clipping=1.0)),
    "hf_ds_config_zero3.json": (15, dict(
        stage=3, offload=("cpu", "cpu"), dtype="float16", loss_scale=FP16_GIVEN,
        optimizer=("adam", 5e-5, 0.9, 0.999, 0.0), schedule=("warmup", 500, "log", 0), batch=(64, 4, 2))),
    "hf_ds_config_zero3_bf16.json": (15, dict(
        stage=3, offload=("cpu", "cpu"), dtype="bfloat16", batch=(64, 4, 2), clipping=1.0)),
}


def _read(name):
    return json.loads((CONFIGS / name).read_text())


def test_at_least_20_real_configs_each_with_its_source_and_a_test():
    files = sorted(path.name for path in CONFIGS.glob("*.json"))
    sources = (CONFIGS / "SOURCES.md").read_text()
    assert len(files) + len(DEEPSPEED_CHAT) >= 20
    assert all(f"| {name} |" in sources for name in files)
    assert sorted([*LOADS, *REFUSED, *HF, "dse_autotuning_ds_config_fp16_z2.json"]) == files


@pytest.mark.parametrize("name", sorted(LOADS))
def test_real_config_maps_to_what_deepspeed_would_run(name):
    devices, expected = LOADS[name]
    summary = _summary(load_config(CONFIGS / name), devices)
    assert {key: summary[key] for key in expected} == expected


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_real_config_deepspeed_or_zjax_cannot_run_is_refused_by_name(name):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / name)
    assert REFUSED[name] in str(err.value)


def test_batch_sizes_that_do_not_divide_the_devices_fail_as_in_deepspeed():
    # train_batch_size 4 on 8 devices: DeepSpeed's micro-batch would be 0 and its batch assertion fails.
    cfg = load_config(CONFIGS / "dse_cifar_ds_config.json")
    with pytest.raises(ConfigError, match="global_batch_size=4 is not divisible"):
        cfg.batch.resolve(8)


def _autos(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _autos(value, f"{prefix}{key}.")
        elif value == "auto":
            yield f"{prefix}{key}"


def _fill(tree, prefix=""):
    return {key: _fill(value, f"{prefix}{key}.") if isinstance(value, dict)
            else HF_FILL[f"{prefix}{key}"] if value == "auto" else value for key, value in tree.items()}


@pytest.mark.parametrize("name", sorted(HF))
def test_hf_trainer_config_lists_every_auto_in_one_error_then_loads_filled_in(name):
    raw = _read(name)
    autos = list(_autos(raw))
    assert len(autos) == HF[name][0]
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / name)
    message = str(err.value)
    assert message.startswith(f"{len(autos)} values are 'auto'")
    lines = message.splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == autos
    assert all(re.search(r"e\.g\. |true or false|delete the key", line) for line in lines)
    expected = HF[name][1]
    summary = _summary(load_config(_fill(raw)), 8)
    assert {key: summary[key] for key in expected} == expected


def test_autotuning_config_with_its_one_auto_filled():
    raw = _read("dse_autotuning_ds_config_fp16_z2.json")
    with pytest.raises(ConfigError, match="1 value is 'auto'.*\n  train_micro_batch_size_per_gpu: give"):
        load_config(raw)
    summary = _summary(load_config({**raw, "train_micro_batch_size_per_gpu": 4}), 8)
    # fp16 without scaling keys under ZeRO: DynamicLossScaler()'s own defaults (2**32, hysteresis 1).
    assert (summary["stage"], summary["loss_scale"], summary["batch"], summary["clipping"]) == (
        2, (True, True, 32, 1000, 1, 1.0), (32, 4, 1), 0.0)


def _deepspeed_chat(offload, dtype, stage):
    """DeepSpeed-Chat's get_train_ds_config (dschat/utils/ds_utils.py, DeepSpeedExamples 83757d9c) with defaults."""
    device = "cpu" if offload else "none"
    data_type, dtype_config = ("fp16", {"enabled": True, "loss_scale_window": 100}) if dtype == "fp16" else (
        "bfloat16", {"enabled": True})
    return {
        "train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "steps_per_print": 10,
        "zero_optimization": {
            "stage": stage, "overlap_comm": True, "offload_param": {"device": device},
            "offload_optimizer": {"device": device}, "stage3_param_persistence_threshold": 1e4,
            "stage3_max_live_parameters": 3e7, "stage3_prefetch_bucket_size": 3e7, "memory_efficient_linear": False},
        data_type: dtype_config,
        "gradient_clipping": 1.0, "prescale_gradients": False, "wall_clock_breakdown": False,
        "hybrid_engine": {"enabled": False, "max_out_tokens": 512, "inference_tp_size": 1,
                          "release_inference_cache": False, "pin_parameters": True, "tp_gather_partition_size": 8},
        "tensorboard": {"enabled": False, "output_path": "/ds_tensorboard_logs/", "job_name": "_tensorboard"},
    }


DEEPSPEED_CHAT = {
    "stage 2, offload, fp16": ((True, "fp16", 2), dict(
        stage=2, offload=("cpu", "none"), dtype="float16", loss_scale=(True, True, 16, 100, 2, 1.0),
        optimizer=ZJAX_ADAMW, batch=(32, 4, 1), clipping=1.0)),
    "stage 3, offload, bf16": ((True, "bf16", 3), dict(
        stage=3, offload=("cpu", "cpu"), dtype="bfloat16", batch=(32, 4, 1), clipping=1.0)),
}


@pytest.mark.parametrize("name", sorted(DEEPSPEED_CHAT))
def test_deepspeed_chat_generated_configs(name):
    args, expected = DEEPSPEED_CHAT[name]
    cfg = load_config(_deepspeed_chat(*args))
    summary = _summary(cfg, 8)
    assert {key: summary[key] for key in expected} == expected
    ignored = dict(cfg.ignored)
    # Parameter offload below stage 3 is accepted and said to be ignored, as DeepSpeed ignores it.
    assert ("only at stage 3" in ignored.get("zero_optimization.offload_param.device", "")) == (args[2] < 3)
    # The switched-off hybrid engine and TensorBoard are accepted silently.
    assert not any(key.startswith(("hybrid_engine", "tensorboard")) for key in ignored)


def test_explain_shows_each_deepspeed_key_and_what_it_became(capsys):
    assert main(["config", "explain", str(CONFIGS / "dse_cifar_ds_config.json")]) == 0
    out = capsys.readouterr().out
    became = out[out.index("# DeepSpeed keys and what they became:"):out.index("# DeepSpeed keys zjax ignores:")]
    for line in ("zero_optimization.cpu_offload: zero.offload_optimizer = cpu",
                 "fp16.initial_scale_power: loss_scale.initial_scale_power = 15",
                 "scheduler.params.warmup_max_lr: optimizer.lr = 0.001",
                 "train_micro_batch_size_per_gpu (not given): batch.micro_batch_size_per_device = null (derived)",
                 "optimizer.params.weight_decay (on every parameter): optimizer.decay_norms_and_biases = true"):
        assert f"#   {line}\n" in became
    ignored = out[out.index("# DeepSpeed keys zjax ignores:"):]
    assert "#   zero_optimization.overlap_comm: ignored (XLA schedules" in ignored
    assert "prescale_gradients" not in out  # false: switched off, so not listed
