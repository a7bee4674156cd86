"""`reft run PLAN --serve`: size the KV-cache pool, build the engine stack, run uvicorn.

Engine (one plan, its page pool) -> ServingEngine (scheduler + sampling) -> AsyncEngine (the
background step loop) -> OpenAIServing (API semantics) -> FastAPI app, served by uvicorn on one
socket that is bound here first, so a busy port is one clear error. An embed plan (reftc compile
--task embed) runs an EmbeddingEngine (pooling) in the ServingEngine's place and answers
/v1/embeddings (embeddings.py) instead of chat and completions.
"""
from __future__ import annotations

import re
import socket
import sys
from pathlib import Path

from ..errors import ReftError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}
DEFAULT_KV_FRACTION = 0.2


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes), else a conservative 2 GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 2 * 2**30


def _size(text: str) -> tuple[float, str] | None:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    return (float(m.group(1)), m.group(2).lower()) if m and m.group(2).lower() in _UNITS else None


def parse_memory(text: str) -> int:
    """'2GiB', '512MB', '1e9' (bytes) or a fraction of available memory such as '0.25'."""
    size = _size(text)
    if size is None:
        raise ReftError(f"--kv-cache-memory {text!r}: give a size such as 2GiB or 512MB, or a fraction of free"
                        " memory such as 0.25")
    value, unit = size
    if not unit and 0 < value <= 1:
        return int(value * available_memory())
    return int(value * _UNITS[unit])


def parse_bytes(text: str, option: str) -> int:
    """'4MiB', '500kB', '1048576' -> bytes (at least 1)."""
    size = _size(text)
    if size is None or int(size[0] * _UNITS[size[1]]) < 1:
        raise ReftError(f"{option} {text!r}: give a size such as 4MiB, 500kB or 1048576")
    return int(size[0] * _UNITS[size[1]])


def kv_pages(layout: dict, memory: str | None, max_num_seqs: int, context: int) -> int:
    """Pages in the pool: --kv-cache-memory, or by default enough for max_num_seqs full contexts
    capped at a fifth of available memory."""
    from ..runtime.kv_cache import PagePool

    page = PagePool.page_bytes(layout)
    if memory is not None:
        pages = parse_memory(memory) // page
    else:
        want = max_num_seqs * -(-context // layout["page_size"])
        pages = min(want, int(DEFAULT_KV_FRACTION * available_memory()) // page)
    if pages < 2:
        raise ReftError(f"--kv-cache-memory {memory}: holds {pages} KV page(s) of {page:,} bytes; give more")
    return pages


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
    plan = Plan(plan_path)
    embed = plan.task == "embed"
    _check_task(plan, embedding, bool(draft_plan or spec_ngram), bool(loras))
    pages = kv_pages(plan.kv, kv_cache_memory, max_num_seqs, plan.context_length)
    engine = Engine(plan, kv_tokens=pages * plan.kv["page_size"], max_batch_tokens=max_batch_tokens,
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
          f" {pages} KV pages of {plan.kv['page_size']} tokens; context {serving.max_model_len};"
          f" up to {max_num_seqs} sequences per step, {serving.scheduler.max_batch_tokens} tokens per step)",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])
