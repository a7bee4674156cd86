"""Serving logic of /v1/chat/completions and /v1/completions: API request -> engine requests ->
OpenAI response objects, whole or as server-sent events.

Notable:
- Each of the n choices (and, for completions, each prompt of a batch) is one engine sequence;
  with a seed, choice i draws from seed + i, so a request is reproducible as a whole.
- Sampling fields the request leaves out fall back to the model's generation_config.json, then
  to OpenAI's defaults (temperature 1, top_p 1, no top-k).
- max_tokens left out means "up to the context" for chat and 16 for completions (OpenAI's).
- usage counts the prompt once per prompt (not once per choice), as OpenAI does.
- A stream ends with one chunk per choice carrying its finish_reason, then the usage chunk when
  stream_options.include_usage is set, then `data: [DONE]`. An engine failure mid-stream is sent
  as an OpenAI error object before [DONE].
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from ..errors import RequestError
from ..runtime.sampler import SamplingParams
from ..runtime.serving import Request, RequestOutput
from .protocol import ChatCompletionRequest, CompletionRequest, _Sampling, error_body


class ApiError(Exception):
    """An error to send as an OpenAI error body with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


@dataclass
class Choice:
    """The accumulated state of one choice."""
    index: int
    prompt: int          # which prompt of the request it continues
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    started: bool = False


@dataclass
class Job:
    """One API request: its engine requests and the choices they fill."""
    api_id: str
    reqs: list[Request]
    choices: list[Choice]
    logprobs: bool

    def choice(self, out: RequestOutput) -> Choice:
        return self.choices[int(out.request_id.rsplit("-", 1)[1])]


def sampling_params(body: _Sampling, defaults: dict, index: int) -> SamplingParams:
    def pick(name, fallback):
        v = getattr(body, name)
        return v if v is not None else defaults.get(name, fallback)

    top_k = int(pick("top_k", 0))
    return SamplingParams(temperature=float(pick("temperature", 1.0)), top_p=float(pick("top_p", 1.0)),
                          top_k=max(top_k, 0), min_p=float(pick("min_p", 0.0)),
                          seed=None if body.seed is None else body.seed + index,
                          presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                          repetition_penalty=body.repetition_penalty)


