"""The config schema, its loader and the DeepSpeed mapping: values in, values or errors out."""
import json
import re
from pathlib import Path

import pytest
import yaml

from zjax.config.schema import BatchConfig, Config, MeshConfig, load_config, resolve_mesh_shape
from zjax.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


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
        ({"optimizer": {"type": "rmsprop"}}, ["optimizer.type='rmsprop'", "AdamW"]),
        ({"precision": {"param_dtype": "bfloat16"}}, ["precision.param_dtype", "float32"]),
        ({"optimizer": {"type": "adam", "weight_decay": 0.1}}, ["optimizer", "adamw"]),
        ({"model": {"d_model": 130}}, ["d_model=130", "n_heads=4"]),
        ({"model": {"n_kv_heads": 3}}, ["n_kv_heads=3", "n_heads=4"]),
        ({"data": {"seq_len": 512}}, ["data.seq_len=512", "model.max_seq_len=256"]),
        ({"logical_axis_rules": {"heads": "model"}}, ["logical_axis_rules", "heads='model'", "data, stage, tensor, sequence, expert or null"]),
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
    # The suggestion is one of the valid keys listed after it.
    assert nearest.rsplit(".", 1)[-1] in str(err.value).split("valid keys")[1].split(": ", 1)[1].split(", ")


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
    ],
)
def test_inconsistent_batch_names_the_numbers(sizes, words):
    with pytest.raises(ConfigError) as err:
        _batch(*sizes).resolve(8)
    for word in words:
        assert word in str(err.value)


def test_a_batch_without_a_size_is_refused_at_load():
    with pytest.raises(ConfigError, match="global_batch_size and micro_batch_size_per_device are both null"):
        load_config({"batch": {"global_batch_size": None, "grad_accum_steps": 2}})


def test_mesh_shape_fills_minus_one_and_checks_the_device_count():
    assert resolve_mesh_shape(MeshConfig(), 8) == {"replica": 1, "data": 8, "stage": 1, "tensor": 1,
                                                   "sequence": 1, "expert": 1}
    assert resolve_mesh_shape(MeshConfig(data=-1, tensor=2), 8)["data"] == 4
    assert resolve_mesh_shape(MeshConfig(replica=2, sequence=2), 8)["data"] == 2
    with pytest.raises(ConfigError, match=r"mesh \{replica: 1, data: 3, stage: 1, tensor: 1, sequence: 1, expert: 1\} "
                                          r"needs 3 devices but 8 are available"):
        resolve_mesh_shape(MeshConfig(data=3), 8)
    with pytest.raises(ConfigError, match=r"mesh \{replica: 1, data: -1, stage: 1, tensor: 3.*not divisible by 3"):
        resolve_mesh_shape(MeshConfig(tensor=3), 8)


# -- bad values ------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig", "utf-32"])
def test_a_file_with_a_byte_order_mark_is_read(tmp_path, encoding):
    # PowerShell's `>` writes UTF-16 LE with a BOM; Notepad may write UTF-8 with one.
    path = tmp_path / "ds.json"
    path.write_bytes(json.dumps({"steps": 7, "output_dir": "runs/é"}).encode(encoding))
    cfg = load_config(path)
    assert (cfg.steps, cfg.output_dir) == (7, "runs/é")


def test_a_file_in_another_encoding_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("steps: 7\n".encode("utf-16-le"))
    with pytest.raises(ConfigError, match="not UTF-8 text: it holds NUL bytes, as UTF-16.*save it as UTF-8"):
        load_config(path)
    path.write_bytes("output_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not utf-8 text: invalid continuation byte at byte 15; save it as UTF-8"):
        load_config(path)


@pytest.mark.parametrize("raw, overrides, words", [
    ({}, ["optimizer.lr=.inf"], "optimizer.lr=inf: should be a finite number"),
    ({}, ["optimizer.lr=.nan"], "optimizer.lr=nan: should be a finite number"),
    ({"gradient_clipping": float("inf")}, None, "gradient_clipping=inf"),
    ({"loss_scale": {"min_loss_scale": float("nan")}}, None, "loss_scale.min_loss_scale=nan"),
    ({"checkpoints": {"every_seconds": float("inf")}}, None, "checkpoints.every_seconds=inf"),
])
def test_infinite_or_nan_numbers_are_refused_naming_key_and_value(raw, overrides, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(raw, overrides)


def test_json_infinity_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"optimizer": {"lr": Infinity}}')
    with pytest.raises(ConfigError, match="optimizer.lr=inf: should be a finite number"):
        load_config(path)


@pytest.mark.parametrize("raw, overrides, key", [
    ({}, ["checkpoints.every_steps=true"], "checkpoints.every_steps"),
    ({"zero": {"stage": True}}, None, "zero.stage"),
    ({"steps": False}, None, "steps"),
    ({"gradient_clipping": True}, None, "gradient_clipping"),
])
def test_booleans_are_not_numbers(raw, overrides, key):
    with pytest.raises(ConfigError, match=f"{re.escape(key)}: got (True|False), a boolean; give a number"):
        load_config(raw, overrides)
    # Where a boolean is meant it still is one.
    assert load_config({}, ["model.tie_embeddings=false", "loss_scale.enabled=true"]).loss_scale.enabled is True


@pytest.mark.parametrize("raw, unknown", [
    ({"max_grad_norm": 1.0}, "max_grad_norm"),
    ({"model": {"width": 64}}, "model.width"),
])
def test_far_keys_get_no_suggestion(raw, unknown):
    with pytest.raises(ConfigError) as err:
        load_config(raw)
    assert f"unknown key {unknown!r}; valid keys" in str(err.value)
    assert "did you mean" not in str(err.value)
