"""Tool calling on /v1/chat/completions: tools into the prompt, the forcing grammar, the format.

Notable:
- The model family's tool-call format is read off its chat template and vocabulary: Mistral's
  `[TOOL_CALLS] [{"name", "arguments"}]`, Llama 3.1/3.2's JSON `{"name", "parameters"}` (after
  `<|python_tag|>` or bare), otherwise Hermes-style `<tool_call>{"name", "arguments"}</tool_call>`
  (Qwen2.5/3, SmolLM2, Hermes). tool_parsers.py reads each back out of the generated text.
- A template that mentions `tools` renders them itself (HF templates take `tools=`), and gets the
  history's assistant `tool_calls` (arguments as objects, as HF templates expect) and `tool`
  messages as they are; Mistral's templates demand 9-character alphanumeric call ids, so ids are
  mapped to such for them. A template that ignores tools (SmolLM2's) gets the Hermes format spelled
  out: the tool list and the call syntax in the system message, past calls as `<tool_call>` text,
  tool results inside `<tool_response>` in a user turn (consecutive results in one turn, as Qwen's
  templates do; a template may refuse a role it does not know).
- `tool_choice`: "auto" (the default with tools) lets the model choose and parses what it wrote;
  "none" leaves the tools out of the prompt and parses nothing; "required" and a named function
  are enforced with a grammar that forces the family's call syntax with each function's
  `parameters` schema as the arguments (llguidance Lark with `%json`), so the arguments always
  parse and validate; the call's JSON is spelled as templates write it (`", "` and `": "`, no
  other whitespace). `parallel_tool_calls: false` allows (and returns) one call.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from ..errors import RequestError
from .protocol import ChatCompletionRequest, ChatMessage, TokenizeRequest

HERMES, LLAMA3, MISTRAL = "hermes", "llama3_json", "mistral"
# forced calls are spelled as chat templates write them (`tojson`): {"name": "f", "arguments": {"a": 1}}
CALL_JSON = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class ToolError(RequestError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class ToolPlan:
    """What a request asks of tools: the definitions, the choice and the model's format."""
    tools: list[dict]          # [{"type": "function", "function": {name, description?, parameters?}}]
    choice: str                # "auto" | "none" | "required" | "named"
    name: str | None           # the named function
    parallel: bool
    fmt: str                   # HERMES | LLAMA3 | MISTRAL
    native: bool               # the chat template renders tools itself

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    @property
    def offered(self) -> bool:
        return bool(self.tools) and self.choice != "none"


def tool_format(template: str, tokenizer) -> str:
    if "[TOOL_CALLS]" in template or tokenizer.token_to_id("[TOOL_CALLS]") is not None:
        return MISTRAL
    if "<|python_tag|>" in template or "ipython" in template:
        return LLAMA3
    return HERMES


def plan_tools(body: ChatCompletionRequest | TokenizeRequest, template: str, tokenizer) -> ToolPlan | None:
    """The request's ToolPlan, or None when it has no tools and no history of calls; ToolError
    names what is wrong (an unknown tool_choice name, a bad function name, duplicates)."""
    tools = [t.model_dump(exclude_none=True, by_alias=True) for t in body.tools or ()]
    messages = body.messages or []
    names = [t["function"]["name"] for t in tools]
    for i, name in enumerate(names):
        if not _NAME.fullmatch(name):
            raise ToolError(f"tools.{i}.function.name: {name!r} is not a valid function name (1 to 64 letters,"
                            " digits, underscores, dots or dashes)", f"tools.{i}.function.name")
        if name in names[:i]:
            raise ToolError(f"tools.{i}.function.name: two tools are named {name!r}", f"tools.{i}.function.name")
    tc = getattr(body, "tool_choice", None)
    choice = tc if isinstance(tc, str) else ("named" if tc is not None else ("auto" if tools else "none"))
    name = tc.function.name if choice == "named" else None
    if choice in ("required", "named") and not tools:
        raise ToolError(f"tool_choice {choice!r} needs tools", "tool_choice")
    if name is not None and name not in names:
        raise ToolError(f"tool_choice names the function {name!r}, which is not among the tools ({', '.join(names)})",
                        "tool_choice")
    if not tools and not any(m.tool_calls or m.role == "tool" for m in messages):
        return None
    return ToolPlan(tools, choice, name, getattr(body, "parallel_tool_calls", True), tool_format(template, tokenizer),
                    "tools" in template)


