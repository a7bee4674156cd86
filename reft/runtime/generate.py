"""One request at a time.

- `stream()` runs a single request through `ServingEngine` (scheduler, sampler, stop tokens and
  strings, length limits, special tokens, incremental detokenizing): what `reft run --prompt` and
  `--chat` use, so they behave exactly like a served request.
- `generate()` is the plain prefill-then-decode loop over token ids, with no scheduler, pages
  shared or text. It is the reference the batched scheduler is tested against (tests/runtime/
  test_scheduler.py), and what parity tests use for raw greedy ids; it is not a user-facing path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from ..errors import ReftError, RequestError
from .engine import Chunk, Engine
from .sampler import Sampler, SamplingParams
from .serving import Request, RequestOutput, ServingEngine


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()


def check_prompt(engine: Engine, prompt_ids: list[int], context_length: int | None = None) -> None:
    context_length = context_length or engine.context_length
    if not prompt_ids:
        raise RequestError("the prompt is empty")
    if len(prompt_ids) >= context_length:
        raise RequestError(f"the prompt is {len(prompt_ids)} tokens but the model's context is"
                           f" {context_length} tokens")
    vocab = engine.plan.manifest.get("vocab_size")
    if vocab and (min(prompt_ids) < 0 or max(prompt_ids) >= vocab):
        raise RequestError(f"prompt token id out of range [0, {vocab})")


def stream(serving: ServingEngine, req: Request) -> Iterator[RequestOutput]:
    """Run one request alone, yielding each step's output (the last one has finish_reason set).
    max_tokens past the context is cut to what fits (generation stops at the context end)
    rather than refused, as a terminal user expects."""
    check_prompt(serving.engine, req.prompt_ids, serving.max_model_len)
    req.max_tokens = min(req.max_tokens, serving.max_model_len - len(req.prompt_ids))
    serving.add(req)
    try:
        while serving.has_work:
            for out in serving.step():
                if out.finish_reason == "error":
                    raise ReftError(out.error or "generation failed")
                yield out
                if out.finished:
                    return
    finally:
        serving.abort(req.id)   # a no-op unless the caller stopped early (Ctrl-C, a closed pipe)


def generate(engine: Engine, req: GenerationRequest) -> Iterator[int]:
    """Yields generated token ids; stops at a stop token (not yielded), max_tokens or the context end."""
    check_prompt(engine, req.prompt_ids)
    if req.max_tokens <= 0:
        raise RequestError(f"max_tokens must be > 0, got {req.max_tokens}")
    sample = Sampler(req.sampling, req.prompt_ids)
    seq = engine.new_sequence(req.prompt_ids)
    out: list[int] = []
    try:
        logits = engine.prefill(seq)[-1]
        for _ in range(req.max_tokens):
            tok = sample(logits, out)
            if tok in req.stop_token_ids:
                return
            out.append(tok)
            yield tok
            if len(seq.tokens) + 1 > engine.context_length:
                return
            seq.tokens.append(tok)
            logits = engine.step([Chunk(seq, 1)])[0][-1]
    finally:
        seq.release()
