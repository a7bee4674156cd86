"""Thin helpers over llama-cpp-python's low-level API (llama.cpp's C API through ctypes).

Used by tools/bench_models.py (GGUF re-encoding, load/logit checks) and
tools/bench_vs_llamacpp.py (pp/tg timing done the way llama-bench does it).

Only the C API is used (`llama_model_load_from_file`, `llama_init_from_model`,
`llama_decode`, ...), never the high-level `Llama` class, so what is timed is llama.cpp's
own work plus one ctypes call per decode step.
"""
from __future__ import annotations

import ctypes
import random
import statistics
import time
from collections import deque
from pathlib import Path

INSTALL_HINT = 'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36'

# llama_ftype values (llama.h)
FTYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k_m": 15, "bf16": 32}


class LlamaCppError(RuntimeError):
    """Anything that went wrong on the llama.cpp side; the message is one line, meant for users."""


_lib = None
_log = deque(maxlen=40)
_log_cb = None  # keep the ctypes callback alive


def lib():
    """The llama_cpp module, with llama.cpp's logging captured (not printed)."""
    global _lib, _log_cb
    if _lib is not None:
        return _lib
    try:
        import llama_cpp  # noqa: PLC0415
    except Exception as e:  # ImportError, or OSError when the shared library does not load
        raise LlamaCppError(f"llama.cpp engine not available ({type(e).__name__}: {e}); "
                            f"install it with: {INSTALL_HINT}") from None

    @llama_cpp.llama_log_callback
    def _cb(level, text, user_data):  # noqa: ARG001
        try:
            _log.append(text.decode("utf-8", "replace"))
        except Exception:
            pass

    _log_cb = _cb
    llama_cpp.llama_log_set(_log_cb, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    _lib = llama_cpp
    return _lib


def last_log(n: int = 3) -> str:
    lines = [s.strip() for s in "".join(_log).splitlines() if s.strip()]
    return " | ".join(lines[-n:]) if lines else "(no log output)"


def version() -> str:
    L = lib()
    v = getattr(L, "__version__", "?")
    return f"llama-cpp-python {v}"


def system_info() -> str:
    return lib().llama_print_system_info().decode("utf-8", "replace").strip()


def quantize(src: Path, dst: Path, ftype: str, nthread: int = 0) -> None:
    """Re-encode a GGUF with llama.cpp's quantizer (`allow_requantize`, so Q4_1 -> F32/F16 works)."""
    L = lib()
    p = L.llama_model_quantize_default_params()
    p.ftype = FTYPE[ftype]
    p.allow_requantize = True
    p.nthread = nthread
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise LlamaCppError(f"llama_model_quantize {src} -> {dst} ({ftype}) failed with {rc}: {last_log()}")


class Model:
    """A llama.cpp model held on the CPU (no GPU layers), memory-mapped like llama-bench does."""

    def __init__(self, path: str | Path, *, use_mmap: bool = True):
        L = lib()
        path = Path(path)
        if not path.is_file():
            raise LlamaCppError(f"GGUF file not found: {path}")
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_mmap = use_mmap
        self.path = path
        self.ptr = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.ptr:
            raise LlamaCppError(f"llama.cpp could not load {path}: {last_log()}")
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.size_bytes = int(L.llama_model_size(self.ptr))  # what llama-bench prints as "size"
        self.n_params = int(L.llama_model_n_params(self.ptr))
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(L.llama_vocab_bos(self.vocab))
        buf = ctypes.create_string_buffer(256)
        L.llama_model_desc(self.ptr, buf, 256)
        self.desc = buf.value.decode("utf-8", "replace")

    def context(self, *, n_ctx: int, n_batch: int = 512, n_ubatch: int = 512, n_threads: int = 2,
                flash_attn: int = -1) -> Context:
        return Context(self, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_threads=n_threads,
                       flash_attn=flash_attn)

    def tokenize(self, text: str, *, add_special: bool = False) -> list[int]:
        L = lib()
        raw = text.encode("utf-8")
        n_max = len(raw) + 16
        arr = (L.llama_token * n_max)()
        n = L.llama_tokenize(self.vocab, raw, len(raw), arr, n_max, add_special, False)
        if n < 0:
            raise LlamaCppError(f"llama_tokenize needs {-n} tokens")
        return list(arr[:n])

    def close(self) -> None:
        if getattr(self, "ptr", None):
            lib().llama_model_free(self.ptr)
            self.ptr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Context:
    """A llama.cpp context: KV cache + compute buffers. Defaults follow llama-bench
    (n_ubatch 512, F16 KV cache, flash attention 'auto')."""

    def __init__(self, model: Model, *, n_ctx: int, n_batch: int, n_ubatch: int, n_threads: int, flash_attn: int):
        L = lib()
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = min(n_ubatch, n_batch)
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        cp.flash_attn_type = flash_attn
        cp.no_perf = True
        self.model = model
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_threads = n_threads
        self.ptr = L.llama_init_from_model(model.ptr, cp)
        if not self.ptr:
            raise LlamaCppError(f"llama.cpp could not create a context (n_ctx={n_ctx}): {last_log()}")

    def set_threads(self, n: int) -> None:
        lib().llama_set_n_threads(self.ptr, n, n)
        self.n_threads = n

    def clear(self) -> None:
        L = lib()
        L.llama_memory_clear(L.llama_get_memory(self.ptr), False)

    def decode(self, tokens: list[int]) -> None:
        """llama_decode of one batch (positions continue the cache; logits for the last token only)."""
        L = lib()
        arr = (L.llama_token * len(tokens))(*tokens)
        rc = L.llama_decode(self.ptr, L.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            raise LlamaCppError(f"llama_decode of {len(tokens)} tokens failed with {rc}: {last_log()}")

    def synchronize(self) -> None:
        lib().llama_synchronize(self.ptr)

    def logits_all(self, tokens: list[int]):
        """Logits for every position of `tokens`, decoded as one batch from an empty cache (numpy [T, V])."""
        import numpy as np  # noqa: PLC0415

        L = lib()
        self.clear()
        n = len(tokens)
        batch = L.llama_batch_init(n, 0, 1)
        try:
            for i, t in enumerate(tokens):
                batch.token[i] = t
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1
            batch.n_tokens = n
            rc = L.llama_decode(self.ptr, batch)
            if rc != 0:
                raise LlamaCppError(f"llama_decode failed with {rc}: {last_log()}")
            out = np.empty((n, self.model.n_vocab), dtype=np.float32)
            for i in range(n):
                ptr = L.llama_get_logits_ith(self.ptr, i)
                out[i] = np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))
            return out
        finally:
            L.llama_batch_free(batch)

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        import numpy as np  # noqa: PLC0415

        L = lib()
        self.clear()
        self.decode(prompt)
        out = []
        for _ in range(n):
            ptr = L.llama_get_logits_ith(self.ptr, -1)
            tok = int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))))
            out.append(tok)
            self.decode([tok])
        return out

    def close(self) -> None:
        if getattr(self, "ptr", None):
            lib().llama_free(self.ptr)
            self.ptr = None


