"""Structured output and tool calling on the real SmolLM2-135M-Instruct (Q4_1 GGUF, its own chat
template, which ignores tools: the Hermes format is spelled out for it), through the openai client.
Skips without the GGUF (tools/fetch_smollm2.py fetches it)."""
from __future__ import annotations

import json

import jsonschema
import pytest
from paths import SMOLLM2_GGUF
from server_util import Server

pytestmark = [pytest.mark.slow, pytest.mark.skipif(SMOLLM2_GGUF is None, reason="no SmolLM2 GGUF")]
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}}]
ASK = [{"role": "user", "content": "What's the weather like in Paris today?"}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "maxItems": 3, "items": {"type": "object", "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]}, "name": {"type": "string", "maxLength": 12}},
        "required": ["kind", "name"], "additionalProperties": False}},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                 "country": {"type": "string", "maxLength": 20}},
                "required": ["city", "country"], "additionalProperties": False}},
    "required": ["name", "age", "pets", "address"], "additionalProperties": False}


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from reft.compiler import compile_model

    tmp = tmp_path_factory.mktemp("smol")
    s = Server(compile_model(SMOLLM2_GGUF, tmp / "plan", progress=False), tmp, "--model-name", "smol")
    yield s.client()
    s.stop()


def test_required_tool_call_then_answer(smol):
    r = smol.chat.completions.create(model="smol", messages=ASK, tools=TOOLS, tool_choice="required",
                                     temperature=0, max_tokens=100)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    for call in c.message.tool_calls:
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    call = c.message.tool_calls[0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "sunny"}'}]
    r = smol.chat.completions.create(model="smol", messages=history, tools=TOOLS, temperature=0, max_tokens=40)
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length") and c.message.content and not c.message.tool_calls


def test_json_schema_nested(smol):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = smol.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Invent a person."}],
                                     response_format=fmt, n=4, seed=1, temperature=1.0, max_tokens=250)
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), PERSON)
