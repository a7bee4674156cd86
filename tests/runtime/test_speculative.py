"""Speculative decoding (reft/runtime/speculative.py) checked against plain decoding.

The bar: with a drafter, every request gives exactly the tokens it gives without one — greedy and
seeded sampling, inside continuous batching, with preemption, stop tokens and max_tokens — and
drafts that match are actually accepted (the rows of one forward are used, not recomputed).
"""
from __future__ import annotations

import numpy as np
import pytest

from test_scheduler import alone

from reft.errors import ReftError
from reft.runtime.engine import Engine
from reft.runtime.sampler import SamplingParams
from reft.runtime.serving import Request, ServingEngine
from reft.runtime.speculative import ModelDrafter, NgramDrafter, lookup

GREEDY = SamplingParams(temperature=0)


def naive_lookup(tokens, k, max_n, min_n):
    for n in range(max_n, min_n - 1, -1):
        if n >= len(tokens):
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + k]
    return []


def test_lookup_matches_a_plain_search():
    rng = np.random.default_rng(0)
    for _ in range(300):
        toks = rng.integers(0, 6, rng.integers(1, 40)).tolist()
        k, max_n = int(rng.integers(1, 6)), int(rng.integers(1, 5))
        min_n = int(rng.integers(1, max_n + 1))
        assert lookup(toks, k, max_n, min_n) == naive_lookup(toks, k, max_n, min_n), (toks, k, max_n, min_n)
    assert lookup([1, 2, 3, 9, 1, 2, 3], 3, 3, 2) == [9, 1, 2]       # the latest earlier occurrence
    assert lookup([5, 6, 7], 4, 3, 2) == []


@pytest.fixture(scope="module")
def engine(stories_plan):
    return Engine.load(stories_plan, kv_tokens=4096)


def repetitive_prompts(engine, n, seed=0):
    """Prompts that repeat text, so prompt lookup has something to find, and random ones."""
    tok = engine.tokenizer
    story = tok.encode("Once upon a time there was a little dog. The little dog liked to run in the park."
                       " Once upon a time there was a little")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i % 2:
            out.append(story[:1] + rng.integers(3, 500, rng.integers(5, 40)).tolist())
        else:
            out.append(story[:int(rng.integers(len(story) // 2, len(story)))])
    return out


def run_all(serving, reqs):
    out = {r.id: [] for r in reqs}
    text = {r.id: "" for r in reqs}
    finish = {}
    for r in reqs:
        serving.add(r)
    steps = 0
    while serving.has_work:
        for o in serving.step():
            out[o.request_id] += o.token_ids
            text[o.request_id] += o.text
            if o.finished:
                finish[o.request_id] = (o.finish_reason, o.completion_tokens)
        steps += 1
        assert steps < 10_000
    return out, text, finish, steps


def test_ngram_greedy_equals_plain_decoding_in_a_batch(engine):
    ps = repetitive_prompts(engine, 6)
    want = [alone(engine, p, 40) for p in ps]
    serving = ServingEngine(engine, max_num_seqs=6, drafter=NgramDrafter(4), spec_tokens=4)
    got, _, finish, steps = run_all(serving, [Request(f"r{i}", p, 40, GREEDY, ignore_eos=True)
                                              for i, p in enumerate(ps)])
    assert [got[f"r{i}"] for i in range(6)] == want
    assert all(f == ("length", 40) for f in finish.values())
    s = serving.spec
    assert s.drafted > 0 and s.accepted > 0 and s.emitted == s.steps + s.accepted
    assert steps < 40 + 2                      # accepted drafts saved steps
    assert engine.pool.used_pages == 0


def test_seeded_sampling_and_text_equal_plain_decoding(engine):
    ps = repetitive_prompts(engine, 4, seed=1)
    params = lambda i: SamplingParams(temperature=0.7, top_p=0.95, top_k=0, seed=7 + i,  # noqa: E731
                                      frequency_penalty=0.3)
    reqs = lambda: [Request(f"r{i}", p, 30, params(i), stop=("park",), ignore_eos=True)  # noqa: E731
                    for i, p in enumerate(ps)]
    plain = run_all(ServingEngine(engine, max_num_seqs=4), reqs())
    spec_engine = ServingEngine(engine, max_num_seqs=4, drafter=NgramDrafter(3, max_n=2, min_n=1), spec_tokens=3)
    spec = run_all(spec_engine, reqs())
    assert spec[0] == plain[0] and spec[1] == plain[1] and spec[2] == plain[2]
    assert spec_engine.spec.accepted > 0


def test_preemption_with_drafts_recomputes_to_the_same_output(stories_plan):
    eng = Engine.load(stories_plan, kv_tokens=16 * 14)
    ps = repetitive_prompts(eng, 6, seed=2)
    want = [alone(eng, p, 40) for p in ps]
    serving = ServingEngine(eng, max_num_seqs=6, drafter=NgramDrafter(4), spec_tokens=4)
    got, *_ = run_all(serving, [Request(f"r{i}", p, 40, GREEDY, ignore_eos=True) for i, p in enumerate(ps)])
    assert serving.scheduler.preemptions > 0
    assert [got[f"r{i}"] for i in range(6)] == want
    assert eng.pool.used_pages == 0


def test_stop_token_inside_accepted_drafts(engine):
    p = repetitive_prompts(engine, 1)[0]
    free = alone(engine, p, 30)
    stop = free[12]
    serving = ServingEngine(engine, drafter=NgramDrafter(6), spec_tokens=6)
    got, _, finish, _ = run_all(serving, [Request("s", p, 30, GREEDY, stop_token_ids=(stop,), ignore_eos=True)])
    assert got["s"] == free[:free.index(stop)]
    assert finish["s"][0] == "stop"


@pytest.fixture(scope="module")
def draft_plan(tmp_path_factory, stories_dir):
    from reft.compiler import compile_model

    return compile_model(stories_dir, tmp_path_factory.mktemp("plans") / "draft", progress=False,
                         dtype="float16")


@pytest.mark.parametrize("which", ["float16", "itself"])
def test_draft_model_greedy_equals_plain_decoding(engine, draft_plan, stories_plan, which):
    ps = repetitive_prompts(engine, 5, seed=3)
    want = [alone(engine, p, 32) for p in ps]
    draft = Engine.load(draft_plan if which == "float16" else stories_plan, kv_tokens=4096, prefix_caching=False)
    drafter = ModelDrafter(draft, 4, 512, engine.tokenizer)
    serving = ServingEngine(engine, max_num_seqs=5, drafter=drafter, spec_tokens=4)
    got, *_ = run_all(serving, [Request(f"r{i}", p, 32, GREEDY, ignore_eos=True) for i, p in enumerate(ps)])
    assert [got[f"r{i}"] for i in range(5)] == want
    # the model drafting for itself is always right; a float16 copy nearly always
    assert serving.spec.acceptance_rate > (0.95 if which == "itself" else 0.8)
    assert draft.pool.used_pages == 0 and engine.pool.used_pages == 0


def test_draft_with_another_tokenizer_is_refused(engine, draft_plan):
    draft = Engine.load(draft_plan, kv_tokens=256)
    with pytest.raises(ReftError, match="tokenizer differs"):
        ModelDrafter(draft, 4, 1000, engine.tokenizer)