# ---- llama-bench's two tests (tools/llama-bench/llama-bench.cpp: test_prompt / test_gen) ----

def _test_prompt(ctx: Context, n_prompt: int, n_batch: int, rng: random.Random) -> None:
    m = ctx.model
    done = 0
    while done < n_prompt:
        n = min(n_prompt - done, n_batch)
        toks = [m.bos if (done == 0 and m.add_bos) else rng.randrange(m.n_vocab)]
        toks += [rng.randrange(m.n_vocab) for _ in range(n - 1)]
        ctx.decode(toks)
        done += n
    ctx.synchronize()


def _test_gen(ctx: Context, n_gen: int, rng: random.Random) -> None:
    m = ctx.model
    tok = m.bos if m.add_bos else rng.randrange(m.n_vocab)
    for _ in range(n_gen):
        ctx.decode([tok])
        ctx.synchronize()
        tok = rng.randrange(m.n_vocab)


def bench(ctx: Context, *, n_prompt: int = 0, n_gen: int = 0, reps: int = 3, warmup: bool = True,
          seed: int = 1234) -> list[float]:
    """Tokens/s of each repetition of one llama-bench test (ppN: n_prompt>0, n_gen=0; tgN: the reverse).

    Like llama-bench: one warm-up (the whole prompt for pp, a single token for tg), then `reps`
    timed runs, each from an empty KV cache; tokens/s = (n_prompt + n_gen) / seconds.
    """
    rng = random.Random(seed)
    ctx.set_threads(ctx.n_threads)
    if warmup:
        ctx.clear()
        if n_prompt:
            _test_prompt(ctx, n_prompt, ctx.n_batch, rng)
        if n_gen:
            _test_gen(ctx, 1, rng)
    out = []
    for _ in range(reps):
        ctx.clear()
        t0 = time.perf_counter_ns()
        if n_prompt:
            _test_prompt(ctx, n_prompt, ctx.n_batch, rng)
        if n_gen:
            _test_gen(ctx, n_gen, rng)
        dt = (time.perf_counter_ns() - t0) / 1e9
        out.append((n_prompt + n_gen) / dt)
    return out


def mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)
