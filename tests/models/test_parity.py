"""Parity with Hugging Face transformers on tiny random-weight models of every family.

Final logits of a 32-token prompt within 1e-4 (float32), 32 greedy tokens identical through
reft's generation loop (prefill + paged-KV decode), perplexity within 1e-4 relative.
"""
from __future__ import annotations

import numpy as np
import pytest
from hf_tiny import CASES, hf_greedy, hf_logits, hf_mean_nll, make_model

from reft.compiler import compile_model
from reft.runtime.engine import Engine
from reft.runtime.generate import GenerationRequest, generate
from reft.runtime.perplexity import perplexity
from reft.runtime.sampler import SamplingParams

TEXT = ("One day, a little girl named Lily found a needle in her room. She knew it was difficult to play "
        "with it because it was sharp. Lily wanted to share the needle with her mom.")


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_case(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    model_dir, hf = make_model(request.param, d / "hf")
    return request.param, model_dir, hf


@pytest.fixture(scope="module", params=["reference", "cpu"])
def case(request, hf_case, tmp_path_factory):
    name, model_dir, hf = hf_case
    plan = compile_model(model_dir, tmp_path_factory.mktemp("plan") / "plan", backend=request.param, progress=False)
    return f"{name}/{request.param}", hf, Engine.load(plan)


def prompt_ids(n=32, seed=1):
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(3, 512, n - 1).tolist()


def test_logits_match(case):
    name, hf, engine = case
    ids = prompt_ids()
    want = hf_logits(hf, ids)
    got = engine.logits(ids)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-4, name
    assert np.abs(want).max() > 1.0  # the weights are not near-trivial


def test_greedy_tokens_match(case):
    name, hf, engine = case
    ids = prompt_ids(seed=2)
    want = hf_greedy(hf, ids, 32)
    req = GenerationRequest(ids, 32, SamplingParams(temperature=0.0))
    got = list(generate(engine, req))
    assert got == want, name


def test_perplexity_matches(case):
    name, hf, engine = case
    ids = engine.tokenizer.encode(TEXT)
    want = float(np.exp(hf_mean_nll(hf, ids)))
    got = perplexity(engine, ids).ppl
    assert abs(got - want) / want < 1e-4, (name, got, want)


def test_chunked_prefill_and_batched_decode_match_single(case):
    """Mixed batches (a prompt piece of one sequence beside decode steps of others) give the same
    logits as each sequence alone."""
    from reft.runtime.engine import Chunk

    name, hf, engine = case
    a, b = prompt_ids(20, seed=3), prompt_ids(9, seed=4)
    want_a, want_b = hf_logits(hf, a), hf_logits(hf, b)
    sa, sb = engine.new_sequence(a), engine.new_sequence(b)
    try:
        la, lb = engine.step([Chunk(sa, 7, "all"), Chunk(sb, 9, "last")])
        assert np.abs(la - want_a[:7]).max() < 1e-4 and np.abs(lb - want_b[-1:]).max() < 1e-4
        la, = engine.step([Chunk(sa, 13, "all")])
        assert np.abs(la - want_a[7:]).max() < 1e-4
    finally:
        sa.release()
        sb.release()
