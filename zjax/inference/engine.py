"""The serving engine: continuous batching over a paged KV cache, one compiled pass.

Requests join (``add_request``) and leave (finished or ``abort``) between passes. Each
``step`` is one packed pass of at most ``token_budget`` tokens (Dynamic SplitFuse, chunked
prefill): first one decode token for every running sequence, then the rest of prompts
already being prefilled, then chunks of waiting prompts, oldest first, each admitted when a
sequence slot and cache pages are free. A long prompt is thus split over passes and decode
never waits behind it. A sequence takes cache pages as it grows and returns them all when
it ends; when a running sequence needs a page and none is free, the newest running sequence
is preempted: its pages are freed and it waits to recompute its tokens (vLLM's recompute
preemption).

Every pass has the same shapes (``token_budget`` tokens, ``max_seqs`` slots, the page
table of ``max_seq_len`` tokens per slot), so the model and the sampler compile once.
With ``tensor=T`` the params sit on a ``tensor`` mesh axis by the training layout's
logical-axis rules and the cache is split by kv heads (replicated when ``n_kv_heads`` is not
divisible by ``T``); XLA partitions the pass.
"""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from zjax.checkpoint import load_params
from zjax.config.schema import DEFAULT_LOGICAL_AXIS_RULES, MeshConfig
from zjax.export import load_safetensors
from zjax.export import run_config as _run_config  # zjax.cli and compression.clean read it here too
from zjax.inference import model as model_lib
from zjax.inference.hf import load_hf
from zjax.inference.kv_cache import KVCache, PageAllocator, init_cache
from zjax.inference.sampling import SamplingParams, SamplingRows, _sample, rows_of
from zjax.inference.tokenizer import TOKENIZER_FILE, ByteTokenizer, Tokenizer, load_tokenizer
from zjax.models.gpt import GPT, fuse_lora, logical_axes
from zjax.parallel.mesh import make_mesh
from zjax.parallel.zero import model_axes_of

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class RequestOutput:
    """What one ``step`` produced for one request.

    ``token_ids`` are the tokens new this step (a stop token included); ``logprobs`` theirs
    when the request asked (else None); ``finish_reason`` is ``"stop"`` (a stop token) or
    ``"length"`` (``max_tokens``) once ``finished``.
    """

    request_id: int
    token_ids: list[int]
    logprobs: list[float] | None
    finished: bool
    finish_reason: str | None


@dataclasses.dataclass
class Completion:
    """A whole request's new tokens (``generate``)."""

    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str


@dataclasses.dataclass(eq=False)
class _Sequence:
    id: int
    prompt: list[int]
    sampling: SamplingParams
    seed: int
    generated: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    slot: int | None = None
    pages: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # tokens whose keys and values are in the cache
    finish_reason: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated


