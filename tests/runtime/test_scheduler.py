"""Continuous batching on the bundled model, checked against the single-request path (generate()).

Every batched run here must give, for every request, exactly the tokens that request gives alone:
chunked prefill mixed with decodes, prefix-cache hits, preemption and recompute, seeded sampling.
"""
from __future__ import annotations

import numpy as np
import pytest

from reft.runtime.engine import Engine
from reft.runtime.generate import GenerationRequest, generate
from reft.runtime.kv_cache import PagePool, Sequence
from reft.runtime.sampler import SamplingParams
from reft.runtime.scheduler import Scheduler
from reft.runtime.serving import Request, ServingEngine

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def engine(stories_plan):
    return Engine.load(stories_plan, kv_tokens=4096)


def prompts(engine, n, seed=0, lo=3, hi=60):
    """n prompts: tokenized story openings plus random-length runs of real tokens."""
    rng = np.random.default_rng(seed)
    tok = engine.tokenizer
    base = tok.encode("Once upon a time there was a little dog who liked to run in the park with his friends")
    return [base[:1] + rng.integers(3, 500, rng.integers(lo, hi)).tolist() for _ in range(n)]


def alone(engine, ids, max_tokens, sampling=GREEDY) -> list[int]:
    return list(generate(engine, GenerationRequest(ids, max_tokens, sampling, ())))


def run_all(serving: ServingEngine, reqs: list[Request], on_step=None) -> dict[str, list[int]]:
    out = {r.id: [] for r in reqs}
    for r in reqs:
        serving.add(r)
    steps = 0
    while serving.has_work:
        for o in serving.step():
            out[o.request_id] += o.token_ids
        steps += 1
        if on_step:
            on_step(serving)
        assert steps < 10_000
    return out


def test_batched_greedy_with_chunked_prefill_equals_alone(engine):
    ps = prompts(engine, 8)
    want = [alone(engine, p, 24) for p in ps]
    serving = ServingEngine(engine, max_num_seqs=8, max_batch_tokens=20)
    mixed = []
    orig = serving.scheduler.schedule

    def schedule():  # record whether a step held prompt pieces and decodes together
        plan = orig()
        mixed.append(any(c.n > 1 for c in plan.chunks) and any(c.n == 1 and c.logits == "last" for c in plan.chunks))
        assert plan.tokens <= 20
        return plan
    serving.scheduler.schedule = schedule
    got = run_all(serving, [Request(f"r{i}", p, 24, GREEDY, ignore_eos=True) for i, p in enumerate(ps)])
    assert [got[f"r{i}"] for i in range(8)] == want
    assert any(mixed)
    assert engine.pool.used_pages == 0


def test_prefix_cache_shares_full_pages(engine):
    engine.pool.reset_prefix_cache()
    shared = prompts(engine, 1, seed=1, lo=45, hi=46)[0]       # 46 tokens: two full pages of 16
    a, b = shared + [300, 301], shared + [302]
    serving = ServingEngine(engine, max_num_seqs=4)
    q0, h0 = engine.pool.queries, engine.pool.hits
    first = run_all(serving, [Request("a", a, 8, GREEDY, ignore_eos=True)])
    outs = []
    serving.add(Request("b", b, 8, GREEDY, ignore_eos=True))
    while serving.has_work:
        outs += serving.step()
    assert outs[0].cached_tokens == 32 and engine.pool.hits - h0 == 2
    assert engine.pool.queries - q0 == 2 + 2    # a looked up 2 pages (miss), b looked up 2 (hit)
    assert first["a"] == alone(engine, a, 8)
    assert sum((o.token_ids for o in outs), []) == alone(engine, b, 8)
    # a prompt that is entirely cached still recomputes its last page (never writes a shared one)
    c = Sequence(engine.pool, shared[:32])
    assert c.match_prefix() == 16
    c.release()


