"""Tool calling without a server: the parsers of each family's format on text samples (whole and
streamed a character at a time), the prompt a tools-aware template renders against transformers'
apply_chat_template, the Hermes fallback for templates that ignore tools, and the forcing grammars."""
from __future__ import annotations

import json

import pytest

from reft.compiler import ASSETS
from reft.frontends.tokenizer import Tokenizer
from reft.server.protocol import ChatCompletionRequest
from reft.server.tool_parsers import ToolCallParser
from reft.server.tools import HERMES, LLAMA3, MISTRAL, forced_grammar, plan_tools, template_messages

CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}'
SAMPLES = [  # (format, text, content, [(name, arguments)])
    (HERMES, f"<tool_call>\n{CALL}\n</tool_call>", None, [("get_weather", {"city": "Paris", "days": 2})]),
    (HERMES, f"Let me look.\n<tool_call>\n{CALL}\n</tool_call>\n<tool_call>{{\"name\": \"now\", \"arguments\": {{}}}}"
             "</tool_call>\n", "Let me look.", [("get_weather", {"city": "Paris", "days": 2}), ("now", {})]),
    (HERMES, f"<tool_call>\n{CALL}", None, [("get_weather", {"city": "Paris", "days": 2})]),   # unclosed at the end
    (HERMES, "Use <b>bold</b> or <tool_> tags, a < b.", "Use <b>bold</b> or <tool_> tags, a < b.", []),
    (HERMES, "<tool_call>{not json}</tool_call> ok", "<tool_call>{not json}</tool_call> ok", []),
    (HERMES, '<tool_call>{"name": "f", "arguments": "{\\"x\\": [1]}"}</tool_call>', None, [("f", {"x": [1]})]),
    (LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}', None,
     [("get_weather", {"city": "Oslo"})]),
    (LLAMA3, ' {"name": "a", "parameters": {}}; {"name": "b", "parameters": {"k": true}}', None,
     [("a", {}), ("b", {"k": True})]),
    (LLAMA3, '{"answer": 42}', '{"answer": 42}', []),
    (LLAMA3, "The weather is {unknown}.", "The weather is {unknown}.", []),
    (MISTRAL, '[TOOL_CALLS] [{"name": "a", "arguments": {"q": "x"}}, {"name": "b", "arguments": {}}]', None,
     [("a", {"q": "x"}), ("b", {})]),
    (MISTRAL, '[{"name": "a", "arguments": {"q": "é"}}]', None, [("a", {"q": "é"})]),
    (MISTRAL, "[1, 2] is a list.", "[1, 2] is a list.", []),
]


def _parse(fmt: str, pieces: list[str], parallel: bool = True):
    p = ToolCallParser(fmt, parallel)
    content, calls = "", []
    for piece in pieces:
        c, k = p.push(piece)
        content, calls = content + c, calls + k
    c, k = p.finish()
    content, calls = content + c, calls + k
    assert calls == p.calls
    return content, [(x["function"]["name"], json.loads(x["function"]["arguments"])) for x in calls], calls


@pytest.mark.parametrize("fmt, text, content, calls", SAMPLES)
def test_parsers_whole_and_streamed(fmt, text, content, calls):
    whole = _parse(fmt, [text])
    streamed = _parse(fmt, list(text))
    for got, got_calls, raw in (whole, streamed):
        assert got_calls == calls
        assert (got.strip() or None) == content
        assert all(x["id"].startswith("call_") and x["type"] == "function" for x in raw)
    assert len({x["id"] for x in whole[2] + streamed[2]}) == 2 * len(calls)


def test_parallel_false_keeps_the_first_call():
    _, calls, _ = _parse(HERMES, [SAMPLES[1][1]], parallel=False)
    assert calls == [("get_weather", {"city": "Paris", "days": 2})]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