class Engine:
    """Generates from the reference GPT with continuous batching; see the module docstring.

    Build it with ``from_params``, ``from_checkpoint``, ``from_safetensors`` or ``from_hf``.
    ``tokenizer`` is the model's (``zjax.inference.tokenizer``): the ``tokenizer.json`` of
    the directory loaded from when it has one, else bytes for a vocabulary of at least 256
    (the demo model), else None (token ids only).

    Example:
      >>> from types import SimpleNamespace
      >>> from zjax.models.gpt import make_gpt
      >>> cfg = SimpleNamespace(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
      ...     d_ff=32, max_seq_len=32, rope_theta=1e4, tie_embeddings=True, norm_eps=1e-6)
      >>> params = nnx.to_pure_dict(nnx.state(make_gpt(cfg), nnx.Param))
      >>> engine = Engine.from_params(params, cfg, max_seqs=2, token_budget=16)
      >>> [len(c.token_ids) for c in engine.generate([[1, 2, 3], [4]], SamplingParams(max_tokens=5))]
      [5, 5]
    """

    def __init__(self, params: dict, model_cfg: Any, *, tensor: int = 1, devices=None, dtype: str = "float32",
                 kv_dtype: str | None = None, page_size: int = 16, num_pages: int | None = None, max_seqs: int = 8,
                 token_budget: int = 64, max_seq_len: int | None = None, block_q: int = 16,
                 attention_impl: str = "auto", logical_axis_rules: Mapping[str, str | None] | None = None,
                 seed: int = 0, tokenizer: Tokenizer | None = None):
        model_lib.check_supported(model_cfg)
        self.cfg = model_cfg
        self.tokenizer = _tokenizer_in([], model_cfg.vocab_size) if tokenizer is None else tokenizer
        max_seq_len = model_cfg.max_seq_len if max_seq_len is None else max_seq_len
        _check_positive(page_size=page_size, max_seqs=max_seqs, token_budget=token_budget, max_seq_len=max_seq_len,
                        block_q=block_q, tensor=tensor)
        if max_seq_len > model_cfg.max_seq_len:
            raise ValueError(f"max_seq_len={max_seq_len} is above the model's max_seq_len={model_cfg.max_seq_len} "
                             "(its rotary table); use at most that")
        if token_budget < max_seqs:
            raise ValueError(f"token_budget={token_budget} is below max_seqs={max_seqs}: every running sequence "
                             "decodes one token per pass; use token_budget >= max_seqs")
        for name, value in (("dtype", dtype), ("kv_dtype", kv_dtype)):
            if value is not None and value not in _DTYPES:
                raise ValueError(f"{name}={value!r}: use one of {', '.join(_DTYPES)}")
        self.max_seq_len = max_seq_len
        self.max_seqs = max_seqs
        self.token_budget = token_budget
        self.page_size = page_size
        self.block_q = min(block_q, token_budget)
        self.pages_per_seq = -(-max_seq_len // page_size)
        num_pages = max_seqs * self.pages_per_seq + 1 if num_pages is None else num_pages
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: the cache needs the null page and at least one more")

        self.mesh = _tensor_mesh(tensor, devices)
        rules = dict(DEFAULT_LOGICAL_AXIS_RULES if logical_axis_rules is None else logical_axis_rules)
        self._rules, self._dtype = rules, _DTYPES[dtype]
        self.params = _place_params(params, model_cfg, self.mesh, rules, self._dtype)
        kv_split = tensor > 1 and model_cfg.n_kv_heads % tensor == 0
        self._cache_sharding = NamedSharding(self.mesh, P(None, None, None, "tensor", None) if kv_split else P())
        self._cache_args = (model_cfg.n_layers, num_pages, page_size, model_cfg.n_kv_heads,
                            model_lib.head_dim_of(model_cfg), _DTYPES[kv_dtype or dtype], self._cache_sharding)
        self.cache = init_cache(*self._cache_args)
        self._param_shapes = _shapes(self.params)
        self.pages = PageAllocator(num_pages)
        self._page_table = np.zeros((max_seqs, self.pages_per_seq), np.int32)
        self._free_slots = list(range(max_seqs - 1, -1, -1))
        self._waiting: list[_Sequence] = []
        self._running: list[_Sequence] = []  # admission order
        self._requests: dict[int, _Sequence] = {}
        self._ids = itertools.count()
        self._seeds = np.random.default_rng(seed)
        self.n_blocks = -(-token_budget // self.block_q) + max_seqs
        #: how many times the pass was traced: 1 after any number of passes
        self.traces = 0
        #: how many times a running sequence was preempted for lack of cache pages
        self.preemptions = 0
        self._pass = self._compile_pass(attention_impl)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_params(cls, params: dict, model_cfg: Any, **kw) -> Engine:
        """An engine for the GPT with these params (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``,
        host or device arrays; a quantized weight, a pytree with a ``dot`` method, is replicated
        under tensor parallelism) and model config (``Config.model`` or alike). LoRA params
        (``model.lora.rank`` > 0) are served with their adapters fused (``gpt.fuse_lora``).

        Keyword arguments: ``tensor`` (tensor-parallel devices), ``devices``, ``dtype`` of the
        weights and activations, ``kv_dtype`` of the cache (default ``dtype``), ``page_size``,
        ``num_pages`` (default: enough for ``max_seqs`` sequences of ``max_seq_len``),
        ``max_seqs`` (sequences in flight), ``token_budget`` (tokens per pass), ``max_seq_len``
        (prompt + new tokens; default the model's), ``block_q`` (query rows per attention
        block), ``attention_impl`` (``pallas_kernels.paged_attention``'s), ``logical_axis_rules``
        (default zjax's), ``seed`` (draws the seeds of requests that give none), ``tokenizer``
        (default: bytes when the vocabulary has at least 256 tokens, else None).
        """
        return cls(params, model_cfg, **kw)

    @classmethod
    def from_checkpoint(cls, directory, config: Any = None, step: int | None = None, **kw) -> Engine:
        """An engine for a zjax checkpoint, saved under any mesh and ZeRO stage.

        Args:
          directory: a run's ``output_dir`` or its ``checkpoints`` directory.
          config: the run's config (a ``Config``, a path or a dict for ``load_config``);
            default the ``config.yaml`` the run wrote next to its checkpoints, else the
            config snapshot saved in the checkpoint.
          step: a step, or None for the newest intact one.
          **kw: as ``from_params``.
        """
        directory = Path(directory)
        checkpoints = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
        cfg = _run_config(checkpoints, config, step)
        kw.setdefault("logical_axis_rules", cfg.logical_axis_rules)
        kw.setdefault("tokenizer", _tokenizer_in([directory, checkpoints], cfg.model.vocab_size))
        from zjax.compression.distill import student_params  # a distillation run: serve its student

        return cls(student_params(load_params(checkpoints, step)), cfg.model, **kw)

    @classmethod
    def from_safetensors(cls, path, model_cfg: Any, **kw) -> Engine:
        """An engine for params in a safetensors file (``zjax.export.export_safetensors``'s names:
        the params' keys joined by dots); ``kw`` as ``from_params``. The tokenizer is the
        ``tokenizer.json`` beside the file, if any."""
        kw.setdefault("tokenizer", _tokenizer_in([Path(path).parent], model_cfg.vocab_size))
        return cls(load_safetensors(path), model_cfg, **kw)

    @classmethod
    def from_hf(cls, path, *, max_seq_len: int | None = None, **kw) -> Engine:
        """An engine for a Hugging Face Llama, Mistral or Qwen2 directory (``hf.load_hf``) with
        its ``tokenizer.json`` (bytes when it has none and the vocabulary allows).

        Args:
          path: the directory (``config.json``, ``*.safetensors``, ``tokenizer.json``).
          max_seq_len: the longest sequence to serve; default the checkpoint's
            ``max_position_embeddings`` (the cache is sized for ``max_seqs`` of them: give
            less for a long-context model).
          **kw: as ``from_params``; ``dtype`` is also the dtype the weights are read in.
        """
        cfg, params = load_hf(path, kw.get("dtype", "float32"), max_seq_len=max_seq_len)
        kw.setdefault("tokenizer", _tokenizer_in([Path(path)], cfg.vocab_size))
        return cls(params, cfg, **kw)

    def load_params(self, params: dict) -> None:
        """Serve new weights of the same shapes (RLHF's hybrid engine: the actor's parameters after
        each update, re-laid out from the training layout onto this engine's mesh); the compiled
        pass is reused. The engine must be idle."""
        if self.has_unfinished():
            raise ValueError("load_params() needs an idle engine: requests are in flight; step() until "
                             "has_unfinished() is False, or abort them")
        placed = _place_params(params, self.cfg, self.mesh, self._rules, self._dtype)
        if _shapes(placed) != self._param_shapes:
            raise ValueError("load_params() takes params of the shapes the engine was built with; build a new "
                             "Engine for another model")
        self.params = placed
        if self.cache is None:  # after release(): a fresh, empty cache
            self.cache = init_cache(*self._cache_args)

    def release(self) -> None:
        """Frees the weights and the KV cache on the devices (RLHF's hybrid engine between rollouts,
        DeepSpeed-Chat's ``release_inference_cache``); ``load_params`` brings both back (the
        compiled pass is kept). The engine must be idle."""
        if self.has_unfinished():
            raise ValueError("release() needs an idle engine: requests are in flight; step() until "
                             "has_unfinished() is False, or abort them")
        # dropped, not deleted: a weight placed without a copy is still its source's (the actor's) buffer
        self.params = self.cache = None

    # -- requests -------------------------------------------------------------------------

    def add_request(self, prompt_ids: Sequence[int], sampling: SamplingParams | None = None) -> int:
        """Queues a prompt; returns its request id. It starts at a later ``step``."""
        sampling = SamplingParams() if sampling is None else sampling
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling={sampling!r}: give a zjax.inference.SamplingParams")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids is empty: give at least one token")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt_ids has token {bad[0]}, outside the vocabulary 0..{self.cfg.vocab_size - 1}")
        if len(prompt) + sampling.max_tokens > self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_tokens={sampling.max_tokens} is "
                             f"{len(prompt) + sampling.max_tokens}, above max_seq_len={self.max_seq_len}; "
                             "shorten the prompt or lower max_tokens")
        needed = -(-(len(prompt) + sampling.max_tokens - 1) // self.page_size)
        if needed > self.pages.capacity:
            raise ValueError(f"the request needs up to {needed} KV-cache pages of {self.page_size} tokens but the "
                             f"cache has {self.pages.capacity} (num_pages={self.pages.num_pages}, one is the null "
                             "page); raise num_pages or shorten the request")
        seed = int(self._seeds.integers(2**32)) if sampling.seed is None else sampling.seed
        seq = _Sequence(next(self._ids), prompt, sampling, seed)
        self._requests[seq.id] = seq
        self._waiting.append(seq)
        return seq.id

    def abort(self, request_id: int) -> bool:
        """Drops a request, waiting or running, and frees its pages. Returns False (and does
        nothing) for a request that already finished or was never added."""
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return False
        if seq in self._waiting:
            self._waiting.remove(seq)
        else:
            self._release(seq)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def request_pages(self, request_id: int) -> list[int]:
        """The cache pages a request holds now, in order (none while it waits)."""
        seq = self._requests.get(request_id)
        return [] if seq is None else list(seq.pages)

    def generate(self, prompts: Sequence[Sequence[int]],
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Runs ``prompts`` to completion: one ``Completion`` per prompt, in order.

        ``sampling``: one ``SamplingParams`` for all, or one per prompt. The engine must have
        no other requests in flight (their outputs would go unreported).
        """
        if self.params is None:
            raise ValueError("this engine was released (release()); give it weights with load_params() first")
        if self.has_unfinished():
            raise ValueError("generate() needs an idle engine, but requests added with add_request() are in "
                             "flight; step() until has_unfinished() is False, or abort them")
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        if len(sampling) != len(prompts):
            raise ValueError(f"{len(sampling)} SamplingParams for {len(prompts)} prompts; give one, or one each")
        ids = [self.add_request(p, s) for p, s in zip(prompts, sampling)]
        seqs = [self._requests[i] for i in ids]
        while self.has_unfinished():
            self.step()
        return [Completion(list(s.generated), list(s.logprobs) if s.sampling.logprobs else None, s.finish_reason)
                for s in seqs]

    # -- one pass -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one packed pass; returns the requests that got a token in it."""
        plan = self._schedule()
        if not plan:
            return []
        batch, rows, sampled = self._pack(plan)
        with jax.set_mesh(self.mesh):
            tokens, logprobs, cache = self._pass(self.params, self.cache, batch, rows)
        self.cache = KVCache(*cache)
        tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
        outputs = []
        for seq, n in plan:
            seq.computed += n
        for seq in sampled:
            token, logprob = int(tokens[seq.slot]), float(logprobs[seq.slot])
            seq.generated.append(token)
            seq.logprobs.append(logprob)
            if token in seq.sampling.stop_token_ids:
                seq.finish_reason = "stop"
            elif len(seq.generated) >= seq.sampling.max_tokens:
                seq.finish_reason = "length"
            finished = seq.finish_reason is not None
            outputs.append(RequestOutput(seq.id, [token], [logprob] if seq.sampling.logprobs else None, finished,
                                         seq.finish_reason))
            if finished:
                self._release(seq)
                del self._requests[seq.id]
        return outputs

    def _schedule(self) -> list[tuple[_Sequence, int]]:
        """This pass's ``(sequence, tokens to compute)``: decodes, then prompts being prefilled,
        then newly admitted prompts, within the token budget."""
        plan: dict[_Sequence, int] = {}
        budget = self.token_budget
        preempted = self.preemptions
        running = sorted(self._running, key=lambda s: len(s.tokens) - s.computed > 1)  # decodes first, stable
        for seq in running:
            if seq not in self._running:  # preempted for an older sequence
                continue
            n = min(len(seq.tokens) - seq.computed, budget)
            if n == 0:
                break
            while seq in self._running and not self._grow(seq, seq.computed + n):
                victim = self._running[-1]
                self._preempt(victim)
                budget += plan.pop(victim, 0)
            if seq in self._running:
                plan[seq] = n
                budget -= n
        # after a preemption, admit nothing this pass: the pages just freed are what the running need
        while self._waiting and budget > 0 and self._free_slots and self.preemptions == preempted:
            seq = self._waiting[0]
            n = min(len(seq.tokens), budget)
            if -(-n // self.page_size) > self.pages.free_count:
                break
            self._waiting.pop(0)
            seq.slot = self._free_slots.pop()
            self._running.append(seq)
            self._grow(seq, n)
            plan[seq] = n
            budget -= n
        return list(plan.items())

    def _grow(self, seq: _Sequence, length: int) -> bool:
        """Gives ``seq`` the pages for ``length`` tokens; False (nothing taken) when too few are free."""
        needed = -(-length // self.page_size) - len(seq.pages)
        if needed <= 0:
            return True
        if needed > self.pages.free_count:
            return False
        new = self.pages.allocate(needed)
        self._page_table[seq.slot, len(seq.pages):len(seq.pages) + needed] = new
        seq.pages += new
        return True

    def _preempt(self, seq: _Sequence) -> None:
        """Frees a running sequence's pages and slot; it waits, first in line, to recompute its tokens."""
        self._release(seq)
        seq.computed = 0
        self._waiting.insert(0, seq)
        self.preemptions += 1

    def _release(self, seq: _Sequence) -> None:
        if seq in self._running:
            self._running.remove(seq)
        if seq.slot is not None:
            self.pages.free(seq.pages)
            self._page_table[seq.slot] = 0
            self._free_slots.append(seq.slot)
        seq.slot, seq.pages = None, []

    def _pack(self, plan):
        """The pass's arrays (``model.Batch``), the sampler's rows (one per slot) and the
        sequences that sample a token."""
        n, q = self.token_budget, self.block_q
        tokens = np.zeros(n, np.int32)
        positions = np.full(n, -1, np.int32)
        slots = np.zeros(n, np.int32)
        block_rows = np.full((self.n_blocks, q), n, np.int32)
        block_slots = np.zeros(self.n_blocks, np.int32)
        logit_index = np.zeros(self.max_seqs, np.int32)
        params = [SamplingParams()] * self.max_seqs
        seeds, steps = [0] * self.max_seqs, [0] * self.max_seqs
        sampled = []
        offset = block = 0
        for seq, count in plan:
            chunk = slice(offset, offset + count)
            tokens[chunk] = seq.tokens[seq.computed:seq.computed + count]
            positions[chunk] = np.arange(seq.computed, seq.computed + count)
            slots[chunk] = seq.slot
            for start in range(0, count, q):
                rows = np.arange(offset + start, offset + min(start + q, count))
                block_rows[block, :len(rows)] = rows
                block_slots[block] = seq.slot
                block += 1
            if seq.computed + count == len(seq.tokens):
                logit_index[seq.slot] = offset + count - 1
                params[seq.slot], seeds[seq.slot], steps[seq.slot] = seq.sampling, seq.seed, len(seq.generated)
                sampled.append(seq)
            offset += count
        batch = model_lib.Batch(tokens, positions, slots, self._page_table.copy(), block_rows, block_slots,
                                logit_index)
        return batch, rows_of(params, seeds, steps), sampled

    def _compile_pass(self, impl: str):
        cfg = self.cfg
        replicated = NamedSharding(self.mesh, P())

        def packed_pass(params, cache, batch: model_lib.Batch, rows: SamplingRows):
            self.traces += 1
            logits, cache = model_lib.forward(params, cfg, cache, batch, impl=impl)
            tokens, logprobs = _sample(logits, rows)
            return tokens, logprobs, cache

        return jax.jit(packed_pass, donate_argnums=(1,),
                       out_shardings=(replicated, replicated,
                                      KVCache(self._cache_sharding, self._cache_sharding)))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}: use an integer >= 1")


def _tensor_mesh(tensor: int, devices) -> jax.sharding.Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if tensor > len(devices):
        raise ValueError(f"tensor={tensor} needs {tensor} devices but {len(devices)} are given; "
                         f"use tensor <= {len(devices)}")
    return make_mesh(MeshConfig(data=1, tensor=tensor), devices[:tensor])


def _shapes(params: dict) -> Any:
    return jax.tree.map(lambda x: (tuple(x.shape), x.dtype), params)


def _place_params(params: dict, cfg: Any, mesh, rules, dtype) -> dict:
    """The params on ``mesh``, each split by its logical axes' rules (the training layout),
    floating-point arrays cast to ``dtype``; a quantized weight (not an array) is replicated.
    LoRA adapters (``model.lora``) are fused into their weights first (``gpt.fuse_lora``)."""
    params = fuse_lora(params, cfg)
    axes = _param_axes(cfg)
    replicated = NamedSharding(mesh, P())

    def place(path, value):
        if not isinstance(value, (jax.Array, np.ndarray)):
            return jax.tree.map(lambda x: jax.device_put(x, replicated), value)
        names = _lookup(axes, path)
        spec = P() if names is None else P(*model_axes_of(tuple(value.shape), names, rules, dict(mesh.shape)))
        if jnp.issubdtype(value.dtype, jnp.floating):
            value = np.asarray(value).astype(dtype) if isinstance(value, np.ndarray) else value.astype(dtype)
        return jax.device_put(value, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(place, params, is_leaf=lambda x: not isinstance(x, dict))


def _param_axes(cfg: Any) -> dict:
    """The GPT's logical axes per param (``gpt.logical_axes``), from an abstract model."""
    return logical_axes(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))


def _lookup(axes: dict, path) -> tuple | None:
    node = axes
    for key in path:
        key = getattr(key, "key", key)
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, tuple) else None


def _tokenizer_in(directories, vocab_size: int) -> Tokenizer | None:
    """The ``tokenizer.json`` of the first directory that has one, else bytes when the vocabulary
    has room for them, else None."""
    for directory in directories:
        if (Path(directory) / TOKENIZER_FILE).is_file():
            return load_tokenizer(directory, vocab_size)
    return ByteTokenizer() if vocab_size >= ByteTokenizer.vocab_size else None
