"""Sampling on the device, as the serving engine uses it (the cuda backend's run_sampled).

The cpu plan's executable is wrapped so that it "samples on the device" by the host sampler's
rule with the numbers it is handed (the cuda sample kernel itself is checked against that rule in
tests/backends/cuda). What is checked here is the wiring: which steps take the device path, that
the samplers hand over exactly the numbers they would have drawn themselves (so a seeded request
gives the same tokens on either path, before and after batching with others), and that a request
needing the logits (logprobs, penalties, min_p, a grammar) brings the whole step back to the host.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

from reft.runtime.engine import Chunk, Engine
from reft.runtime.grammar import GrammarSpec
from reft.runtime.sampler import DeviceDraw, Sampler, SamplingParams
from reft.runtime.serving import Request, ServingEngine


class DeviceSampling:
    """A cpu executable that also draws tokens from its logits rows, like CudaExecutable.run_sampled."""

    samples_on_device = True

    def __init__(self, exe):
        self.exe = exe
        self.sampled_steps = 0   # forward calls that returned ids
        self.logit_steps = 0     # forward calls that returned logits

    def __getattr__(self, name):
        return getattr(self.exe, name)

    def run(self, feeds, entry="forward"):
        self.logit_steps += 1
        return self.exe.run(feeds, entry)

    def run_sampled(self, feeds, temperature, top_k, top_p, u):
        self.sampled_steps += 1
        rows = self.exe.run(feeds)["logits"]
        assert len(rows) == len(temperature) == len(top_k) == len(top_p) == len(u)
        out = []
        for r, row in enumerate(rows):
            s = Sampler(SamplingParams(temperature=temperature[r], top_k=top_k[r], top_p=top_p[r], min_p=0.0))
            s.rng = types.SimpleNamespace(random=lambda r=r: u[r])
            out.append(s(row))
        return np.asarray(out, np.int32)


@pytest.fixture(scope="module")
def engines(stories_plan):
    host = Engine.load(stories_plan, kv_tokens=4096)
    dev = Engine.load(stories_plan, kv_tokens=4096)
    dev.exe = DeviceSampling(dev.exe)
    assert dev.samples_on_device and not host.samples_on_device
    return host, dev


def requests(engine, specs) -> list[Request]:
    base = engine.tokenizer.encode("Once upon a time there was a little dog")
    rng = np.random.default_rng(0)
    return [Request(f"r{i}", base + rng.integers(3, 500, 4 + 3 * i).tolist(), 12, sampling=s, ignore_eos=True, **kw)
            for i, (s, kw) in enumerate(specs)]


def run(engine, reqs, max_num_seqs=8) -> dict[str, list[int]]:
    serving = ServingEngine(engine, max_num_seqs=max_num_seqs, max_batch_tokens=64)
    out = {r.id: [] for r in reqs}
    for r in reqs:
        if isinstance(r.grammar, GrammarSpec):
            r.grammar = serving.grammars.compile(r.grammar)
        serving.add(r)
    while serving.has_work:
        for o in serving.step():
            out[o.request_id] += o.token_ids
    return out


PLAIN = [(SamplingParams(temperature=0), {}),
         (SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=7), {}),
         (SamplingParams(temperature=1.2, top_p=1.0, top_k=0, seed=11), {}),
         (SamplingParams(temperature=0.6, top_k=5, seed=3), {})]


def test_plain_requests_are_drawn_on_the_device_with_the_same_tokens(engines):
    host, dev = engines
    want = run(host, requests(host, PLAIN))
    before = dev.exe.sampled_steps, dev.exe.logit_steps
    got = run(dev, requests(dev, PLAIN))
    assert got == want
    sampled, logits = dev.exe.sampled_steps - before[0], dev.exe.logit_steps - before[1]
    assert sampled >= 12 and logits == 0   # every step yielding tokens drew them on the device
    alone = {r.id: run(dev, [r])[r.id] for r in requests(dev, PLAIN)}   # batching does not move the draws
    assert alone == want


@pytest.mark.parametrize("extra", [
    (SamplingParams(temperature=0.7, seed=5), {"logprobs": 2}),
    (SamplingParams(temperature=0.7, seed=5, repetition_penalty=1.3), {}),
    (SamplingParams(temperature=0.7, seed=5, logit_bias={42: 5.0}), {}),
    (SamplingParams(temperature=0.7, seed=5, min_p=0.1), {}),
    (SamplingParams(temperature=0), {"grammar": GrammarSpec("regex", r"[a-z ]+")}),
], ids=["logprobs", "penalty", "logit_bias", "min_p", "grammar"])
def test_a_request_that_needs_the_logits_brings_its_steps_to_the_host(engines, extra):
    host, dev = engines
    specs = PLAIN[:2] + [extra]
    want = run(host, requests(host, specs))
    before = dev.exe.sampled_steps, dev.exe.logit_steps
    got = run(dev, requests(dev, specs))
    assert got == want
    assert dev.exe.logit_steps - before[1] >= 12   # every step that request is in


def test_step_sampled_checks_its_draws(engines):
    _, dev = engines
    seq = dev.new_sequence(dev.tokenizer.encode("Once upon a time"))
    try:
        with pytest.raises(ValueError, match="a draw for each chunk"):
            dev.step_sampled([Chunk(seq, len(seq.tokens))], [None])
        with pytest.raises(ValueError, match="a draw for each chunk"):
            dev.step_sampled([Chunk(seq, len(seq.tokens), "all")], [DeviceDraw(0.0, 0, 1.0, 0.0)])
        assert seq.cached == 0
        tok = dev.step_sampled([Chunk(seq, len(seq.tokens))], [DeviceDraw(0.0, 0, 1.0, 0.0)])
        assert seq.cached == len(seq.tokens)
        assert tok == [int(np.argmax(dev.logits(seq.tokens)[-1]))]
    finally:
        seq.release()


def test_device_draws_take_what_the_host_draw_would():
    """The same seeded generator gives the same numbers whether the host or the device draws: one
    per token at temperature > 0, none at 0, each in [0, 1) as float32."""
    p = SamplingParams(temperature=0.9, top_k=7, top_p=0.8, seed=123)
    a, b = Sampler(p), Sampler(p)
    for _ in range(50):
        d = a.device_draw()
        assert d == DeviceDraw(0.9, 7, 0.8, d.u) and 0 <= d.u < 1 and d.u == float(np.float32(b.rng.random()))
    g = Sampler(SamplingParams(temperature=0, seed=1))
    state = g.rng.bit_generator.state
    assert g.device_draw().u == 0.0 and g.rng.bit_generator.state == state
    assert not Sampler(SamplingParams(min_p=0.1)).on_device
    assert not Sampler(SamplingParams(presence_penalty=0.5)).on_device
    assert Sampler(SamplingParams(top_k=0, top_p=1.0)).on_device
