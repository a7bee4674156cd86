"""Perplexity over a token stream (llama-perplexity's job).

The tokens are cut into consecutive windows of `ctx` tokens, each evaluated on a fresh KV
cache. Within a window every token after the first is scored (predicted from the tokens
before it in the same window); the first token of each window is context only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import RequestError
from .engine import Engine


@dataclass
class PerplexityResult:
    ppl: float
    mean_nll: float
    tokens_scored: int
    windows: int


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64."""
    z = logits.astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))[:, 0]
    return lse - z[np.arange(len(targets)), targets]


def perplexity(engine: Engine, tokens: list[int], ctx: int | None = None, progress=None) -> PerplexityResult:
    ctx = min(ctx or engine.context_length, engine.context_length)
    if ctx < 2:
        raise RequestError(f"--ctx must be at least 2, got {ctx}")
    if len(tokens) < 2:
        raise RequestError("the text has fewer than 2 tokens; nothing to score")
    total, n, windows = 0.0, 0, 0
    for start in range(0, len(tokens) - 1, ctx):
        window = tokens[start:start + ctx]
        if len(window) < 2:
            break
        logits = engine.logits(window)
        total += float(token_nll(logits[:-1], np.asarray(window[1:])).sum())
        n += len(window) - 1
        windows += 1
        if progress:
            progress(len(window))
    mean = total / n
    return PerplexityResult(math.exp(mean), mean, n, windows)
