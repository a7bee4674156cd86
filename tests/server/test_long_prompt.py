"""Blocking work on request inputs (chat template, tokenizer, detokenizer) runs off the event
loop: /health answers within 0.5 s while a 4 MB prompt is tokenized, or 700k tokens decoded."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from server_util import Server


@pytest.fixture(scope="module")
def roomy(stories_plan, chat_template_file, tmp_path_factory):
    """Accepts 4 MB prompts (the default caps would refuse them before tokenizing)."""
    s = Server(stories_plan, tmp_path_factory.mktemp("roomy"), "--chat-template", chat_template_file,
               "--max-request-bytes", "8MiB", "--max-prompt-chars", "5000000")
    yield s
    s.stop()


def probe_health_during(server, path: str, body: dict) -> tuple[httpx.Response, list[float]]:
    """POST body (serialized beforehand) in a thread; probe /health until it is answered."""
    data = json.dumps(body).encode()
    result = {}

    def post():
        result["r"] = httpx.post(server.url + path, content=data, headers={"content-type": "application/json"},
                                 timeout=120)
    t = threading.Thread(target=post)
    latencies = []
    with httpx.Client(base_url=server.url, timeout=10) as probe:
        probe.get("/health")   # connect first
        t.start()
        while t.is_alive():
            t0 = time.perf_counter()
            assert probe.get("/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.05)
    t.join()
    return result["r"], latencies


def test_health_answers_while_a_4mb_chat_prompt_is_tokenized(roomy):
    text = "Once upon a time there was a little dog. " * (4_000_000 // 41)
    r, latencies = probe_health_during(roomy, "/v1/chat/completions",
                                       {"messages": [{"role": "user", "content": text}], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert len(latencies) >= 3, "the request was too quick to probe anything"
    assert max(latencies) < 0.5, latencies


def test_health_answers_while_700k_tokens_are_detokenized(roomy):
    r, latencies = probe_health_during(roomy, "/detokenize", {"tokens": [403, 407, 261, 378] * 175_000})
    assert r.status_code == 200 and r.json()["prompt"].startswith("Once upon a time")
    assert max(latencies) < 0.5, latencies
