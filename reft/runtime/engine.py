"""The engine: one forward entry for every batch shape, over runtime-owned KV pages.

A step runs the plan's `forward` entry once on a flattened batch of chunks; each chunk is
the next `n` uncached tokens of one sequence (a whole prompt, a prompt piece, or the one
new token of a decode step), so prefill, decode, chunked prefill and mixed batches are all
the same call.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import backends
from ..errors import RequestError
from .kv_cache import PagePool, Sequence
from .plan import Plan


@dataclass
class Chunk:
    seq: Sequence
    n: int                 # process seq.tokens[seq.cached : seq.cached + n]
    logits: str = "last"   # "last" | "all" | "none"


class Engine:
    def __init__(self, plan: Plan, *, kv_tokens: int | None = None, max_batch_tokens: int | None = None,
                 backend_options: backends.BackendOptions | None = None, prefix_caching: bool = True,
                 threads: int | None = None):
        """backend_options: what the plan's backend loads it with (e.g. the cpu backend's threads);
        `threads=` is shorthand for BackendOptions(threads=...)."""
        self.plan = plan
        self.exe = backends.load(plan, backend_options or backends.BackendOptions(threads=threads))
        self.context_length = plan.context_length
        limit = int(plan.manifest.get("max_batch_tokens") or 512)
        self.max_batch_tokens = min(max_batch_tokens or limit, limit)
        pages = -(-(kv_tokens or self.context_length) // plan.kv["page_size"])
        self.pool = PagePool(plan.kv, pages, self.exe.zeros, prefix_caching)

    @classmethod
    def load(cls, path: str | Path, **kw) -> "Engine":
        return cls(Plan(path), **kw)

    @property
    def tokenizer(self):
        return self.plan.tokenizer

    def new_sequence(self, tokens: list[int]) -> Sequence:
        return Sequence(self.pool, tokens)

    def step(self, chunks: list[Chunk]) -> list[np.ndarray]:
        """Run one forward call; returns each chunk's logits rows ([0|1|n, V] float32)."""
        ids, pos, sid, rows, counts = [], [], [], [], []
        for s, c in enumerate(chunks):
            seq, start = c.seq, c.seq.cached
            if start + c.n > len(seq.tokens):
                raise ValueError("chunk goes past the sequence's tokens")
            if start + c.n > self.context_length:
                raise RequestError(f"sequence of {start + c.n} tokens exceeds the model's context of"
                                   f" {self.context_length}")
            seq.reserve(start + c.n)
            base = len(ids)
            ids += seq.tokens[start:start + c.n]
            pos += range(start, start + c.n)
            sid += [s] * c.n
            want = {"last": [c.n - 1], "all": list(range(c.n)), "none": []}[c.logits]
            rows += [base + r for r in want]
            counts.append(len(want))
        mp = max(len(c.seq.pages) for c in chunks)
        table = np.zeros((len(chunks), mp), np.int32)
        for s, c in enumerate(chunks):
            table[s, :len(c.seq.pages)] = c.seq.pages
        feeds = {"input_ids": np.asarray(ids, np.int32), "positions": np.asarray(pos, np.int32),
                 "seq_ids": np.asarray(sid, np.int32), "logit_rows": np.asarray(rows, np.int32),
                 "page_table": table, **self.pool.arrays}
        logits = self.exe.run(feeds)["logits"]
        for c in chunks:
            c.seq.cached += c.n
        return list(np.split(np.asarray(logits, np.float32), np.cumsum(counts)[:-1]))

    def prefill(self, seq: Sequence, logits: str = "last") -> np.ndarray:
        """Process every uncached token of `seq` in pieces of at most max_batch_tokens."""
        out = []
        while seq.cached < len(seq.tokens):
            n = min(self.max_batch_tokens, len(seq.tokens) - seq.cached)
            last = seq.cached + n == len(seq.tokens)
            mode = logits if logits == "all" else ("last" if last and logits == "last" else "none")
            out.append(self.step([Chunk(seq, n, mode)])[0])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits of every position of one sequence ([len(tokens), V]), on a fresh cache."""
        seq = self.new_sequence(tokens)
        try:
            return self.prefill(seq, logits="all")
        finally:
            seq.release()
