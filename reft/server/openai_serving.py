"""Serving logic of /v1/chat/completions and /v1/completions: API request -> engine requests
(responses.py turns their outputs into OpenAI response objects, whole or as server-sent events).

Notable:
- Each of the n choices (and, for completions, each prompt of a batch) is one engine sequence;
  with a seed, choice i draws from seed + i, so a request is reproducible as a whole.
- Sampling fields the request leaves out fall back to the model's generation_config.json, then
  to OpenAI's defaults (temperature 1, top_p 1, no top-k).
- max_tokens left out means "up to the context" for chat and 16 for completions (OpenAI's).
- usage counts the prompt once per prompt (not once per choice), as OpenAI does.
- Structured output (structured.py reads the fields) and the grammar of tool_choice "required" or
  a named function (tools.py) are compiled once per request, in the worker thread, after the
  cheaper checks; every choice follows its own copy. A grammar the engine rejects is a 400.
- Prompt text is capped in characters before it is tokenized (`max_prompt_chars`; serve.py
  makes it PROMPT_CHARS_PER_TOKEN x the plan's context length by default: no prompt that long
  fits the context, and tokenizing it would only waste time).
- Chat-template rendering, tokenization and detokenization of request inputs are blocking work:
  the routes run the methods doing them in worker threads (the tokenizer releases the GIL).
- Completions with `echo` return the prompt text before the completion; with `logprobs` the
  logprobs cover the prompt tokens too (the first one's is null, as vLLM's), computed by the
  engine from every prompt row's logits. `max_tokens: 0` is allowed with echo (score only).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from ..errors import RequestError
from ..runtime.grammar import GrammarError, GrammarSpec
from ..runtime.sampler import SamplingParams
from ..runtime.serving import Request, RequestOutput, TokenLogprob
from .protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                       _Sampling, error_body)
from .structured import grammar_spec
from .tool_parsers import ToolCallParser
from .tools import ToolError, ToolPlan, forced_grammar, plan_tools, template_messages

PROMPT_CHARS_PER_TOKEN = 32   # the default prompt cap: far above any tokenizer's characters per token


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
    started: bool = False   # an output of it was sent (or, whole, collected)
    echo: str = ""          # the prompt text it echoes (completions with echo)
    tools: ToolCallParser | None = None   # chat with tools offered: splits the text into content and calls


@dataclass
class Job:
    """One API request: its engine requests and the choices they fill."""
    api_id: str
    reqs: list[Request]
    choices: list[Choice]
    logprobs: bool
    echo: bool = False

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
                          repetition_penalty=body.repetition_penalty,
                          logit_bias={int(k): float(v) for k, v in body.logit_bias.items()} if body.logit_bias else None)


class OpenAIServing:
    def __init__(self, engine, tokenizer, model_name: str, max_model_len: int, chat_template: str | None,
                 defaults: dict, max_prompt_chars: int | None = None, adapters: dict[str, str] | None = None):
        """adapters: the LoRA adapters loaded in the engine, name -> folder; a request selects one by
        naming it as its `model`."""
        self.engine = engine                  # AsyncEngine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.adapters = dict(adapters or {})
        self.max_model_len = max_model_len
        self.chat_template = chat_template
        self.defaults = defaults
        self.max_prompt_chars = max_prompt_chars or PROMPT_CHARS_PER_TOKEN * max_model_len

    def model_card(self, model: str | None = None) -> dict:
        """The /v1/models entry of the base model or of a LoRA adapter (with its parent, as vLLM lists them)."""
        adapter = self.check_model(model)
        card = {"id": adapter or self.model_name, "object": "model", "created": 0, "owned_by": "reft",
                "max_model_len": self.max_model_len}
        if adapter is not None:
            card.update(root=self.adapters[adapter], parent=self.model_name)
        return card

    def model_cards(self) -> list[dict]:
        return [self.model_card()] + [self.model_card(a) for a in self.adapters]

    # --- validation shared by every route ----------------------------------------------------------
    def check_model(self, model: str | None) -> str | None:
        """The LoRA adapter a request's `model` names (None: the base model); 404 for anything else."""
        if model is None or model == self.model_name:
            return None
        if model in self.adapters:
            return model
        served = ", ".join(f"`{m}`" for m in [self.model_name, *self.adapters])
        raise ApiError(404, f"the model `{model}` does not exist; this server serves {served}", "model",
                       "model_not_found")

    def check_chars(self, chars: int, param: str) -> None:
        if chars > self.max_prompt_chars:
            raise ApiError(400, f"the {param} holds {chars:,} characters, more than this server accepts for a"
                           f" model with a {self.max_model_len}-token context ({self.max_prompt_chars:,} characters,"
                           " --max-prompt-chars); shorten it", param, "prompt_too_long")

    @property
    def template(self) -> str:
        template = self.chat_template or self.tokenizer.chat_template
        if not template:
            raise ApiError(400, "this model has no chat template; start the server with --chat-template FILE"
                           " or use /v1/completions", "messages")
        return template

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    tools: ToolPlan | None = None) -> list[int]:
        """Messages (and tools) -> prompt token ids through the chat template (blocking: run it in a
        thread)."""
        from ..errors import ModelError

        self.check_chars(sum(len(m.text) for m in messages), "messages")
        template = self.template
        try:
            dicts, extra = template_messages(messages, tools)
            text = self.tokenizer.render_chat(dicts, add_generation_prompt=add_generation_prompt, template=template,
                                              **extra)
        except ToolError as e:
            raise ApiError(400, str(e), e.param) from None
        except ModelError as e:
            raise ApiError(400, str(e), "messages") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    def constrain(self, job: Job, spec: GrammarSpec | None, grammar: str | None = None) -> None:
        """Compile the request's grammar (blocking) and give it to every choice; 400 if rejected."""
        if spec is None:
            return
        try:
            constraint = self.engine.serving.grammars.compile(spec, grammar)
        except GrammarError as e:
            raise ApiError(400, str(e), e.param) from None
        for r in job.reqs:
            r.grammar = constraint

    def check_ids(self, ids: list[int], param: str) -> None:
        vocab = self.engine.serving.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is out of range [0, {vocab})", param)

    def tokenize(self, body: TokenizeRequest) -> dict:
        self.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of `prompt` or `messages`")
        if body.messages is not None:
            try:
                tools = plan_tools(body, self.template, self.tokenizer)
            except ToolError as e:
                raise ApiError(400, str(e), e.param) from None
            ids = self.render_chat(body.messages, body.add_generation_prompt, tools)
        else:
            self.check_chars(len(body.prompt), "prompt")
            ids = self.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    def detokenize(self, body: DetokenizeRequest) -> dict:
        self.check_model(body.model)
        self.check_ids(body.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    def _requests(self, body: _Sampling, prompts: list[list[int]], max_tokens: int | None, default_max: int | None,
                  logprobs: int | None, prefix: str, echo: bool = False) -> Job:
        """Engine requests for each prompt x n choices; `echo` allows max_tokens 0 (score only)."""
        adapter = self.check_model(body.model)
        if body.logit_bias:
            self.check_ids([int(k) for k in body.logit_bias], "logit_bias")
        rid = f"{prefix}-{uuid.uuid4().hex}"
        reqs, choices = [], []
        for p, ids in enumerate(prompts):
            room = self.max_model_len - len(ids)
            if room < (0 if echo and max_tokens == 0 else 1):
                raise ApiError(400, f"this model's maximum context length is {self.max_model_len} tokens, but the"
                               f" prompt has {len(ids)} tokens", "messages" if prefix == "chatcmpl" else "prompt",
                               "context_length_exceeded")
            self.check_ids(ids, "prompt")
            n_max = max_tokens if max_tokens is not None else (default_max or room)
            if n_max < 0 or (n_max == 0 and not echo):
                raise ApiError(400, f"max_tokens must be at least 1{' (or 0 with echo)' if prefix == 'cmpl' else ''},"
                               f" got {n_max}", "max_tokens")
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
                # echo scores the prompt when logprobs are asked for, or when there is nothing else to do
                scoring = (logprobs if logprobs is not None else (0 if n_max == 0 else None)) if echo else None
                reqs.append(Request(f"{rid}-{index}", ids, n_max, sp, body.stops, tuple(body.stop_token_ids or ()),
                                    body.ignore_eos, logprobs, scoring, skip_special_tokens=body.skip_special_tokens,
                                    adapter=adapter))
                choices.append(Choice(index, p))
        return Job(rid, reqs, choices, logprobs is not None, echo)

    def chat_requests(self, body: ChatCompletionRequest) -> Job:
        """The engine requests of a chat completion (blocking: run it in a thread)."""
        try:
            spec = grammar_spec(body)
            tools = plan_tools(body, self.template, self.tokenizer)
        except (GrammarError, ToolError) as e:
            raise ApiError(400, str(e), e.param) from None
        if tools is not None and tools.forced and spec is not None:
            raise ApiError(400, f"tool_choice {body.tool_choice if tools.name is None else tools.name!r} forces tool"
                           f" calls, which cannot follow {spec.param} as well; give one of them", spec.param)
        ids = self.render_chat(body.messages, body.add_generation_prompt, tools)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        lp = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        job = self._requests(body, [ids], max_tokens, None, lp, "chatcmpl")
        if tools is not None and tools.forced:
            self.constrain(job, GrammarSpec("grammar", None, "tools"), forced_grammar(tools, self.tokenizer))
        else:
            self.constrain(job, spec)
        if tools is not None and tools.offered:
            for c in job.choices:
                c.tools = ToolCallParser(tools.fmt, tools.parallel)
        return job

    def completion_requests(self, body: CompletionRequest) -> Job:
        """The engine requests of a completion (blocking: run it in a thread)."""
        p = body.prompt
        given = [p] if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)) else list(p)
        for x in given:
            if isinstance(x, str):
                self.check_chars(len(x), "prompt")
        prompts = [self.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in given]
        if not prompts or any(not x for x in prompts):
            raise ApiError(400, "the prompt is empty", "prompt")
        try:
            spec = grammar_spec(body)
        except GrammarError as e:
            raise ApiError(400, str(e), e.param) from None
        job = self._requests(body, prompts, body.max_tokens, 16, body.logprobs, "cmpl", body.echo)
        self.constrain(job, spec)
        if body.echo:
            texts = [x if isinstance(x, str) else self.tokenizer.decode(x, skip_special_tokens=True) for x in given]
            for c in job.choices:
                c.echo = texts[c.prompt]
        return job

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

    def completion_logprobs(self, entries: list[TokenLogprob], offset: int) -> dict:
        """The legacy completions logprobs object of `entries`, whose text starts at `offset`; a
        prompt's first token has null logprob and top_logprobs."""
        offsets = []
        for x in entries:
            offsets.append(offset)
            offset += len(x.text)
        return {"tokens": [x.text for x in entries], "token_logprobs": [x.logprob for x in entries],
                "top_logprobs": [None if x.logprob is None else {self._spell(x.prev, t): v for t, v in x.top}
                                 for x in entries],
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
