"""Serving logic of POST /v1/embeddings: OpenAI's embeddings API over an embed plan.

An embed plan (`reftc compile MODEL -o PLAN --task embed`) is served by the EmbeddingEngine
(reft/runtime/embed.py) in the AsyncEngine's background thread, where a generate plan is served
by the ServingEngine: each input of a request is one engine sequence, so the inputs of a request,
and concurrent requests, share forward steps.

Notable:
- `input`: a string, a list of strings, a list of token ids, or a list of such lists. Text is
  tokenized as the model's tokenizer does by default, its post-processing included (the EOS that
  Qwen3-Embedding's tokenizer appends and its last-token pooling reads).
- `encoding_format` "base64": each vector's float32 values, little-endian, base64-encoded (what
  the openai client asks for by default and decodes).
- `dimensions`: Matryoshka-style truncation to the first N dimensions, re-normalised after. Only a
  server started with --matryoshka honours it (truncating a model that was not trained for it
  quietly spoils its embeddings); elsewhere only the full size is accepted.
- No silent truncation: an input longer than the context is a 400, as are an empty input, token
  ids outside the vocabulary, and more inputs than the server admits at once.
- `user` is accepted and ignored (it changes nothing).
- The plan decides what the server does: on a generate plan this route is a 400 saying how to
  compile an embed plan; on an embed plan chat and completions are 400s (`generation_refused`).
"""
from __future__ import annotations

import asyncio
import base64
import uuid

from anyio import to_thread
from fastapi import Request
from fastapi.responses import Response

from ..runtime.embed import EmbeddingEngine, EmbedRequest
from .openai_serving import ApiError, OpenAIServing
from .protocol import EmbeddingRequest

DISCONNECT_POLL_S = 0.5


def embeddings_refused() -> ApiError:
    """/v1/embeddings on a server of a generate plan."""
    return ApiError(400, "this model was compiled for generation; compile it with `reftc compile MODEL -o PLAN"
                    " --task embed` to serve /v1/embeddings", "model", "model_not_embedding")


def generation_refused(route: str) -> ApiError:
    """Chat and completions on a server of an embed plan."""
    return ApiError(400, f"this model was compiled for embeddings (--task embed); it serves POST /v1/embeddings,"
                    f" not {route}", "model", "model_not_generative")


def encode(vector, encoding_format: str):
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


class EmbeddingServing:
    def __init__(self, api: OpenAIServing, core: EmbeddingEngine):
        """api: the server's OpenAIServing (model name, prompt cap, submission through its
        AsyncEngine, which runs `core`)."""
        self.api, self.core = api, core

    def _inputs(self, given) -> tuple[list, bool]:
        """The request's inputs, each a string or a list of token ids, and whether `input` was one."""
        single = isinstance(given, str) or bool(given and all(isinstance(x, int) for x in given))
        if single:
            given = [given]
        if not given:
            raise ApiError(400, "input is empty; give a string, a list of strings, a list of token ids or a list"
                           " of such lists", "input")
        limit = self.api.engine.max_in_flight
        if len(given) > limit:
            raise ApiError(400, f"input holds {len(given)} items, more than this server takes at once ({limit}:"
                           " --max-num-seqs + --max-queue); send fewer per request", "input")
        return list(given), single

    def _tokens(self, item, i: int | None) -> list[int]:
        param = "input" if i is None else f"input[{i}]"
        if not item:
            raise ApiError(400, f"{param} is empty", "input")
        if isinstance(item, str):
            self.api.check_chars(len(item), param)
            ids = self.core.tokenizer.encode(item)
        else:
            ids = list(item)
            self.api.check_ids(ids, "input")
        if len(ids) > self.core.max_model_len:
            raise ApiError(400, f"{param} has {len(ids)} tokens, more than this model's context of"
                           f" {self.core.max_model_len} tokens; shorten it", "input", "context_length_exceeded")
        return ids

    def _check_dimensions(self, d: int | None) -> None:
        full = self.core.hidden_size
        if d is None or d == full:
            return
        if not self.core.options.matryoshka:
            raise ApiError(400, f"dimensions {d}: this server returns the model's {full} dimensions; truncation is"
                           " for models trained for it (start the server with --matryoshka)", "dimensions")
        if not 1 <= d <= full:
            raise ApiError(400, f"dimensions must be from 1 to {full}, got {d}", "dimensions")

    def requests(self, body: EmbeddingRequest) -> list[EmbedRequest]:
        """The engine requests of an embeddings request (blocking: tokenizes; run it in a thread)."""
        self.api.check_model(body.model)
        self._check_dimensions(body.dimensions)
        items, single = self._inputs(body.input)
        rid = f"embd-{uuid.uuid4().hex}"
        return [EmbedRequest(f"{rid}-{i}", self._tokens(x, None if single else i), body.dimensions)
                for i, x in enumerate(items)]

    async def create(self, body: EmbeddingRequest, request: Request):
        """The response body of POST /v1/embeddings, or a 499 when the client hangs up first."""
        reqs = await to_thread.run_sync(self.requests, body)
        handle = self.api.submit(reqs)
        task = asyncio.ensure_future(self._collect(handle))
        try:
            while True:   # a client that hangs up cancels its request
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    outs = task.result()
                    break
                if await request.is_disconnected():
                    task.cancel()
                    return Response(status_code=499)
        finally:
            handle.close()
        data = [{"object": "embedding", "index": i, "embedding": encode(outs[r.id].embedding, body.encoding_format)}
                for i, r in enumerate(reqs)]
        tokens = sum(len(r.prompt_ids) for r in reqs)
        return {"object": "list", "data": data, "model": self.api.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @staticmethod
    async def _collect(handle) -> dict:
        outs = {}
        async for out in handle:
            if out.finish_reason == "error":
                raise ApiError(500, f"embedding failed: {out.error}", None, "embedding_failed")
            if out.finished:
                outs[out.request_id] = out
        return outs
