"""The chat page at / in headless Chromium: type a message, the streamed reply appears.

Skips only when Chromium is absent and REFT_REQUIRE_BROWSER is unset (CI sets it, so CI cannot
skip silently).
"""
from __future__ import annotations

import json
import os
import shutil
import time

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("REFT_REQUIRE_BROWSER"):
            pytest.fail(f"REFT_REQUIRE_BROWSER is set but Chromium is missing at {CHROMIUM}")
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("REFT_REQUIRE_BROWSER"):
            raise
        pytest.skip("needs the playwright package")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def test_chat_page_streams_a_reply(server, browser):
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'stories'")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")
    page.fill("#input", "Once upon a time")
    page.click("#send")
    reply = page.locator(".msg.assistant").first
    page.wait_for_function("document.getElementById('send').disabled === false"
                           " && document.querySelector('.msg.assistant').textContent.length > 0", timeout=30000)
    assert page.locator(".msg.user").first.text_content() == "Once upon a time"
    text = reply.text_content()
    assert text and "error" not in (reply.get_attribute("class") or "")
    assert "tokens/s" in page.locator("#stats").text_content()
    # the same conversation through the API gives the same greedy reply
    api = server.client().chat.completions.create(model="stories", temperature=0, max_tokens=40, top_p=0.95,
                                                  messages=[{"role": "user", "content": "Once upon a time"}])
    assert api.choices[0].message.content == text
    page.close()


def test_chat_page_stop_button(server, browser):
    page = browser.new_page()

    def no_eos(route):  # keep the reply going until Stop, whatever the model says
        body = json.loads(route.request.post_data)
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))
    page.route("**/v1/chat/completions", no_eos)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent === 'stories'")
    page.fill("#max_tokens", "1900")
    page.fill("#input", "Tell me a long story")
    page.click("#send")
    page.wait_for_function("document.querySelector('.msg.assistant').textContent.length > 0", timeout=30000)
    page.click("#stop")
    page.wait_for_function("document.getElementById('send').disabled === false", timeout=10000)
    assert page.locator(".msg.assistant").first.text_content().endswith("[stopped]")
    page.close()
    deadline = time.monotonic() + 10
    while server.metric("reft_num_requests_running"):   # Stop cancelled the request on the server
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.fixture(scope="module")
def keyed_server(stories_plan, chat_template_file, tmp_path_factory):
    from server_util import Server

    s = Server(stories_plan, tmp_path_factory.mktemp("keyed-page"), "--chat-template", chat_template_file,
               "--model-name", "stories", "--api-key", "sekrit")
    yield s
    s.stop()


def test_chat_page_behind_an_api_key(keyed_server, browser):
    """The page itself loads without the key; its API calls carry the key typed into it."""
    page = browser.new_page()
    page.goto(keyed_server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('API key')")
    page.fill("#api_key", "sekrit")
    page.dispatch_event("#api_key", "change")
    page.wait_for_function("document.getElementById('model').textContent === 'stories'")
    page.fill("#max_tokens", "5")
    page.fill("#input", "Once upon a time")
    page.click("#send")
    page.wait_for_function("document.getElementById('send').disabled === false"
                           " && document.querySelector('.msg.assistant').textContent.length > 0", timeout=30000)
    assert "error" not in (page.locator(".msg.assistant").first.get_attribute("class") or "")
    page.close()