HISTORY = [{"role": "system", "content": "Be brief."},
           {"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_abc", "type": "function", "function": {"name": "get_weather",
                                                                   "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "tool_call_id": "call_abc", "content": '{"temp": 21}'}]
# a Qwen2.5-style template: tools listed in the system turn, calls and results spelled with tojson
TOOLS_TEMPLATE = """{%- if tools %}<|system|>{{ messages[0].content if messages[0].role == 'system' else '' }}
<tools>{% for t in tools %}{{ t | tojson }}
{% endfor %}</tools>
{%- elif messages[0].role == 'system' %}<|system|>{{ messages[0].content }}{% endif %}
{% for m in messages %}{% if m.role == 'assistant' %}<|assistant|>{{ m.content or '' }}
{%- for c in m.tool_calls or [] %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}
</tool_call>{% endfor %}
{% elif m.role == 'tool' %}<|user|><tool_response id="{{ m.tool_call_id }}">{{ m.content }}</tool_response>
{% elif m.role != 'system' %}<|{{ m.role }}|>{{ m.content }}
{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"""


def _plan(body: dict, template: str, tok):
    return plan_tools(ChatCompletionRequest.model_validate({"messages": HISTORY, **body}), template, tok)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(ASSETS / "stories260K")


def test_tools_template_matches_transformers(tok):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(ASSETS / "stories260K" / "tokenizer.json"))
    plan = _plan({"tools": TOOLS}, TOOLS_TEMPLATE, tok)
    assert plan.native and plan.fmt == HERMES and plan.choice == "auto"
    body = ChatCompletionRequest.model_validate({"messages": HISTORY, "tools": TOOLS})
    messages, extra = template_messages(body.messages, plan)
    ours = tok.render_chat(messages, template=TOOLS_TEMPLATE, **extra)
    hf_history = json.loads(json.dumps(HISTORY))   # transformers documents arguments as an object
    hf_history[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    want = hf.apply_chat_template(hf_history, tools=TOOLS, chat_template=TOOLS_TEMPLATE, tokenize=False,
                                  add_generation_prompt=True)
    assert ours == want and '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}' in ours


def test_template_without_tools_gets_the_hermes_format(tok):
    plain = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    plan = _plan({"tools": TOOLS}, plain, tok)
    assert not plan.native and plan.fmt == HERMES
    body = ChatCompletionRequest.model_validate({"messages": HISTORY, "tools": TOOLS})
    text = tok.render_chat(*template_messages(body.messages, plan)[:1], template=plain)
    assert text.startswith("system: Be brief.\n\nYou can call functions") and json.dumps(TOOLS[1]) in text
    assert 'assistant: <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert text.endswith('user: <tool_response>\n{"temp": 21}\n</tool_response>\n')
    plan = _plan({"tools": TOOLS, "tool_choice": "none"}, plain, tok)   # none: the tools stay out of the prompt
    text = tok.render_chat(*template_messages(body.messages, plan)[:1], template=plain)
    assert "You can call functions" not in text and "<tool_call>" in text


def test_mistral_templates_get_nine_character_ids(tok):
    template = ("{% for m in messages %}{% for c in m.tool_calls or [] %}{% if c.id | length != 9 %}"
                "{{ raise_exception('bad id') }}{% endif %}[TOOL_CALLS]{{ c.id }}{% endfor %}"
                "{% if m.tool_call_id is defined %}{{ m.tool_call_id }}{% endif %}{% endfor %}{{ tools | length }}")
    plan = _plan({"tools": TOOLS}, template, tok)
    assert plan.fmt == MISTRAL and plan.native
    messages, extra = template_messages(ChatCompletionRequest.model_validate({"messages": HISTORY}).messages, plan)
    text = tok.render_chat(messages, template=template, **extra)
    ids = text[len("[TOOL_CALLS]"):-1]
    assert len(ids) == 18 and ids[:9] == ids[9:] and ids.isalnum() and text.endswith("2")


@pytest.mark.parametrize("fmt, choice, parallel, pieces", [
    (HERMES, "required", True, ['start: call ("\\n" call)*', '"<tool_call>"', '"get_weather"', '"now"']),
    (HERMES, {"type": "function", "function": {"name": "now"}}, True, ["start: call\n", '"now"']),
    (LLAMA3, "required", False, ["start: call_json", '"parameters"']),
    (MISTRAL, "required", True, ['"[TOOL_CALLS]" " "? "[" call_json ("," " "? call_json)* "]"']),
])
def test_forced_grammars(tok, fmt, choice, parallel, pieces):
    template = {HERMES: "{{ tools }}", LLAMA3: "<|python_tag|>{{ tools }}", MISTRAL: "[TOOL_CALLS]{{ tools }}"}[fmt]
    plan = _plan({"tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": parallel}, template, tok)
    assert plan.fmt == fmt and plan.forced
    grammar = forced_grammar(plan, tok)
    for piece in pieces:
        assert piece in grammar
    if plan.name == "now":
        assert "get_weather" not in grammar