def test_preemption_recomputes_to_the_same_greedy_output(stories_plan):
    eng = Engine.load(stories_plan, kv_tokens=16 * 12)   # 12 pages: not enough for 6 sequences of ~60 tokens
    ps = prompts(eng, 6, seed=2, lo=20, hi=30)
    want = [alone(eng, p, 40) for p in ps]
    serving = ServingEngine(eng, max_num_seqs=6)
    got = run_all(serving, [Request(f"r{i}", p, 40, GREEDY, ignore_eos=True) for i, p in enumerate(ps)])
    assert serving.scheduler.preemptions > 0
    assert [got[f"r{i}"] for i in range(6)] == want
    assert eng.pool.used_pages == 0


def test_seeded_sampling_is_independent_of_the_batch(engine):
    ps = prompts(engine, 4, seed=3)
    sp = [SamplingParams(temperature=1.0, top_p=0.9, top_k=0, seed=100 + i, presence_penalty=0.5,
                         repetition_penalty=1.1) for i in range(4)]
    want = [alone(engine, p, 20, s) for p, s in zip(ps, sp)]
    sp = [SamplingParams(**vars(s)) for s in sp]   # fresh RNGs
    serving = ServingEngine(engine, max_num_seqs=4)
    got = run_all(serving, [Request(f"r{i}", p, 20, s, ignore_eos=True) for i, (p, s) in enumerate(zip(ps, sp))])
    assert [got[f"r{i}"] for i in range(4)] == want


def test_abort_frees_pages(engine):
    engine.pool.reset_prefix_cache()
    serving = ServingEngine(engine, max_num_seqs=2)
    for i, p in enumerate(prompts(engine, 3, seed=4, lo=30, hi=40)):
        serving.add(Request(f"r{i}", p, 200, GREEDY, ignore_eos=True))
    for _ in range(5):
        serving.step()
    assert engine.pool.used_pages > 0 and serving.num_running == 2 and serving.num_waiting == 1
    for i in range(3):
        assert serving.abort(f"r{i}").finish_reason == "abort"
    assert engine.pool.used_pages == 0 and not serving.has_work
    assert serving.abort("r0") is None


def test_stop_token_and_length_finish(engine):
    p = prompts(engine, 1, seed=5)[0]
    free = alone(engine, p, 10)
    serving = ServingEngine(engine)
    got = run_all(serving, [Request("s", p, 10, GREEDY, stop_token_ids=(free[3],), ignore_eos=True)])
    assert got["s"] == free[:free.index(free[3])]
    outs = []
    serving.add(Request("l", p, 5, GREEDY, ignore_eos=True))
    while serving.has_work:
        outs += serving.step()
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 5


def test_scheduler_budget_decodes_first_then_prompt_pieces():
    """Pure scheduling over a host page pool: no model involved."""
    layout = {"page_size": 4, "kv_heads": 1, "head_dim": 2, "dtype": "float32", "inputs": ["k", "v"]}
    pool = PagePool(layout, 64, np.zeros, prefix_caching=False)
    s = Scheduler(pool, max_num_seqs=3, max_batch_tokens=10)
    a, b, c, d = (Sequence(pool, list(range(n))) for n in (3, 25, 2, 2))
    for x in (a, b, c, d):
        s.add(x)
    plan = s.schedule()                   # a whole, b's first 7 tokens; c must wait (no budget)
    assert [(x.seq, x.n, x.logits) for x in plan.chunks] == [(a, 3, "last"), (b, 7, "none")]
    for ch in plan.chunks:
        ch.seq.cached += ch.n
    a.tokens.append(9)
    plan = s.schedule()                   # a decodes, b gets 9 more; c must still wait
    assert [(x.seq, x.n) for x in plan.chunks] == [(a, 1), (b, 9)]
    for ch in plan.chunks:
        ch.seq.cached += ch.n
    a.tokens.append(9)
    plan = s.schedule()                   # a decodes, b's last 9 tokens; no budget left for c
    assert [(x.seq, x.n, x.logits) for x in plan.chunks] == [(a, 1, "last"), (b, 9, "last")]
    assert list(s.waiting) == [c, d]
    for ch in plan.chunks:
        ch.seq.cached += ch.n
        ch.seq.tokens.append(9)
    plan = s.schedule()                   # c joins; d waits for a slot (max_num_seqs 3)
    assert [(x.seq, x.n) for x in plan.chunks] == [(a, 1), (b, 1), (c, 2)]
    assert list(s.waiting) == [d] and s.running == [a, b, c]
