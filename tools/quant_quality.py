#!/usr/bin/env python3
"""Quality of quantized SmolLM2-135M-Instruct: reft's perplexity next to llama.cpp's, same text.

Rows (the models come from tools/bench_models.py --models smollm2-135m --formats f32 q4_1 q8_0 q4_k_m):

  float32      hf/ (every tensor of the Q4_1 GGUF dequantized)  | llama.cpp: f32.gguf (same values)
  int8, int4   reft's own weight-only quantization of hf/ (reftc compile --quant ...), reft only
  Q4_1         the original GGUF, blocks kept quantized          | llama.cpp: the same file
  Q8_0, Q4_K_M llama.cpp's requantizations of it                 | llama.cpp: the same files

Perplexity is computed the way llama.cpp's perplexity tool does it, for both engines: the
token stream (BOS first where the vocabulary adds one) is cut into chunks of --ctx tokens,
each evaluated from an empty cache with its first token replaced by BOS where the vocabulary
adds one, and only the second half of each chunk is scored. llama.cpp's figure comes from its
`llama-perplexity` binary when --llama-perplexity is given (built from the llama.cpp sources
vendored in the llama-cpp-python sdist), else from the same scheme through its C API.
A second column scores the short reference text of shared/models (reference ppl 10.59, every
token after the first), as tests/models/test_smollm2_gguf.py does.

    python tools/quant_quality.py --text /usr/share/common-licenses/GPL-3 \\
        --llama-perplexity PATH/TO/llama.cpp/build/bin/llama-perplexity
"""
from __future__ import annotations

import argparse
import hashlib
import tempfile
import json
import math
import re
import subprocess
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp_util as lc  # noqa: E402

from reft.runtime.perplexity import token_nll  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT.parent / "shared" / "models" / "smollm2-135m-instruct" / "reference_outputs.json"

