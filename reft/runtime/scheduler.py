"""Continuous batching: which tokens of which sequences the next forward step processes.

Pure Python over `Sequence` records; the engine runs what `schedule()` returns. Policy per step:
1. Running sequences first, oldest first: a decode needs its one new token; a prompt still being
   prefilled gets its next piece. Together at most `max_batch_tokens` tokens (so long prompts
   are processed in chunks, mixed with the decodes of other sequences).
2. When the page pool cannot hold a running sequence's next tokens, the newest running
   sequence is preempted: its pages are dropped and it goes back to the front of the queue, to
   be recomputed later (its tokens so far become its prompt). Recompute, not swap: the prefix
   cache often still holds its pages.
3. Then waiting sequences are admitted in arrival order while fewer than `max_num_seqs` run and
   tokens and pages are left; on admission a sequence first shares the cached pages of its
   longest cached prompt prefix. Admission never preempts.
A sequence with `all_logits` set (its prompt is being scored) gets the logits of every row it is
scheduled, and shares no cached prefix.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..errors import RequestError
from .engine import Chunk
from .kv_cache import PagePool, Sequence


@dataclass
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(c.n for c in self.chunks)


class Scheduler:
    def __init__(self, pool: PagePool, *, max_num_seqs: int, max_batch_tokens: int):
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """A sequence leaves (finished or aborted): its pages go back to the pool."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.release()

    def _preempt_newest(self, plan: StepPlan) -> Sequence:
        victim = self.running.pop()
        victim.release()
        self.waiting.appendleft(victim)
        plan.preempted.append(victim)
        self.preemptions += 1
        return victim

    @staticmethod
    def _chunk(seq: Sequence, n: int) -> Chunk:
        if seq.all_logits:
            return Chunk(seq, n, "all")
        return Chunk(seq, n, "last" if seq.cached + n == len(seq.tokens) else "none")

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_batch_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq.tokens) - seq.cached, budget)
            need = self.pool.pages_for(seq.cached + n) - len(seq.pages)
            while need > self.pool.free_pages and self._preempt_newest(plan) is not seq:
                pass
            if seq not in self.running:  # it was the newest itself
                break
            seq.reserve(seq.cached + n)
            plan.chunks.append(self._chunk(seq, n))
            budget -= n
            i += 1
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            if not seq.pages and not seq.all_logits:
                seq.match_prefix()
            n = min(len(seq.tokens) - seq.cached, budget)
            if self.pool.pages_for(seq.cached + n) - len(seq.pages) > self.pool.free_pages:
                if not seq.all_logits:
                    seq.unmatch_prefix()  # give shared pages back; they stay cached for the next try
                break
            self.waiting.popleft()
            seq.reserve(seq.cached + n)
            self.running.append(seq)
            plan.chunks.append(self._chunk(seq, n))
            budget -= n
        return plan

    def completed(self, plan: StepPlan) -> None:
        """After the step ran: offer newly filled pages to the prefix cache."""
        for c in plan.chunks:
            c.seq.register_pages()


class BatchingEngine:
    """What the generation and embedding engines (serving.py, embed.py) share around the scheduler:
    the page pool and scheduler over an Engine, the requests in flight by id and by sequence, their
    registration and removal, and the counts the server reports. Subclasses set `_finish(state,
    reason, error=None)`, which ends a request and calls `_forget`."""

    def __init__(self, engine, *, max_num_seqs: int, max_batch_tokens: int | None, max_model_len: int | None):
        self.engine = engine
        self.pool = engine.pool
        self.tokenizer = engine.tokenizer
        self.scheduler = Scheduler(self.pool, max_num_seqs=max_num_seqs,
                                   max_batch_tokens=min(max_batch_tokens or engine.max_batch_tokens,
                                                        engine.max_batch_tokens))
        # a lone sequence must always fit in the pool, or preemption could not make progress
        self.max_model_len = min(max_model_len or engine.context_length, engine.context_length,
                                 self.pool.num_pages * self.pool.page_size)
        self.vocab_size = int(engine.plan.manifest.get("vocab_size") or self.tokenizer.vocab_size)
        self._states: dict = {}    # request id -> its state (.req, .seq)
        self._by_seq: dict = {}    # Sequence -> its state
        self.prompt_tokens_total = 0

    def _admit(self, st) -> None:
        """Start tracking a checked request's state and queue its sequence."""
        if st.req.id in self._states:
            raise RequestError(f"request id {st.req.id!r} is already in flight")
        self._states[st.req.id] = st
        self._by_seq[st.seq] = st
        self.scheduler.add(st.seq)
        self.prompt_tokens_total += len(st.req.prompt_ids)

    def _forget(self, st) -> None:
        """Stop tracking a request; its pages go back to the pool."""
        self.scheduler.remove(st.seq)
        del self._states[st.req.id]
        del self._by_seq[st.seq]

    def abort(self, request_id: str):
        """Cancel a request; its pages go back to the pool. None if it is not in flight."""
        st = self._states.get(request_id)
        return None if st is None else self._finish(st, "abort")

    def fail_all(self, error: str) -> list:
        """End every request in flight with finish reason "error" (after an unexpected failure)."""
        return [self._finish(st, "error", error) for st in list(self._states.values())]

    def _fail_step(self, plan: StepPlan, e: Exception) -> list:
        """A step that raised fails its requests, not the server."""
        return [self._finish(self._by_seq[c.seq], "error", f"{type(e).__name__}: {e}") for c in plan.chunks]

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)
