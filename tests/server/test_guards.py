"""What the server refuses before any route runs: a missing API key (401, every route but /health,
the chat page and, with --metrics-public, /metrics), an oversized body (413, fast, by
Content-Length or while reading a chunked body), a foreign Host (421) or Origin (403)."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from reft.server.guards import allowed_host_names, host_name, is_loopback
from server_util import Server

KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROUTES = [("GET", "/v1/models", None), ("GET", "/v1/models/stories", None), ("GET", "/metrics", None),
          ("POST", "/tokenize", {"prompt": "Once"}), ("POST", "/detokenize", {"tokens": [1, 403]}),
          ("POST", "/v1/completions", {"prompt": "Once", "max_tokens": 2}),
          ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
          ("GET", "/no/such/route", None)]


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert code is None or err["code"] == code, err
    return err


@pytest.fixture(scope="module")
def keyed(stories_plan, chat_template_file, tmp_path_factory):
    s = Server(stories_plan, tmp_path_factory.mktemp("keyed"), "--chat-template", chat_template_file,
               "--model-name", "stories", "--api-key", KEY, "--max-request-bytes", "1MiB")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def public(stories_plan, chat_template_file, tmp_path_factory):
    s = Server(stories_plan, tmp_path_factory.mktemp("public"), "--chat-template", chat_template_file,
               "--model-name", "stories", "--api-key", KEY, "--metrics-public",
               "--allowed-hosts", "reft.example, Other.Example:8080")
    yield s
    s.stop()


# --- API key -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,path,body", ROUTES, ids=[r[1] for r in ROUTES])
def test_every_route_needs_the_key(keyed, method, path, body):
    r = httpx.request(method, keyed.url + path, json=body, timeout=30)
    assert_error(r, 401, "invalid_api_key")
    r = httpx.request(method, keyed.url + path, json=body, headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert_error(r, 401, "invalid_api_key")
    r = httpx.request(method, keyed.url + path, json=body, headers=AUTH, timeout=30)
    assert r.status_code == (404 if path == "/no/such/route" else 200), r.text


def test_health_and_chat_page_need_no_key(keyed):
    assert httpx.get(keyed.url + "/health").json() == {"status": "ok"}
    r = httpx.get(keyed.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")


def test_openai_client_with_and_without_the_key(keyed):
    with pytest.raises(openai.AuthenticationError):
        keyed.client().models.retrieve("stories")
    client = keyed.client(api_key=KEY)
    assert client.models.retrieve("stories").id == "stories"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_metrics_public(public):
    assert httpx.get(public.url + "/metrics").status_code == 200
    assert_error(httpx.get(public.url + "/v1/models"), 401)


# --- body size ---------------------------------------------------------------------------------------
def test_20mb_body_is_refused_at_once(server):
    body = b'{"prompt": "' + b"a" * (20 * 2**20) + b'"}'
    t = time.perf_counter()
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert time.perf_counter() - t < 1.0
    err = assert_error(r, 413, "request_too_large")
    assert "4,194,304" in err["message"] and "--max-request-bytes" in err["message"]
    assert server.healthy()


def test_chunked_body_over_the_limit(keyed):
    def chunks():   # no Content-Length: sent chunked, 3 MiB in all
        for _ in range(48):
            yield b"a" * 65536
    t = time.perf_counter()
    r = httpx.post(keyed.url + "/v1/completions", content=chunks(), timeout=30,
                   headers={**AUTH, "content-type": "application/json"})
    assert time.perf_counter() - t < 1.0
    assert_error(r, 413, "request_too_large")


def test_bodies_under_the_limit_pass(keyed):
    def chunks():
        yield b'{"prompt": "Once upon a time", '
        yield b'"max_tokens": 3}'
    r = httpx.post(keyed.url + "/v1/completions", content=chunks(), headers={**AUTH, "content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    prompt = "Once upon a time " * 3000   # 51 kB: passes the size check, then is too long for the context
    r = httpx.post(keyed.url + "/v1/completions", json={"prompt": prompt}, headers=AUTH, timeout=30)
    assert_error(r, 400, "context_length_exceeded")


# --- Host and Origin ---------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["localhost", "localhost:1234", "127.0.0.1", "[::1]:8000", "LOCALHOST"])
def test_loopback_hosts_pass(server, host):
    assert httpx.get(server.url + "/health", headers={"host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "10.0.0.1"])
def test_foreign_host_is_421(server, host):
    err = assert_error(httpx.get(server.url + "/v1/models", headers={"host": host}), 421, "misdirected_request")
    assert "--allowed-hosts" in err["message"]


def test_cross_origin_is_403(server):
    for origin in ("http://evil.example", "null", "http://127.0.0.1.evil.example:8000", "http://[::1"):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 2},
                       headers={"origin": origin})
        assert_error(r, 403, "forbidden_origin")
    for origin in (server.url, "http://localhost:3000"):
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 2},
                       headers={"origin": origin})
        assert r.status_code == 200, r.text


def test_allowed_hosts(public):
    for host in ("reft.example", "reft.example:443", "other.example", "localhost"):
        h = {"host": host, "origin": f"https://{host}", **AUTH}
        assert httpx.get(public.url + "/v1/models", headers=h).status_code == 200, host
    assert_error(httpx.get(public.url + "/v1/models", headers={"host": "evil.example", **AUTH}), 421)
    assert_error(httpx.get(public.url + "/v1/models", headers={"origin": "https://evil.example", **AUTH}), 403)


def test_which_binds_check_hosts():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("::")
    assert allowed_host_names("0.0.0.0", None) is None                  # reachable from outside: opt in
    assert allowed_host_names("0.0.0.0", "a.example") == {"localhost", "127.0.0.1", "::1", "a.example"}
    assert allowed_host_names("127.0.0.1", None) == {"localhost", "127.0.0.1", "::1"}
    assert allowed_host_names("127.0.0.1", "*") is None
    assert [host_name(h) for h in ("A.example:80", "[::1]:8000", "::1", "localhost")] == \
        ["a.example", "::1", "::1", "localhost"]
