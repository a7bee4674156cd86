#!/usr/bin/env python3
"""Per-token cost of structured output: grammar-masked against free decoding, in the same run.

  python tools/bench_structured.py PLAN [--rounds 6] [--threads N]

One sequence at a time on ServingEngine (what a served request runs through). Each round decodes
the JSON object of a nested schema (objects in objects, an array of objects, enums, bounded
numbers) at temperature 0.7 with one seed, then the same number of tokens unconstrained from the
same prompt; rounds alternate so drift on a shared machine hits both alike. Reported, per
generated token after the first (prefill excluded):
- the inter-token time of each kind (median over tokens) and the difference as a share of the
  free decode step: the end-to-end overhead;
- the grammar's own work, timed inside the same run: the mask (llguidance, `allowed_tokens`)
  and the rest of sampling with the mask applied (`_advance`: sampler, matcher.consume_token,
  detokenizing) against `_advance` of the free tokens.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reft.backends.base import BackendOptions  # noqa: E402
from reft.runtime.engine import Engine  # noqa: E402
from reft.runtime.grammar import GrammarSpec  # noqa: E402
from reft.runtime.sampler import SamplingParams  # noqa: E402
from reft.runtime.serving import Request, ServingEngine  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "email": {"type": "string", "maxLength": 40},
    "address": {"type": "object", "properties": {
        "street": {"type": "string", "maxLength": 32}, "city": {"type": "string", "maxLength": 24},
        "geo": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                "required": ["lat", "lon"], "additionalProperties": False}},
        "required": ["street", "city", "geo"], "additionalProperties": False},
    "pets": {"type": "array", "maxItems": 3, "items": {"type": "object", "properties": {
        "kind": {"enum": ["cat", "dog", "bird", "fish"]}, "name": {"type": "string", "maxLength": 16}},
        "required": ["kind", "name"], "additionalProperties": False}},
    "member": {"type": "boolean"}},
    "required": ["name", "age", "email", "address", "pets", "member"], "additionalProperties": False}
PROMPT = "Invent a customer record with a name, age, email, address with coordinates, pets and membership."


class Timer:
    """Wraps a method of an object and adds up the seconds spent in it."""

    def __init__(self, obj, name: str):
        self.seconds, self.calls, inner = 0.0, 0, getattr(obj, name)

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        setattr(obj, name, timed)

    def take(self) -> tuple[float, int]:
        out = (self.seconds, self.calls)
        self.seconds, self.calls = 0.0, 0
        return out


class Gaps:
    """ServingEngine observer: the time between consecutive tokens of a request."""

    def __init__(self):
        self.gaps: list[float] = []

    def token(self, seconds: float, first: bool) -> None:
        if not first:
            self.gaps.append(seconds)

    def finish(self, out) -> None:
        pass


def run(serving: ServingEngine, prompt: list[int], n: int, seed: int, grammar=None) -> tuple[str, int]:
    req = Request(f"r{seed}-{grammar is not None}", prompt, n, SamplingParams(temperature=0.7, top_p=1.0, top_k=0,
                                                                              seed=seed),
                  ignore_eos=grammar is None, grammar=grammar)
    serving.add(req)
    text, tokens = "", 0
    while serving.has_work:
        for out in serving.step():
            text, tokens = text + out.text, out.completion_tokens
    return text, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan", type=Path)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    engine = Engine.load(args.plan, backend_options=BackendOptions(threads=args.threads))
    gaps = Gaps()
    serving = ServingEngine(engine, max_num_seqs=1, observer=gaps)
    tok = engine.tokenizer
    if tok.chat_template:
        prompt = tok.encode(tok.render_chat([{"role": "user", "content": PROMPT}]), add_special_tokens=False)
    else:
        prompt = tok.encode(PROMPT)
    t0 = time.perf_counter()
    grammar = serving.grammars.compile(GrammarSpec("json_schema", SCHEMA))
    compile_s = time.perf_counter() - t0
    masks, advance = Timer(serving, "_masks"), Timer(serving, "_advance")
    run(serving, prompt, 8, 0)                                    # warm-up (and the prompt's KV pages cached)
    per = {"constrained": [], "free": []}
    work = {"mask": [0.0, 0], "advance_constrained": [0.0, 0], "advance_free": [0.0, 0]}
    sample, n_json = "", 0
    for r in range(args.rounds):
        for kind in ("constrained", "free"):
            gaps.gaps.clear()
            masks.take(), advance.take()
            text, n = run(serving, prompt, 400 if kind == "constrained" else n_json, r + 1,
                          grammar if kind == "constrained" else None)
            if kind == "constrained":
                json.loads(text)                                  # it must be the schema's JSON
                n_json, sample = n, text
                m = masks.take()
                work["mask"] = [work["mask"][0] + m[0], work["mask"][1] + m[1]]
            a = advance.take()
            key = f"advance_{kind}"
            work[key] = [work[key][0] + a[0], work[key][1] + a[1]]
            per[kind] += gaps.gaps
    free, constrained = statistics.median(per["free"]), statistics.median(per["constrained"])
    us = {k: 1e6 * s / max(c, 1) for k, (s, c) in work.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    print(f"plan {args.plan} · commit {commit} · vocab {serving.vocab_size} · threads "
          f"{getattr(engine.exe, 'threads', args.threads)} · {args.rounds} rounds, "
          f"{len(per['constrained'])} constrained and {len(per['free'])} free tokens")
    print(f"schema compile (first, incl. the vocabulary trie): {compile_s * 1e3:.0f} ms")
    print(f"inter-token, median: free {free * 1e3:.2f} ms, constrained {constrained * 1e3:.2f} ms "
          f"-> overhead {100 * (constrained - free) / free:+.1f}% of a decode step")
    print(f"grammar work per token: mask {us['mask']:.0f} us ({100 * us['mask'] * 1e-6 / free:.1f}% of a step); "
          f"sampling+consume {us['advance_constrained']:.0f} us vs free sampling {us['advance_free']:.0f} us "
          f"({100 * (us['advance_constrained'] - us['advance_free']) * 1e-6 / free:+.1f}% of a step)")
    print(f"sample output: {sample[:160]}")


if __name__ == "__main__":
    main()
