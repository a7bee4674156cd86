"""Host sampling against distributions computed independently here."""
from __future__ import annotations

import numpy as np
import pytest

from reft.errors import RequestError
from reft.runtime.sampler import Sampler, SamplingParams

LOGITS = np.log(np.array([0.05, 0.5, 0.15, 0.3], np.float32))  # probabilities at temperature 1


def freqs(params, n=20000, logits=LOGITS):
    s = Sampler(params)
    counts = np.bincount([s(logits) for _ in range(n)], minlength=len(logits))
    return counts / n


def test_greedy_is_argmax():
    assert Sampler(SamplingParams(temperature=0))(LOGITS) == 1


def test_full_distribution():
    f = freqs(SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=0))
    assert np.abs(f - [0.05, 0.5, 0.15, 0.3]).max() < 0.015


def test_temperature_sharpens():
    p = np.exp(LOGITS / 0.5)
    p /= p.sum()
    f = freqs(SamplingParams(temperature=0.5, top_p=1.0, top_k=0, seed=1))
    assert np.abs(f - p).max() < 0.015


def test_top_k():
    f = freqs(SamplingParams(temperature=1.0, top_p=1.0, top_k=2, seed=2))
    assert f[0] == 0 and f[2] == 0
    assert abs(f[1] - 0.5 / 0.8) < 0.015


def test_top_p_keeps_smallest_set_reaching_p():
    f = freqs(SamplingParams(temperature=1.0, top_p=0.75, top_k=0, seed=3))
    assert f[0] == 0 and f[2] == 0 and abs(f[3] - 0.3 / 0.8) < 0.015


def test_min_p():
    f = freqs(SamplingParams(temperature=1.0, top_p=1.0, top_k=0, min_p=0.35, seed=4))
    assert f[0] == 0 and f[2] == 0 and f[3] > 0  # 0.15 < 0.35 * 0.5 <= 0.3


def test_seed_reproducible():
    s1, s2 = Sampler(SamplingParams(seed=9, temperature=1.0)), Sampler(SamplingParams(seed=9, temperature=1.0))
    draws = [s1(LOGITS) for _ in range(50)]
    assert draws == [s2(LOGITS) for _ in range(50)] and len(set(draws)) > 1


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=2)])
def test_invalid_params(bad):
    with pytest.raises(RequestError):
        Sampler(SamplingParams(**bad))


# --- penalties, top-k / top-p / min-p together, logprobs: against a plain-Python re-implementation ----
def reference_probs(logits, prm: SamplingParams, prompt, output) -> dict[int, float]:
    """The sampling distribution written out the long way, token by token."""
    import math

    z = [float(x) for x in logits]
    for t in set(prompt) | set(output):          # repetition penalty (CTRL / transformers)
        z[t] = z[t] / prm.repetition_penalty if z[t] > 0 else z[t] * prm.repetition_penalty
    for t in set(output):                          # OpenAI frequency + presence penalties
        z[t] -= prm.frequency_penalty * output.count(t) + prm.presence_penalty
    z = [x / prm.temperature for x in z]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    if prm.top_k:
        order = order[:prm.top_k]
    total = sum(math.exp(z[i] - z[order[0]]) for i in order)
    p = {i: math.exp(z[i] - z[order[0]]) / total for i in order}
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += p[i]
        if prm.top_p < 1 and mass >= prm.top_p:
            break
    kept = [i for i in kept if p[i] >= prm.min_p * p[order[0]]]
    total = sum(p[i] for i in kept)
    return {i: p[i] / total for i in kept}


CASES = [dict(temperature=0.7, top_p=1.0, top_k=0, repetition_penalty=1.3),
         dict(temperature=1.0, top_p=0.8, top_k=0, presence_penalty=0.9, frequency_penalty=0.4),
         dict(temperature=1.3, top_p=1.0, top_k=7, min_p=0.05, frequency_penalty=-0.5),
         dict(temperature=0.9, top_p=0.6, top_k=20, min_p=0.1, presence_penalty=-1.0, repetition_penalty=0.8)]


@pytest.mark.parametrize("case", CASES)
def test_distribution_matches_reference(case):
    rng = np.random.default_rng(11)
    logits = rng.normal(0, 2, 60).astype(np.float32)
    prompt, output = [1, 2, 3, 5, 8], [8, 13, 13, 21, 21, 21, 40]
    prm = SamplingParams(**case)
    idx, probs = Sampler(prm, prompt).distribution(logits, output)
    want = reference_probs(logits, prm, prompt, output)
    assert dict(zip(idx.tolist(), probs.tolist())) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_penalized_draws_follow_the_distribution():
    logits = np.log(np.array([0.1, 0.4, 0.2, 0.3], np.float32))
    prm = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=5, frequency_penalty=0.5, presence_penalty=0.2)
    want = reference_probs(logits, prm, [], [1, 1, 3])
    s = Sampler(prm)
    f = np.bincount([s(logits, [1, 1, 3]) for _ in range(20000)], minlength=4) / 20000
    assert np.abs(f - [want.get(i, 0.0) for i in range(4)]).max() < 0.015


def test_greedy_takes_argmax_after_penalties():
    logits = np.array([0.0, 3.0, 2.9, -1.0], np.float32)
    prm = SamplingParams(temperature=0, repetition_penalty=1.2)
    assert Sampler(prm)(logits) == 1
    assert Sampler(prm, prompt_ids=[1])(logits) == 2       # 3.0 / 1.2 = 2.5 < 2.9


def test_logprobs_match_log_softmax():
    import math

    from reft.runtime.sampler import logprobs

    logits = np.random.default_rng(3).normal(0, 3, 40).astype(np.float32)
    denom = sum(math.exp(float(x)) for x in logits)
    ref = [math.log(math.exp(float(x)) / denom) for x in logits]
    lp, top = logprobs(logits, 7, 3)
    assert lp == pytest.approx(ref[7], abs=1e-9)
    best = sorted(range(40), key=lambda i: -ref[i])[:3]
    assert [t for t, _ in top] == best and [v for _, v in top] == pytest.approx([ref[i] for i in best], abs=1e-9)
