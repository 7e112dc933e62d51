"""Block-sparse attention with DeepSpeed's sparsity layouts.

DeepSpeed's sparse attention (``deepspeed/ops/sparse_attention``) splits the ``[seq, seq]``
score matrix into ``block x block`` tiles and computes only the tiles a *layout* marks: an
int ``[num_heads, num_blocks, num_blocks]`` array built by a ``SparsityConfig`` subclass
(``deepspeed/ops/sparse_attention/sparsity_config.py``). This module has the same layouts
and an attention that computes exactly masked dense attention over them:

- one frozen dataclass per DeepSpeed config class, each with a ``mode`` and DeepSpeed's
  parameters (keyword arguments, DeepSpeed's names) and defaults: ``DenseSparsity`` (``"dense"``, ``DenseSparsityConfig``),
  ``FixedSparsity`` (``"fixed"``), ``VariableSparsity`` (``"variable"``),
  ``BigBirdSparsity`` (``"bigbird"``), ``BSLongformerSparsity`` (``"bslongformer"``) and
  ``LocalSlidingWindowSparsity`` (``"local"``). They check their values when built and
  raise ``zjax.errors.ConfigError`` naming the key, the value and what would work;
  ``sparsity_config(mode, **fields)`` builds one by name.
- ``make_layout(config, seq_len)``: the layout DeepSpeed's ``make_layout`` gives, in numpy
  (``int64`` 0/1, as DeepSpeed's ``torch.int64``). The code follows DeepSpeed's functions
  line by line (vectorized where DeepSpeed loops over cells). One difference on purpose:
  the random blocks of ``variable`` and ``bigbird`` come from
  ``np.random.default_rng(config.seed)`` instead of Python's unseeded ``random``, so a
  seed gives one layout on every host and every run.
- ``block_sparse_attention(q, k, v, layout, block=...)``: softmax attention where query
  ``t`` of head ``h`` sees key ``s`` iff ``layout[h, t // block, s // block]`` (and, with
  ``causal``, ``s <= t``). ``impl="xla"`` is masked dense attention (the reference);
  ``"interpret"`` and ``"pallas"`` run JAX's splash attention kernel
  (``jax.experimental.pallas.ops.tpu.splash_attention``), which skips the empty blocks
  of its own tiling forward and backward.
- ``map_deepspeed_sparse_attention(block)``: a DeepSpeed ``sparse_attention`` config block
  to one of the dataclasses.

DeepSpeed's ``"unidirectional"`` is a property of the *layout* (no block above the
diagonal, triangular blocks inside local windows); it does not mask tokens inside a
diagonal block, DeepSpeed users pass an ``attn_mask`` for that. Here ``causal=True`` is
that token-level mask.

Example:
  >>> import jax, jax.numpy as jnp
  >>> config = FixedSparsity(num_heads=2, block=16, num_local_blocks=2)
  >>> layout = make_layout(config, seq_len=64)
  >>> layout.shape
  (2, 4, 4)
  >>> layout[0].tolist()
  [[1, 1, 0, 1], [1, 1, 0, 1], [0, 1, 1, 1], [0, 1, 1, 1]]
  >>> q = jax.random.normal(jax.random.key(0), (1, 64, 2, 8))
  >>> block_sparse_attention(q, q, q, layout, block=16).shape
  (1, 64, 2, 8)
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
from typing import Any, ClassVar, Union

import jax
import jax.numpy as jnp
import numpy as np

from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_masks

from pallas_kernels import dispatch
from zjax.errors import ConfigError

logger = logging.getLogger("zjax")

ATTENTIONS = ("bidirectional", "unidirectional")
# The block side of splash attention's tiles (its key blocks are multiples of 128 lanes).
SPLASH_BLOCK = 128
_KEY = "sparse_attention"


# --------------------------------------------------------------------------- configs

def _fail(key: str, value: Any, what: str) -> ConfigError:
    return ConfigError(f"{_KEY}.{key}={value!r}: {what}")


def _check_int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise _fail(key, value, f"must be an integer >= {minimum}")
    if value < minimum:
        raise _fail(key, value, f"must be an integer >= {minimum}")


def _check_bool(key: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise _fail(key, value, "must be true or false")


def _int_tuple(config, key: str, minimum: int, *, empty_ok: bool = True) -> None:
    """Turns a list field into a tuple of ints (hashable, frozen), checking each entry."""
    value = getattr(config, key)
    if value is None:
        return
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise _fail(key, value, f"must be a list of integers >= {minimum}")
    items = tuple(value)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)) or item < minimum:
            raise _fail(key, value, f"must be a list of integers >= {minimum}; {item!r} is not")
    if not items and not empty_ok:
        raise _fail(key, value, f"must list at least one integer >= {minimum}")
    object.__setattr__(config, key, tuple(int(i) for i in items))


def _check_attention(config) -> None:
    if config.attention not in ATTENTIONS:
        close = difflib.get_close_matches(str(config.attention), ATTENTIONS, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _fail("attention", config.attention, f"use one of {', '.join(ATTENTIONS)}{hint}")


def _check_horizontal(config) -> None:
    _check_bool("horizontal_global_attention", config.horizontal_global_attention)
    if config.horizontal_global_attention and config.attention != "bidirectional":
        raise _fail("horizontal_global_attention", True,
                    "only bidirectional attention can have horizontal global attention (a global "
                    "row would attend to later blocks); set attention: bidirectional or "
                    "horizontal_global_attention: false")


def _check_global_ranges(config) -> None:
    _int_tuple(config, "global_block_indices", 0)
    _int_tuple(config, "global_block_end_indices", 0)
    starts, ends = config.global_block_indices, config.global_block_end_indices
    if ends is None:
        return
    if len(starts) != len(ends):
        raise _fail("global_block_end_indices", list(ends),
                    f"must have as many entries as global_block_indices={list(starts)} "
                    f"({len(starts)}), one end (exclusive) per start")
    for start, end in zip(starts, ends):
        if start >= end:
            raise _fail("global_block_end_indices", list(ends),
                        f"each end must be larger than its start; start {start} >= end {end}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Sparsity:
    """Fields every DeepSpeed ``SparsityConfig`` has (``num_heads``, ``block``,
    ``different_layout_per_head``). ``num_heads`` may be left ``None`` and given to
    ``make_layout`` instead (a DeepSpeed JSON block has no head count)."""

    mode: ClassVar[str] = ""
    num_heads: int | None = None
    block: int = 16
    different_layout_per_head: bool = False

    def __post_init__(self):
        if self.num_heads is not None:
            _check_int("num_heads", self.num_heads, 1)
        _check_int("block", self.block, 1)
        _check_bool("different_layout_per_head", self.different_layout_per_head)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DenseSparsity(_Sparsity):
    """DeepSpeed's ``DenseSparsityConfig``: every block (for comparison)."""

    mode: ClassVar[str] = "dense"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedSparsity(_Sparsity):
    """DeepSpeed's ``FixedSparsityConfig`` (Sparse Transformers' "fixed" pattern).

    Local windows of ``num_local_blocks`` blocks on the diagonal, each seeing itself (a
    lower triangle of blocks when ``unidirectional``); the last ``num_global_blocks``
    blocks of every window are global columns every later (``unidirectional``) or every
    (``bidirectional``) row sees, and with ``horizontal_global_attention`` also global rows
    that see everything. With ``different_layout_per_head`` head ``h`` takes pattern
    ``h % num_different_global_patterns``: its global blocks sit that many global-block
    widths earlier in each window.
    """

    mode: ClassVar[str] = "fixed"
    num_local_blocks: int = 4
    num_global_blocks: int = 1
    attention: str = "bidirectional"
    horizontal_global_attention: bool = False
    num_different_global_patterns: int = 1

    def __post_init__(self):
        super().__post_init__()
        _check_int("num_local_blocks", self.num_local_blocks, 1)
        _check_int("num_global_blocks", self.num_global_blocks, 1)
        if self.num_local_blocks % self.num_global_blocks:
            divisors = [d for d in range(1, self.num_local_blocks + 1) if self.num_local_blocks % d == 0]
            raise _fail("num_local_blocks", self.num_local_blocks,
                        f"must be divisible by num_global_blocks={self.num_global_blocks} "
                        f"(DeepSpeed's FixedSparsityConfig requires it); use num_global_blocks in "
                        f"{divisors} or num_local_blocks a multiple of {self.num_global_blocks}")
        _check_attention(self)
        _check_horizontal(self)
        _check_int("num_different_global_patterns", self.num_different_global_patterns, 1)
        if self.num_different_global_patterns > 1 and not self.different_layout_per_head:
            raise _fail("num_different_global_patterns", self.num_different_global_patterns,
                        "more than one global pattern needs a layout per head; set "
                        "different_layout_per_head: true or num_different_global_patterns: 1")
        most = self.num_local_blocks // self.num_global_blocks
        if self.num_different_global_patterns > most:
            raise _fail("num_different_global_patterns", self.num_different_global_patterns,
                        f"can be at most num_local_blocks // num_global_blocks = "
                        f"{self.num_local_blocks} // {self.num_global_blocks} = {most}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VariableSparsity(_Sparsity):
    """DeepSpeed's ``VariableSparsityConfig``: ``fixed`` with random blocks, local windows of
    the sizes ``local_window_blocks`` lists (the last size repeats to the end), and global
    blocks at ``global_block_indices`` (or the ranges ``[start, end)`` when
    ``global_block_end_indices`` is given). ``seed`` picks the random blocks.

    As in DeepSpeed, ``unidirectional`` makes the windows triangular and starts each global
    column at its first block row, but draws random blocks from the whole row and keeps a
    global range's cells right of its first column: such blocks lie above the diagonal
    (``causal=True`` masks their tokens).
    """

    mode: ClassVar[str] = "variable"
    num_random_blocks: int = 0
    local_window_blocks: tuple[int, ...] = (4,)
    global_block_indices: tuple[int, ...] = (0,)
    global_block_end_indices: tuple[int, ...] | None = None
    attention: str = "bidirectional"
    horizontal_global_attention: bool = False
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        _check_int("num_random_blocks", self.num_random_blocks, 0)
        # DeepSpeed fails on an empty list (its remainder loop reads an unset size) and on a
        # zero size (a range with step 0): both are refused here, naming the key.
        _int_tuple(self, "local_window_blocks", 1, empty_ok=False)
        _check_global_ranges(self)
        _check_attention(self)
        _check_horizontal(self)
        _check_int("seed", self.seed, 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BigBirdSparsity(_Sparsity):
    """DeepSpeed's ``BigBirdSparsityConfig``: ``num_random_blocks`` random blocks per row, a
    sliding window of ``num_sliding_window_blocks`` blocks centred on the diagonal, and the
    first ``num_global_blocks`` blocks as global rows and columns; ``unidirectional``
    keeps the lower triangle of blocks. ``seed`` picks the random blocks."""

    mode: ClassVar[str] = "bigbird"
    num_random_blocks: int = 1
    num_sliding_window_blocks: int = 3
    num_global_blocks: int = 1
    attention: str = "bidirectional"
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        _check_int("num_random_blocks", self.num_random_blocks, 0)
        _check_int("num_sliding_window_blocks", self.num_sliding_window_blocks, 1)
        _check_int("num_global_blocks", self.num_global_blocks, 0)
        _check_attention(self)
        _check_int("seed", self.seed, 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BSLongformerSparsity(_Sparsity):
    """DeepSpeed's ``BSLongformerSparsityConfig`` (block-sparse Longformer): a sliding window
    of ``num_sliding_window_blocks`` blocks and global blocks (rows and columns) at
    ``global_block_indices`` (or the ranges to ``global_block_end_indices``);
    ``unidirectional`` keeps the lower triangle of blocks."""

    mode: ClassVar[str] = "bslongformer"
    num_sliding_window_blocks: int = 3
    global_block_indices: tuple[int, ...] = (0,)
    global_block_end_indices: tuple[int, ...] | None = None
    attention: str = "bidirectional"

    def __post_init__(self):
        super().__post_init__()
        _check_int("num_sliding_window_blocks", self.num_sliding_window_blocks, 1)
        _check_global_ranges(self)
        _check_attention(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LocalSlidingWindowSparsity(_Sparsity):
    """DeepSpeed's ``LocalSlidingWindowSparsityConfig``: only a sliding window of
    ``num_sliding_window_blocks`` blocks (``unidirectional``, the default as in DeepSpeed:
    the window's half before the diagonal and the diagonal). DeepSpeed's class takes no
    ``different_layout_per_head``; here it is accepted and changes nothing (every head's
    window is the same)."""

    mode: ClassVar[str] = "local"
    num_sliding_window_blocks: int = 3
    attention: str = "unidirectional"

    def __post_init__(self):
        super().__post_init__()
        _check_int("num_sliding_window_blocks", self.num_sliding_window_blocks, 1)
        _check_attention(self)


SparsityConfig = Union[DenseSparsity, FixedSparsity, VariableSparsity, BigBirdSparsity,
                       BSLongformerSparsity, LocalSlidingWindowSparsity]
CONFIGS: dict[str, type] = {c.mode: c for c in (
    DenseSparsity, FixedSparsity, VariableSparsity, BigBirdSparsity, BSLongformerSparsity,
    LocalSlidingWindowSparsity)}
MODES = tuple(CONFIGS)


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"{_KEY}.{key}: not a key of {where}; {hint}valid keys: {', '.join(valid)}")


def _mode_class(mode: Any) -> type:
    if mode not in CONFIGS:
        close = difflib.get_close_matches(str(mode), MODES, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{_KEY}.mode={mode!r}: not a sparsity mode; use one of "
                          f"{', '.join(MODES)}{hint}")
    return CONFIGS[mode]


def sparsity_config(mode: str, **fields) -> SparsityConfig:
    """The config of sparsity ``mode`` (one of ``MODES``) with ``fields``.

    Raises:
      ConfigError: an unknown mode or field (naming the nearest valid one) or a bad value.

    Example:
      >>> sparsity_config("bigbird", num_heads=4, num_random_blocks=2).num_sliding_window_blocks
      3
    """
    cls = _mode_class(mode)
    valid = _fields(cls)
    for key in fields:
        if key not in valid:
            raise _unknown_key(key, valid, f"mode {mode!r}")
    return cls(**fields)


# --------------------------------------------------------------------------- layouts

def make_layout(config: SparsityConfig, seq_len: int, *, num_heads: int | None = None) -> np.ndarray:
    """The block layout DeepSpeed's ``<Mode>SparsityConfig.make_layout(seq_len)`` gives.

    Args:
      config: one of this module's sparsity configs.
      seq_len: the sequence length; a multiple of ``config.block``.
      num_heads: the head count when the config leaves it ``None`` (overrides it otherwise).

    Returns:
      ``int64 [num_heads, seq_len // block, seq_len // block]``: 1 where a block of queries
      (row) attends a block of keys (column). Without ``different_layout_per_head`` every
      head has head 0's layout (DeepSpeed's ``check_and_propagate_first_head_layout``).

    Raises:
      ConfigError: ``seq_len`` not a multiple of ``block``, no head count, or a window /
        random / global count larger than the number of blocks (DeepSpeed refuses these
        when it builds the layout).
    """
    if not isinstance(config, tuple(CONFIGS.values())):
        raise ConfigError(f"make_layout: config {config!r} is not a sparsity config; build one "
                          f"with sparsity_config(mode, ...) (modes: {', '.join(MODES)})")
    heads = num_heads if num_heads is not None else config.num_heads
    if heads is None:
        raise ConfigError(f"{_KEY}.num_heads=None: give the attention's head count "
                          "(num_heads in the config or make_layout(..., num_heads=H))")
    _check_int("num_heads", heads, 1)
    _check_int("seq_len", seq_len, 1)
    block = config.block
    if seq_len % block:
        lower, upper = seq_len // block * block, (seq_len // block + 1) * block
        options = f"{lower} or {upper}" if lower else f"{upper}"
        raise ConfigError(f"{_KEY}.block={block} with seq_len={seq_len}: the sequence length "
                          f"must be a multiple of block (DeepSpeed's setup_layout requires it); "
                          f"pad the sequence to {options}, or pick a block that divides {seq_len}")
    nb = seq_len // block
    layout = np.zeros((heads, nb, nb), np.int64)
    layout_heads = heads if config.different_layout_per_head else 1
    rng = np.random.default_rng(getattr(config, "seed", 0))
    build = _BUILDERS[config.mode]
    for h in range(layout_heads):
        build(config, h, layout, rng)
    if not config.different_layout_per_head:  # check_and_propagate_first_head_layout
        layout[1:] = layout[0]
    return layout


def _too_few_blocks(key: str, value: int, nb: int, seq_len_block: int) -> ConfigError:
    return _fail(key, value, f"is more than the {nb} blocks of the sequence "
                 f"(seq_len / block = {nb * seq_len_block} / {seq_len_block}); use at most {nb}")


def _local_windows(layout, h, start, end, unidirectional):
    """Rows and columns ``[start, end)`` see each other (their lower triangle when
    ``unidirectional``): DeepSpeed's ``for row ... for col in range(start, row + 1 or end)``."""
    if start >= end:
        return
    window = np.ones((end - start, end - start), np.int64)
    layout[h, start:end, start:end] |= np.tril(window) if unidirectional else window


def _dense_layout(config, h, layout, rng):
    layout[:] = 1


def _fixed_layout(config, h, layout, rng):
    """``FixedSparsityConfig.set_local_layout`` then ``set_global_layout``."""
    nb = layout.shape[1]
    nl, ng = config.num_local_blocks, config.num_global_blocks
    uni = config.attention == "unidirectional"
    for i in range(0, nb, nl):
        _local_windows(layout, h, i, min(i + nl, nb), uni)

    first_global = nl - (1 + h % config.num_different_global_patterns) * ng
    # every global block but those of a last, short window
    end = nb - (nb % nl)
    for i in range(first_global, end, nl):
        first_row = 0 if config.attention == "bidirectional" else i
        layout[h, first_row:, i:i + ng] = 1
        if config.horizontal_global_attention:
            layout[h, i:i + ng, :] = 1
    # the last, possibly short, window's global blocks
    if end < nb:
        start = min(end + first_global, nb - ng)
        stop = start + ng
        first_row = 0 if config.attention == "bidirectional" else start
        layout[h, first_row:, start:stop] = 1
        if config.horizontal_global_attention:
            layout[h, start:stop, :] = 1


def _random_blocks(config, h, layout, rng, *, causal_rows: bool):
    """``set_random_layout``: ``num_random_blocks`` distinct columns per row, drawn from all
    blocks (``variable``, and bidirectional ``bigbird``) or from blocks up to the row
    (unidirectional ``bigbird``, ``causal_rows``)."""
    nb = layout.shape[1]
    k = config.num_random_blocks
    if nb < k:
        raise _too_few_blocks("num_random_blocks", k, nb, config.block)
    if k == 0:
        return
    for row in range(nb):
        population = row + 1 if causal_rows else nb
        # DeepSpeed's random.sample raises when a unidirectional row has fewer blocks than
        # num_random_blocks (the first rows); such a row takes all of them instead.
        cols = rng.choice(population, size=min(k, population), replace=False)
        layout[h, row, cols] = 1


def _variable_layout(config, h, layout, rng):
    """``VariableSparsityConfig``: ``set_random_layout``, ``set_local_layout``,
    ``set_global_layout``."""
    nb = layout.shape[1]
    uni = config.attention == "unidirectional"
    _random_blocks(config, h, layout, rng, causal_rows=False)

    start = end = 0
    for size in config.local_window_blocks:
        end = min(end + size, nb)
        _local_windows(layout, h, start, end, uni)
        start += size
    # the remaining blocks take the last window size
    for i in range(start, nb, size):
        _local_windows(layout, h, i, min(i + size, nb), uni)

    ends = config.global_block_end_indices
    ranges = ([(i, i + 1) for i in config.global_block_indices] if ends is None
              else list(zip(config.global_block_indices, ends)))
    for first, last in ranges:
        if first < nb:
            last = min(last, nb)
            if config.horizontal_global_attention:
                layout[h, first:last, :] = 1
            first_row = 0 if config.attention == "bidirectional" else first
            layout[h, first_row:, first:last] = 1


def _sliding_window(config, h, layout, *, causal_end: bool):
    """``set_sliding_window_layout``: row ``r`` sees blocks ``[r - w, r + w]`` with
    ``w = num_sliding_window_blocks // 2`` (up to ``r`` for the unidirectional ``local``)."""
    nb = layout.shape[1]
    n = config.num_sliding_window_blocks
    if nb < n:
        raise _too_few_blocks("num_sliding_window_blocks", n, nb, config.block)
    w = n // 2
    rows = np.arange(nb)[:, None]
    cols = np.arange(nb)[None, :]
    upper = rows if causal_end else rows + w
    layout[h] |= ((cols >= rows - w) & (cols <= upper)).astype(np.int64)


def _bigbird_layout(config, h, layout, rng):
    """``BigBirdSparsityConfig``: ``set_random_layout``, ``set_sliding_window_layout``,
    ``set_global_layout_itc`` (global rows and columns ``[0, num_global_blocks)``, then
    ``torch.tril`` when unidirectional)."""
    nb = layout.shape[1]
    uni = config.attention == "unidirectional"
    _random_blocks(config, h, layout, rng, causal_rows=uni)
    _sliding_window(config, h, layout, causal_end=False)
    ng = config.num_global_blocks
    if nb < ng:
        raise _too_few_blocks("num_global_blocks", ng, nb, config.block)
    layout[h, :ng, :] = 1
    layout[h, :, :ng] = 1
    if uni:
        layout[h] = np.tril(layout[h])


def _bslongformer_layout(config, h, layout, rng):
    """``BSLongformerSparsityConfig``: ``set_sliding_window_layout``, ``set_global_layout``
    (global rows and columns, then ``torch.tril`` when unidirectional)."""
    nb = layout.shape[1]
    _sliding_window(config, h, layout, causal_end=False)
    ends = config.global_block_end_indices
    ranges = ([(i, i + 1) for i in config.global_block_indices] if ends is None
              else list(zip(config.global_block_indices, ends)))
    for first, last in ranges:
        if first < nb:
            last = min(last, nb)
            layout[h, first:last, :] = 1
            layout[h, :, first:last] = 1
    if config.attention == "unidirectional":
        layout[h] = np.tril(layout[h])


def _local_layout(config, h, layout, rng):
    """``LocalSlidingWindowSparsityConfig.set_sliding_window_layout``."""
    _sliding_window(config, h, layout, causal_end=config.attention != "bidirectional")


_BUILDERS = {
    "dense": _dense_layout,
    "fixed": _fixed_layout,
    "variable": _variable_layout,
    "bigbird": _bigbird_layout,
    "bslongformer": _bslongformer_layout,
    "local": _local_layout,
}


# --------------------------------------------------------------------------- DeepSpeed keys

# The keys DeepSpeed's config parser (deepspeed/runtime/config.py, get_sparse_<mode>_config)
# reads for each mode. ``local`` is not in DeepSpeed's parser (only its Python class);
# ``seed`` is zjax's (DeepSpeed's random blocks are unseeded); ``attention`` for bigbird and
# bslongformer is read here although DeepSpeed's parser drops it (see the mapper).
_DS_KEYS = {
    "dense": ("block",),
    "fixed": ("block", "different_layout_per_head", "num_local_blocks", "num_global_blocks",
              "attention", "horizontal_global_attention", "num_different_global_patterns"),
    "variable": ("block", "different_layout_per_head", "num_random_blocks", "local_window_blocks",
                 "global_block_indices", "global_block_end_indices", "attention",
                 "horizontal_global_attention", "seed"),
    "bigbird": ("block", "different_layout_per_head", "num_random_blocks",
                "num_sliding_window_blocks", "num_global_blocks", "attention", "seed"),
    "bslongformer": ("block", "different_layout_per_head", "num_sliding_window_blocks",
                     "global_block_indices", "global_block_end_indices", "attention"),
    "local": ("block", "different_layout_per_head", "num_sliding_window_blocks", "attention"),
}
DEEPSPEED_KEYS = ("mode",) + tuple(dict.fromkeys(k for keys in _DS_KEYS.values() for k in keys))


def map_deepspeed_sparse_attention(block: dict, *, num_heads: int | None = None) -> SparsityConfig:
    """DeepSpeed's ``sparse_attention`` config block as one of this module's configs.

    Follows ``deepspeed/runtime/config.py`` (``get_sparse_attention`` and
    ``get_sparse_<mode>_config``) and its defaults (``deepspeed/runtime/constants.py``):
    ``mode`` defaults to ``"fixed"``; each mode reads only its own keys, and a key another
    mode reads is ignored as DeepSpeed ignores it (logged once on ``logging.getLogger("zjax")``);
    ``bigbird``'s ``num_random_blocks`` defaults to 0 as in DeepSpeed's JSON defaults (its
    Python class says 1). Differences: ``mode: local`` (DeepSpeed's
    ``LocalSlidingWindowSparsityConfig``, which its JSON parser lacks) is accepted;
    ``attention`` is honoured for ``bigbird`` and ``bslongformer`` (DeepSpeed's parser
    drops it, so a DeepSpeed JSON config always builds them bidirectional); ``seed`` picks
    the random blocks of ``variable`` and ``bigbird``.

    Args:
      block: the ``sparse_attention`` mapping.
      num_heads: the attention's head count (DeepSpeed takes it from the model); may be
        left ``None`` and given to ``make_layout``.

    Raises:
      ConfigError: a key no mode reads (naming the nearest valid key), an unknown mode, or
        a value the config refuses.

    Example:
      >>> map_deepspeed_sparse_attention({"mode": "bslongformer", "num_sliding_window_blocks": 5})
      BSLongformerSparsity(num_heads=None, block=16, different_layout_per_head=False, num_sliding_window_blocks=5, global_block_indices=(0,), global_block_end_indices=None, attention='bidirectional')
    """
    if not isinstance(block, dict):
        raise ConfigError(f"{_KEY}={block!r}: must be a mapping of sparsity keys "
                          f"({', '.join(DEEPSPEED_KEYS)})")
    for key in block:
        if key not in DEEPSPEED_KEYS:
            raise _unknown_key(str(key), list(DEEPSPEED_KEYS), "DeepSpeed's sparse_attention")
    mode = block.get("mode", "fixed")
    _mode_class(mode)
    fields = {}
    for key, value in block.items():
        if key == "mode":
            continue
        if key in _DS_KEYS[mode]:
            fields[key] = value
        else:
            readers = [m for m, keys in _DS_KEYS.items() if key in keys]
            _log_once(f"{_KEY}.{key} is ignored with mode {mode!r} (DeepSpeed reads it only for "
                      f"mode {' / '.join(readers)})")
    if mode == "bigbird":
        fields.setdefault("num_random_blocks", 0)
    if num_heads is not None:
        fields["num_heads"] = num_heads
    return sparsity_config(mode, **fields)


_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


# --------------------------------------------------------------------------- attention

def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout, *, block: int,
                           causal: bool = False, scale: float | None = None,
                           impl: str = "auto") -> jax.Array:
    """Softmax attention over the blocks a sparsity layout marks.

    Query ``t`` of head ``h`` attends key ``s`` iff ``layout[h, t // block, s // block]``
    is nonzero and, with ``causal``, ``s <= t``: exactly
    ``softmax(where(mask, q k^T * scale, -inf)) v``.

    Args:
      q: ``[batch, seq, heads, head_dim]``.
      k: ``[batch, seq, kv_heads, head_dim]``; ``kv_heads`` divides ``heads`` (query head
        ``h`` reads kv head ``h // (heads // kv_heads)``).
      v: like ``k``.
      layout: ``[heads or 1, seq // block, seq // block]``, e.g. from ``make_layout``
        (a layout of one head serves every head). The kernel paths need it concrete
        (a numpy array, not traced); the ``"xla"`` path also takes a traced one.
      block: the layout's block side in tokens.
      causal: also mask keys after the query (DeepSpeed's ``unidirectional`` layouts
        mask only whole blocks; this masks the tokens inside the diagonal blocks).
      scale: multiplies the scores; default ``1 / sqrt(head_dim)``.
      impl: ``"xla"``: masked dense attention (the mask is the layout broadcast over
        ``block x block`` tiles, never materialised per token); computes every block.
        ``"interpret"``: JAX's splash attention kernel in Pallas interpret mode (any
        backend; slow, for tests). ``"pallas"``: the same kernel compiled, TPU only (splash
        attention is a Mosaic kernel; on GPU there is no kernel and this raises).
        ``"auto"``: ``"pallas"`` on TPU with a concrete layout, else ``"xla"``.
        The kernel's tiles are ``SPLASH_BLOCK`` = 128 tokens (``block`` when that is a
        multiple of 128, up to 512); it skips every tile the layout leaves empty, in the
        forward and in its own backward kernels (``dq``, ``dk``/``dv``), and reads a
        partly filled tile's token mask from memory. The sequence is padded to whole
        tiles and the padding masked.

    Returns:
      ``[batch, seq, heads, head_dim]`` in ``q``'s dtype (scores and softmax in float32).
      A query row that sees no key (a layout row with no block, or only blocks after
      it under ``causal``) gets zeros, and its gradients are zero; never NaN.

    Raises:
      ConfigError: shapes that do not fit one another, the layout or ``block``; an unknown
        ``impl``; ``"pallas"`` off TPU; a traced layout on a kernel path.
    """
    layout_shape = _check_inputs(q, k, v, layout, block)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    impl = _resolve_impl(impl, layout)
    if impl == "xla":
        return _xla_attention(q, k, v, jnp.asarray(layout), block, causal, scale)
    heads = q.shape[2]
    layout = np.broadcast_to(np.asarray(layout) != 0, (heads,) + layout_shape[1:])
    return _splash_attention(q, k, v, layout, block, causal, scale, interpret=impl == "interpret")


def _check_inputs(q, k, v, layout, block) -> tuple[int, ...]:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ConfigError(f"block_sparse_attention: q {q.shape}, k {k.shape}, v {v.shape}; need q "
                          "[batch, seq, heads, head_dim] and k, v both [batch, seq, kv_heads, head_dim]")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ConfigError(f"block_sparse_attention: q {q.shape} and k {k.shape} differ in batch, "
                          "seq or head_dim (self-attention: one sequence for queries and keys)")
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads:
        raise ConfigError(f"block_sparse_attention: kv_heads={kv_heads} must divide heads={heads}")
    _check_int("block", block, 1)
    seq = q.shape[1]
    shape = tuple(np.shape(layout))
    if seq % block:
        raise ConfigError(f"block_sparse_attention: seq={seq} is not a multiple of block={block}; "
                          "pad the sequence or use the block the layout was made with")
    nb = seq // block
    if len(shape) != 3 or shape[0] not in (1, heads) or shape[1:] != (nb, nb):
        raise ConfigError(f"block_sparse_attention: layout of shape {shape} does not fit seq={seq}, "
                          f"block={block}, heads={heads}; need [{heads} or 1, {nb}, {nb}] "
                          f"(make_layout(config, seq_len={seq}, num_heads={heads}) with block {block})")
    return shape


def _resolve_impl(impl: str, layout) -> str:
    if impl not in dispatch.IMPLS:
        raise ConfigError(f"block_sparse_attention: impl={impl!r} is not an implementation; use one "
                          f"of {dispatch.IMPLS}")
    traced = isinstance(layout, jax.core.Tracer)
    here = dispatch.backend()
    if impl == "auto":
        if here == "tpu" and not traced:
            return "pallas"
        reason = ("the layout is traced" if traced else
                  f"splash attention is a TPU kernel and the backend is {here!r}")
        _log_once(f"block_sparse_attention: impl='auto' uses masked dense XLA attention ({reason})")
        return "xla"
    if impl == "pallas" and here != "tpu":
        raise ConfigError(f"block_sparse_attention: impl='pallas' runs splash attention, a TPU "
                          f"(Mosaic) kernel, but the default backend is {here!r}; use impl='xla' "
                          "(masked dense attention) or impl='interpret' (the kernel interpreted)")
    if impl != "xla" and traced:
        raise ConfigError(f"block_sparse_attention: impl={impl!r} needs the layout as a concrete "
                          "array (the kernel's block lists are built from it in numpy); build it "
                          "with make_layout outside jit and close over it, or use impl='xla'")
    return impl


def _xla_attention(q, k, v, layout, block, causal, scale):
    """Masked dense attention, the reference: scores ``[batch, kv_heads, groups, nb, block,
    nb, block]`` masked by the layout broadcast over each tile."""
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups, nb = heads // kv_heads, seq // block
    qg = q.reshape(batch, nb, block, kv_heads, groups, head_dim)
    kb = k.reshape(batch, nb, block, kv_heads, head_dim)
    scores = jnp.einsum("bitkgd,bjskd->bkgitjs", qg, kb, preferred_element_type=jnp.float32) * scale
    allowed = jnp.broadcast_to(layout != 0, (heads, nb, nb)).reshape(kv_heads, groups, nb, 1, nb, 1)
    if causal:
        tokens = jnp.arange(seq).reshape(nb, block)
        allowed = allowed & (tokens[:, :, None, None] >= tokens[None, None, :, :])
    scores = jnp.where(allowed, scores, -jnp.inf)
    # Softmax over the (key block, key) axes; a row with no key keeps max 0 and sum 0.
    peak = jnp.max(scores, axis=(-2, -1), keepdims=True)
    peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
    probs = jnp.exp(scores - peak)  # exactly 0 where masked, with a 0 gradient
    total = jnp.sum(probs, axis=(-2, -1), keepdims=True)
    probs = probs / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bkgitjs,bjskd->bitkgd", probs.astype(v.dtype), v.reshape(kb.shape),
                     preferred_element_type=jnp.float32)
    return out.reshape(q.shape).astype(q.dtype)


@dataclasses.dataclass(frozen=True, eq=True)
class _LayoutTokenMask(splash_masks.Mask):
    """One head's token mask ``[padded, padded]`` as a splash attention ``Mask``, computed
    from its block layout on demand (splash's mask processing reads it tile by tile; no
    ``[seq, seq]`` array exists). Equal layouts give equal (and equally hashed) masks,
    which splash processes and stores once.

    A row that sees no key (padding, or an empty layout row) is given its own position as
    a key so that the kernel's softmax stays finite; ``block_sparse_attention`` zeroes
    those rows' output, so that key gets a zero gradient.
    """

    layout_bytes: bytes
    nb: int
    block: int
    seq: int
    padded: int
    causal: bool

    @property
    def shape(self) -> tuple[int, int]:
        return (self.padded, self.padded)

    @functools.cached_property
    def _layout(self) -> np.ndarray:
        return np.frombuffer(self.layout_bytes, np.bool_).reshape(self.nb, self.nb)

    @functools.cached_property
    def empty_rows(self) -> np.ndarray:
        return ~_rows_with_keys(self._layout, self.block, self.seq, self.padded, self.causal)

    def __getitem__(self, idx) -> np.ndarray:
        rows, cols = idx
        squeeze = []
        if isinstance(rows, (int, np.integer)):
            rows, squeeze = slice(rows, rows + 1), squeeze + [0]
        if isinstance(cols, (int, np.integer)):
            cols, squeeze = slice(cols, cols + 1), squeeze + [1]
        r = np.arange(self.padded)[rows][:, None]
        c = np.arange(self.padded)[cols][None, :]
        real = (r < self.seq) & (c < self.seq)
        mask = real & self._layout[np.minimum(r // self.block, self.nb - 1),
                                   np.minimum(c // self.block, self.nb - 1)]
        if self.causal:
            mask &= c <= r
        mask |= self.empty_rows[r] & (c == r)
        return mask.squeeze(tuple(squeeze)) if squeeze else mask


def _rows_with_keys(layout: np.ndarray, block: int, seq: int, padded: int, causal: bool) -> np.ndarray:
    """bool ``[padded]``: whether each query row (of one head) sees any key."""
    nb = layout.shape[0]
    rows = np.arange(padded)
    block_row = np.minimum(rows // block, nb - 1)
    if causal:
        # the first key block of each block row; a row sees a key iff it starts at or before it
        first = np.where(layout.any(axis=1), layout.argmax(axis=1), nb) * block
        seen = first[block_row] <= rows
    else:
        seen = layout.any(axis=1)[block_row]
    return seen & (rows < seq)


def _splash_tile(block: int) -> int:
    return block if block % SPLASH_BLOCK == 0 and block <= 4 * SPLASH_BLOCK else SPLASH_BLOCK


@functools.lru_cache(maxsize=32)
def _splash_kernel(layout_bytes: bytes, heads: int, nb: int, block: int, seq: int, causal: bool,
                   interpret: bool):
    """The splash kernel for one layout (cached: building its block lists walks every tile),
    the padded length, and bool ``[seq, heads]``: whether each query row sees a key."""
    tile = _splash_tile(block)
    padded = -(-seq // tile) * tile
    layout = np.frombuffer(layout_bytes, np.bool_).reshape(heads, nb, nb)
    per_head = [_LayoutTokenMask(np.ascontiguousarray(layout[h]).tobytes(), nb, block, seq, padded,
                                 causal) for h in range(heads)]
    sizes = splash.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile,
                              block_q_dkv=tile, block_kv_dkv=tile, block_kv_dkv_compute=tile,
                              block_q_dq=tile, block_kv_dq=tile)
    kernel = splash.make_splash_mha(splash_masks.MultiHeadMask(per_head), head_shards=1,
                                    q_seq_shards=1, block_sizes=sizes, interpret=interpret)
    seen = ~np.stack([m.empty_rows[:seq] for m in per_head], axis=1)
    return kernel, padded, seen


def _splash_attention(q, k, v, layout: np.ndarray, block, causal, scale, *, interpret):
    """``block_sparse_attention`` through splash attention (its own custom VJP)."""
    batch, seq, heads, head_dim = q.shape
    nb = seq // block
    kernel, padded, seen = _splash_kernel(np.ascontiguousarray(layout).tobytes(), heads, nb, block,
                                          seq, bool(causal), bool(interpret))

    def heads_first(x):  # [batch, seq, h, d] -> [batch, h, padded, d]
        return jnp.pad(x, ((0, 0), (0, padded - seq), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    out = jax.vmap(kernel)(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k),
                           heads_first(v))
    out = out.transpose(0, 2, 1, 3)[:, :seq]
    # Rows that see no key ran on a stand-in key: zero them (their cotangent is then zero too).
    return jnp.where(seen[None, :, :, None], out, 0).astype(q.dtype)
