"""`reft bench`: prompt processing (ppN) and text generation (tgN) speed, as llama-bench defines them.

ppN: one step of N prompt tokens on an empty KV cache. tgN: N single-token decode steps
starting from an empty cache. Each test runs once to warm up, then `repetitions` times;
tokens/s is reported as mean and standard deviation over the repetitions.

Speculative decoding (`bench_speculative`, `reft bench --draft/--spec-ngram`) needs real text, since
drafts are only accepted where the model would say them: a prompt is decoded greedily through the
serving engine without and then with the drafter, in the same run, and the generated tokens must
be identical (they are compared); reported are both decode speeds, the speed-up, the acceptance
rate and the mean accepted length.
"""
from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass

import numpy as np

from .engine import Chunk, Engine


@dataclass
class BenchResult:
    model: str
    size_bytes: int
    params: int
    backend: str
    threads: int
    test: str
    tokens_per_s: float
    stddev: float
    runs: list
    peak_rss_bytes: int
    kv_cache_bytes: int = 0
    load_s: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tokens(engine: Engine, n: int, seed: int = 0) -> list[int]:
    vocab = int(engine.plan.manifest.get("vocab_size") or 32000)
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def time_prompt(engine: Engine, n: int, reproducible: bool = False) -> float:
    seq = engine.new_sequence(_tokens(engine, n), reproducible)
    try:
        t0 = time.perf_counter()
        engine.prefill(seq)
        return time.perf_counter() - t0
    finally:
        seq.release()


def time_generation(engine: Engine, n: int, reproducible: bool = False) -> float:
    toks = _tokens(engine, n, seed=1)
    seq = engine.new_sequence([toks[0]], reproducible)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            engine.step([Chunk(seq, 1)])
            if i + 1 < n:
                seq.tokens.append(toks[i + 1])
        return time.perf_counter() - t0
    finally:
        seq.release()


def bench(engine: Engine, prompt: int, gen: int, repetitions: int, threads: int,
          load_s: float = 0.0, reproducible: bool = False) -> list[BenchResult]:
    """llama-bench's ppN / tgN tests; `load_s` (how long Engine.load took) is reported alongside;
    reproducible: time reproducible sequences (the batch-invariant kernels a seeded request gets)."""
    m = engine.plan.manifest
    kv = sum(a.nbytes for a in engine.pool.arrays.values())
    q = m.get("quantization") or {}
    if q.get("method") == "gguf":   # the file's types, most common first, as llama-bench names the model
        kinds = sorted(q["matrices"].items(), key=lambda kv: -kv[1])
        precision = "+".join(d for d, _ in kinds if d not in ("float32", "float16", "bfloat16")).upper()
    elif q.get("method"):
        precision = f"{q['method']}" + (f"-g{q['group_size']}" if q.get("group_size") else "")
    else:
        precision = m["dtypes"]["weights"]
    name = f"{m['model']['architecture']} {precision}" + (" reproducible" if reproducible else "")
    out = []
    tests = ([(f"pp{prompt}", prompt, time_prompt)] if prompt else []) + ([(f"tg{gen}", gen, time_generation)] if gen else [])
    for test, n, fn in tests:
        fn(engine, n, reproducible)  # warm-up
        rates = [n / fn(engine, n, reproducible) for _ in range(repetitions)]
        out.append(BenchResult(name, int(m["weights"]["bytes"]), int(m["model"]["params"]), m["backend"]["name"],
                               threads, test, float(np.mean(rates)), float(np.std(rates)), rates, peak_rss(), kv, load_s))
    return out


def format_table(results: list[BenchResult]) -> str:
    rows = ["| model | size | params | backend | threads | test | t/s |", "|---|---:|---:|---|---:|---|---:|"]
    for r in results:
        rows.append(f"| {r.model} | {r.size_bytes / 2**20:.2f} MiB | {r.params / 1e6:.2f} M | {r.backend} | {r.threads}"
                    f" | {r.test} | {r.tokens_per_s:.2f} ± {r.stddev:.2f} |")
    if results:
        r = results[-1]
        rows.append(f"\npeak RSS {r.peak_rss_bytes / 2**20:.0f} MiB (weights {r.size_bytes / 2**20:.0f} MiB,"
                    f" KV cache {r.kv_cache_bytes / 2**20:.0f} MiB), plan load {r.load_s:.2f} s")
    return "\n".join(rows)


@dataclass
class SpecBenchResult:
    drafter: str
    spec_tokens: int
    prompt_tokens: int
    generated: int
    plain_tokens_per_s: float
    spec_tokens_per_s: float
    acceptance_rate: float
    mean_accepted_length: float
    identical: bool

    @property
    def speedup(self) -> float:
        return self.spec_tokens_per_s / self.plain_tokens_per_s

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup}


def _decode(engine: Engine, ids: list[int], gen: int, drafter, spec_tokens: int):
    """Greedy decode of `ids` through the serving engine: (generated ids, decode seconds, spec stats).
    The clock starts after the first token (prefill is not decoding)."""
    from .sampler import SamplingParams
    from .serving import Request, ServingEngine

    serving = ServingEngine(engine, max_num_seqs=1, drafter=drafter, spec_tokens=spec_tokens,
                            reproducible="off")   # one sequence: nothing else shares its steps
    serving.add(Request("bench", list(ids), gen, SamplingParams(temperature=0)))
    out, t0 = [], None
    while serving.has_work:
        for o in serving.step():
            out += o.token_ids
        if t0 is None:
            t0 = time.perf_counter()
            first = len(out)
    engine.pool.reset_prefix_cache()
    return out, time.perf_counter() - t0, first, serving.spec


def bench_speculative(engine: Engine, drafter, ids: list[int], gen: int, repetitions: int,
                      spec_tokens: int) -> SpecBenchResult:
    """Plain greedy decoding of `ids` against speculative decoding with `drafter`, same run."""
    _decode(engine, ids, gen, None, spec_tokens)                      # warm-up
    plain, spec, stats = [], [], None
    for _ in range(repetitions):
        want, secs, first, _ = _decode(engine, ids, gen, None, spec_tokens)
        plain.append((len(want) - first) / secs)
        got, secs, first, stats = _decode(engine, ids, gen, drafter, spec_tokens)
        spec.append((len(got) - first) / secs)
    return SpecBenchResult(drafter.name, spec_tokens, len(ids), len(want), float(np.mean(plain)),
                           float(np.mean(spec)), stats.acceptance_rate, stats.mean_accepted_length, got == want)


def format_spec(r: SpecBenchResult) -> str:
    return "\n".join([
        "| drafter | k | prompt | generated | plain t/s | speculative t/s | speed-up | acceptance | mean accepted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r.drafter} | {r.spec_tokens} | {r.prompt_tokens} | {r.generated} | {r.plain_tokens_per_s:.2f}"
        f" | {r.spec_tokens_per_s:.2f} | {r.speedup:.2f}x | {r.acceptance_rate:.2f} | {r.mean_accepted_length:.2f} |",
        "" if r.identical else "\nWARNING: the speculative output differs from plain greedy decoding"])
