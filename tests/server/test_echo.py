"""Prompt scoring on /v1/completions through the official client: `echo` prepends the prompt,
`logprobs` then covers the prompt tokens (the first one's is null, as vLLM's), `max_tokens: 0`
with echo scores the prompt only. Prompt logprobs match transformers on a tiny random model."""
from __future__ import annotations

import httpx
import numpy as np
import pytest

from hf_tiny import hf_logits, make_model
from reft.compiler import compile_model
from server_util import Server

PROMPT = "Once upon a time there was a little dog"


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def prompt_reference(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """log p(ids[i] | ids[:i]) for i >= 1."""
    return log_softmax(logits[:-1])[np.arange(len(ids) - 1), ids[1:]]


def check_offsets(lp, text: str):
    assert "".join(lp.tokens) == text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_score_prompt_only(client, engine):
    ids = engine.tokenizer.encode(PROMPT)
    r = client.completions.create(model="stories", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text == PROMPT and c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(prompt_reference(engine.logits(ids), ids).tolist(), abs=1e-4)
    for v, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert len(top) == 2 and max(top.values()) >= v - 1e-6
    check_offsets(lp, c.text)


def test_echo_with_a_completion(client, engine):
    plain = client.completions.create(model="stories", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1)
    r = client.completions.create(model="stories", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1, echo=True)
    c, p = r.choices[0], plain.choices[0]
    assert c.text == PROMPT + p.text
    n = len(engine.tokenizer.encode(PROMPT))
    assert c.logprobs.tokens[n:] == p.logprobs.tokens
    assert c.logprobs.token_logprobs[n:] == pytest.approx(p.logprobs.token_logprobs, abs=1e-6)
    check_offsets(c.logprobs, c.text)
    assert r.usage.completion_tokens == 8
    no_lp = client.completions.create(model="stories", prompt=PROMPT, max_tokens=8, temperature=0, echo=True)
    assert no_lp.choices[0].text == c.text and no_lp.choices[0].logprobs is None


def test_echo_streamed_equals_whole(client):
    kw = dict(model="stories", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1, echo=True)
    whole = client.completions.create(**kw).choices[0]
    chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
    assert chunks[0].choices[0].text.startswith(PROMPT)
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert sum((c.choices[0].logprobs.token_logprobs for c in chunks), []) == whole.logprobs.token_logprobs
    assert sum((c.choices[0].logprobs.text_offset for c in chunks), []) == whole.logprobs.text_offset
    only = [c for c in client.completions.create(model="stories", prompt=PROMPT, max_tokens=0, echo=True,
                                                 stream=True) if c.choices]
    assert "".join(c.choices[0].text for c in only) == PROMPT and only[-1].choices[0].finish_reason == "length"


def test_echo_of_token_ids_and_batches(client, engine):
    ids = engine.tokenizer.encode(PROMPT)
    r = client.completions.create(model="stories", prompt=[ids, ids[:4]], max_tokens=0, echo=True, n=2)
    assert [c.text for c in r.choices] == [PROMPT] * 2 + [engine.tokenizer.decode(ids[:4], skip_special_tokens=True)] * 2
    assert r.usage.prompt_tokens == len(ids) + 4


def test_max_tokens_zero_needs_echo(server):
    for body in ({"prompt": PROMPT, "max_tokens": 0}, {"prompt": PROMPT, "max_tokens": 0, "logprobs": 1}):
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                               "max_tokens": 0, "echo": True}, timeout=30)
    assert r.status_code == 400


def test_prompt_logprobs_match_transformers(tmp_path_factory):
    """A tiny random-weight llama compiled for the cpu backend, served with 7-token prefill chunks;
    the prompt is first completed once so its pages sit in the prefix cache (scoring must not use them)."""
    d = tmp_path_factory.mktemp("tiny")
    model_dir, hf = make_model("llama-gqa-llama3", d / "hf")
    plan = compile_model(model_dir, d / "plan", backend="cpu", progress=False)
    ids = [1] + np.random.default_rng(7).integers(259, 512, 39).tolist()
    want = prompt_reference(hf_logits(hf, ids), ids)
    s = Server(plan, d, "--max-batch-tokens", "7", "--model-name", "tiny")
    try:
        client = s.client()
        client.completions.create(model="tiny", prompt=ids, max_tokens=2)
        r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=0)
        lp = r.choices[0].logprobs
        assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
        assert np.abs(np.array(lp.token_logprobs[1:]) - want).max() < 1e-4
        assert np.abs(want).max() > 1.0 and np.std(want) > 0.1   # not a flat distribution
    finally:
        s.stop()
