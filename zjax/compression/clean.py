"""``redundancy_clean``: a row- and head-pruned reference GPT made physically smaller.

Pruning leaves exact zeros (``zjax.compression.prune``): a feed-forward feature whose up, gate or
down weights are all zero contributes nothing, nor does a query head whose rows of the output
projection are all zero. Cleaning drops them: each layer keeps its live features and heads; since
the layers are stacked they must all keep the same number, so a layer with fewer live ones keeps
dead ones to make up the count (they still contribute exactly zero). Grouped KV heads keep their
grouping (the same number of query heads per KV head); with as many KV heads as heads a pruned
head takes its key and value heads with it. The cleaned model computes what the masked one did
(the dropped terms were zeros) with ``d_ff``, ``n_heads`` and ``n_kv_heads`` smaller, and
``head_dim`` set explicitly.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from zjax.errors import ConfigError


def _choose(dead: np.ndarray, keep: int) -> np.ndarray:
    """Per row of ``dead`` ``[..., F]``: the indices of its live items, made up to ``keep`` with dead
    ones, in increasing order."""
    flat = dead.reshape(-1, dead.shape[-1])
    out = np.empty((flat.shape[0], keep), np.int64)
    for i, row in enumerate(flat):
        live = np.flatnonzero(~row)
        filler = np.flatnonzero(row)[: keep - live.size]
        out[i] = np.sort(np.concatenate([live, filler]))
    return out.reshape(dead.shape[:-1] + (keep,))


def _take(x: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """``x`` ``[L, ...]`` indexed per layer along ``axis`` by ``index`` ``[L, k]``."""
    return np.stack([np.take(x[layer], index[layer], axis=axis - 1) for layer in range(x.shape[0])])


def redundancy_clean(params: dict, model_cfg: Any) -> tuple[dict, dict]:
    """The GPT's ``params`` (``nnx.to_pure_dict`` of its ``nnx.Param`` state, stacked ``blocks``)
    and ``model_cfg`` without the pruned features and heads.

    Returns:
      ``(params, model)``: numpy params of the smaller model and its ``model`` config as a dict
      (``model_cfg``'s fields with ``d_ff``, ``n_heads``, ``n_kv_heads`` and ``head_dim`` set).
    """
    from zjax.models.gpt import attention_head_dim

    cfg = model_cfg.model_dump() if hasattr(model_cfg, "model_dump") else dict(model_cfg)
    if cfg.get("moe") and (cfg["moe"].get("num_experts") or 0) > 0:
        raise ConfigError("redundancy_clean handles the dense reference GPT; this model has MoE layers "
                          "(model.moe.num_experts > 0)")
    if cfg.get("sparse_attention") is not None:
        raise ConfigError("redundancy_clean cannot drop heads of a model with model.sparse_attention (its layouts "
                          "are per head); unset it")
    params = _numpy(params)
    blocks = params["blocks"]
    mlp, attn = blocks["mlp"], blocks["attn"]
    n_heads, n_kv = cfg["n_heads"], cfg["n_kv_heads"]
    hd = attention_head_dim(model_cfg)
    n_layers = mlp["w_up"].shape[0]

    # feed-forward features
    dead = ((mlp["w_up"] == 0).all(axis=1) | (mlp["w_gate"] == 0).all(axis=1) | (mlp["w_down"] == 0).all(axis=2))
    d_ff = max(int((~dead).sum(-1).max()), 1)
    keep = _choose(dead, d_ff)
    new_mlp = dict(mlp, w_gate=_take(mlp["w_gate"], keep, 2), w_up=_take(mlp["w_up"], keep, 2),
                   w_down=_take(mlp["w_down"], keep, 1))

    # attention heads: a head is dead when its rows of the output projection are all zero
    wo = attn["wo"]
    head_dead = (wo.reshape(n_layers, n_heads, hd, -1) == 0).all(axis=(2, 3))  # [L, H]
    per_group = n_heads // n_kv
    if per_group == 1:
        new_heads = max(int((~head_dead).sum(-1).max()), 1)
        heads = _choose(head_dead, new_heads)  # [L, H']
        kv_heads, new_kv = heads, new_heads
    else:
        grouped = head_dead.reshape(n_layers, n_kv, per_group)
        new_per_group = max(int((~grouped).sum(-1).max()), 1)
        within = _choose(grouped, new_per_group)  # [L, KV, g']
        heads = (within + (np.arange(n_kv) * per_group)[None, :, None]).reshape(n_layers, -1)
        kv_heads, new_kv, new_heads = np.tile(np.arange(n_kv), (n_layers, 1)), n_kv, n_kv * new_per_group

    def columns(index):  # head indices -> their hd columns
        return (index[..., None] * hd + np.arange(hd)).reshape(n_layers, -1)

    q_cols, kv_cols = columns(heads), columns(kv_heads)
    new_attn = dict(attn, wq=_take(attn["wq"], q_cols, 2), wk=_take(attn["wk"], kv_cols, 2),
                    wv=_take(attn["wv"], kv_cols, 2), wo=_take(wo, q_cols, 1))
    for bias, cols in (("bq", q_cols), ("bk", kv_cols), ("bv", kv_cols)):
        if bias in attn:
            new_attn[bias] = _take(attn[bias], cols, 1)
    out = dict(params, blocks=dict(blocks, mlp=new_mlp, attn=new_attn))
    cfg.update(d_ff=d_ff, n_heads=new_heads, n_kv_heads=new_kv, head_dim=hd)
    return out, cfg


def _numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def parameter_count(params: Any) -> int:
    """The number of values in ``params``."""
    if isinstance(params, dict):
        return sum(parameter_count(v) for v in params.values())
    return int(np.asarray(params).size)


def clean_checkpoint(source, out_dir, step: int | None = None, config=None) -> dict:
    """``zjax compress clean``: the run at ``source`` (output_dir or checkpoints) cleaned into
    ``out_dir/model.safetensors`` and ``out_dir/config.yaml`` (the run's config with the smaller
    ``model`` and no ``compression``), which ``zjax generate``/``serve`` read with ``--config``.
    Returns ``{"before", "after", "model"}``: parameter counts and the new model block."""
    import os
    from pathlib import Path

    import jax
    from safetensors.numpy import save_file

    from zjax.checkpoint import load_params
    from zjax.compression.distill import student_params
    from zjax.export import _name
    from zjax.inference.engine import _run_config

    source = Path(source)
    checkpoints = source / "checkpoints" if (source / "checkpoints").is_dir() else source
    if not checkpoints.is_dir():
        raise ConfigError(f"CHECKPOINT {source} is not a directory; give a run's output_dir or its checkpoints")
    cfg = _run_config(checkpoints, config, step)
    params = student_params(load_params(checkpoints, step))
    small, model = redundancy_clean(params, cfg.model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {_name(path): np.ascontiguousarray(x) for path, x in jax.tree_util.tree_leaves_with_path(small)}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "np", "cleaned_from": str(source)})
    os.replace(tmp, out / "model.safetensors")
    from zjax.config.schema import load_config

    dump = cfg.model_dump(mode="json")
    dump["model"] = model
    dump.pop("compression", None)
    dump["output_dir"] = None
    cleaned = load_config(dump)
    (out / "config.yaml").write_text(cleaned.to_yaml())
    return {"before": parameter_count(params), "after": parameter_count(small), "model": model}


def export_int8(params: dict, impl: str = "auto") -> dict:
    """The reference GPT's params (trained with 8-bit symmetric per-column weight quantization,
    ``compression.weight_quantization``) as the inference engine's int8 weights
    (``zjax.inference.quant.quantize_params``): the values the forward pass was trained on."""
    from zjax.inference.quant import quantize_params

    return quantize_params(params, "int8", impl=impl)