# name, reft compile source (relative to the model dir) + options, llama.cpp GGUF (or None)
ROWS = [
    ("float32", "hf", ["--dtype", "float32"], "f32.gguf"),
    ("int8 (reft, per channel)", "hf", ["--quant", "int8"], None),
    ("int4-g32 (reft)", "hf", ["--quant", "int4", "--group-size", "32"], None),
    ("int4-g64 (reft)", "hf", ["--quant", "int4", "--group-size", "64"], None),
    ("int4-g128 (reft)", "hf", ["--quant", "int4", "--group-size", "128"], None),   # 576-wide rows end in 64
    ("Q4_1 (original file)", "q4_1.gguf", [], "q4_1.gguf"),
    ("Q8_0", "q8_0.gguf", [], "q8_0.gguf"),
    ("Q4_K_M", "q4_k_m.gguf", [], "q4_k_m.gguf"),
]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def chunked_ppl(logits_of, tokens: list[int], n_ctx: int, bos: int | None) -> tuple[float, int]:
    """llama-perplexity's scheme: chunks of n_ctx, BOS-first, score positions n_ctx/2 .. n_ctx-2."""
    first, total, n = n_ctx // 2, 0.0, 0
    for c in range(len(tokens) // n_ctx):
        chunk = list(tokens[c * n_ctx:(c + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        z = logits_of(chunk)
        total += float(token_nll(z[first:n_ctx - 1], chunk[first + 1:]).sum())
        n += n_ctx - 1 - first
    return math.exp(total / n), n


def full_ppl(logits_of, tokens: list[int]) -> float:
    z = logits_of(tokens)
    return math.exp(float(token_nll(z[:-1], tokens[1:]).mean()))


_GGUF_TOKENIZER = None


def token_ids(text: str) -> list[int]:
    return _GGUF_TOKENIZER.encode(text)


def reft_row(src: Path, opts: list[str], plans: Path, name: str, text: str, n_ctx: int, threads: int,
             ref_text: str | None):
    from reft.compiler import compile_model
    from reft.runtime.engine import Engine

    plan = plans / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    kw = {"progress": False}
    it = iter(opts)
    for k in it:
        v = next(it)
        kw[{"--dtype": "dtype", "--quant": "quant", "--group-size": "group_size"}[k]] = \
            int(v) if k == "--group-size" else v
    if not (plan / "manifest.json").is_file():
        say(f"reft: compile {src} {' '.join(opts)} -> {plan}")
        compile_model(src, plan, **kw)
    eng = Engine.load(plan, threads=threads)
    tok = eng.tokenizer
    # one token stream for every row: the GGUF tokenizer's (llama.cpp's; tokenizer.json splits a
    # few whitespace runs differently, see tests/frontends/test_gguf_tokenizer.py)
    ids = token_ids(text)
    adds_bos = tok.encode("a")[:1] == [tok.bos_token_id] != tok.encode("a", add_special_tokens=False)[:1]
    bos = tok.bos_token_id if adds_bos else None
    ppl, n = chunked_ppl(eng.logits, ids, n_ctx, bos)
    ref = full_ppl(eng.logits, token_ids(ref_text)) if ref_text else None
    return {"ppl": ppl, "scored": n, "tokens": ids, "ref_ppl": ref, "bytes": eng.plan.manifest["weights"]["bytes"]}


def llamacpp_row(gguf: Path, text: str, n_ctx: int, threads: int, binary: Path | None, ref_text: str | None):
    with lc.Model(gguf) as m:
        ids = m.tokenize(text, add_special=True)
        ctx = m.context(n_ctx=max(n_ctx, 128), n_batch=max(n_ctx, 128), n_threads=threads)
        try:
            ref = full_ppl(ctx.logits_all, m.tokenize(ref_text, add_special=True)) if ref_text else None
            if binary is None:
                ppl, n = chunked_ppl(ctx.logits_all, ids, n_ctx, m.bos if m.add_bos else None)
                how = "C API"
            else:
                ppl, n, how = None, (len(ids) // n_ctx) * (n_ctx - 1 - n_ctx // 2), "llama-perplexity"
        finally:
            ctx.close()
    if binary is not None:
        tf = Path(tempfile.gettempdir()) / f"quant_quality_{hashlib.sha256(text.encode()).hexdigest()[:12]}.txt"
        tf.write_text(text, encoding="utf-8")
        cmd = [str(binary), "-m", str(gguf), "-f", str(tf), "-c", str(n_ctx), "-b", str(n_ctx), "-t", str(threads)]
        say("llama.cpp: " + " ".join(cmd))
        p = subprocess.run(cmd, capture_output=True, text=True)
        found = re.search(r"Final estimate: PPL = ([0-9.]+)", p.stdout + p.stderr)
        if p.returncode or not found:
            raise SystemExit(f"error: llama-perplexity failed on {gguf.name}: {(p.stderr or p.stdout)[-300:]}")
        ppl = float(found.group(1))
    return {"ppl": ppl, "scored": n, "tokens": ids, "ref_ppl": ref, "how": how}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Perplexity of SmolLM2-135M-Instruct under reft's and llama.cpp's "
                                "quantizations, both engines scoring the same text the same way.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model-dir", type=Path, default=Path(__file__).resolve().parent.parent / ".cache" / "bench" / "models" / "smollm2-135m")
    p.add_argument("--text", type=Path, default=Path("/usr/share/common-licenses/GPL-3"),
                   help="text to score (default: the GPL-3 text Debian ships)")
    p.add_argument("--ctx", type=int, default=512, help="chunk size (default 512)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plans", type=Path, default=Path(__file__).resolve().parent.parent / ".cache" / "bench" / "plans" / "quality")
    p.add_argument("--llama-perplexity", type=Path, default=None, help="llama.cpp's llama-perplexity binary")
    p.add_argument("--save", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    text = args.text.read_text(encoding="utf-8")
    ref_text = json.loads(REFERENCE.read_text())["ppl_text"] if REFERENCE.is_file() else None
    args.plans.mkdir(parents=True, exist_ok=True)
    global _GGUF_TOKENIZER
    from reft.frontends.gguf import open_gguf

    _GGUF_TOKENIZER = open_gguf(args.model_dir / "q4_1.gguf").tokenizer
    rows = []
    for name, src, opts, gguf in ROWS:
        if not (args.model_dir / src).exists():
            say(f"skip {name}: {args.model_dir / src} is absent")
            continue
        r = reft_row(args.model_dir / src, opts, args.plans, name, text, args.ctx, args.threads, ref_text)
        row = {"weights": name, "reft": r, "llama.cpp": None}
        if gguf and (args.model_dir / gguf).is_file():
            l = llamacpp_row(args.model_dir / gguf, text, args.ctx, args.threads, args.llama_perplexity, ref_text)
            if l["tokens"] != r["tokens"]:
                say(f"warning: {name}: reft and llama.cpp tokenize the text differently")
            row["llama.cpp"] = l
        say(f"{name}: reft {r['ppl']:.4f}" + (f", llama.cpp {row['llama.cpp']['ppl']:.4f}" if row["llama.cpp"] else ""))
        rows.append(row)

    n_tok = len(rows[0]["reft"]["tokens"]) if rows else 0
    print(f"text: {args.text} ({n_tok} tokens, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}), "
          f"chunks of {args.ctx}, second half scored ({rows[0]['reft']['scored'] if rows else 0} tokens)\n")
    print("| weights | weight bytes | reft ppl | llama.cpp ppl | reft / llama.cpp | reft ppl, reference text |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        r, lcr = row["reft"], row["llama.cpp"]
        ratio = f"{r['ppl'] / lcr['ppl']:.4f}" if lcr else "—"
        print(f"| {row['weights']} | {r['bytes'] / 2**20:.1f} MiB | {r['ppl']:.4f} | "
              f"{lcr['ppl']:.4f} ({lcr['how']}) | {ratio} | {r['ref_ppl']:.4f} |" if lcr else
              f"| {row['weights']} | {r['bytes'] / 2**20:.1f} MiB | {r['ppl']:.4f} | — | — | {r['ref_ppl']:.4f} |")
    if args.save:
        for row in rows:
            for k in ("reft", "llama.cpp"):
                if row[k]:
                    row[k].pop("tokens", None)
        args.save.write_text(json.dumps({"text": str(args.text), "ctx": args.ctx, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
