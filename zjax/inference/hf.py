"""Hugging Face Llama, Mistral and Qwen2 checkpoints as zjax's reference ``GPT``.

``load_hf(directory)`` reads what transformers' ``save_pretrained`` writes (and what the
Hub serves): ``config.json`` and one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. It returns the ``ModelConfig`` of the equivalent GPT and
its parameters as the pure dict of ``nnx.state(make_gpt(cfg), nnx.Param)``, the layers
stacked along axis 0::

    cfg, params = load_hf("Qwen2.5-0.5B")
    model = make_gpt(cfg)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)

Names: ``model.embed_tokens`` -> ``embedding``; ``model.layers.{i}.self_attn.{q,k,v,o}_proj``
-> ``blocks.attn.w{q,k,v,o}[i]`` (transposed: transformers stores ``[out, in]``, zjax
``[in, out]``), their q/k/v biases -> ``blocks.attn.b{q,k,v}[i]``; ``input_layernorm`` and
``post_attention_layernorm`` -> ``blocks.attn_norm`` / ``blocks.mlp_norm``;
``mlp.{gate,up,down}_proj`` -> ``blocks.mlp.w_{gate,up,down}[i]`` (transposed);
``model.norm`` -> ``final_norm``; ``lm_head`` -> ``lm_head`` (transposed) unless the
embeddings are tied. The files are read one tensor at a time into the stacked arrays,
so the peak host memory is the params plus one tensor.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pydantic
from flax import nnx
from safetensors import safe_open

from zjax.config.schema import ModelConfig
from zjax.errors import ConfigError
from zjax.models.gpt import GPT

__all__ = ["SUPPORTED_MODEL_TYPES", "load_hf", "model_config_from_hf"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
INDEX_FILE = "model.safetensors.index.json"

# Per layer (after ``model.layers.{i}.``): transformers' tensor -> (path under ``blocks``, transposed)
_LAYER_TENSORS = {
    "self_attn.q_proj.weight": (("attn", "wq"), True),
    "self_attn.k_proj.weight": (("attn", "wk"), True),
    "self_attn.v_proj.weight": (("attn", "wv"), True),
    "self_attn.o_proj.weight": (("attn", "wo"), True),
    "self_attn.q_proj.bias": (("attn", "bq"), False),
    "self_attn.k_proj.bias": (("attn", "bk"), False),
    "self_attn.v_proj.bias": (("attn", "bv"), False),
    "input_layernorm.weight": (("attn_norm", "scale"), False),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), False),
    "mlp.gate_proj.weight": (("mlp", "w_gate"), True),
    "mlp.up_proj.weight": (("mlp", "w_up"), True),
    "mlp.down_proj.weight": (("mlp", "w_down"), True),
}
_MODEL_TENSORS = {
    "model.embed_tokens.weight": (("embedding",), False),
    "model.norm.weight": (("final_norm", "scale"), False),
    "lm_head.weight": (("lm_head",), True),
}
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers some older checkpoints saved: derived from the config, never read.
_DERIVED = re.compile(r"model\.(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")
# safetensors dtypes numpy lacks (safetensors.numpy cannot return them): read from the
# file's bytes as ml_dtypes arrays.
_ML_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def load_hf(path, dtype=None, *, max_seq_len: int | None = None) -> tuple[ModelConfig, dict]:
    """A Hugging Face checkpoint directory as ``(ModelConfig, params)`` for ``zjax.models.gpt.GPT``.

    Args:
      path: a directory with ``config.json`` (``model_type`` llama, mistral or qwen2) and
        ``*.safetensors`` (one file, or shards with ``model.safetensors.index.json``).
      dtype: the params' dtype (``jnp.float32``, ``"bfloat16"``, ...); None keeps the
        checkpoint's.
      max_seq_len: the model's ``max_seq_len`` (the longest sequence it takes); default the
        checkpoint's ``max_position_embeddings``. A Mistral-style sliding window is only
        admitted when it is at most the window (where the window never takes effect).

    Returns:
      ``(model_cfg, params)``: params a nested dict of numpy arrays with exactly the tree of
      ``nnx.to_pure_dict(nnx.state(make_gpt(model_cfg), nnx.Param))``.

    Raises:
      ConfigError: naming the file and key, for a model zjax's GPT does not implement, a
        missing, misshapen or unexpected tensor.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{config_file} does not exist; load_hf takes a Hugging Face checkpoint directory "
                          "(config.json and *.safetensors, as save_pretrained writes them)")
    try:
        hf_config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{config_file} is not JSON ({err})") from None
    cfg = model_config_from_hf(hf_config, max_seq_len=max_seq_len, where=str(config_file))
    files = _safetensors_files(path)
    dtype = None if dtype is None else np.dtype(jnp.dtype(dtype))

    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    shapes = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    expected = _expected_tensors(cfg)  # transformers' name -> (path, layer or None, transposed)
    params: dict = jax.tree.map(lambda _: None, shapes)
    found: dict[str, Path] = {}
    for file in files:
        header = None
        with safe_open(str(file), framework="numpy") as tensors:
            for key in tensors.keys():
                if key in found:
                    raise ConfigError(f"{file}: tensor {key!r} is also in {found[key]}; a checkpoint holds each "
                                      "tensor once")
                if key == "lm_head.weight" and cfg.tie_embeddings:
                    continue  # tied: transformers also ties lm_head to the embedding over a stored copy
                if _DERIVED.fullmatch(key):
                    continue
                if key not in expected:
                    raise ConfigError(f"{file}: unexpected tensor {key!r}: {_unexpected(key, cfg, hf_config)}")
                found[key] = file
                where, layer, transposed = expected[key]
                whole = _get(shapes, where).shape
                want = whole[1:] if layer is not None else whole
                hf_shape = tuple(reversed(want)) if transposed else tuple(want)
                view = tensors.get_slice(key)
                got = tuple(view.get_shape())
                if got != hf_shape:
                    raise ConfigError(f"{file}: tensor {key!r} has shape {got}, but {config_file.name} describes "
                                      f"{hf_shape}; the config and the weights are of different models")
                kind = view.get_dtype()
                if kind in _ML_DTYPES:
                    header = header or _header(file)
                    array = _read_raw(file, header, key, _ML_DTYPES[kind])
                else:
                    array = tensors.get_tensor(key)
                array = array.T if transposed else array
                out = _get(params, where)
                if out is None:
                    out = np.empty(whole, dtype or array.dtype)
                    _set(params, where, out)
                if layer is None:
                    out[...] = array
                else:
                    out[layer] = array
                del array

    missing = [key for key in expected if key not in found]
    if missing:
        read = ", ".join(file.name for file in files)
        raise ConfigError(f"{path}: {len(missing)} tensor(s) that {config_file.name} implies are in none of "
                          f"{read}: {', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}; a complete "
                          "save_pretrained directory (every shard of its index) has them all")
    return cfg, params


