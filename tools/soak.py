"""Soak test: minutes of mixed traffic against one `reft run PLAN --serve`, checking that nothing
breaks, leaks or drifts.

Concurrent clients loop over a weighted mix of requests:

  complete   a completion, whole                         expect 200
  chat       a streamed chat completion, read to [DONE]  expect 200 and a finish_reason
  cancel     a streamed completion dropped after a few chunks (the server must abort it)
  n2         n=2 with logprobs                           expect 200, two choices
  seeded     one of 10 fixed prompts with its own seed at temperature 1, among the rest of the
             traffic: its text must equal the first answer seen for that prompt (reproducibility
             whatever the batch and the prefix cache hold: the server runs seeded requests as
             reproducible sequences, docs/serving.md). A mismatch fails the run
  long       a prompt near the context, or past it       expect 200, or 400 context_length_exceeded
  oversized  a body over --max-request-bytes             expect 413
  malformed  broken JSON / wrong types / unknown model   expect 400 / 404

Reported: requests and status codes per kind, 5xx (must be 0), lost requests (no response, a
stream without [DONE], a wrong status: must be 0), reproducibility mismatches (must be 0),
latency percentiles (whole requests, and time to first token of streams), and the server's RSS
sampled every few seconds: after warm-up, at the end, and its peak — growth beyond the KV pool
(which is allocated at start) fails the run. At the end the server must hold no sequences and no
KV pages. Exit status 0 only when every check holds.

    python tools/soak.py --plan plans/smollm2 --minutes 10 --concurrency 16
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
KINDS = {"complete": 20, "chat": 20, "cancel": 15, "n2": 8, "seeded": 15, "long": 7, "oversized": 5, "malformed": 10}
WORDS = ("the little dog ran to the park and saw a big red ball under a green tree while the sun was shining and"
         " the birds were singing songs about the summer sky").split()
MAX_BODY = 1 << 20    # the server is started with --max-request-bytes 1MiB


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


class Soak:
    def __init__(self, url: str, model: str, context: int, vocab: int, seed: int):
        self.url, self.model, self.context, self.vocab = url, model, context, vocab
        self.rng = random.Random(seed)
        self.status: dict[str, Counter] = defaultdict(Counter)
        self.lost: list[str] = []
        self.server_errors: list[str] = []
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.ttft: list[float] = []
        self.first_text: dict[int, str] = {}
        self.mismatches = 0
        self.seeded_checks = 0
        self.seeded_prompts = [f"Story {i}: " + " ".join(WORDS[i:] + WORDS[:i]) for i in range(10)]

    def prompt(self, lo: int = 3, hi: int = 40) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(lo, hi)))

    def expect(self, kind: str, status: int, ok: tuple[int, ...], what: str = "") -> bool:
        self.status[kind][status] += 1
        if status >= 500:
            self.server_errors.append(f"{kind}: {status} {what[:200]}")
        if status not in ok:
            self.lost.append(f"{kind}: status {status}, expected {ok} {what[:200]}")
            return False
        return True

    def check(self, kind: str, ok: bool, what: str) -> None:
        if not ok:
            self.lost.append(f"{kind}: unexpected answer {what[:200]}")

    async def one(self, c: httpx.AsyncClient, kind: str) -> None:
        t0 = time.perf_counter()
        try:
            await getattr(self, "_" + kind)(c, t0)
        except (httpx.HTTPError, json.JSONDecodeError, KeyError, IndexError) as e:
            self.lost.append(f"{kind}: {type(e).__name__}: {e}")
            return
        self.latency[kind].append(time.perf_counter() - t0)

    async def _complete(self, c, t0):
        r = await c.post("/v1/completions", json={"model": self.model, "prompt": self.prompt(),
                                                   "max_tokens": self.rng.randint(4, 48)})
        if self.expect("complete", r.status_code, (200,), r.text):
            self.check("complete", r.json()["choices"][0]["finish_reason"] in ("stop", "length"), r.text)

    async def _stream(self, c, kind, path, body, t0, stop_after=None):
        done, first = False, None
        async with c.stream("POST", path, json={**body, "stream": True}) as r:
            if not self.expect(kind, r.status_code, (200,)):
                return
            chunks = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if first is None:
                    first = time.perf_counter() - t0
                if line == "data: [DONE]":
                    done = True
                    break
                chunks += 1
                if stop_after is not None and chunks >= stop_after:
                    return   # the client goes away mid-stream
        self.ttft.append(first or 0.0)
        if not done:
            self.lost.append(f"{kind}: stream ended without [DONE]")

    async def _chat(self, c, t0):
        body = {"model": self.model, "messages": [{"role": "user", "content": self.prompt()}],
                "max_tokens": self.rng.randint(8, 64)}
        await self._stream(c, "chat", "/v1/chat/completions", body, t0)

    async def _cancel(self, c, t0):
        body = {"model": self.model, "prompt": self.prompt(), "max_tokens": 200, "ignore_eos": True}
        await self._stream(c, "cancel", "/v1/completions", body, t0, stop_after=self.rng.randint(1, 5))

    async def _n2(self, c, t0):
        r = await c.post("/v1/completions", json={"model": self.model, "prompt": self.prompt(), "n": 2,
                                                   "max_tokens": 16, "logprobs": 2, "temperature": 0.9})
        if self.expect("n2", r.status_code, (200,), r.text):
            self.check("n2", len(r.json()["choices"]) == 2, r.text)

    async def _seeded(self, c, t0):
        i = self.rng.randrange(10)
        r = await c.post("/v1/completions", json={"model": self.model, "prompt": self.seeded_prompts[i],
                                                   "max_tokens": 24, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                                   "seed": 4242 + i, "ignore_eos": True})
        if self.expect("seeded", r.status_code, (200,), r.text):
            text = r.json()["choices"][0]["text"]
            self.seeded_checks += 1
            if self.first_text.setdefault(i, text) != text:
                self.mismatches += 1

    async def _long(self, c, t0):
        over = self.rng.random() < 0.5
        n = self.context + 50 if over else self.context // 2
        ids = [3 + i % (self.vocab - 3) for i in range(n)]
        r = await c.post("/v1/completions", json={"model": self.model, "prompt": ids, "max_tokens": 4})
        self.expect("long", r.status_code, (400,) if over else (200,), r.text)

    async def _oversized(self, c, t0):
        body = b'{"prompt": "' + b"x" * (MAX_BODY + 4096) + b'"}'
        r = await c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        self.expect("oversized", r.status_code, (413,), r.text)

    async def _malformed(self, c, t0):
        body, want = self.rng.choice([
            (b'{"prompt": "hi", "max_tokens": ', 400),
            (json.dumps({"prompt": "hi", "max_tokens": "ten"}).encode(), 400),
            (json.dumps({"messages": "hi"}).encode(), 400),
            (json.dumps({"model": "nope", "prompt": "hi"}).encode(), 404)])
        path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        r = await c.post(path, content=body, headers={"content-type": "application/json"})
        self.expect("malformed", r.status_code, (want,), r.text)

    async def client(self, deadline: float) -> None:
        kinds, weights = zip(*KINDS.items())
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as c:
            while time.monotonic() < deadline:
                await self.one(c, self.rng.choices(kinds, weights)[0])


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", required=True, type=Path)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from server_util import free_port

    from reft.runtime.plan import Plan

    plan = Plan(args.plan)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "reft.cli.reft", "run", str(args.plan), "--serve", "--port", str(port),
           "--model-name", "soak", "--max-request-bytes", str(MAX_BODY), "--max-num-seqs", str(args.concurrency)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if not plan.tokenizer.chat_template:   # a plain one, so the chat requests have something to render
        template = Path(tempfile.mkdtemp()) / "chat.jinja"
        template.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
        cmd += ["--chat-template", str(template)]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        m = httpx.get(url + "/metrics").text
        kv_bytes = int(metric(m, "reft_kv_cache_pages_total")) * _page_bytes(plan)
        soak = Soak(url, "soak", plan.context_length, int(plan.manifest["vocab_size"]), args.seed)
        samples = []

        async def run():
            warm = time.monotonic() + 20
            end = time.monotonic() + args.minutes * 60
            tasks = [asyncio.create_task(soak.client(end)) for _ in range(args.concurrency)]
            while not all(t.done() for t in tasks):
                samples.append((time.monotonic() < warm, time.monotonic(), rss_bytes(server.pid)))
                await asyncio.sleep(5)
            await asyncio.gather(*tasks)

        asyncio.run(run())
        time.sleep(2)
        m = httpx.get(url + "/metrics").text
        left = {k: metric(m, k) for k in ("reft_num_requests_running", "reft_num_requests_waiting",
                                          "reft_kv_cache_pages_used")}
    finally:
        server.terminate()
        server.wait()
    after_warmup = next((r for warm, _, r in samples if not warm), samples[0][2])
    end_rss, peak = samples[-1][2], max(r for _, _, r in samples)
    growth = end_rss - after_warmup
    total = sum(sum(c.values()) for c in soak.status.values())
    print(f"soak: {args.minutes:g} min, {args.concurrency} clients, {total} requests "
          f"({total / (args.minutes * 60):.1f}/s), plan {args.plan}")
    print("| kind | requests | statuses |\n|---|---:|---|")
    for k in KINDS:
        print(f"| {k} | {sum(soak.status[k].values())} | {dict(sorted(soak.status[k].items()))} |")
    lat = [x for k in ("complete", "n2", "seeded") for x in soak.latency[k]]
    print(f"latency (whole requests) p50 {pct(lat, 50):.3f} s, p90 {pct(lat, 90):.3f} s, p99 {pct(lat, 99):.3f} s;"
          f" stream TTFT p50 {pct(soak.ttft, 50):.3f} s, p99 {pct(soak.ttft, 99):.3f} s")
    print(f"RSS after warm-up {after_warmup / 2**20:.0f} MiB, end {end_rss / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB"
          f" (growth {growth / 2**20:+.0f} MiB; KV pool {kv_bytes / 2**20:.0f} MiB)")
    print(f"5xx: {len(soak.server_errors)}, lost: {len(soak.lost)}, seeded mismatches: {soak.mismatches} of"
          f" {soak.seeded_checks}; left in the server: {left}")
    for e in (soak.server_errors + soak.lost)[:10]:
        print("  ", e)
    deterministic = bool(plan.manifest["backend"].get("deterministic"))
    ok = (not soak.server_errors and not soak.lost and not soak.mismatches
          and growth <= kv_bytes and not any(left.values()))
    if args.json:
        args.json.write_text(json.dumps({
            "minutes": args.minutes, "concurrency": args.concurrency, "requests": total,
            "deterministic": deterministic,
            "status": {k: dict(v) for k, v in soak.status.items()}, "server_errors": len(soak.server_errors),
            "lost": len(soak.lost), "seeded_checks": soak.seeded_checks, "mismatches": soak.mismatches,
            "latency_p50": pct(lat, 50), "latency_p99": pct(lat, 99), "ttft_p50": pct(soak.ttft, 50),
            "rss_after_warmup": after_warmup, "rss_end": end_rss, "rss_peak": peak, "kv_bytes": kv_bytes,
            "rss_samples": [(t, r) for _, t, r in samples], "left": left, "ok": ok}, indent=1))
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def _page_bytes(plan) -> int:
    from reft.runtime.kv_cache import PagePool

    return PagePool.page_bytes(plan.kv)


if __name__ == "__main__":
    sys.exit(main())
