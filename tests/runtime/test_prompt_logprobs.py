"""Prompt scoring in the serving engine: every prompt token's logprob equals log-softmax of the
model's own logits (Engine.logits on a fresh cache), however the prefill is cut into chunks,
batched with other requests, preceded by prefix-cache hits or preempted; sent once."""
from __future__ import annotations

import numpy as np
import pytest

from reft.runtime.engine import Engine
from reft.runtime.sampler import SamplingParams
from reft.runtime.serving import Request, ServingEngine

GREEDY = SamplingParams(temperature=0)
TEXT = ("Once upon a time there was a little dog who liked to run in the park with his friends. One day he found"
        " a big red ball under a tree")


@pytest.fixture(scope="module")
def engine(stories_plan):
    return Engine.load(stories_plan, kv_tokens=4096)


def reference(engine, ids) -> np.ndarray:
    """log p(ids[i] | ids[:i]) for i >= 1, from the logits of every position."""
    z = engine.logits(ids).astype(np.float64)[:-1]
    m = z.max(1, keepdims=True)
    lp = z - m - np.log(np.exp(z - m).sum(1, keepdims=True))
    return lp[np.arange(len(ids) - 1), ids[1:]]


def run(serving, reqs):
    """Run to the end; every output of each request, in order."""
    outs = {r.id: [] for r in reqs}
    for r in reqs:
        serving.add(r)
    for _ in range(10_000):
        if not serving.has_work:
            return outs
        for o in serving.step():
            outs[o.request_id].append(o)
    raise AssertionError("did not finish")


def check_scored(engine, ids, outs, k):
    sent = [o.prompt_logprobs for o in outs if o.prompt_logprobs is not None]
    assert len(sent) == 1 and outs[0].prompt_logprobs is not None, "prompt logprobs come once, on the first output"
    lps = sent[0]
    assert [x.token for x in lps] == ids
    assert lps[0].logprob is None and lps[0].top == []
    np.testing.assert_allclose([x.logprob for x in lps[1:]], reference(engine, ids), atol=1e-5)
    for x in lps[1:]:
        assert len(x.top) == k
        if k:
            assert [v for _, v in x.top] == sorted((v for _, v in x.top), reverse=True)
            assert x.top[0][1] >= x.logprob - 1e-9
    assert "".join(x.text for x in lps) == engine.tokenizer.decode(ids, skip_special_tokens=True)


def test_chunked_prefill_beside_other_requests(engine):
    ids = engine.tokenizer.encode(TEXT)
    other = engine.tokenizer.encode("The cat sat")
    serving = ServingEngine(engine, max_num_seqs=4, max_batch_tokens=7)   # prefill in pieces of <= 7 tokens
    outs = run(serving, [Request("plain", other, 12, GREEDY, ignore_eos=True),
                         Request("scored", ids, 4, GREEDY, ignore_eos=True, prompt_logprobs=3),
                         Request("only", ids[:9], 0, GREEDY, prompt_logprobs=0)])
    check_scored(engine, ids, outs["scored"], 3)
    assert sum(len(o.token_ids) for o in outs["scored"]) == 4
    check_scored(engine, ids[:9], outs["only"], 0)
    assert len(outs["only"]) == 1 and outs["only"][0].finish_reason == "length"
    assert outs["only"][0].completion_tokens == 0 and not outs["only"][0].token_ids
    assert all(o.prompt_logprobs is None for o in outs["plain"])
    assert engine.pool.used_pages == 0


def test_scoring_ignores_the_prefix_cache(engine):
    ids = engine.tokenizer.encode(TEXT)
    serving = ServingEngine(engine, max_num_seqs=2)
    run(serving, [Request("warm", ids, 2, GREEDY, ignore_eos=True)])        # its full pages are now cached
    outs = run(serving, [Request("scored", ids, 2, GREEDY, ignore_eos=True, prompt_logprobs=1)])
    check_scored(engine, ids, outs["scored"], 1)
    assert outs["scored"][0].cached_tokens == 0
    again = run(serving, [Request("again", ids, 2, GREEDY, ignore_eos=True)])
    assert again["again"][0].cached_tokens > 0   # the cache still serves ordinary requests


def test_one_token_prompt_and_preemption(stories_plan):
    eng = Engine.load(stories_plan, kv_tokens=16 * 12)   # 12 pages: not enough for all at once
    base = eng.tokenizer.encode(TEXT)
    rng = np.random.default_rng(5)
    prompts = [base[:1] + rng.integers(259, 512, 24).tolist() for _ in range(6)]   # no byte tokens
    serving = ServingEngine(eng, max_num_seqs=6, max_batch_tokens=10)
    reqs = [Request(f"r{i}", p, 30, GREEDY, ignore_eos=True, prompt_logprobs=2) for i, p in enumerate(prompts)]
    outs = run(serving, reqs + [Request("one", base[:1], 1, GREEDY, ignore_eos=True, prompt_logprobs=2)])
    assert serving.scheduler.preemptions > 0
    for i, p in enumerate(prompts):
        check_scored(eng, p, outs[f"r{i}"], 2)
    assert [x.token for x in outs["one"][0].prompt_logprobs] == base[:1]


def test_max_tokens_zero_needs_prompt_scoring(engine):
    from reft.errors import RequestError

    serving = ServingEngine(engine)
    with pytest.raises(RequestError, match="max_tokens"):
        serving.check(Request("x", [1, 2, 3], 0, GREEDY))
