"""The engine: one forward entry for every batch shape, over runtime-owned KV pages.

A step runs the plan's `forward` entry once on a flattened batch of chunks; each chunk is
the next `n` uncached tokens of one sequence (a whole prompt, a prompt piece, or the one
new token of a decode step), so prefill, decode, chunked prefill and mixed batches are all
the same call.

The rows a step returns are the forward entry's one output at the rows each chunk asks for:
logits for a generate plan, hidden states for an embed plan (`task="embed"`, runtime/embed.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import backends
from ..errors import PlanError, ReftError, RequestError
from .kv_cache import PagePool, Sequence
from .lora import AdapterSlots
from .memory import KvBudget
from .plan import Plan


OUTPUTS = {"generate": "logits", "embed": "hidden_states"}   # task -> the forward entry's output
TASK_MISMATCH = {
    ("embed", "generate"): "{plan} was compiled with --task embed: it computes embeddings, not text; serve it"
                           " with `reft run PLAN --serve` and POST /v1/embeddings",
    ("generate", "embed"): "{plan} was compiled for generation; compile the model with `reftc compile MODEL -o"
                           " PLAN --task embed` to compute embeddings",
}


@dataclass
class Chunk:
    seq: Sequence
    n: int                 # process seq.tokens[seq.cached : seq.cached + n]
    logits: str = "last"   # rows returned: "last" | "all" | "first" | "none"


class Engine:
    def __init__(self, plan: Plan, *, kv_tokens: int | None = None, kv_budget: KvBudget | None = None,
                 max_batch_tokens: int | None = None, backend_options: backends.BackendOptions | None = None,
                 prefix_caching: bool = True, threads: int | None = None, task: str = "generate"):
        """kv_tokens: KV-cache slots in the page pool (default: one full context); kv_budget: size the
        pool instead from the memory free where the executable keeps it (host memory, or device
        memory once the weights are on the GPU); backend_options: what the plan's backend loads it
        with (e.g. the cpu backend's threads); `threads=` is shorthand for
        BackendOptions(threads=...); task: what the caller needs the plan to compute (a plan compiled
        for another task is a PlanError)."""
        if plan.task != task:
            raise PlanError(TASK_MISMATCH.get((plan.task, task), f"{plan.path} is a {plan.task} plan, not a {task} one")
                            .format(plan=plan.path))
        self.plan = plan
        self.output = OUTPUTS[task]
        self.exe = backends.load(plan, backend_options or backends.BackendOptions(threads=threads))
        self.context_length = plan.context_length
        limit = int(plan.manifest.get("max_batch_tokens") or 512)
        self.max_batch_tokens = min(max_batch_tokens or limit, limit)
        if kv_budget is not None:
            pages = kv_budget.pages(PagePool.page_bytes(plan.kv), plan.kv["page_size"], self.context_length,
                                    self.exe.free_memory())
        else:
            pages = -(-(kv_tokens or self.context_length) // plan.kv["page_size"])
        self.pool = PagePool(plan.kv, pages, self.exe.zeros, prefix_caching)
        layout = plan.manifest.get("lora")   # --max-loras: adapter slots (runtime/lora.py)
        self.adapters = AdapterSlots(layout, self.exe.zeros) if layout else None
        # whether reproducible sequences can be promised: the backend has a batch-invariant mode
        self.supports_reproducible = bool(getattr(self.exe, "supports_reproducible", False))

    @classmethod
    def load(cls, path: str | Path, **kw) -> "Engine":
        return cls(Plan(path), **kw)

    @property
    def tokenizer(self):
        return self.plan.tokenizer

    def new_sequence(self, tokens: list[int], reproducible: bool = False) -> Sequence:
        """reproducible: the sequence's logits must not depend on what else is in its steps or on how
        its prompt was split (seeded sampling); a backend without such a mode refuses it."""
        return self.adapter_sequence(tokens, None, reproducible)

    def adapter_sequence(self, tokens: list[int], adapter: str | None, reproducible: bool = False) -> Sequence:
        """A sequence whose tokens run through the loaded LoRA adapter `adapter` (None: the base model)."""
        if reproducible and not self.supports_reproducible:
            raise RequestError("reproducible results need a cpu plan compiled by this version of reftc"
                               f" ({self.plan.path}: its backend has no reproducible mode, or its kernels predate it)")
        if adapter is None:
            return Sequence(self.pool, tokens, reproducible=reproducible)
        if self.adapters is None:
            raise RequestError(f"LoRA adapter {adapter!r} requested, but this plan has no adapter slots"
                               " (compile it with --max-loras N)")
        try:
            slot = self.adapters.slot(adapter)
        except ReftError as e:
            raise RequestError(str(e)) from None
        return Sequence(self.pool, tokens, adapter=slot, salt=b"lora:" + adapter.encode() + b"\0",
                        reproducible=reproducible)

    def step(self, chunks: list[Chunk]) -> list[np.ndarray]:
        """Run one forward call; returns each chunk's rows ([0|1|n, V] float32 logits; [.., D] hidden
        states on an embed plan)."""
        feeds, counts = self._feeds(chunks)
        logits = self.exe.run(feeds)[self.output]
        self._advance(chunks)
        return list(np.split(np.asarray(logits, np.float32), np.cumsum(counts)[:-1]))

    @property
    def samples_on_device(self) -> bool:
        """Whether step_sampled works: the backend draws tokens where the logits are (cuda)."""
        return self.output == "logits" and bool(getattr(self.exe, "samples_on_device", False))

    def step_sampled(self, chunks: list[Chunk], draws: list) -> list[int | None]:
        """Run one forward call and draw each chunk's next token on the device, so only token ids
        come back: draws[i] is chunk i's DeviceDraw (runtime/sampler.py; the chunk's logits must be
        "last") or None (its logits must be "none"). Returns each chunk's token, or None."""
        if len(draws) != len(chunks) or any(c.logits != ("none" if d is None else "last") for c, d in zip(chunks, draws)):
            raise ValueError("step_sampled: a draw for each chunk whose logits are 'last', None where 'none'")
        feeds, _ = self._feeds(chunks)
        ds = [d for d in draws if d is not None]
        ids = self.exe.run_sampled(feeds, [d.temperature for d in ds], [d.top_k for d in ds], [d.top_p for d in ds],
                                   [d.u for d in ds])
        self._advance(chunks)
        it = iter(ids.tolist())
        return [None if d is None else next(it) for d in draws]

    def _advance(self, chunks: list[Chunk]) -> None:
        for c in chunks:
            c.seq.cached += c.n

    def _feeds(self, chunks: list[Chunk]) -> tuple[dict, list[int]]:
        """The forward entry's inputs for a step of these chunks, and how many rows each asks for."""
        ids, pos, sid, rows, counts, slots = [], [], [], [], [], []
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
            slots += [seq.adapter] * c.n
            want = {"last": [c.n - 1], "all": list(range(c.n)), "first": [0], "none": []}[c.logits]
            rows += [base + r for r in want]
            counts.append(len(want))
        mp = max(len(c.seq.pages) for c in chunks)
        table = np.zeros((len(chunks), mp), np.int32)
        for s, c in enumerate(chunks):
            table[s, :len(c.seq.pages)] = c.seq.pages
        feeds = {"input_ids": np.asarray(ids, np.int32), "positions": np.asarray(pos, np.int32),
                 "seq_ids": np.asarray(sid, np.int32), "logit_rows": np.asarray(rows, np.int32),
                 "page_table": table, **self.pool.arrays}
        if self.adapters is not None:
            feeds.update(self.adapters.feeds(slots))
        if self.supports_reproducible:   # a reproducible sequence makes the whole step run that way
            self.exe.set_deterministic(any(c.seq.reproducible for c in chunks))
        return feeds, counts

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
