#!/usr/bin/env python3
"""Serving benchmark: N streamed requests at a fixed concurrency against a running server.

Like vLLM's serving benchmark with its random dataset: every request has a prompt of a random
length (uniform in input_len x [1 - range, 1 + range]) cut from tokenized filler text, and asks
for a random number of output tokens (the same rule on output_len), greedy, with ignore_eos so
it generates exactly that many. Prompts and lengths are seeded, so runs are comparable; the
server's prefix cache remembers them, though, so time each run against a fresh server (or
another --seed).

Reports request throughput, output tokens/s, TTFT (time to first token) and TPOT (time per
output token after the first, per request) at p50 / p99, and the mean streaming rate 1 / TPOT.

    reft run plan/ --serve --port 8000 &
    python tools/bench_serving.py --base-url http://127.0.0.1:8000 -n 64 -c 16 [--nice]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import httpx
import numpy as np

FILLER = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hum strange tunes about rivers "
          "mountains clocks gardens and ships that sail far beyond the morning light").split()


@dataclass
class Result:
    ok: bool
    prompt_tokens: int
    output_tokens: int
    ttft: float = 0.0
    latency: float = 0.0
    error: str = ""


async def one(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int, headers: dict) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    try:
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                return Result(False, len(prompt), 0, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    return Result(False, len(prompt), tokens, error=ev["error"]["message"])
                if ev.get("choices") and ttft is None:
                    ttft = time.perf_counter() - t0
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return Result(False, len(prompt), tokens, error=f"{type(e).__name__}: {e}")
    return Result(True, len(prompt), tokens, ttft or 0.0, time.perf_counter() - t0)


def lengths(rng, mean: int, spread: float, n: int) -> list[int]:
    lo, hi = max(1, int(mean * (1 - spread))), max(1, int(mean * (1 + spread)))
    return rng.integers(lo, hi + 1, n).tolist()


async def make_prompts(client, model, headers, sizes: list[int], rng) -> list[list[int]]:
    words = rng.choice(FILLER, 2 * max(sizes) + 64).tolist()
    r = await client.post("/tokenize", json={"model": model, "prompt": " ".join(words), "add_special_tokens": False},
                          headers=headers)
    r.raise_for_status()
    ids = r.json()["tokens"]
    out = []
    for n in sizes:
        start = int(rng.integers(0, max(1, len(ids) - n)))
        out.append(ids[start:start + n])
    return out


async def bench(args) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=httpx.Timeout(None), limits=limits) as client:
        model = args.model
        if model is None:
            r = await client.get("/v1/models", headers=headers)
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        rng = np.random.default_rng(args.seed)
        ins = lengths(rng, args.input_len, args.range_ratio, args.num_requests)
        outs = lengths(rng, args.output_len, args.range_ratio, args.num_requests)
        prompts = await make_prompts(client, model, headers, ins, rng)
        for i in range(args.warmup):   # reversed: shares no cached prefix with the timed prompts
            await one(client, model, prompts[i % len(prompts)][::-1], 8, headers)
        sem = asyncio.Semaphore(args.concurrency)

        async def limited(p, n):
            async with sem:
                return await one(client, model, p, n, headers)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited(p, n) for p, n in zip(prompts, outs)))
        duration = time.perf_counter() - t0
    good = [r for r in results if r.ok]
    ttft = np.array([r.ttft for r in good]) * 1e3
    tpot = np.array([(r.latency - r.ttft) / (r.output_tokens - 1) for r in good if r.output_tokens > 1]) * 1e3
    pct = lambda a, q: float(np.percentile(a, q)) if a.size else float("nan")  # noqa: E731
    out_tokens = sum(r.output_tokens for r in good)
    return {"model": model, "num_requests": args.num_requests, "concurrency": args.concurrency,
            "completed": len(good), "failed": len(results) - len(good),
            "errors": sorted({r.error for r in results if not r.ok})[:5],
            "duration_s": duration, "request_throughput": len(good) / duration,
            "input_tokens": sum(r.prompt_tokens for r in good), "output_tokens": out_tokens,
            "output_tokens_per_s": out_tokens / duration,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "tpot_ms_p50": pct(tpot, 50), "tpot_ms_p99": pct(tpot, 99),
            "stream_tokens_per_s_mean": float(np.mean(1e3 / tpot)) if tpot.size else float("nan"),
            "settings": {k: v for k, v in vars(args).items() if k not in ("api_key", "output")}}


def table(r: dict) -> str:
    rows = [("completed / failed", f"{r['completed']} / {r['failed']}"), ("duration", f"{r['duration_s']:.2f} s"),
            ("request throughput", f"{r['request_throughput']:.2f} req/s"),
            ("output tokens", f"{r['output_tokens']}"), ("output throughput", f"{r['output_tokens_per_s']:.1f} tok/s"),
            ("TTFT p50 / p99", f"{r['ttft_ms_p50']:.1f} / {r['ttft_ms_p99']:.1f} ms"),
            ("TPOT p50 / p99", f"{r['tpot_ms_p50']:.2f} / {r['tpot_ms_p99']:.2f} ms"),
            ("stream rate (mean 1/TPOT)", f"{r['stream_tokens_per_s_mean']:.1f} tok/s")]
    head = f"model {r['model']}, {r['num_requests']} requests at concurrency {r['concurrency']}"
    lines = [head, "", "| metric | value |", "|---|---:|"] + [f"| {a} | {b} |" for a, b in rows]
    if r["errors"]:
        lines += ["", "errors: " + "; ".join(r["errors"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (`reft run PLAN --serve`)")
    ap.add_argument("--model", default=None, help="model id to send (default: the first of /v1/models)")
    ap.add_argument("--api-key", default=None, help="sent as `Authorization: Bearer KEY`")
    ap.add_argument("-n", "--num-requests", type=int, default=64, help="requests in the run")
    ap.add_argument("-c", "--concurrency", type=int, default=4, help="requests in flight at once")
    ap.add_argument("--input-len", type=int, default=128, help="mean prompt length in tokens")
    ap.add_argument("--output-len", type=int, default=128, help="mean output length in tokens")
    ap.add_argument("--range-ratio", type=float, default=0.5,
                    help="lengths are uniform in mean x [1 - r, 1 + r]; 0 makes every request the same size")
    ap.add_argument("--seed", type=int, default=0, help="seed of prompts and lengths")
    ap.add_argument("--warmup", type=int, default=1, help="untimed short requests first")
    ap.add_argument("--nice", action="store_true",
                    help="run this client at the lowest CPU priority, so that on a machine it shares with the"
                         " server it does not take the cores of the server's kernel threads")
    ap.add_argument("--output", choices=["md", "json"], default="md", help="a table, or JSON for scripts")
    args = ap.parse_args(argv)
    if args.nice:
        os.nice(19)
    if args.num_requests < 1 or args.concurrency < 1 or not 0 <= args.range_ratio < 1:
        ap.error("need --num-requests >= 1, --concurrency >= 1 and 0 <= --range-ratio < 1")
    try:
        r = asyncio.run(bench(args))
    except httpx.HTTPError as e:
        print(f"error: cannot reach {args.base_url}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(r, indent=2) if args.output == "json" else table(r))
    return 0 if r["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
