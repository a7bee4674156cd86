"""Speculative decoding: cheap drafts of the next tokens, verified by the target in one forward step.

A drafter proposes up to k tokens to follow each decoding sequence; `ServingEngine` appends them
to the sequence, runs the target once over the last sampled token plus the drafts (every row's
logits), and then samples row by row with the sequence's own sampler: while the sampled token
equals the draft, the next row is valid and sampling goes on; the first token that differs (or
the token after the last draft) is kept and ends the step. The K/V written for rejected drafts is
dropped by rolling the sequence's cached length back.

Notable:
- Drafts are point guesses (the draft model's greedy choice, or a prompt-lookup continuation), so
  the rejection-sampling rule — accept draft d with probability min(1, p(d)/q(d)), else sample
  from the residual max(p - q, 0) — with q a point mass on d reduces to: draw from the target's
  distribution p and accept d exactly when the draw is d. The output distribution is unchanged,
  and since each draw uses the same sampler and RNG stream as plain decoding, greedy output and
  seeded samples are the very tokens plain decoding would produce.
- Sequences that follow a grammar, score their prompt or have one token left to generate are not
  drafted for; everything else about a request (stop strings, logprobs, penalties) works per
  verified token exactly as in plain decoding.
- `NgramDrafter` (prompt lookup, as in llama.cpp's lookup decoding and vLLM's `ngram`): find the
  most recent earlier occurrence of the sequence's last n tokens (n from `max_n` down to `min_n`)
  and propose the tokens that followed it. No second model; it shines when the output copies its
  input (editing, summarising, code).
- `ModelDrafter`: a second, smaller or more heavily quantized plan with the same tokenizer keeps
  its own page pool and one draft sequence per target sequence; each step it catches up on the
  tokens the target accepted (reusing the K/V of the common prefix) and decodes k greedy tokens,
  batched across sequences.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ReftError
from .engine import Chunk, Engine
from .kv_cache import Sequence


@dataclass
class SpecStats:
    steps: int = 0        # verification steps (one per drafted sequence per forward)
    drafted: int = 0      # draft tokens proposed and verified
    accepted: int = 0     # draft tokens the target accepted
    emitted: int = 0      # tokens produced by verification steps (accepted drafts + one per step, at most)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens generated per verification step (1 = no draft accepted)."""
        return self.emitted / self.steps if self.steps else 0.0


class NgramDrafter:
    """Prompt-lookup drafting over the sequence's own tokens (prompt and output)."""

    name = "ngram"

    def __init__(self, k: int, max_n: int = 3, min_n: int = 2):
        if not 1 <= min_n <= max_n:
            raise ReftError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.k, self.max_n, self.min_n = k, max_n, min_n

    def propose(self, wanted: dict[Sequence, int]) -> dict[Sequence, list[int]]:
        """Up to wanted[seq] draft tokens for each sequence (none where nothing matches)."""
        out = {}
        for seq, k in wanted.items():
            d = lookup(seq.tokens, k, self.max_n, self.min_n)
            if d:
                out[seq] = d
        return out

    def release(self, seq: Sequence) -> None:
        pass