class OpenAIServing:
    def __init__(self, engine, tokenizer, model_name: str, max_model_len: int, chat_template: str | None,
                 defaults: dict):
        self.engine = engine                  # AsyncEngine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.chat_template = chat_template
        self.defaults = defaults

    # --- validation shared by every route ----------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"the model `{model}` does not exist; this server serves `{self.model_name}`",
                           "model", "model_not_found")

    def render_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        from ..errors import ModelError

        template = self.chat_template or self.tokenizer.chat_template
        if not template:
            raise ApiError(400, "this model has no chat template; start the server with --chat-template FILE"
                           " or use /v1/completions", "messages")
        try:
            text = self.tokenizer.render_chat([m.as_template_dict() for m in messages],
                                              add_generation_prompt=add_generation_prompt, template=template)
        except ModelError as e:
            raise ApiError(400, str(e), "messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.engine.serving.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is out of range [0, {vocab})", param)

    def _requests(self, body: _Sampling, prompts: list[list[int]], max_tokens: int | None, default_max: int | None,
                  logprobs: int | None, prefix: str) -> Job:
        self.check_model(body.model)
        rid = f"{prefix}-{uuid.uuid4().hex}"
        reqs, choices = [], []
        for p, ids in enumerate(prompts):
            self.check_ids(ids, "prompt")
            if len(ids) >= self.max_model_len:
                raise ApiError(400, f"this model's maximum context length is {self.max_model_len} tokens, but the"
                               f" prompt has {len(ids)} tokens", "messages" if prefix == "chatcmpl" else "prompt",
                               "context_length_exceeded")
            n_max = max_tokens if max_tokens is not None else (default_max or self.max_model_len - len(ids))
            if n_max <= 0:
                raise ApiError(400, f"max_tokens must be at least 1, got {n_max}", "max_tokens")
            if len(ids) + n_max > self.max_model_len:
                raise ApiError(400, f"this model's maximum context length is {self.max_model_len} tokens, but"
                               f" {len(ids)} prompt tokens + {n_max} max_tokens = {len(ids) + n_max};"
                               " lower max_tokens or shorten the prompt", "max_tokens", "context_length_exceeded")
            for i in range(body.n):
                index = p * body.n + i
                try:
                    sp = sampling_params(body, self.defaults, index)
                    sp.validate()
                except RequestError as e:
                    raise ApiError(400, str(e)) from None
                reqs.append(Request(f"{rid}-{index}", ids, n_max, sp, body.stops, tuple(body.stop_token_ids or ()),
                                    body.ignore_eos, logprobs))
                choices.append(Choice(index, p))
        return Job(rid, reqs, choices, logprobs is not None)

    def chat_requests(self, body: ChatCompletionRequest):
        ids = self.render_chat(body.messages, body.add_generation_prompt)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        lp = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return self._requests(body, [ids], max_tokens, None, lp, "chatcmpl")

    def completion_requests(self, body: CompletionRequest):
        if body.echo:
            raise ApiError(400, "echo is not supported", "echo")
        p = body.prompt
        if isinstance(p, str):
            prompts = [self.tokenizer.encode(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif p:
            prompts = [self.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in p]
        else:
            prompts = []
        if not prompts or any(not x for x in prompts):
            raise ApiError(400, "the prompt is empty", "prompt")
        return self._requests(body, prompts, body.max_tokens, 16, body.logprobs, "cmpl")

    def submit(self, reqs: list[Request]):
        from ..runtime.async_engine import Overloaded

        try:
            return self.engine.submit(reqs)
        except Overloaded as e:
            raise ApiError(429, str(e), None, "too_many_requests") from None
        except RequestError as e:
            raise ApiError(400, str(e)) from None

    # --- response objects --------------------------------------------------------------------------
    def _spell(self, prev: int, tok: int) -> str:
        """An alternative token's text as it would follow `prev` (decoded alone, SentencePiece
        tokens would lose their leading space)."""
        dec = self.tokenizer.decode
        before, both = dec([prev]), dec([prev, tok])
        return both[len(before):] if both.startswith(before) else dec([tok])

    def chat_logprobs(self, out: RequestOutput) -> list[dict]:
        def entry(text, lp):
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
        return [{**entry(x.text, x.logprob), "top_logprobs": [entry(self._spell(x.prev, t), v) for t, v in x.top]}
                for x in out.logprobs]

    def completion_logprobs(self, out: RequestOutput, offset: int) -> dict:
        offsets = []
        for x in out.logprobs:
            offsets.append(offset)
            offset += len(x.text)
        return {"tokens": [x.text for x in out.logprobs], "token_logprobs": [x.logprob for x in out.logprobs],
                "top_logprobs": [{self._spell(x.prev, t): v for t, v in x.top} for x in out.logprobs],
                "text_offset": offsets}

    @staticmethod
    def usage(choices: list[Choice]) -> dict:
        prompts = {c.prompt: (c.prompt_tokens, c.cached_tokens) for c in choices}
        prompt = sum(p for p, _ in prompts.values())
        completion = sum(c.completion_tokens for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(c for _, c in prompts.values())}}

    @staticmethod
    def _fail(out: RequestOutput) -> ApiError:
        return ApiError(500, f"generation failed: {out.error}", None, "generation_failed")


def _update(choice: Choice, out: RequestOutput) -> None:
    choice.text += out.text
    choice.completion_tokens = out.completion_tokens
    choice.prompt_tokens, choice.cached_tokens = out.prompt_tokens, out.cached_tokens
    if out.finished:
        choice.finish_reason = out.finish_reason


async def collect(serving: OpenAIServing, job: Job, stream, chat: bool) -> dict:
    """Run a request to the end and build the whole response object."""
    lps: dict[int, list] = {c.index: [] for c in job.choices}
    comp_lps = {c.index: {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                for c in job.choices}
    async for out in stream:
        if out.finish_reason == "error":
            raise serving._fail(out)
        c = job.choice(out)
        if out.logprobs:
            if chat:
                lps[c.index] += serving.chat_logprobs(out)
            else:
                part = serving.completion_logprobs(out, len(c.text))
                for k, v in part.items():
                    comp_lps[c.index][k] += v
        _update(c, out)
    head = {"id": job.api_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": serving.model_name}
    if chat:
        body = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                 "logprobs": {"content": lps[c.index]} if job.logprobs else None, "finish_reason": c.finish_reason}
                for c in job.choices]
    else:
        body = [{"index": c.index, "text": c.text, "logprobs": comp_lps[c.index] if job.logprobs else None,
                 "finish_reason": c.finish_reason} for c in job.choices]
    return {**head, "choices": body, "usage": serving.usage(job.choices)}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def sse_events(serving: OpenAIServing, job: Job, stream, chat: bool, include_usage: bool):
    """The server-sent events of a streamed response (the caller closes the stream)."""
    head = {"id": job.api_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": serving.model_name}

    def chunk(choice_objs):
        return _sse({**head, "choices": choice_objs, **({"usage": None} if include_usage else {})})

    if chat:  # the role comes first, as OpenAI sends it
        yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for c in job.choices])
    async for out in stream:
        if out.finish_reason == "error":
            yield _sse(serving._fail(out).body())
            break
        c = job.choice(out)
        offset = len(c.text)
        _update(c, out)
        if not (out.text or out.logprobs or out.finished):
            continue
        if chat:
            lp = {"content": serving.chat_logprobs(out)} if job.logprobs else None
            delta = {"content": out.text} if out.text else {}
            yield chunk([{"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": out.finish_reason}])
        else:
            lp = serving.completion_logprobs(out, offset) if job.logprobs else None
            yield chunk([{"index": c.index, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason}])
    else:
        if include_usage:
            yield _sse({**head, "choices": [], "usage": serving.usage(job.choices)})
    yield "data: [DONE]\n\n"
