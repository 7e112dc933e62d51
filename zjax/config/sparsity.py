"""DeepSpeed's sparse-attention configs and layouts (``SparsityConfig``), in numpy.

The config half of block-sparse attention: one frozen dataclass per DeepSpeed config class
(``DenseSparsity``, ``FixedSparsity``, ``VariableSparsity``, ``BigBirdSparsity``,
``BSLongformerSparsity``, ``LocalSlidingWindowSparsity``), ``sparsity_config(mode, **fields)``,
``make_layout(config, seq_len)`` (DeepSpeed's layouts, random blocks seeded) and
``map_deepspeed_sparse_attention(block)`` (a DeepSpeed ``sparse_attention`` block). It lives in
``zjax.config`` so the config can check a ``model.sparse_attention`` block when it is loaded;
``zjax.models.sparse_attention`` re-exports it beside the attention itself.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import Any, ClassVar, Union

import numpy as np

from zjax.errors import ConfigError


logger = logging.getLogger("zjax")

ATTENTIONS = ("bidirectional", "unidirectional")
# The block side of splash attention's tiles (its key blocks are multiples of 128 lanes).
SPLASH_BLOCK = 128  # (the kernel is in zjax.models.sparse_attention)
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
