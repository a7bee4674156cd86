"""Request bodies of the OpenAI-compatible API (pydantic), and the OpenAI error body.

Unknown fields are ignored, as OpenAI clients and agent frameworks send many; the fields below
are the ones reft honours. Beyond OpenAI's own: top_k, min_p, repetition_penalty,
stop_token_ids and ignore_eos (vLLM's names and meanings); structured output through
response_format, vLLM's guided_json / guided_regex / guided_choice / guided_grammar and
structured_outputs, and llama-server's grammar and json_schema (structured.py reads them);
tools, tool_choice and parallel_tool_calls on chat (tools.py).

Types are strict, as OpenAI's are: `"max_tokens": "3"` or `"stream": "yes"` is a 400, not
coerced; an int is accepted where a float is expected (`"temperature": 1`). A string holding a
lone UTF-16 surrogate (JSON `"\\ud800"`, which JSON parsers let through) is a 400 naming the
field, before anything tries to tokenize it.
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator
from pydantic_core import PydanticCustomError


def _lone_surrogate(value) -> int | None:
    """Index of the first character of `value` (a string, or a list holding strings) that is not
    valid Unicode, else None."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return e.start
        return None
    if isinstance(value, list) and value and isinstance(value[0], str):  # (a mixed list fails validation)
        for x in value:
            at = _lone_surrogate(x)
            if at is not None:
                return at
    return None


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        if isinstance(data, dict):
            for key, value in data.items():
                at = _lone_surrogate(value)
                if at is not None:
                    raise PydanticCustomError(
                        "invalid_unicode", "not valid Unicode: a lone surrogate at character {at}; send text as"
                        " UTF-8 (escape characters beyond U+FFFF as surrogate pairs)", {"field": str(key), "at": at})
        return data


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: StrictStr | None = None
    description: StrictStr | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs` object (the newer spelling of its guided_* fields)."""
    json_: dict | StrictStr | None = Field(None, alias="json")
    regex: StrictStr | None = None
    choice: list[StrictStr] | None = None
    grammar: StrictStr | None = None
    json_object: bool | None = None


class _Sampling(_Body):
    model: str | None = None
    n: int = Field(1, ge=1, le=64)
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)          # -1 or 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # structured output (one of these at most; structured.py)
    response_format: ResponseFormat | None = None
    guided_json: dict | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None
    structured_outputs: StructuredOutputs | None = None
    grammar: StrictStr | None = None          # llama-server: GBNF (or Lark)
    json_schema: dict | None = None           # llama-server

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class FunctionCall(_Body):
    name: StrictStr
    arguments: StrictStr | dict = "{}"    # OpenAI sends a JSON string; some clients an object


class ToolCall(_Body):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None     # assistant turns that called tools
    tool_call_id: StrictStr | None = None        # a tool's result: the call it answers

    @property
    def text(self) -> str:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return content or ""

    def as_template_dict(self) -> dict:
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text}
        if self.name is not None:
            out["name"] = self.name
        return out


class FunctionDef(_Body):
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ToolDef(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: StrictStr


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, list[StrictInt], list[StrictStr], list[list[StrictInt]]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    tools: list[ToolDef] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[StrictInt]


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               421: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
