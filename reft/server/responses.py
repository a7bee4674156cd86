"""Engine outputs -> OpenAI response objects: whole (`collect`) or as server-sent events (`sse_events`).

Notable:
- A stream ends with one chunk per choice carrying its finish_reason, then the usage chunk when
  stream_options.include_usage is set, then `data: [DONE]`. An engine failure mid-stream is sent
  as an OpenAI error object before [DONE].
- With tools, each choice's text goes through its ToolCallParser: content that cannot be part of
  a call is streamed as `delta.content` at once; each call, when complete, as two
  `delta.tool_calls` chunks (index, id, type and name with empty arguments, then the arguments),
  which the OpenAI client concatenates per index. A choice that called tools and stopped has
  finish_reason "tool_calls"; its message content is null when it said nothing else.
"""
from __future__ import annotations

import json
import time

from anyio import to_thread

from ..runtime.serving import RequestOutput
from .openai_serving import Choice, Job, OpenAIServing


def _update(choice: Choice, out: RequestOutput) -> None:
    choice.text += out.text
    choice.completion_tokens = out.completion_tokens
    choice.prompt_tokens, choice.cached_tokens = out.prompt_tokens, out.cached_tokens
    if out.finished:
        choice.finish_reason = out.finish_reason


def _finish_reason(c: Choice) -> str | None:
    if c.finish_reason == "stop" and c.tools is not None and c.tools.calls:
        return "tool_calls"
    return c.finish_reason


async def _completion_part(serving: OpenAIServing, job: Job, c: Choice, out: RequestOutput) -> tuple[str, dict | None]:
    """The text and logprobs object that one output adds to a completion choice; the first output
    of an echoing choice brings the prompt (and the prompt's logprobs) before its own."""
    lp = serving.completion_logprobs(out.logprobs, len(c.echo) + len(c.text)) if job.logprobs else None
    text, first = out.text, not c.started
    c.started = True
    if first and job.echo:
        text = c.echo + text
        if job.logprobs:   # decoding every prompt token's alternatives is blocking work
            head = await to_thread.run_sync(serving.completion_logprobs, out.prompt_logprobs or [], 0)
            lp = {k: head[k] + lp[k] for k in lp}
    return text, lp


def _chat_message(c: Choice) -> dict:
    if c.tools is None:
        return {"role": "assistant", "content": c.text}
    content, _ = c.tools.push(c.text)
    rest, _ = c.tools.finish()
    content += rest
    if not c.tools.calls:
        return {"role": "assistant", "content": content}
    return {"role": "assistant", "content": content if content.strip() else None, "tool_calls": c.tools.calls}


async def collect(serving: OpenAIServing, job: Job, stream, chat: bool) -> dict:
    """Run a request to the end and build the whole response object."""
    lps: dict[int, list] = {c.index: [] for c in job.choices}
    comp_lps = {c.index: {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                for c in job.choices}
    async for out in stream:
        if out.finish_reason == "error":
            raise serving._fail(out)
        c = job.choice(out)
        if chat and out.logprobs:
            lps[c.index] += serving.chat_logprobs(out)
        elif not chat:
            _, part = await _completion_part(serving, job, c, out)
            for k, v in (part or {}).items():
                comp_lps[c.index][k] += v
        _update(c, out)
    head = {"id": job.api_id, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": serving.model_name}
    if chat:
        body = [{"index": c.index, "message": _chat_message(c),
                 "logprobs": {"content": lps[c.index]} if job.logprobs else None, "finish_reason": _finish_reason(c)}
                for c in job.choices]
    else:
        body = [{"index": c.index, "text": c.echo + c.text, "logprobs": comp_lps[c.index] if job.logprobs else None,
                 "finish_reason": c.finish_reason} for c in job.choices]
    return {**head, "choices": body, "usage": serving.usage(job.choices)}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _chat_deltas(c: Choice, out: RequestOutput) -> tuple[str, list[dict]]:
    """The content and tool-call deltas that one output adds to a chat choice."""
    if c.tools is None:
        return out.text, []
    content, calls = c.tools.push(out.text)
    if out.finished:
        more, later = c.tools.finish()
        content, calls = content + more, calls + later
    first = len(c.tools.calls) - len(calls)
    deltas = []
    for k, call in enumerate(calls, first):
        fn = call["function"]
        deltas.append({"index": k, "id": call["id"], "type": "function",
                       "function": {"name": fn["name"], "arguments": ""}})
        deltas.append({"index": k, "function": {"arguments": fn["arguments"]}})
    return content, deltas


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
        if chat:
            _update(c, out)
            content, calls = _chat_deltas(c, out)
            lp = {"content": serving.chat_logprobs(out)} if job.logprobs else None
            pending = bool(content or out.logprobs)
            if calls:
                if pending:
                    yield chunk([{"index": c.index, "delta": {"content": content} if content else {}, "logprobs": lp,
                                  "finish_reason": None}])
                    content, lp, pending = "", None, False
                for d in calls:
                    yield chunk([{"index": c.index, "delta": {"tool_calls": [d]}, "logprobs": None,
                                  "finish_reason": None}])
            if not (pending or out.finished):
                continue
            delta = {"content": content} if content else {}
            yield chunk([{"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": _finish_reason(c)}])
        else:
            text, lp = await _completion_part(serving, job, c, out)
            _update(c, out)
            if text or out.logprobs or out.finished:
                yield chunk([{"index": c.index, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}])
    else:
        if include_usage:
            yield _sse({**head, "choices": [], "usage": serving.usage(job.choices)})
    yield "data: [DONE]\n\n"
