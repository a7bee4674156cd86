"""KV-cache pages: a fixed pool of pages per layer, owned by the runtime, shared by prefix.

The pool is a set of arrays `kv_cache.{layer}.{k|v}` of shape [num_pages, page_size, Hkv, D]
(the graph's cache inputs, named by the manifest's kv_cache record); a latent cache (multi-head
latent attention) is one array `kv_cache.{layer}.latent` per layer, [num_pages, page_size, 1, C + R].
Sequences own lists of page ids (their page table).

Notable:
- Pages are reference-counted so sequences that share a prompt prefix share its *full* pages.
  A full page is named by a hash chained over every token up to its end (`page_hash`), so one
  hash names one exact prefix; `PagePool.lookup` finds a cached page by that name.
- A page whose last user leaves keeps its contents and its hash: it becomes *evictable* and is
  handed out again, least recently freed first, only when no never-used page is left. A later
  request with the same prefix revives it instead of recomputing it.
- A sequence served through a LoRA adapter (reft/runtime/lora.py) computes other K/V than the
  base model for the same tokens: its page names chain from the adapter's name, so prefixes are
  shared only between sequences of the same adapter.
- A sequence never writes into a page it shares: `Sequence.match_prefix` takes only pages that
  lie wholly before the sequence's last token, which is always recomputed (its logits are
  needed), so writes start on a page of the sequence's own.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from ..errors import RequestError


def page_hash(parent: bytes, tokens) -> bytes:
    """Name of a full page: its tokens chained onto the name of the page before it."""
    return hashlib.blake2b(parent + np.asarray(tokens, np.int64).tobytes(), digest_size=16).digest()


class PagePool:
    def __init__(self, layout: dict, num_pages: int, zeros, prefix_caching: bool = True):
        self.page_size = layout["page_size"]
        self.num_pages = num_pages
        self.prefix_caching = prefix_caching
        shape = (num_pages, self.page_size, layout["kv_heads"], layout["head_dim"])
        self.arrays = {name: zeros(shape, layout["dtype"]) for name in layout["inputs"]}
        self._free = list(range(num_pages - 1, -1, -1))   # never used or forgotten: pop() takes the lowest
        self._refs = [0] * num_pages
        self._hash: dict[int, bytes] = {}                   # page -> its name, for cached pages
        self._index: dict[bytes, int] = {}                  # name -> page
        self._evictable: OrderedDict[int, None] = OrderedDict()   # cached pages nobody uses, oldest first
        self.queries = 0   # full prompt pages looked up
        self.hits = 0      # ... and found

    @staticmethod
    def page_bytes(layout: dict) -> int:
        """Bytes one page takes over all layers (K and V)."""
        item = np.dtype(np.float32 if layout["dtype"] == "float32" else np.float16).itemsize
        return len(layout["inputs"]) * layout["page_size"] * layout["kv_heads"] * layout["head_dim"] * item

    @property
    def free_pages(self) -> int:
        """Pages an allocation can take: unused ones and cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def used_pages(self) -> int:
        return self.num_pages - self.free_pages

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def alloc(self, n: int) -> list[int]:
        if n > self.free_pages:
            raise RequestError(f"KV cache full: need {n} more pages, {self.free_pages} free")
        out = []
        for _ in range(n):
            if self._free:
                p = self._free.pop()
            else:  # recycle the cached page freed longest ago
                p, _ = self._evictable.popitem(last=False)
                del self._index[self._hash.pop(p)]
            self._refs[p] = 1
            out.append(p)
        return out

    def free(self, pages: list[int]) -> None:
        """Drop one reference to each page (the list is emptied); last pages go back first."""
        for p in reversed(pages):
            self._refs[p] -= 1
            if self._refs[p] == 0:
                if p in self._hash:
                    self._evictable[p] = None
                else:
                    self._free.append(p)
        pages.clear()

    # --- prefix caching ----------------------------------------------------------------------------
    def lookup(self, name: bytes) -> int | None:
        return self._index.get(name) if self.prefix_caching else None

    def share(self, page: int) -> None:
        """Take one more reference to a cached page (reviving it if nobody held it)."""
        self._refs[page] += 1
        self._evictable.pop(page, None)

    def register(self, page: int, name: bytes) -> None:
        """Record that `page` now holds the full prefix `name` (first writer wins)."""
        if self.prefix_caching and name not in self._index and page not in self._hash:
            self._index[name] = page
            self._hash[page] = name

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (pages in use stay in use)."""
        for p in self._evictable:
            self._free.append(p)
        self._evictable.clear()
        self._index.clear()
        self._hash.clear()


class Sequence:
    """A sequence's tokens and the pages that hold its cached K/V (positions 0..cached-1)."""

    def __init__(self, pool: PagePool, tokens: list[int] | None = None, adapter: int = -1, salt: bytes = b"",
                 reproducible: bool = False):
        """adapter: the LoRA adapter slot its tokens run through (-1: the base model); salt: the
        adapter's name, which the names of its cached pages chain from; reproducible: every step
        with this sequence runs in the backend's reproducible mode (Engine.step), and its pages are
        named apart, so it reuses only K/V computed that way."""
        self.pool = pool
        self.tokens: list[int] = list(tokens or [])
        self.adapter, self._salt = adapter, (b"reproducible\0" if reproducible else b"") + salt
        self.reproducible = reproducible
        self.pages: list[int] = []
        self.cached = 0
        self._names: list[bytes] = []   # names of the leading full pages, as far as computed
        self._offered = 0               # leading pages already offered to the prefix cache
        self.all_logits = False         # scoring the prompt: the scheduler asks for every row's logits
                                        # and shares no cached prefix (each position must be computed)

    def reserve(self, length: int) -> None:
        need = self.pool.pages_for(length) - len(self.pages)
        if need > 0:
            self.pages += self.pool.alloc(need)

    def release(self) -> None:
        self.pool.free(self.pages)
        self.cached = self._offered = 0

    def _name(self, i: int) -> bytes:
        """Name of full page i (computed once, in order)."""
        ps = self.pool.page_size
        while len(self._names) <= i:
            j = len(self._names)
            self._names.append(page_hash(self._names[-1] if j else self._salt, self.tokens[j * ps:(j + 1) * ps]))
        return self._names[i]

    def match_prefix(self) -> int:
        """On an empty sequence, share the cached pages of its longest cached prompt prefix and
        count the lookup in the pool's hit rate; returns the tokens that need no computing. The
        last token is never covered (its logits are needed)."""
        assert not self.pages and self.cached == 0
        pool = self.pool
        if not pool.prefix_caching:
            return 0
        full = (len(self.tokens) - 1) // pool.page_size
        for i in range(full):
            page = pool.lookup(self._name(i))
            if page is None:
                break   # later pages cannot hit: their names chain through this one
            pool.share(page)
            self.pages.append(page)
        pool.queries += full
        pool.hits += len(self.pages)
        self.cached = len(self.pages) * pool.page_size
        self._offered = len(self.pages)
        return self.cached

    def unmatch_prefix(self) -> None:
        """Undo match_prefix (the sequence was not admitted after all), stats included."""
        pool = self.pool
        if pool.prefix_caching:
            pool.queries -= (len(self.tokens) - 1) // pool.page_size
            pool.hits -= len(self.pages)
        self.release()

    def register_pages(self) -> None:
        """Offer every full page of computed tokens to the prefix cache."""
        pool = self.pool
        if not pool.prefix_caching:
            return
        for i in range(self._offered, min(self.cached // pool.page_size, len(self.pages))):
            pool.register(self.pages[i], self._name(i))
            self._offered = i + 1
