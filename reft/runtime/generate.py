"""Single-request generation: prefill the prompt, then decode one token per step."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from ..errors import RequestError
from .engine import Chunk, Engine
from .sampler import Sampler, SamplingParams


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()


def check_prompt(engine: Engine, prompt_ids: list[int]) -> None:
    if not prompt_ids:
        raise RequestError("the prompt is empty")
    if len(prompt_ids) >= engine.context_length:
        raise RequestError(f"the prompt is {len(prompt_ids)} tokens but the model's context is"
                           f" {engine.context_length} tokens")
    vocab = engine.plan.manifest.get("vocab_size")
    if vocab and (min(prompt_ids) < 0 or max(prompt_ids) >= vocab):
        raise RequestError(f"prompt token id out of range [0, {vocab})")


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
