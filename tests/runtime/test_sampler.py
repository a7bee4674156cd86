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