# --- the prompt ----------------------------------------------------------------------------------------
def _arguments(raw, where: str) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw)
    except ValueError:
        raise ToolError(f"{where}: the arguments are not valid JSON", where) from None
    if not isinstance(value, dict):
        raise ToolError(f"{where}: the arguments must be a JSON object", where)
    return value


def _mistral_id(call_id: str) -> str:
    """Mistral's templates refuse call ids that are not 9 alphanumeric characters."""
    return call_id if re.fullmatch(r"[A-Za-z0-9]{9}", call_id) else hashlib.sha1(call_id.encode()).hexdigest()[:9]


def hermes_system_prompt(tools: list[dict]) -> str:
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You can call functions to help with the user's request. The functions you can call are listed"
            f" inside <tools></tools> tags as JSON schemas:\n<tools>\n{listing}\n</tools>\n\nTo call a function,"
            " write a JSON object with its name and arguments inside <tool_call></tool_call> tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <arguments-object>}\n</tool_call>')


def template_messages(messages: list[ChatMessage], plan: ToolPlan | None) -> tuple[list[dict], dict]:
    """(messages, extra template variables) to render a conversation with tools and tool calls."""
    out = []
    for i, m in enumerate(messages):
        d = m.as_template_dict()
        calls = [(c.id or f"call_{i}_{k}", c.function.name,
                  _arguments(c.function.arguments, f"messages.{i}.tool_calls.{k}.function.arguments"))
                 for k, c in enumerate(m.tool_calls or ())]
        if plan is None or plan.native:
            fix = _mistral_id if plan is not None and plan.fmt == MISTRAL else (lambda x: x)
            if calls:
                d["tool_calls"] = [{"id": fix(cid), "type": "function", "function": {"name": n, "arguments": a}}
                                   for cid, n, a in calls]
            if m.tool_call_id is not None:
                d["tool_call_id"] = fix(m.tool_call_id)
        elif calls:
            text = "\n".join("<tool_call>\n" + json.dumps({"name": n, "arguments": a}, ensure_ascii=False)
                             + "\n</tool_call>" for _, n, a in calls)
            d["content"] = (d["content"] + "\n" if d["content"] else "") + text
        elif m.role == "tool":   # as a user turn (what Qwen's templates do; unknown roles may be refused)
            response = f"<tool_response>\n{d['content']}\n</tool_response>"
            if i and messages[i - 1].role == "tool":
                out[-1]["content"] += "\n" + response
                continue
            d = {"role": "user", "content": response}
        out.append(d)
    if plan is None or not plan.offered:
        return out, {}
    if plan.native:
        return out, {"tools": plan.tools}
    prompt = hermes_system_prompt(plan.tools)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, {}


# --- the grammar of required / named calls -------------------------------------------------------------
def _special_id(text: str, tokenizer) -> int | None:
    i = tokenizer.token_to_id(text)
    if i is None:
        return None
    added = tokenizer.backend.get_added_tokens_decoder().get(i)
    return i if added is not None and added.special else None


def _literal(text: str, tokenizer) -> str:
    """A Lark item matching `text`: the special token itself when it is one (text never matches
    special tokens), else the string."""
    i = _special_id(text, tokenizer)
    return f"<[{i}]>" if i is not None else json.dumps(text)


def call_schema(tool: dict, fmt: str) -> dict:
    f = tool["function"]
    key = "parameters" if fmt == LLAMA3 else "arguments"
    params = f.get("parameters") or {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": f["name"]}, key: params},
            "required": ["name", key], "additionalProperties": False}


def forced_grammar(plan: ToolPlan, tokenizer) -> str:
    """A Lark grammar (llguidance dialect) that admits only tool calls in the model's format."""
    tools = [t for t in plan.tools if plan.name in (None, t["function"]["name"])]
    schemas = [call_schema(t, plan.fmt) for t in tools]
    body = dict(schemas[0]) if len(schemas) == 1 else {"anyOf": schemas}
    body["x-guidance"] = CALL_JSON
    many = plan.parallel and plan.name is None
    lines = ["call_json: %json " + json.dumps(body, ensure_ascii=False)]
    if plan.fmt == HERMES:
        opening, closing = _literal("<tool_call>", tokenizer), _literal("</tool_call>", tokenizer)
        lines += ['start: call ("\\n" call)*' if many else "start: call",
                  f'call: {opening} "\\n" call_json "\\n" {closing}']
    elif plan.fmt == LLAMA3:
        lines += ["start: call_json"]
    else:
        more = ' ("," " "? call_json)*' if many else ""
        lines += [f'start: {_literal("[TOOL_CALLS]", tokenizer)} " "? "[" call_json{more} "]"']
    return "\n".join(lines)
