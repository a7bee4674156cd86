"""Embeddings: pooled hidden states of an embed plan, for many requests batched together.

An embed plan (`reftc compile --task embed`) is fed exactly as a generate plan, but its forward
entry returns the final norm's output instead of logits. `EmbeddingEngine.step()` runs one
forward call for every scheduled sequence, through the generation path's Engine (paged K/V) and
Scheduler (continuous batching, chunked prefill), pools each finished sequence's rows into one
vector and returns the finished embeddings.

Notable:
- Pooling decides which rows each chunk asks the plan for, so only those leave the forward:
  `last` (Qwen3-Embedding and other decoder embedders) the last token's row, on the chunk that
  ends the sequence; `cls` the first token's row, on the chunk that starts it; `mean` every row.
- Inputs longer than a step's token budget are prefilled in chunks between other sequences'
  chunks; `mean` keeps a running sum over the chunks.
- With `last` pooling a prompt prefix cached by an earlier request (a shared instruction) is not
  recomputed (the last token always is); `mean` and `cls` read the rows of the prefix itself, so
  their sequences share no cached pages.
- A sequence that starts over from its first token (a preemption) starts its pooled state over.
- `dimensions` (Matryoshka-style) keeps the first N dimensions of the pooled vector before the L2
  normalisation, so a truncated embedding is unit length too.
- The request interface (check / add / abort / fail_all / step / has_work, outputs with
  `request_id` and `finished`) is ServingEngine's, so AsyncEngine runs this engine in the
  server's background thread as it runs generation.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import ReftError, RequestError
from .engine import Engine
from .kv_cache import Sequence
from .scheduler import BatchingEngine

POOLINGS = ("last", "mean", "cls")


@dataclass(frozen=True)
class EmbeddingOptions:
    """How the server turns hidden states into embeddings (`reft run PLAN --serve --pooling ...`)."""
    pooling: str = "last"        # last | mean | cls
    normalize: bool = True       # L2-normalise each embedding
    matryoshka: bool = False     # requests may ask for fewer `dimensions` (the model was trained for it)

    def check(self) -> None:
        if self.pooling not in POOLINGS:
            raise ReftError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLINGS)}")

    def describe(self) -> str:
        return (f"{self.pooling} pooling, {'L2-normalised' if self.normalize else 'not normalised'}"
                + (", Matryoshka dimensions" if self.matryoshka else ""))


@dataclass
class EmbedRequest:
    """One input to embed (a request with several inputs submits one of these per input)."""
    id: str
    prompt_ids: list[int]
    dimensions: int | None = None    # keep the first N dimensions (needs EmbeddingOptions.matryoshka)
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class EmbedOutput:
    request_id: str
    embedding: np.ndarray | None = None    # float32 [D or dimensions], when finished with "stop"
    prompt_tokens: int = 0
    finish_reason: str | None = None       # "stop" | "abort" | "error"
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def rows_needed(pooling: str, start: int, n: int, total: int) -> str:
    """The rows (an engine Chunk's mode) that a chunk of tokens start..start+n of a `total`-token
    sequence contributes to its pooled vector."""
    if pooling == "mean":
        return "all"
    if pooling == "cls":
        return "first" if start == 0 else "none"
    return "last" if start + n == total else "none"


def finish_vector(pooled: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """Truncate to `dimensions` (Matryoshka), then L2-normalise (a zero vector stays zero)."""
    v = np.asarray(pooled[:dimensions] if dimensions else pooled, np.float64)
    if normalize:
        v = v / max(float(np.linalg.norm(v)), 1e-12)
    return v.astype(np.float32)


class _State:
    def __init__(self, req: EmbedRequest, seq: Sequence):
        self.req, self.seq = req, seq
        self.pooled: np.ndarray | None = None   # the row (last, cls) or the running sum of rows (mean)

    def take(self, pooling: str, start: int, rows: np.ndarray) -> None:
        if pooling == "mean":
            total = rows.sum(axis=0, dtype=np.float64)
            self.pooled = total if start == 0 else self.pooled + total
        elif len(rows):
            self.pooled = rows[0].astype(np.float64)

    def vector(self, pooling: str) -> np.ndarray:
        return self.pooled / len(self.seq.tokens) if pooling == "mean" else self.pooled


class EmbeddingEngine(BatchingEngine):
    def __init__(self, engine: Engine, options: EmbeddingOptions = EmbeddingOptions(), *, max_num_seqs: int = 64,
                 max_batch_tokens: int | None = None, max_model_len: int | None = None, observer=None):
        """engine: an Engine on an embed plan (Engine(plan, task="embed")); observer: optional, its
        .finish(output) is called as each request ends (the server's metrics)."""
        options.check()
        if engine.output != "hidden_states":
            raise ReftError("EmbeddingEngine needs an Engine loaded with task='embed'")
        super().__init__(engine, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens,
                         max_model_len=max_model_len)
        self.options = options
        self.hidden_size = int(engine.plan.manifest["entry_points"]["forward"]["outputs"]["hidden_states"]["shape"][-1])
        self.observer = observer

    # --- requests in and out -----------------------------------------------------------------------
    def check(self, req: EmbedRequest) -> None:
        """Raise RequestError naming what is wrong with a request that cannot be served."""
        n = len(req.prompt_ids)
        if n == 0:
            raise RequestError("the input is empty")
        if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= self.vocab_size:
            raise RequestError(f"input token id out of range [0, {self.vocab_size})")
        if n > self.max_model_len:
            raise RequestError(f"the input has {n} tokens, more than this model's context of {self.max_model_len}")
        d = req.dimensions
        if d is not None and d != self.hidden_size:
            if not self.options.matryoshka:
                raise RequestError(f"dimensions {d}: this server returns the model's {self.hidden_size} dimensions"
                                   " (start it with --matryoshka for a model trained to be truncated)")
            if not 1 <= d <= self.hidden_size:
                raise RequestError(f"dimensions must be from 1 to {self.hidden_size}, got {d}")

    def add(self, req: EmbedRequest) -> None:
        self.check(req)
        seq = self.engine.new_sequence(req.prompt_ids)
        seq.all_logits = self.options.pooling != "last"   # no shared prefix: its rows are needed
        self._admit(_State(req, seq))

    # --- one step ----------------------------------------------------------------------------------
    def step(self) -> list[EmbedOutput]:
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return []
        starts = [c.seq.cached for c in plan.chunks]
        for c, start in zip(plan.chunks, starts):
            c.logits = rows_needed(self.options.pooling, start, c.n, len(c.seq.tokens))
        try:
            rows = self.engine.step(plan.chunks)
        except Exception as e:  # noqa: BLE001 - one bad step fails its requests, not the server
            return self._fail_step(plan, e)
        self.scheduler.completed(plan)
        outs = []
        for c, start, r in zip(plan.chunks, starts, rows):
            st = self._by_seq[c.seq]
            st.take(self.options.pooling, start, r)
            if start + c.n == len(c.seq.tokens):
                outs.append(self._finish(st, "stop"))
        return outs

    def _finish(self, st: _State, reason: str, error: str | None = None) -> EmbedOutput:
        out = EmbedOutput(st.req.id, prompt_tokens=len(st.req.prompt_ids), finish_reason=reason, error=error)
        if reason == "stop":
            out.embedding = finish_vector(st.vector(self.options.pooling), st.req.dimensions, self.options.normalize)
        self._forget(st)
        if self.observer is not None:
            self.observer.finish(out)
        return out

    # --- in-process use ----------------------------------------------------------------------------
    def embed(self, inputs: list[list[int]], dimensions: int | None = None) -> np.ndarray:
        """Embeddings of several token-id inputs, batched ([len(inputs), D or dimensions] float32)."""
        reqs = [EmbedRequest(f"embed-{i}", list(ids), dimensions) for i, ids in enumerate(inputs)]
        for r in reqs:
            self.check(r)
        for r in reqs:
            self.add(r)
        done: dict[str, EmbedOutput] = {}
        while self.has_work:
            for out in self.step():
                done[out.request_id] = out
        failed = next((o for o in done.values() if o.finish_reason != "stop"), None)
        if failed is not None:
            raise RequestError(f"embedding failed: {failed.error}")
        return np.stack([done[r.id].embedding for r in reqs])