def model_config_from_hf(hf: dict[str, Any], *, max_seq_len: int | None = None,
                         where: str = "config.json") -> ModelConfig:
    """The ``ModelConfig`` of the GPT equivalent to a transformers ``config.json`` (a dict).

    ``where`` names the file in errors. See ``load_hf`` for ``max_seq_len``.
    """
    kind = hf.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{where}: model_type={kind!r} is not supported; zjax.inference.hf loads "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama-style decoders: RMSNorm, rotary, grouped "
                          "KV heads, SwiGLU)")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{where}: hidden_act={act!r} is not supported; zjax's GPT has a SwiGLU MLP "
                          "(hidden_act: silu)")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    absent = [key for key in required if hf.get(key) is None]
    if max_seq_len is None and hf.get("max_position_embeddings") is None:
        absent.append("max_position_embeddings")
    if absent:
        raise ConfigError(f"{where} has no {', '.join(absent)}; a {kind} config.json names them"
                          + (" (or pass max_seq_len)" if "max_position_embeddings" in absent else ""))
    if hf.get("mlp_bias"):
        raise ConfigError(f"{where}: mlp_bias=true is not supported; zjax's GPT MLP has no biases")
    # Qwen2 always has q/k/v biases (and none on o_proj); Llama's attention_bias puts one on o_proj too
    if kind != "qwen2" and hf.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias=true adds biases to q/k/v and o_proj; zjax's GPT has "
                          "q/k/v biases only (model.qkv_bias, as Qwen2), so this checkpoint is not supported")

    # transformers >= 5 writes rope_parameters (rope_theta inside); earlier ones rope_theta and rope_scaling
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", None)
    theta = hf.get("rope_theta", 10000.0) if theta is None else theta
    partial = rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ConfigError(f"{where}: partial_rotary_factor={partial} is not supported; zjax's GPT rotates "
                          "every feature of a head (partial_rotary_factor: 1.0)")

    seq = max_seq_len if max_seq_len is not None else hf["max_position_embeddings"]
    window = hf.get("sliding_window")
    if kind == "qwen2":
        layer_types = hf.get("layer_types")
        sliding = bool(hf.get("use_sliding_window")) and (
            "sliding_attention" in layer_types if layer_types
            else hf.get("max_window_layers", hf["num_hidden_layers"]) < hf["num_hidden_layers"])
    else:
        sliding = window is not None
    if sliding and window is not None and seq > window:
        raise ConfigError(f"{where}: sliding_window={window} is not supported at max_seq_len={seq}: zjax's GPT "
                          f"attends to the whole causal prefix. Load with max_seq_len <= {window} "
                          f"(load_hf(path, max_seq_len={window})), where the window never takes effect")

    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and hidden % heads == 0 and head_dim == hidden // heads:
        head_dim = None
    values = dict(
        vocab_size=hf["vocab_size"], d_model=hidden, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads, d_ff=hf["intermediate_size"], max_seq_len=seq,
        rope_theta=theta, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=hf.get("rms_norm_eps", 1e-6), head_dim=head_dim, qkv_bias=kind == "qwen2",
        rope_scaling=rope or None)
    try:
        return ModelConfig.model_validate(values)
    except pydantic.ValidationError as err:
        problems = "; ".join(_describe(error) for error in err.errors())
        raise ConfigError(f"{where} describes a model zjax's GPT cannot build: {problems}") from None


