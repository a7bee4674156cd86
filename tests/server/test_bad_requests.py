"""Bad requests get a 4xx with an OpenAI error body, and the server keeps serving after each."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from server_util import Server

MSG = [{"role": "user", "content": "Once upon a time"}]


def assert_error(status: int, body: dict, want: int):
    assert status == want, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], body
    assert "Traceback" not in err["message"]


def still_serving(server):
    assert server.healthy()
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 2, "temperature": 0},
                   timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]


RAW = [  # (route, body as raw bytes or JSON, status)
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}', 400),        # malformed JSON
    ("/v1/chat/completions", b"not json at all", 400),
    ("/v1/chat/completions", b"", 400),
    ("/v1/chat/completions", {"messages": "Once upon a time"}, 400),                         # wrong types
    ("/v1/chat/completions", {"messages": MSG, "temperature": "hot"}, 400),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": "ten"}, 400),
    ("/v1/chat/completions", {"messages": MSG, "n": [2]}, 400),
    ("/v1/chat/completions", {"messages": MSG, "stop": 5}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400),
    ("/v1/chat/completions", {"model": "stories"}, 400),                                     # missing messages
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", [1, 2, 3], 400),
    ("/v1/completions", {"prompt": {"text": "hi"}}, 400),
    ("/v1/completions", {"prompt": []}, 400),
    ("/v1/completions", {"prompt": [99999]}, 400),                                           # token id out of range
    ("/v1/completions", {"prompt": "Once", "max_tokens": 0}, 400),                           # max_tokens <= 0
    ("/v1/completions", {"prompt": "Once", "max_tokens": -3}, 400),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 0}, 400),
    ("/v1/completions", {"prompt": "Once", "max_tokens": 100000}, 400),                      # over the context
    ("/v1/completions", {"prompt": "Once " * 3000, "max_tokens": 1}, 400),
    ("/v1/completions", {"prompt": "Once", "model": "gpt-4o"}, 404),                         # unknown model
    ("/v1/chat/completions", {"messages": MSG, "model": "gpt-4o"}, 404),
    ("/v1/completions", {"prompt": "Once", "temperature": -1}, 400),
    ("/v1/completions", {"prompt": "Once", "top_p": 0}, 400),
    ("/v1/completions", {"prompt": "Once", "n": 0}, 400),
    ("/v1/completions", {"prompt": "Once", "logprobs": 100}, 400),
    ("/detokenize", {"tokens": [-1]}, 400),
    ("/tokenize", {}, 400),
    ("/v1/embeddings", {"input": "hi"}, 400),                                       # a generate plan's server
    ("/v1/nonexistent", {"input": "hi"}, 404),                                              # no such route
    ("/v1/completions", {"prompt": "Once", "max_tokens": "3"}, 400),                         # strict types
    ("/v1/completions", {"prompt": "Once", "stream": "yes"}, 400),
    ("/v1/completions", {"prompt": "Once", "temperature": "0.5"}, 400),
    ("/v1/completions", {"prompt": "Once", "temperature": True}, 400),
    ("/v1/completions", {"prompt": "Once", "n": 1.0}, 400),
    ("/v1/completions", {"prompt": "Once", "echo": "true"}, 400),
    ("/v1/chat/completions", {"messages": MSG, "logprobs": 1}, 400),
    ("/v1/chat/completions", {"messages": MSG, "stream_options": {"include_usage": "yes"}}, 400),
    ("/v1/completions", {"prompt": "x" * 70000}, 400),                                       # over the prompt cap
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 40000}] * 2}, 400),
    ("/tokenize", {"prompt": "x" * 70000}, 400),
    ("/v1/completions", {"prompt": "Once", "max_tokens": 0, "echo": False}, 400),
]
LONE_SURROGATE = [  # (route, raw JSON with a lone surrogate escaped, the param named)
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": "\ud800x"}]}', "messages.0.content"),
    ("/v1/chat/completions", rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]}',
     "messages.0.content.0.text"),
    ("/v1/completions", rb'{"prompt": "Once \ud800"}', "prompt"),
    ("/v1/completions", rb'{"prompt": ["fine", "\udc00"]}', "prompt"),
    ("/v1/completions", rb'{"prompt": "Once", "stop": ["\ud800"]}', "stop"),
    ("/tokenize", rb'{"prompt": "\ud800"}', "prompt"),
]


@pytest.mark.parametrize("route,body,status", RAW, ids=[f"{i}:{r[0]}" for i, r in enumerate(RAW)])
def test_bad_request_raw(server, route, body, status):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + route, timeout=30, **kw)
    assert r.headers["content-type"].startswith("application/json")
    assert_error(r.status_code, r.json(), status)


@pytest.mark.parametrize("route,body,param", LONE_SURROGATE, ids=[f"{i}:{r[0]}" for i, r in enumerate(LONE_SURROGATE)])
def test_invalid_unicode(server, route, body, param):
    r = httpx.post(server.url + route, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert_error(r.status_code, r.json(), 400)
    err = r.json()["error"]
    assert err["param"] == param and "not valid Unicode" in err["message"], err


UNSUPPORTED = [  # (route, extra fields, the param the 400 names): behaviour reft lacks is refused, not ignored
    ("/v1/completions", {"suffix": "the end"}, "suffix"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("/v1/chat/completions", {"reasoning_effort": "high"}, "reasoning_effort"),
    ("/v1/completions", {"min_tokens": 4}, "min_tokens"),
    ("/v1/completions", {"use_beam_search": True}, "use_beam_search"),
    ("/v1/completions", {"logit_bias": {"7": 200}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"999999": 5}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, "messages.0.content.0.type"),
]


@pytest.mark.parametrize("route,extra,param", UNSUPPORTED, ids=[u[2] for u in UNSUPPORTED])
def test_unsupported_fields_are_400_naming_them(server, route, extra, param):
    base = {"messages": MSG} if "chat" in route else {"prompt": "Once"}
    r = httpx.post(server.url + route, json={**base, "max_tokens": 2, **extra}, timeout=30)
    assert_error(r.status_code, r.json(), 400)
    assert r.json()["error"]["param"] == param, r.json()


def test_logit_bias_and_skip_special_tokens_are_honoured(server, engine):
    tok = engine.tokenizer
    forced = tok.encode("Lily", add_special_tokens=False)[0]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 3, "temperature": 1.0,
                                                        "logit_bias": {str(forced): 100}, "logprobs": 0}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].split() == ["Lily"] * 3
    eos = tok.eos_token_ids[0]
    body = {"prompt": "Once", "max_tokens": 2, "temperature": 0, "logit_bias": {str(eos): 100}, "ignore_eos": True}
    hidden = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["text"]
    shown = httpx.post(server.url + "/v1/completions", json={**body, "skip_special_tokens": False},
                       timeout=30).json()["choices"][0]["text"]
    assert hidden == "" and shown.strip() == tok.decode([eos, eos]).strip() != ""


def test_surrogate_pairs_and_int_floats_are_fine(server):
    r = httpx.post(server.url + "/v1/completions", content=rb'{"prompt": "Once \ud83d\ude00", "max_tokens": 2,'
                   rb' "temperature": 1, "top_p": 1}', headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 200, r.text


def test_wrong_method(server):
    r = httpx.get(server.url + "/v1/chat/completions")
    assert_error(r.status_code, r.json(), 405)


def test_server_survives_every_bad_request(server):
    for route, body, _ in RAW + LONE_SURROGATE:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        httpx.post(server.url + route, timeout=30, **kw)
    still_serving(server)


def test_openai_client_sees_typed_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="stories", prompt="Once", max_tokens=0)
    assert "max_tokens" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="stories", prompt="Once", max_tokens=5000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="stories", messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="stories", messages=MSG, temperature="hot")
    still_serving(server)


@pytest.fixture(scope="module")
def small_server(stories_plan, chat_template_file, tmp_path_factory):
    """One running sequence and one queued at most, behind an API key."""
    s = Server(stories_plan, tmp_path_factory.mktemp("small"), "--chat-template", chat_template_file,
               "--max-num-seqs", "1", "--max-queue", "1", "--api-key", "sekrit")
    yield s
    s.stop()


def test_api_key(small_server):
    url = small_server.url
    r = httpx.get(url + "/v1/models")
    assert_error(r.status_code, r.json(), 401)
    r = httpx.post(url + "/v1/chat/completions", json={"messages": MSG}, headers={"Authorization": "Bearer wrong"})
    assert_error(r.status_code, r.json(), 401)
    with pytest.raises(openai.AuthenticationError):
        small_server.client(api_key="wrong").models.list()
    good = small_server.client(api_key="sekrit")
    assert good.models.list().data[0].id
    assert good.chat.completions.create(model=good.models.list().data[0].id, messages=MSG, max_tokens=3).choices
    assert small_server.healthy()   # /health needs no key


def test_too_many_requests(small_server):
    client = small_server.client(api_key="sekrit")
    long = dict(model=client.models.list().data[0].id, prompt="Once upon a time", max_tokens=2000, stream=True,
                extra_body={"ignore_eos": True})
    a = client.completions.create(**long)    # runs
    next(iter(a))
    b = client.completions.create(**long)    # queued
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=long["model"], prompt="Once", max_tokens=2)
        assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_error"
    finally:
        a.close()
        b.close()
    deadline = time.monotonic() + 10
    while True:  # the server frees the slots as soon as it sees the two clients hang up
        try:
            client.completions.create(model=long["model"], prompt="Once", max_tokens=2)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "closed streams still hold their slots"
            time.sleep(0.05)
    assert small_server.healthy()
