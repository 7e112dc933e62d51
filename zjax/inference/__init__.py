"""Inference with zjax's reference GPT: a serving engine (``Engine``: paged KV cache, continuous
batching with chunked prefill, sampling, tensor parallelism) loading zjax checkpoints, safetensors
exports and Hugging Face checkpoints (``hf.load_hf``)."""
from zjax.inference.engine import Completion, Engine, RequestOutput
from zjax.inference.kv_cache import KVCache, OutOfPages, PageAllocator, init_cache
from zjax.inference.model import forward, logits
from zjax.inference.sampling import SamplingParams, sample

__all__ = [
    "Completion",
    "Engine",
    "KVCache",
    "OutOfPages",
    "PageAllocator",
    "RequestOutput",
    "SamplingParams",
    "forward",
    "init_cache",
    "logits",
    "sample",
]
