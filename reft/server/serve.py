"""`reft run PLAN --serve`: size the KV-cache pool, build the engine stack, run uvicorn.

Engine (one plan, its page pool) -> ServingEngine (scheduler + sampling) -> AsyncEngine (the
background step loop) -> OpenAIServing (API semantics) -> FastAPI app, served by uvicorn on one
socket that is bound here first, so a busy port is one clear error. An embed plan (reftc compile
--task embed) runs an EmbeddingEngine (pooling) in the ServingEngine's place and answers
/v1/embeddings (embeddings.py) instead of chat and completions.
"""
from __future__ import annotations

import socket
import sys
from pathlib import Path

from ..errors import ReftError
from ..runtime.memory import KvBudget, parse_bytes

def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ReftError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _check_task(plan, embedding, speculative: bool, loras: bool = False) -> None:
    """Options that only apply to the other task's plans are an error, not ignored."""
    if plan.task == "embed" and (speculative or loras):
        raise ReftError(f"{plan.path} is an embed plan (reftc compile --task embed); --draft, --spec-ngram and"
                        " --lora apply to generation")
    if plan.task != "embed" and embedding is not None:
        raise ReftError(f"--pooling, --no-normalize and --matryoshka apply to embed plans; {plan.path} was compiled"
                        " for generation (compile the model with `reftc compile MODEL -o PLAN --task embed`)")
    if embedding is not None:
        embedding.check()


def serve(plan_path: Path, *, host: str, port: int, api_key: str | None, kv_cache_memory: str | None,
          max_num_seqs: int, max_batch_tokens: int | None, max_queue: int, chat_template: Path | None,
          backend_options, model_name: str | None, prefix_caching: bool = True, metrics_public: bool = False,
          max_request_bytes: str | None = None, max_prompt_chars: int | None = None,
          allowed_hosts: str | None = None, draft_plan: Path | None = None, spec_ngram: bool = False,
          spec_tokens: int = 4, embedding=None, loras: dict | None = None, reproducible: str = "seeded") -> None:
    """embedding: a runtime.embed.EmbeddingOptions (--pooling, ...) for an embed plan; None: defaults.
    loras: LoRA adapters to load, name -> PEFT adapter folder (requests pick one by `model`).
    reproducible: which requests run reproducibly (ServingEngine: "seeded", "all", "off")."""
    try:
        import uvicorn

        from .app import build_app
    except ImportError as e:
        raise ReftError(f"serving needs FastAPI and uvicorn ({e}); pip install fastapi uvicorn") from None
    from ..frontends.config import load_generation_config
    from ..runtime.async_engine import AsyncEngine
    from ..runtime.engine import Engine
    from ..runtime.lora import load_adapters
    from ..runtime.plan import Plan
    from ..runtime.serving import ServingEngine
    from ..runtime.speculative import make_drafter
    from .guards import DEFAULT_MAX_REQUEST_BYTES, GuardConfig, allowed_host_names
    from .metrics import ServerMetrics
    from .openai_serving import PROMPT_CHARS_PER_TOKEN, OpenAIServing

    guards = GuardConfig(api_key=api_key, metrics_public=metrics_public,
                         max_request_bytes=(parse_bytes(max_request_bytes, "--max-request-bytes") if max_request_bytes
                                            else DEFAULT_MAX_REQUEST_BYTES),
                         allowed_hosts=allowed_host_names(host, allowed_hosts))

    template = None
    if chat_template is not None:
        try:
            template = chat_template.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ReftError(f"{chat_template}: cannot read chat template ({e})") from None
    budget = KvBudget(kv_cache_memory, max_num_seqs)
    plan = Plan(plan_path)
    embed = plan.task == "embed"
    _check_task(plan, embedding, bool(draft_plan or spec_ngram), bool(loras))
    engine = Engine(plan, kv_budget=budget, max_batch_tokens=max_batch_tokens,
                    backend_options=backend_options, prefix_caching=prefix_caching,
                    task="embed" if embed else "generate")
    if template is not None:
        engine.tokenizer.render_chat([{"role": "user", "content": "hi"}], template=template)  # fails early
    load_adapters(engine, loras or {})
    metrics = ServerMetrics()
    if embed:
        from ..runtime.embed import EmbeddingEngine, EmbeddingOptions

        serving = EmbeddingEngine(engine, embedding or EmbeddingOptions(), max_num_seqs=max_num_seqs,
                                  max_batch_tokens=max_batch_tokens, observer=metrics)
    else:
        drafter = make_drafter(draft_plan, spec_ngram, spec_tokens, engine, backend_options)
        serving = ServingEngine(engine, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens,
                                observer=metrics, drafter=drafter, spec_tokens=spec_tokens, reproducible=reproducible)
        if reproducible != "off" and not engine.supports_reproducible:
            print(f"reft: note: {plan.path} has no batch-invariant mode (a cuda plan, or cpu kernels compiled before"
                  " it existed: recompile), so a seeded request's text can depend on what shares its steps",
                  file=sys.stderr, flush=True)
    metrics.watch(serving)
    gen = load_generation_config(plan.path / "tokenizer")
    defaults = {k: gen[k] for k in ("temperature", "top_p", "top_k") if k in gen}
    name = model_name or Path(plan_path).resolve().name
    api = OpenAIServing(AsyncEngine(serving, max_num_seqs + max_queue), engine.tokenizer, name,
                        serving.max_model_len, template, defaults,
                        max_prompt_chars or PROMPT_CHARS_PER_TOKEN * plan.context_length,
                        {n: str(p) for n, p in (loras or {}).items()})
    if embed:
        from .embeddings import EmbeddingServing

        print(f"reft: {name} is an embed plan: POST /v1/embeddings ({serving.options.describe()})",
              file=sys.stderr, flush=True)
    app = build_app(api, metrics, guards, EmbeddingServing(api, serving) if embed else None)
    sock = _listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"reft: serving {name} at http://{shown}:{sock.getsockname()[1]}/ (OpenAI API under /v1;"
          f" {engine.pool.num_pages} KV pages of {plan.kv['page_size']} tokens; context {serving.max_model_len};"
          f" up to {max_num_seqs} sequences per step, {serving.scheduler.max_batch_tokens} tokens per step)",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])
