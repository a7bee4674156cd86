"""Tool calling through the official openai client against the real server (the bundled model with
a template that ignores tools, so the Hermes format is spelled out in the prompt): forced calls
whose arguments validate, named functions, streamed tool-call deltas the client assembles, tool
history, and 400s for requests that cannot be honoured."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["celsius", "fahrenheit"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
             "additionalProperties": False}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "Weather in Oslo?"}]


def _check_call(call):
    assert call.id.startswith("call_") and call.type == "function"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_returns_a_valid_call(client):
    for seed in range(3):
        r = client.chat.completions.create(model="stories", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=200)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls) == 1
        _check_call(c.message.tool_calls[0])


def test_named_function(client):
    r = client.chat.completions.create(model="stories", messages=MESSAGES, tools=TOOLS, temperature=1.0, seed=4,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       max_tokens=200, n=2)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and [t.function.name for t in c.message.tool_calls] == ["get_time"]
        _check_call(c.message.tool_calls[0])


def test_streamed_tool_calls_assemble(client):
    """The client's stream helper assembles the delta.tool_calls chunks into the same call."""
    with client.chat.completions.stream(model="stories", messages=MESSAGES, tools=TOOLS, temperature=1.0, seed=7,
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                        max_tokens=200) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_completion()
    c = final.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    _check_call(c.message.tool_calls[0])
    assert "tool_calls.function.arguments.done" in events
    deltas = {}   # and by hand, as the OpenAI docs accumulate them
    for chunk in client.chat.completions.create(model="stories", messages=MESSAGES, tools=TOOLS, temperature=1.0,
                                                seed=7, max_tokens=200, stream=True, tool_choice={
                                                    "type": "function", "function": {"name": "get_weather"}}):
        for d in chunk.choices[0].delta.tool_calls or ():
            acc = deltas.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            acc["id"] = d.id or acc["id"]
            acc["name"] += d.function.name or "" if d.function else ""
            acc["arguments"] += d.function.arguments or "" if d.function else ""
    assert list(deltas) == [0] and deltas[0]["name"] == "get_weather"
    assert json.loads(deltas[0]["arguments"]) == json.loads(c.message.tool_calls[0].function.arguments)


def test_auto_and_none(client):
    for choice in ("auto", "none"):
        r = client.chat.completions.create(model="stories", messages=MESSAGES, tools=TOOLS, tool_choice=choice,
                                           temperature=0, max_tokens=20)
        c = r.choices[0]
        assert c.finish_reason in ("stop", "length", "tool_calls")
        assert c.message.content or c.message.tool_calls


def test_tool_history_renders(server, client):
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": -3}'}]
    ids = httpx.post(server.url + "/tokenize", json={"messages": history, "tools": TOOLS}).json()["tokens"]
    text = httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert "<tools>" in text and '"name": "get_time"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius", "days": 1}}' in text
    assert '<tool_response>\n{"temp": -3}\n</tool_response>' in text
    r = client.chat.completions.create(model="stories", messages=history, tools=TOOLS, max_tokens=10, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("extra, words", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "'launch'"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS + TOOLS[:1]}, "two tools are named 'get_weather'"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "not a valid function name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
      "tool_choice": "required"}, "Invalid type"),
    ({"messages": MESSAGES + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}, "not valid JSON"),
])
def test_bad_tool_requests_are_400(server, client, extra, words):
    body = {"model": "stories", "messages": MESSAGES, "max_tokens": 5, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    assert words in e.value.body["message"]
    assert server.healthy()
