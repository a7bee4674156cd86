"""Token sampling on the host: greedy, temperature, top-k, top-p, min-p, seeded."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40              # 0 = off
    min_p: float = 0.0
    seed: int | None = None

    def validate(self) -> None:
        from ..errors import RequestError

        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}")


class Sampler:
    def __init__(self, params: SamplingParams):
        params.validate()
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        logits = np.asarray(logits, np.float64).reshape(-1)
        if p.temperature == 0:
            return int(np.argmax(logits))
        z = logits / p.temperature
        idx = np.arange(z.size)
        if 0 < p.top_k < z.size:
            idx = np.argpartition(-z, p.top_k - 1)[:p.top_k]
        z = z[idx]
        order = np.argsort(-z, kind="stable")
        idx, z = idx[order], z[order]
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        keep = probs.size
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
        if p.min_p > 0:
            keep = min(keep, int(np.sum(probs >= p.min_p * probs[0])))
        probs = probs[:max(keep, 1)]
        probs /= probs.sum()
        return int(idx[self.rng.choice(probs.size, p=probs)])
