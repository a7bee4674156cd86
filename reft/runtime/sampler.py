"""Token sampling on the host: penalties, greedy, temperature, top-k, top-p, min-p, seeded; logprobs.

Per token, in this order (vLLM's and transformers' order):
0. logit_bias (OpenAI): {token id: bias} added to the logits first, as if the model had said it
   (-100 bans a token, +100 all but forces it).
1. repetition_penalty r (CTRL / transformers): every token seen in the prompt or the output has
   its logit divided by r when positive, multiplied by r when negative.
2. frequency and presence penalties (OpenAI): logit -= frequency x count in the output
   + presence x (count > 0).
3. temperature 0 takes the argmax; otherwise logits / temperature, then top-k, top-p (the
   smallest set of most likely tokens whose mass reaches p) and min-p (drop tokens below
   min_p x the top probability), renormalised, and one seeded draw.
4. structured output: tokens outside the sequence's grammar mask (`allowed`, computed per
   sequence by reft/runtime/grammar.py) get -inf after the penalties, so every rule above works
   on the grammar's tokens only; greedy takes the best allowed token.
Logprobs are of the model's own distribution (log-softmax of the raw logits), before any of
the above, as vLLM reports them by default.
"""
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None

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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise RequestError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for tok, bias in (self.logit_bias or {}).items():
            if tok < 0 or not -100 <= bias <= 100:
                raise RequestError(f"logit_bias: token ids must be >= 0 and biases in [-100, 100], got {tok}: {bias}")

    @property
    def penalized(self) -> bool:
        """Whether the logits change before sampling (penalties or logit_bias)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)


@dataclass(frozen=True)
class DeviceDraw:
    """One token to draw where the logits are (the cuda backend's sample kernel): the row's
    temperature, top_k, top_p and the uniform number the host draw would have used."""
    temperature: float
    top_k: int
    top_p: float
    u: float


class Sampler:
    """Draws tokens for one sequence; `prompt_ids` matter only to the repetition penalty."""

    def __init__(self, params: SamplingParams, prompt_ids=()):
        params.validate()
        self.params = params
        self.rng = np.random.default_rng(None if params.seed is None else params.seed % 2**64)  # any int seeds
        self.prompt_ids = np.asarray(prompt_ids, np.int64)

    def penalize(self, logits: np.ndarray, output_ids=(), allowed: np.ndarray | None = None) -> np.ndarray:
        """Logits (float64) after logit_bias, the repetition, frequency and presence penalties, and
        -inf where `allowed` (a bool mask over the vocabulary) is False."""
        p = self.params
        z = np.array(logits, np.float64).reshape(-1)
        if allowed is not None:
            z[~allowed[:z.size]] = -np.inf
        if not p.penalized:
            return z
        if p.logit_bias:
            ids = np.fromiter(p.logit_bias, np.int64)
            keep = ids < z.size
            z[ids[keep]] += np.fromiter(p.logit_bias.values(), np.float64)[keep]
        out = np.asarray(output_ids, np.int64)
        if p.repetition_penalty != 1.0:
            seen = np.unique(np.concatenate([self.prompt_ids, out]))
            seen = seen[(seen >= 0) & (seen < z.size)]
            z[seen] = np.where(z[seen] > 0, z[seen] / p.repetition_penalty, z[seen] * p.repetition_penalty)
        if out.size and (p.frequency_penalty or p.presence_penalty):
            counts = np.bincount(out[out < z.size], minlength=z.size)
            z -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        return z

    def distribution(self, logits: np.ndarray, output_ids=(), allowed: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, their probabilities) that a draw at temperature > 0 chooses among."""
        p = self.params
        z = self.penalize(logits, output_ids, allowed) / p.temperature
        idx = np.arange(z.size)
        if 0 < p.top_k < z.size:   # the k largest, ties at the k-th to the lower id; in decreasing order, so a
            kth = np.partition(z, z.size - p.top_k)[z.size - p.top_k]   # draw does not depend on numpy's internals
            above = np.flatnonzero(z > kth)
            idx = np.concatenate([above, np.flatnonzero(z == kth)[:p.top_k - above.size]])
            idx = idx[np.lexsort((idx, -z[idx]))]
            z = z[idx]
        if p.top_p < 1.0:  # needs the tokens in order of probability
            order = np.argsort(-z, kind="stable")
            idx, z = idx[order], z[order]
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        keep = probs > 0     # masked-out tokens (-inf) have none
        if p.top_p < 1.0:
            keep[int(np.searchsorted(np.cumsum(probs), p.top_p) + 1):] = False
        if p.min_p > 0:
            keep &= probs >= p.min_p * probs.max()
        keep[int(np.argmax(probs))] = True
        idx, probs = idx[keep], probs[keep]
        return idx, probs / probs.sum()

    @property
    def on_device(self) -> bool:
        """Whether the device can draw this sequence's tokens: nothing changes the logits first
        (penalties, logit_bias) and no min_p; a grammar or logprobs are the caller's to check."""
        return not self.params.penalized and self.params.min_p == 0

    def device_draw(self) -> DeviceDraw:
        """The next token's draw for the device (needs `on_device`). It takes from the seeded
        generator exactly what __call__ would (one number at temperature > 0, none at 0), so a
        seed gives the same stream of draws on either path."""
        p = self.params
        u = float(min(np.float32(self.rng.random()), np.float32(1) - np.finfo(np.float32).epsneg)) \
            if p.temperature > 0 else 0.0
        return DeviceDraw(float(p.temperature), int(p.top_k), float(p.top_p), u)

    def __call__(self, logits: np.ndarray, output_ids=(), allowed: np.ndarray | None = None) -> int:
        """The next token; `allowed` (bool per vocabulary id) restricts it to a grammar's tokens,
        of which there must be at least one."""
        if self.params.temperature == 0:
            z = self.penalize(logits, output_ids, allowed) if self.params.penalized or allowed is not None else logits
            return int(np.argmax(z))
        idx, probs = self.distribution(logits, output_ids, allowed)
        cdf = np.cumsum(probs)
        return int(idx[min(int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")), idx.size - 1)])


def logprobs(logits: np.ndarray, token: int, top: int = 0) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of `token` under the raw logits, and the `top` most likely (id, logprob)."""
    z = np.asarray(logits, np.float64).reshape(-1)
    m = z.max()
    lp = z - (m + np.log(np.exp(z - m).sum()))
    best: list[tuple[int, float]] = []
    if top > 0:
        k = min(top, lp.size)
        ids = np.argpartition(-lp, k - 1)[:k]
        ids = ids[np.argsort(-lp[ids], kind="stable")]
        best = [(int(i), float(lp[i])) for i in ids]
    return float(lp[token]), best
