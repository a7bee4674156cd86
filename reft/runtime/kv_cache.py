"""KV-cache pages: a fixed pool of pages per layer, owned by the runtime.

The pool is a set of arrays `kv_cache.{layer}.{k|v}` of shape [num_pages, page_size, Hkv, D]
(the graph's cache inputs). Sequences own lists of page ids; pages return to the free list
when a sequence finishes.
"""
from __future__ import annotations

from ..errors import RequestError


class PagePool:
    def __init__(self, layout: dict, num_pages: int, zeros):
        self.page_size = layout["page_size"]
        self.num_pages = num_pages
        shape = (num_pages, self.page_size, layout["kv_heads"], layout["head_dim"])
        self.arrays = {name: zeros(shape, layout["dtype"]) for name in layout["inputs"]}
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RequestError(f"KV cache full: need {n} more pages, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
        pages.clear()


class Sequence:
    """A sequence's tokens and the pages that hold its cached K/V (positions 0..cached-1)."""

    def __init__(self, pool: PagePool, tokens: list[int] | None = None):
        self.pool = pool
        self.tokens: list[int] = list(tokens or [])
        self.pages: list[int] = []
        self.cached = 0

    def reserve(self, length: int) -> None:
        need = self.pool.pages_for(length) - len(self.pages)
        if need > 0:
            self.pages += self.pool.alloc(need)

    def release(self) -> None:
        self.pool.free(self.pages)
        self.cached = 0
