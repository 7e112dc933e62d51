"""The paged KV cache: fixed-size pages of keys and values, and the host-side allocator.

The cache holds ``k`` and ``v`` of shape ``[n_layers, num_pages, page_size, n_kv_heads,
head_dim]``. A sequence's tokens live in whole pages listed, in order, in its row of a page
table: the token at position ``p`` sits at ``(page_table[slot, p // page_size], p %
page_size)``. Page 0 is the null page: padding tokens write there and unused page-table
entries point there, so it is never handed to a sequence and never read unmasked.

``PageAllocator`` is plain Python on the host: a free list; a sequence takes pages as it
grows and gives all of them back when it ends.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NULL_PAGE = 0


class KVCache(NamedTuple):
    """Keys and values, each ``[n_layers, num_pages, page_size, n_kv_heads, head_dim]``."""

    k: jax.Array
    v: jax.Array

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]


def init_cache(n_layers: int, num_pages: int, page_size: int, n_kv_heads: int, head_dim: int,
               dtype=jnp.float32, sharding: jax.sharding.Sharding | None = None) -> KVCache:
    """A zeroed cache (placed by ``sharding`` when given).

    Example:
      >>> init_cache(2, 5, 16, 2, 8).k.shape
      (2, 5, 16, 2, 8)
    """
    shape = (n_layers, num_pages, page_size, n_kv_heads, head_dim)
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return KVCache(zeros(), zeros())


class OutOfPages(RuntimeError):
    """Raised by ``PageAllocator.allocate`` when fewer pages are free than asked for."""


class PageAllocator:
    """Hands out the cache's pages (all but the null page 0) and takes them back.

    Args:
      num_pages: pages in the cache, the null page included.

    Example:
      >>> pages = PageAllocator(4)
      >>> pages.allocate(2), pages.free_count
      ([1, 2], 1)
      >>> pages.free([1, 2]); pages.free_count
      3
    """

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages}: the cache needs the null page and at least one more")
        self.num_pages = num_pages
        # popped from the end: the lowest page numbers go out first, and a freed page is reused next
        self._free = list(range(num_pages - 1, NULL_PAGE, -1))

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Pages a sequence can ever hold (all but the null page)."""
        return self.num_pages - 1

    def allocate(self, n: int) -> list[int]:
        """``n`` free pages, or ``OutOfPages`` (nothing taken) when fewer are free."""
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} KV-cache pages but {len(self._free)} of {self.capacity} are free; "
                             "finish or abort a sequence, or raise num_pages")
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        """Returns ``pages`` (all of a finished sequence's) to the free list."""
        for page in pages:
            if not NULL_PAGE < page < self.num_pages or page in self._free:
                raise ValueError(f"page {page} cannot be freed: it is not a page this allocator handed out "
                                 f"(1..{self.num_pages - 1}) or it is free already")
        self._free.extend(reversed(pages))
