"""Request bodies of the OpenAI-compatible API (pydantic), and the OpenAI error body.

Unknown fields are ignored, as OpenAI clients and agent frameworks send many; the fields below
are the ones reft honours, and those in UNSUPPORTED (behaviour reft lacks: suffix, best_of, beam
search, audio, ...) are a 400 naming the field when a request uses them, never silently ignored. Beyond OpenAI's own: top_k, min_p, repetition_penalty,
stop_token_ids, ignore_eos and skip_special_tokens (vLLM's names and meanings), logit_bias; structured output through
response_format, vLLM's guided_json / guided_regex / guided_choice / guided_grammar and
structured_outputs, and llama-server's grammar and json_schema (structured.py reads them);
tools, tool_choice and parallel_tool_calls on chat (tools.py). Embeddings (embeddings.py):
input, encoding_format, dimensions.

Types are strict, as OpenAI's are: `"max_tokens": "3"` or `"stream": "yes"` is a 400, not
coerced; an int is accepted where a float is expected (`"temperature": 1`). A string holding a
lone UTF-16 surrogate (JSON `"\\ud800"`, which JSON parsers let through) is a 400 naming the
field, before anything tries to tokenize it.
"""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator, model_validator
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


# Fields of the OpenAI / vLLM APIs that select behaviour reft does not have: a request that uses one
# is a 400 naming it rather than an answer that silently ignores it. field -> (is it used?, why not)
UNSUPPORTED = {
    "suffix": (lambda v: v not in (None, ""), "suffix (text after the insertion point) is not supported"),
    "best_of": (lambda v: v not in (None, 1), "best_of > 1 is not supported; use n"),
    "functions": (lambda v: v is not None, "the legacy `functions` field is not supported; use tools"),
    "function_call": (lambda v: v is not None, "the legacy `function_call` field is not supported; use tool_choice"),
    "audio": (lambda v: v is not None, "audio output is not supported"),
    "modalities": (lambda v: v not in (None, ["text"]), "only the text modality is supported"),
    "prediction": (lambda v: v is not None, "predicted outputs are not supported (the server's --spec-ngram"
                   " drafts from the prompt)"),
    "web_search_options": (lambda v: v is not None, "web search is not supported"),
    "reasoning_effort": (lambda v: v is not None, "reasoning_effort is not supported"),
    "min_tokens": (lambda v: v not in (None, 0), "min_tokens is not supported"),
    "use_beam_search": (lambda v: bool(v), "beam search is not supported"),
    "length_penalty": (lambda v: v not in (None, 1, 1.0), "length_penalty (beam search) is not supported"),
    "include_stop_str_in_output": (lambda v: bool(v), "include_stop_str_in_output is not supported"),
    "truncate_prompt_tokens": (lambda v: v is not None, "truncate_prompt_tokens is not supported"),
}


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
    logit_bias: dict[str, float] | None = None   # token id (as a string, OpenAI's JSON) -> bias in [-100, 100]
    skip_special_tokens: bool = True          # vLLM: leave special tokens out of the text

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        if isinstance(data, dict):
            for key, (used, why) in UNSUPPORTED.items():
                if used(data.get(key)):
                    raise PydanticCustomError("unsupported", why, {"field": key})
        return data

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v):
        for k, b in (v or {}).items():
            if not k.isdigit():
                raise ValueError(f"keys must be token ids, got {k!r}")
            if not -100 <= b <= 100:
                raise ValueError(f"biases must be in [-100, 100], got {b} for token {k}")
        return v

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data):
        if isinstance(data, dict) and data.get("type") != "text":
            raise PydanticCustomError("unsupported", "content parts of type {kind} are not supported (text only)",
                                      {"field": "type", "kind": repr(data.get("type"))})
        return data


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


class EmbeddingRequest(_Body):
    model: str | None = None
    input: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: str | None = None        # accepted; changes nothing

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value):
        """One message for every wrong shape (rather than the first union member's complaint)."""
        ids = lambda xs: all(isinstance(x, int) and not isinstance(x, bool) for x in xs)  # noqa: E731
        if isinstance(value, str) or (isinstance(value, list) and (
                all(isinstance(x, str) for x in value) or ids(value)
                or all(isinstance(x, list) and ids(x) for x in value))):
            return value
        raise PydanticCustomError("input_type", "must be a string, a list of strings, a list of token ids or a list"
                                  " of lists of token ids")


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