def _describe(error: dict) -> str:
    key = ".".join(["model", *map(str, error["loc"])])
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    return f"{key}: {message}"


def _expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], int | None, bool]]:
    expected = {}
    for key, (where, transposed) in _MODEL_TENSORS.items():
        if key != "lm_head.weight" or not cfg.tie_embeddings:
            expected[key] = (where, None, transposed)
    for layer in range(cfg.n_layers):
        for name, (where, transposed) in _LAYER_TENSORS.items():
            if name.endswith(".bias") and not cfg.qkv_bias:
                continue
            expected[f"model.layers.{layer}.{name}"] = (("blocks", *where), layer, transposed)
    return expected


def _unexpected(key: str, cfg: ModelConfig, hf: dict) -> str:
    """Why a tensor has no place in the GPT, and what would load it."""
    match = _LAYER_KEY.fullmatch(key)
    if match and int(match.group(1)) >= cfg.n_layers:
        return f"layer {match.group(1)}, but num_hidden_layers={cfg.n_layers}; the config and weights disagree"
    if match and match.group(2) in _LAYER_TENSORS:  # a bias
        return ("a bias zjax's GPT has only with q/k/v biases (model_type qwen2); "
                f"this config.json has model_type={hf.get('model_type')!r}")
    return (f"zjax's GPT has no place for it; load_hf reads a {'/'.join(SUPPORTED_MODEL_TYPES)} *ForCausalLM "
            "checkpoint (model.embed_tokens, model.layers.N.self_attn.{q,k,v,o}_proj, model.layers.N.mlp."
            "{gate,up,down}_proj, input/post_attention_layernorm, model.norm, lm_head)")


def _safetensors_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"{index} is not a safetensors index (a JSON object with weight_map): {err}") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        absent = [file.name for file in files if not file.is_file()]
        if absent:
            raise ConfigError(f"{index} lists {', '.join(absent)}, which {path} lacks; download every shard")
        return files
    # one model.safetensors: read alone (Mistral's repositories also hold consolidated.safetensors,
    # the same weights under Mistral's own names)
    single = path / "model.safetensors"
    files = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        torch_files = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = (f" (it has {', '.join(torch_files)}: convert them with transformers' "
                "save_pretrained(..., safe_serialization=True))" if torch_files else "")
        raise ConfigError(f"{path} has no *.safetensors file{hint}; load_hf reads safetensors checkpoints")
    return files


def _header(file: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and where its data begins (8-byte length, header, data)."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def _read_raw(file: Path, header: tuple[dict, int], key: str, dtype) -> np.ndarray:
    """One tensor of a dtype numpy lacks, read from the file's bytes."""
    meta, base = header
    start, end = meta[key]["data_offsets"]
    count = (end - start) // np.dtype(dtype).itemsize
    return np.fromfile(file, dtype=dtype, count=count, offset=base + start).reshape(meta[key]["shape"])


def _get(tree: dict, where: tuple[str, ...]):
    for key in where:
        tree = tree[key]
    return tree


def _set(tree: dict, where: tuple[str, ...], value) -> None:
    for key in where[:-1]:
        tree = tree[key]
    tree[where[-1]] = value