def lookup(tokens: list[int], k: int, max_n: int, min_n: int) -> list[int]:
    """The (at most k) tokens that followed the latest earlier occurrence of the last n tokens,
    trying the longest n first; [] when no suffix of at least min_n tokens occurred before."""
    a = np.asarray(tokens, np.int64)
    L = a.size
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        suffix = a[L - n:]
        # windows starting at 0..L-n-1 (the suffix itself, at L-n, is excluded)
        win = np.lib.stride_tricks.sliding_window_view(a[:L - 1], n)
        hits = np.flatnonzero((win == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return a[start:start + k].tolist()
    return []


class ModelDrafter:
    """Greedy drafts from a second plan (same tokenizer) with its own KV pages."""

    name = "draft"

    def __init__(self, engine: Engine, k: int, target_vocab: int, target_tokenizer):
        vocab = int(engine.plan.manifest.get("vocab_size") or engine.tokenizer.vocab_size)
        if vocab != target_vocab or not same_tokenizer(engine.tokenizer, target_tokenizer):
            raise ReftError(f"--draft {engine.plan.path}: its tokenizer differs from the target plan's"
                            f" (vocabulary {vocab} vs {target_vocab}); a draft plan must share the tokenizer")
        self.engine, self.k = engine, k
        self._seqs: dict[Sequence, Sequence] = {}   # target sequence -> its draft sequence

    def release(self, seq: Sequence) -> None:
        d = self._seqs.pop(seq, None)
        if d is not None:
            d.release()

    def _sync(self, seq: Sequence) -> Sequence:
        """The draft sequence of `seq`, its tokens made equal to the target's (keeping the K/V of the
        common prefix)."""
        d = self._seqs.get(seq)
        if d is None:
            d = self._seqs[seq] = self.engine.new_sequence([])
        common = 0
        for a, b in zip(d.tokens, seq.tokens):
            if a != b:
                break
            common += 1
        d.tokens = list(seq.tokens)
        d.cached = min(d.cached, common, len(d.tokens) - 1)
        return d

    def propose(self, wanted: dict[Sequence, int]) -> dict[Sequence, list[int]]:
        eng = self.engine
        drafts = {seq: self._sync(seq) for seq in wanted}
        budget = eng.max_batch_tokens
        live: dict[Sequence, Sequence] = {}
        for seq, d in drafts.items():   # room for the catch-up and the k drafts in the draft pool?
            need = eng.pool.pages_for(len(d.tokens) + wanted[seq]) - len(d.pages)
            if need <= eng.pool.free_pages and len(d.tokens) + wanted[seq] <= eng.context_length:
                d.reserve(len(d.tokens) + wanted[seq])
                live[seq] = d
            else:
                self.release(seq)
        out: dict[Sequence, list[int]] = {seq: [] for seq in live}
        # catch up: process every uncached token (a new prompt, or what the target accepted)
        pending = {seq: d for seq, d in live.items()}
        last: dict[Sequence, np.ndarray] = {}
        while pending:
            chunks, owners = [], []
            left = budget
            for seq, d in pending.items():
                n = min(len(d.tokens) - d.cached, left)
                if n <= 0:
                    break
                done = d.cached + n == len(d.tokens)
                chunks.append(Chunk(d, n, "last" if done else "none"))
                owners.append(seq)
                left -= n
            rows = eng.step(chunks)
            for seq, c, r in zip(owners, chunks, rows):
                if c.logits == "last":
                    last[seq] = r[-1]
                    del pending[seq]
        # k greedy steps, batched
        active = list(live)
        for _ in range(max(wanted[s] for s in live) if live else 0):
            for seq in active:
                tok = int(np.argmax(last[seq]))
                out[seq].append(tok)
                live[seq].tokens.append(tok)
            active = [s for s in active if len(out[s]) < wanted[s]]
            if not active:
                break
            rows = eng.step([Chunk(live[s], 1) for s in active])
            for s, r in zip(active, rows):
                last[s] = r[-1]
        return out


def same_tokenizer(a, b) -> bool:
    """Whether two plans' tokenizers map text to the same ids (same vocabulary and specials)."""
    va, vb = a.backend.get_vocab(with_added_tokens=True), b.backend.get_vocab(with_added_tokens=True)
    return va == vb and tuple(a.eos_token_ids) == tuple(b.eos_token_ids)


def make_drafter(draft_plan, ngram: bool, k: int, target: Engine, backend_options=None):
    """The drafter `reft run` asked for: --draft PLAN, --spec-ngram, or None."""
    if draft_plan is not None and ngram:
        raise ReftError("give at most one of --draft PLAN and --spec-ngram")
    if ngram:
        return NgramDrafter(k)
    if draft_plan is None:
        return None
    vocab = int(target.plan.manifest.get("vocab_size") or target.tokenizer.vocab_size)
    engine = Engine.load(draft_plan, kv_tokens=target.pool.num_pages * target.pool.page_size,
                         backend_options=backend_options, prefix_caching=False)
    return ModelDrafter(engine, k, vocab, target.tokenizer)
