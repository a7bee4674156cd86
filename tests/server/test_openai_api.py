"""The official openai client against the real server: chat and completions, streaming and not,
n > 1, stop strings, seeds, logprobs, usage, tokenizer routes, metrics, cancellation."""
from __future__ import annotations

import time

import httpx
import numpy as np
import pytest

from reft.runtime.generate import GenerationRequest, generate
from reft.runtime.sampler import SamplingParams

PROMPT = "Once upon a time"
MESSAGES = [{"role": "system", "content": "Tell a story."}, {"role": "user", "content": "Once upon a time"}]


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["stories"]
    assert client.models.retrieve("stories").id == "stories"
    assert httpx.get(server.url + "/v1/models/stories").json() == httpx.get(server.url + "/v1/models").json()["data"][0]
    r = httpx.get(server.url + "/v1/models/gpt-4o")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_completion_greedy_matches_transformers(client, stories_reference):
    r = client.completions.create(model="stories", prompt=PROMPT, temperature=0, max_tokens=64)
    assert r.choices[0].text == stories_reference["greedy_64_text"]
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(stories_reference["prompt_ids"]) and r.usage.completion_tokens == 64


def test_completion_stream_equals_whole(client, stories_reference):
    chunks = list(client.completions.create(model="stories", prompt=stories_reference["prompt_ids"], temperature=0,
                                            max_tokens=64, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == stories_reference["greedy_64_text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 64


def test_chat_whole_and_streamed(server, client):
    prompt_ids = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    r = client.chat.completions.create(model="stories", messages=MESSAGES, temperature=0, max_tokens=30,
                                       extra_body={"ignore_eos": True})
    msg = r.choices[0]
    assert msg.message.role == "assistant" and msg.message.content and msg.finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == 30
    chunks = list(client.chat.completions.create(model="stories", messages=MESSAGES, temperature=0, max_tokens=30,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_uses_the_template(server, client, engine):
    """The reply continues exactly the text the chat template renders (checked by generating
    from that text directly)."""
    text = "system: Tell a story.\nuser: Once upon a time\nassistant:"
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    assert httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}).json()["tokens"] == ids
    gen = list(generate(engine, GenerationRequest(ids, 20, SamplingParams(temperature=0))))
    whole = engine.tokenizer.decode(ids + gen, skip_special_tokens=True)
    assert whole.startswith(text)
    want = whole[len(text):]
    r = client.chat.completions.create(model="stories", messages=MESSAGES, temperature=0, max_tokens=20,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == want


def test_n2_choices(client):
    r = client.completions.create(model="stories", prompt=PROMPT, n=2, temperature=1.0, seed=3, max_tokens=20,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text != r.choices[1].text
    assert r.usage.completion_tokens == 40 and r.usage.prompt_tokens == 5
    stream = client.chat.completions.create(model="stories", messages=MESSAGES, n=2, temperature=1.0, seed=3,
                                            max_tokens=10, stream=True, extra_body={"ignore_eos": True})
    texts = {0: "", 1: ""}
    finished = set()
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1} and all(texts.values())


def test_stop_strings(client):
    r = client.completions.create(model="stories", prompt=PROMPT, temperature=0, max_tokens=64, stop=["Lily"])
    assert r.choices[0].text == ", there was a little girl named " and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="stories", prompt=PROMPT, temperature=0, max_tokens=64,
                                            stop=["little", "Lily"], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == ", there was a "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_reproducibility(client):
    def draw(seed):
        return client.completions.create(model="stories", prompt=PROMPT, temperature=1.0, seed=seed, max_tokens=40,
                                         extra_body={"ignore_eos": True}).choices[0].text
    a, b, c = draw(1234), draw(1234), draw(99)
    assert a == b and a != c


def test_logprobs_match_the_model(client, engine, stories_reference):
    """Logprobs of greedy tokens equal log-softmax of the model's logits computed in-process."""
    ids = stories_reference["prompt_ids"]
    gen = stories_reference["greedy_64_ids"][:12]
    logits = engine.logits(ids + gen).astype(np.float64)[len(ids) - 1:-1]   # the rows predicting gen
    m = logits.max(1, keepdims=True)
    ref = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
    r = client.completions.create(model="stories", prompt=ids, temperature=0, max_tokens=12, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 12
    assert lp.token_logprobs == pytest.approx([ref[i, t] for i, t in enumerate(gen)], abs=1e-4)
    for i, top in enumerate(lp.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(lp.token_logprobs[i], abs=1e-6)
    assert "".join(lp.tokens) == r.choices[0].text
    c = client.chat.completions.create(model="stories", messages=MESSAGES, temperature=0, max_tokens=8, logprobs=True,
                                       top_logprobs=2, extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == 8 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-6) for e in content)


def test_tokenize_detokenize(server, engine):
    r = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}).json()
    assert r["tokens"] == engine.tokenizer.encode(PROMPT) and r["count"] == len(r["tokens"])
    back = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"][1:]}).json()
    assert back["prompt"] == PROMPT


def test_prefix_cache_and_metrics(server, client):
    long_prompt = "Once upon a time there was a little dog named Max. Max liked to play with his ball in the park"
    for _ in range(2):
        r = client.completions.create(model="stories", prompt=long_prompt, temperature=0, max_tokens=4)
    assert r.usage.prompt_tokens_details.cached_tokens >= 16
    assert server.metric("reft_prefix_cache_hit_rate") > 0
    assert server.metric("reft_time_to_first_token_seconds_count") > 0
    assert server.metric("reft_inter_token_latency_seconds_count") > 0
    assert server.metric('reft_requests_total{route="/v1/completions",status="200"}') >= 2
    assert server.metric("reft_kv_cache_pages_total") > 0
    for name in ("reft_num_requests_running", "reft_num_requests_waiting", "reft_kv_cache_pages_used"):
        server.metric(name)


def test_client_disconnect_cancels_and_frees_pages(server, client):
    stream = client.completions.create(model="stories", prompt=PROMPT, temperature=1.0, max_tokens=1500, stream=True,
                                       extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert server.metric("reft_num_requests_running") == 1
    stream.close()
    deadline = time.monotonic() + 10
    while server.metric("reft_num_requests_running") or server.metric("reft_kv_cache_pages_used"):
        assert time.monotonic() < deadline, "the cancelled request still holds the engine"
        time.sleep(0.05)
    assert server.metric('reft_request_finished_total{reason="abort"}') >= 1
