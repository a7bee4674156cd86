#!/usr/bin/env python3
"""Decode speed of a mixture-of-experts model against a dense model of its active size.

  python tools/bench_moe.py [--layers N] [--hidden 1024] [--experts 8] [--top-k 2] [--moe-width 2048]
                            [--dtype bfloat16] [--gen 32] [--reps 3] [--rounds 2] [--threads N] [--work DIR]

Builds two random-weight models with transformers and saves them as Hugging Face folders: a
Mixtral (E experts of width F, top-k routing) and a Llama with the same attention whose MLP is
k * F wide, i.e. exactly the MLP parameters one token of the Mixtral multiplies. Both compile for
the cpu backend (`reftc compile`'s Python entry, --dtype), then `reft bench PLAN -p 0 -n GEN`
measures each one's decode speed, the two alternating --rounds times in one run so drift on a
shared machine hits both alike (the best round of each counts). Printed: both rates, the
parameters, and MoE decode time / dense decode time. If a decode step read every expert, the
ratio would approach E / k (4x for 8 experts, top-2); the issue's target is <= 1.3.
The vocabulary is small (the bundled stories260K tokenizer's 512) so the layers dominate.

Decode streams the weights, so the comparison only means something when neither model sits in
the CPU's last-level cache: a 118 MB dense model on a host with a 260 MiB L3 decodes from cache,
its MoE counterpart (4x the bytes, a different pair of experts each token) from DRAM, and the
ratio then measures cache against memory (1.2-1.46x on such a host with 4 layers, 0.96x with 16).
Without --layers, the layer count is chosen so that the dense model's weights are at least twice
the last-level cache (at least 4 layers); the header line prints the cache size and the choice.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / "reft" / "assets" / "stories260K"


def build(kind: str, out: Path, args) -> Path:
    """A random-weight folder: kind "moe" (Mixtral) or "dense" (Llama with the active MLP width)."""
    import torch
    import transformers

    common = dict(vocab_size=512, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                  max_position_embeddings=4096, tie_word_embeddings=False)
    if kind == "moe":
        cfg = transformers.MixtralConfig(**common, intermediate_size=args.moe_width, num_local_experts=args.experts,
                                         num_experts_per_tok=args.top_k)
        model = transformers.MixtralForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common, intermediate_size=args.top_k * args.moe_width)
        model = transformers.LlamaForCausalLM(cfg)
    torch.manual_seed(0)
    model.to(torch.bfloat16).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, out / f)
    return out


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache Linux reports (sysfs), 0 when unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return max(sizes, default=0)


def dense_layer_bytes(args) -> int:
    """Weight bytes of one layer of the dense model (attention + the active-width MLP)."""
    h, kv = args.hidden, max(1, args.hidden // 256) * 64
    params = 2 * h * h + 2 * h * kv + 3 * h * args.top_k * args.moe_width + 2 * h
    return params * (4 if args.dtype == "float32" else 2)


def reft_command() -> list[str]:
    exe = Path(sys.executable).parent / "reft"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "reft.cli.reft"]


def decode_rate(plan: Path, args) -> dict:
    """One `reft bench -p 0 -n GEN` run: its tgN record (tokens/s mean and stddev over --reps)."""
    cmd = reft_command() + ["bench", str(plan), "-p", "0", "-n", str(args.gen), "-r", str(args.reps), "-o", "json"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()[-400:]}")
    return json.loads(r.stdout)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None,
                   help="[default: enough that the dense model's weights are twice the last-level cache, >= 4]")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--moe-width", type=int, default=2048, help="each expert's intermediate size")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--gen", type=int, default=32, help="decode steps per timed run")
    p.add_argument("--reps", type=int, default=3, help="timed runs per `reft bench` (after a warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two benchmarks")
    p.add_argument("--threads", type=int, default=None, help="[default: reft's, the physical cores]")
    p.add_argument("--work", type=Path, default=None, help="keep the models and plans here [default: a temp dir]")
    args = p.parse_args(argv)
    llc = last_level_cache_bytes()
    if args.layers is None:
        per_layer = dense_layer_bytes(args)
        args.layers = max(4, -(-2 * llc // per_layer))
    print(f"last-level cache {llc / 2**20:.0f} MiB; {args.layers} layers: dense weights"
          f" {args.layers * dense_layer_bytes(args) / 2**20:.0f} MiB", flush=True)

    from reft.compiler import compile_model
    from reft.plan import read_manifest

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_moe_"))
    try:
        plans = {}
        for kind in ("moe", "dense"):
            folder = build(kind, work / kind, args)
            plans[kind] = compile_model(folder, work / f"{kind}.plan", backend="cpu", dtype=args.dtype, progress=False)
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for kind in ("dense", "moe"):
                r = decode_rate(plans[kind], args)
                if kind not in best or r["tokens_per_s"] > best[kind]["tokens_per_s"]:
                    best[kind] = r
        params = {k: read_manifest(plans[k])["model"]["params"] for k in plans}
        active = params["dense"]
        for kind, what in (("moe", f"{args.experts} experts, top-{args.top_k}"), ("dense", "active-size MLP")):
            r = best[kind]
            print(f"{kind:5} ({what}): {params[kind] / 1e6:7.1f} M params, tg{args.gen} {r['tokens_per_s']:7.2f}"
                  f" ± {r['stddev']:.2f} t/s, {r['threads']} threads, {args.dtype}")
        ratio = best["dense"]["tokens_per_s"] / best["moe"]["tokens_per_s"]
        print(f"decode time MoE / dense: {ratio:.2f}x (total / active parameters: {params['moe'] / active:.2f}x;"
              f" target <= 1.3x)")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
