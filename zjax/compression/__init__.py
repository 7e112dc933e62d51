"""Model compression during training (DeepSpeed's compression library, composed with ZeRO and
the parallel axes): pruning masks as an optax transform (``prune``; DeepSpeed's learned-score
``topk`` as ``learned_prune``, which wraps the optimizer), fake quantization with
straight-through gradients (``fake_quant``, ``quantize_weights``, ``quantize_input``), layer
reduction and knowledge distillation (``zjax.compression.distill``) and ``redundancy_clean``
(``zjax.compression.clean``), which makes a row- and head-pruned reference GPT physically smaller
and exports a quantization-aware-trained one to the engine's int8 (``clean.export_int8``); those
two modules sit a layer above the rest (they read checkpoints and the inference engine).
"""
from zjax.compression.learned import ScorePruneState, learned_prune, scores_mask
from zjax.compression.masks import (block_mask, channel_mask, head_mask, kth_largest, magnitude_mask,
                                    n_of_m_mask, row_mask, top_k_mask)
from zjax.compression.pruning import PruneState, prune, pruning_groups, sparsity
from zjax.compression.quantization import (activation_quantization, fake_quant, fake_quant_tokens, quantize_input,
                                           quantize_weights)

__all__ = [
    "PruneState", "ScorePruneState", "activation_quantization", "block_mask", "channel_mask", "fake_quant",
    "fake_quant_tokens", "head_mask", "kth_largest", "learned_prune", "magnitude_mask", "n_of_m_mask", "prune",
    "pruning_groups", "quantize_input", "quantize_weights", "row_mask", "scores_mask", "sparsity", "top_k_mask",
]
