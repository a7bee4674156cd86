"""Many requests at once: the scheduler, the engine's batched step and per-request sampling.

`ServingEngine.step()` runs one forward call for every scheduled sequence and returns what each
request gained from it (new text, tokens, logprobs, a finish reason). It is synchronous and
single-threaded; `AsyncEngine` (async_engine.py) runs it in a background thread for the server.

Notable:
- Each choice of a request is its own `Sequence` with its own seeded `Sampler`, so a seed gives
  the same text whatever else runs beside it, and after a preemption the draw goes on where it
  stopped (the RNG is not reset by the recompute). The draws alone are not enough: a seeded
  request's sequence is reproducible (`reproducible="seeded"`, the default), so every step it is in
  runs the backend's batch-invariant kernels and it reuses only cached pages computed by them; its
  logits, hence its text, then do not depend on the batch, the chunking or the prefix cache.
- Text is produced here, token by token (IncrementalDecoder, then StopStrings holding back what
  could still turn into a stop string), so a stop string ends the sequence in the same step.
- EOS (generation_config's ids, unless ignore_eos) and `stop_token_ids` end a sequence with
  finish reason "stop"; the stopping token counts in usage but adds no text and no logprobs.
- Prompt scoring (`prompt_logprobs`): the prompt is prefilled with every row's logits (chunked
  prefill included) and without the prefix cache; each prompt token's logprob under the tokens
  before it comes back once, on the request's first output. max_tokens 0 then means "score only":
  the request ends with finish reason "length" after its prefill.
- Structured output (`Request.grammar`, reft/runtime/grammar.py): each constrained sequence has
  its own matcher; the masks of all constrained sequences sampling in a step are computed in one
  call after the forward and applied by their samplers, so constrained and free sequences share
  batches. The matcher takes each accepted token; EOS is allowed (even with ignore_eos) only where
  the grammar may end, and a sequence whose grammar is complete stops there ("stop").
- Speculative decoding (`drafter`, reft/runtime/speculative.py): after scheduling, decoding
  sequences get up to `spec_tokens` draft tokens appended to their chunk (within the step's token
  budget and the free pages); the step returns every row of those chunks, `_verify` samples them
  in order while the draws equal the drafts, and the sequence's tokens and cached length are
  rolled back to what was accepted before the prefix cache sees any page.
- LoRA adapters per request (`Request.adapter`, reft/runtime/lora.py): the sequence carries its
  adapter's slot into every step, so requests for different adapters and the base model batch.
- Sampling on the device (`Engine.samples_on_device`: cuda plans): when every token a step yields
  can be drawn by the device's sample kernel (no grammar, logprobs, penalties, logit_bias or
  min_p, no drafts, no prompt scoring), the samplers hand over their numbers (`device_draw`, the
  same numbers they would draw themselves) and only token ids come back, not R x vocab logits;
  otherwise the step brings the logits to the host as above.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import RequestError
from ..frontends.tokenizer import IncrementalDecoder
from .engine import Engine
from .grammar import Constraint, GrammarCompiler
from .kv_cache import Sequence
from .sampler import Sampler, SamplingParams, logprobs
from .scheduler import BatchingEngine
from .speculative import SpecStats
from .stop import StopStrings


REPRODUCIBLE = ("seeded", "all", "off")   # ServingEngine(reproducible=...): which requests run reproducibly


@dataclass
class Request:
    """One sequence to generate (a request with n choices submits n of these)."""
    id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None       # None: off; k: the sampled token's logprob and k alternatives
    prompt_logprobs: int | None = None  # None: off; k: each prompt token's logprob and k alternatives
    skip_special_tokens: bool = True
    grammar: Constraint | None = None   # structured output: the grammar the text must follow
    adapter: str | None = None          # a LoRA adapter loaded in the engine (None: the base model)
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class TokenLogprob:
    token: int
    logprob: float | None           # None only for a prompt's first token (nothing predicts it)
    top: list[tuple[int, float]]    # the most likely (id, logprob) at this position
    text: str                       # the text this token added to the stream (its pieces join to the text)
    prev: int                       # the token before it, to spell the alternatives in context


@dataclass
class RequestOutput:
    """What one request gained in one step."""
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None   # one per prompt token, on the first output only
    finish_reason: str | None = None      # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0                # prompt tokens served from the prefix cache
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _State:
    """A request in flight: its sequence, sampler, detokenizer and stop-string filter."""

    def __init__(self, req: Request, seq: Sequence, eos: tuple[int, ...], tokenizer):
        self.req, self.seq = req, seq
        self.sampler = Sampler(req.sampling, req.prompt_ids)
        self.matcher = req.grammar.start() if req.grammar is not None else None
        keep_eos = req.ignore_eos and self.matcher is None   # a grammar allows EOS only where it may end
        self.stops = frozenset(req.stop_token_ids) | (frozenset() if keep_eos else frozenset(eos))
        self.decoder = IncrementalDecoder(tokenizer, req.prompt_ids, skip_special_tokens=req.skip_special_tokens)
        self.text = StopStrings(req.stop)
        self.output: list[int] = []
        self.cached_tokens: int | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.prompt_logprobs: list[TokenLogprob] | None = None   # scored so far (prompt scoring only)
        self.prompt_logprobs_sent = False
        if req.prompt_logprobs is not None:
            first = req.prompt_ids[0]
            self.prompt_decoder = IncrementalDecoder(tokenizer, [first], skip_special_tokens=req.skip_special_tokens)
            text = tokenizer.decode([first], skip_special_tokens=req.skip_special_tokens)
            self.prompt_logprobs = [TokenLogprob(first, None, [], text, -1)]

    @property
    def prompt_scored(self) -> bool:
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) == len(self.req.prompt_ids)


class ServingEngine(BatchingEngine):
    def __init__(self, engine: Engine, *, max_num_seqs: int = 64, max_batch_tokens: int | None = None,
                 max_model_len: int | None = None, observer=None, drafter=None, spec_tokens: int = 4,
                 reproducible: str = "seeded"):
        """drafter: an NgramDrafter or ModelDrafter (speculative decoding) proposing up to
        `spec_tokens` tokens per decoding sequence and step; None decodes one token per step.
        reproducible: which requests run as reproducible sequences (Engine.new_sequence), where the
        backend has that mode: "seeded" (those with a seed), "all", or "off"."""
        if reproducible not in REPRODUCIBLE:
            raise RequestError(f"reproducible must be one of {', '.join(REPRODUCIBLE)}, got {reproducible!r}")
        super().__init__(engine, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens,
                         max_model_len=max_model_len)
        self.eos = tuple(self.tokenizer.eos_token_ids)
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size)
        self.observer = observer     # optional: .token(seconds, first=bool) and .finish(output)
        self.generation_tokens_total = 0
        if drafter is not None and spec_tokens < 1:
            raise RequestError(f"spec_tokens must be >= 1, got {spec_tokens}")
        self.drafter, self.spec_tokens = drafter, spec_tokens
        self.spec = SpecStats()
        self.reproducible = reproducible if engine.supports_reproducible else "off"

    # --- requests in and out -----------------------------------------------------------------------
    def check(self, req: Request) -> None:
        """Raise RequestError naming what is wrong with a request that cannot be served."""
        n = len(req.prompt_ids)
        if n == 0:
            raise RequestError("the prompt is empty")
        if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= self.vocab_size:
            raise RequestError(f"prompt token id out of range [0, {self.vocab_size})")
        if req.max_tokens < 0 or (req.max_tokens == 0 and req.prompt_logprobs is None):
            raise RequestError(f"max_tokens must be > 0 (0 only when scoring the prompt), got {req.max_tokens}")
        if n + req.max_tokens > self.max_model_len:
            raise RequestError(f"this model's maximum context length is {self.max_model_len} tokens, but the"
                               f" request needs {n + req.max_tokens} ({n} in the prompt + {req.max_tokens}"
                               " max_tokens); shorten the prompt or lower max_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(req, name) is not None and getattr(req, name) < 0:
                raise RequestError(f"{name} must be >= 0, got {getattr(req, name)}")
        req.sampling.validate()

    def add(self, req: Request) -> None:
        self.check(req)
        repro = self.reproducible == "all" or (self.reproducible == "seeded" and req.sampling.seed is not None)
        seq = self.engine.adapter_sequence(req.prompt_ids, req.adapter, reproducible=repro)
        seq.all_logits = req.prompt_logprobs is not None and len(req.prompt_ids) > 1
        self._admit(_State(req, seq, self.eos, self.tokenizer))

    # --- one step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return []
        starts = [c.seq.cached for c in plan.chunks]
        for c in plan.chunks:
            st = self._by_seq[c.seq]
            if st.cached_tokens is None:
                st.cached_tokens = c.seq.cached
        drafts: dict = {}
        try:
            drafts = self._draft(plan)
            draws = self._device_draws(plan.chunks, starts) if not drafts else None
            rows = self.engine.step(plan.chunks) if draws is None else self.engine.step_sampled(plan.chunks, draws)
        except Exception as e:  # noqa: BLE001 - one bad step fails its requests, not the server
            for seq, d in drafts.items():
                del seq.tokens[len(seq.tokens) - len(d):]
            return self._fail_step(plan, e)
        for seq, d in drafts.items():   # drafts leave the sequence until verified (the prefix cache
            del seq.tokens[len(seq.tokens) - len(d):]   # must never name a page after them)
            seq.cached = len(seq.tokens)
        self.scheduler.completed(plan)
        now = time.monotonic()
        outs, ready = [], []
        for c, start, r in zip(plan.chunks, starts, rows):
            st = self._by_seq[c.seq]
            if c.seq in drafts:
                outs.append(self._verify(st, r, drafts[c.seq], now))
                continue
            if c.logits == "all" and st.prompt_logprobs is not None:
                self._score_prompt(st, start, r)
            if c.logits != "none" and start + c.n == len(c.seq.tokens):
                if st.req.max_tokens:
                    ready.append((st, r if draws is not None else r[-1]))
                else:
                    outs.append(self._finish(st, "length"))
        if draws is not None:   # drawn on the device: token ids
            return outs + [self._advance(st, None, now, token=tok) for st, tok in ready]
        masks = self._masks([st for st, _ in ready])
        for st, logits in ready:
            outs.append(self._advance(st, logits, now, masks.get(st)))
        return outs

    def _device_draws(self, chunks, starts) -> list | None:
        """Each chunk's DeviceDraw (None for a chunk that yields no token) when the engine draws tokens
        on the device and every token of this step can be drawn there: no grammar, logprobs,
        penalties or min_p, no prompt logprobs, no request that wants none; else None (the logits
        come to the host). Only then does it take the draws' numbers from the samplers."""
        if not self.engine.samples_on_device:
            return None
        takers = []
        for c, start in zip(chunks, starts):
            st = self._by_seq[c.seq]
            if c.logits == "none":
                takers.append(None)
                continue
            if (c.logits != "last" or start + c.n != len(c.seq.tokens) or not st.req.max_tokens
                    or st.matcher is not None or st.req.logprobs is not None or not st.sampler.on_device):
                return None
            takers.append(st)
        return [None if st is None else st.sampler.device_draw() for st in takers]

    def _draft(self, plan) -> dict:
        """Append draft tokens to the chunks of decoding sequences (speculative decoding); returns
        {sequence: its drafts} for the chunks that got any."""
        if self.drafter is None:
            return {}
        left = self.scheduler.max_batch_tokens - plan.tokens
        wanted, chunks = {}, {}
        for c in plan.chunks:
            st = self._by_seq[c.seq]
            k = min(self.spec_tokens, st.req.max_tokens - len(st.output) - 1,
                    self.max_model_len - len(c.seq.tokens), left)
            if (k > 0 and c.n == 1 and c.logits == "last" and c.seq.cached + 1 == len(c.seq.tokens)
                    and st.matcher is None and st.output):
                wanted[c.seq], chunks[c.seq] = k, c
                left -= k
        if not wanted:
            return {}
        drafts = {}
        for seq, d in self.drafter.propose(wanted).items():
            pool = self.pool
            room = (pool.free_pages + len(seq.pages)) * pool.page_size - len(seq.tokens)
            d = d[:min(wanted[seq], room)]
            if not d:
                continue
            seq.tokens += d
            seq.reserve(len(seq.tokens))
            c = chunks[seq]
            c.n, c.logits = 1 + len(d), "all"
            drafts[seq] = d
        return drafts

    def _verify(self, st: _State, rows: np.ndarray, draft: list[int], now: float) -> RequestOutput:
        """Sample a drafted sequence's rows in order while the draws equal the drafts (rows[i] is
        the distribution after draft i-1); the K/V of accepted drafts stays cached."""
        out, accepted = None, 0
        for i, row in enumerate(rows):
            out = self._advance(st, row, now, out=out)
            if out.finished or i == len(draft) or st.output[-1] != draft[i]:
                break
            accepted += 1
        self.spec.steps += 1
        self.spec.drafted += len(draft)
        self.spec.accepted += accepted
        self.spec.emitted += i + 1
        if not out.finished:
            st.seq.cached = len(st.seq.tokens) - 1
        return out

    def _masks(self, states: list[_State]) -> dict[_State, np.ndarray]:
        """The grammar masks of the constrained sequences among `states`, computed together."""
        constrained = [st for st in states if st.matcher is not None]
        if not constrained:
            return {}
        allowed = self.grammars.allowed_tokens([st.matcher for st in constrained])
        return dict(zip(constrained, allowed))

    def _score_prompt(self, st: _State, start: int, rows: np.ndarray) -> None:
        """Record the logprobs of the prompt tokens that rows (the logits at positions start...)
        predict; positions scored before a preemption are not scored twice."""
        prompt, scored = st.req.prompt_ids, st.prompt_logprobs
        first = len(scored) - 1 - start                       # the row predicting prompt[len(scored)]
        last = min(len(rows), len(prompt) - 1 - start)        # rows up to the one predicting prompt[-1]
        if first < 0 or first >= last:
            return
        z = rows[first:last].astype(np.float64)
        m = z.max(axis=-1, keepdims=True)
        lp = z - (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))
        targets = prompt[start + first + 1:start + last + 1]
        k = min(st.req.prompt_logprobs, lp.shape[1])
        if k:
            tops = np.argpartition(-lp, k - 1, axis=-1)[:, :k]
            tops = np.take_along_axis(tops, np.argsort(-np.take_along_axis(lp, tops, -1), -1, kind="stable"), -1)
        for i, tok in enumerate(targets):
            top = [(int(t), float(lp[i, t])) for t in tops[i]] if k else []
            piece = st.prompt_decoder.push(tok)
            if len(scored) == len(prompt) - 1:
                piece += st.prompt_decoder.flush()
            scored.append(TokenLogprob(int(tok), float(lp[i, tok]), top, piece, int(prompt[start + first + i])))
        if st.prompt_scored:
            st.seq.all_logits = False   # the rest (decode, a recompute after preemption) is ordinary

    def _advance(self, st: _State, logits: np.ndarray | None, now: float, allowed: np.ndarray | None = None,
                 out: RequestOutput | None = None, token: int | None = None) -> RequestOutput:
        """Sample the next token of a sequence whose last token was just computed (among the
        `allowed` ones when it follows a grammar), or take `token`, drawn on the device; `out` is
        this step's output so far, when the step verifies drafts and yields several tokens."""
        req = st.req
        if allowed is not None and not allowed.any():
            why = st.matcher.get_error() or "dead end"
            return self._finish(st, "error", f"the grammar allows no token here ({why})")
        tok = token if token is not None else st.sampler(logits, st.output, allowed)
        st.output.append(tok)
        self.generation_tokens_total += 1
        if self.observer is not None:
            self.observer.token(now - (st.last_token_at or req.arrival), first=st.last_token_at is None)
        st.first_token_at = st.first_token_at or now
        st.last_token_at = now
        if out is None:
            out = self._output(st)
        out.completion_tokens = len(st.output)
        if tok in st.stops:
            return self._finish(st, "stop", out=out)
        out.token_ids.append(tok)
        piece = st.decoder.push(tok)
        if req.logprobs is not None:
            lp, top = logprobs(logits, tok, req.logprobs)
            out.logprobs.append(TokenLogprob(tok, lp, top, piece, st.seq.tokens[-1]))
        out.text += st.text.push(piece)
        if st.text.stopped:
            return self._finish(st, "stop", out=out)
        if st.matcher is not None:
            if not st.matcher.consume_token(tok):
                return self._finish(st, "error", f"the grammar rejected token {tok}: {st.matcher.get_error()}", out)
            if st.matcher.is_stopped():   # complete: nothing but EOS could follow
                return self._finish(st, "stop", out=out)
        if len(st.output) >= req.max_tokens or len(st.seq.tokens) + 1 > self.max_model_len:
            return self._finish(st, "length", out=out)
        st.seq.tokens.append(tok)
        return out

    def _output(self, st: _State) -> RequestOutput:
        out = RequestOutput(st.req.id, prompt_tokens=len(st.req.prompt_ids), completion_tokens=len(st.output),
                            cached_tokens=st.cached_tokens or 0)
        if st.prompt_scored and not st.prompt_logprobs_sent:
            out.prompt_logprobs, st.prompt_logprobs_sent = st.prompt_logprobs, True
        return out

    def _finish(self, st: _State, reason: str, error: str | None = None, out: RequestOutput | None = None):
        out = out or self._output(st)
        if reason in ("stop", "length") and not st.text.stopped:
            out.text += st.text.push(st.decoder.flush()) + st.text.flush()
        out.finish_reason, out.error = reason, error
        self._forget(st)
        if self.drafter is not None:
            self.drafter.release(st.seq)
        if self.observer is not None:
            self.observer.finish(out)
        return out
