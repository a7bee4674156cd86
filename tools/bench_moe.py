#!/usr/bin/env python3
"""Decode speed of a mixture-of-experts model against a dense model of its active size.

  python tools/bench_moe.py [--layers N] [--hidden 1024] [--experts 8] [--top-k 2] [--moe-width 2048]
                            [--dtype bfloat16] [--gen 32] [--reps 3] [--rounds 2] [--threads N] [--work DIR]
                            [--target avx2|avx512|...] [--no-llamacpp]

Builds two random-weight models with transformers and saves them as Hugging Face folders: a
Mixtral (E experts of width F, top-k routing) and a Llama with the same attention whose MLP is
k * F wide, i.e. exactly the MLP parameters one token of the Mixtral multiplies. Both compile for
the cpu backend (`reftc compile`'s Python entry, --dtype), then `reft bench PLAN -p 0 -n GEN`
measures each one's decode speed, the two alternating --rounds times in one run so drift on a
shared machine hits both alike (the best round of each counts). Printed: both rates, the
parameters, and MoE decode time / dense decode time. If a decode step read every expert, the
ratio would approach E / k (4x for 8 experts, top-2); the issue's target is <= 1.3.
The vocabulary is small (the bundled stories260K tokenizer's 512) so the layers dominate.

The same two models also go to llama.cpp (llama-cpp-python, driven like llama-bench by
tools/llamacpp_util.py): each is written as a BF16 GGUF of llama.cpp's `llama` architecture (the
MoE one with its stacked `ffn_*_exps` experts, as llama.cpp's converter writes Mixtral; the
tokenizer metadata is stories260K.gguf's from ../shared/models), and its tg rate is measured in the
same alternation, so the table shows both engines' MoE / dense ratios and reft / llama.cpp per
model. --no-llamacpp skips it; without llama-cpp-python or the shared file it is skipped with a note.

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
sys.path.insert(0, str(ROOT / "tools"))
TOKENIZER = ROOT / "reft" / "assets" / "stories260K"
STORIES_GGUF = ROOT.parent / "shared" / "models" / "stories260K" / "stories260K.gguf"   # its tokenizer metadata


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
    if args.llamacpp:
        write_gguf(out, cfg, out / "model.gguf")
    return out


def write_gguf(folder: Path, cfg, path: Path) -> Path:
    """The checkpoint in `folder` (bfloat16, the names save_pretrained writes) as a BF16 GGUF of
    llama.cpp's `llama` architecture: q/k rows in llama.cpp's interleaved rotary order, Mixtral's
    experts stacked into ffn_{gate,up,down}_exps, norm weights in float32."""
    import numpy as np
    import torch
    from bench_models import gguf_name, permute_for_llamacpp
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
    from safetensors.torch import load_file

    def bf16(t: torch.Tensor) -> np.ndarray:   # the bfloat16 bits, exactly
        return t.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)

    w = GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or 10000.0))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(32)   # LLAMA_FTYPE_MOSTLY_BF16
    moe = hasattr(cfg, "num_local_experts")
    if moe:
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    for key, field in GGUFReader(str(STORIES_GGUF)).fields.items():
        if key.startswith("tokenizer."):
            w.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    for name, t in load_file(folder / "model.safetensors").items():
        if ".block_sparse_moe." in name:   # model.layers.{i}.block_sparse_moe.(gate | experts.{e}.w{1,2,3}).weight
            parts = name.split(".")
            i = int(parts[2])
            if parts[4] == "gate":
                w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", bf16(t), raw_dtype=GGMLQuantizationType.BF16)
            else:
                experts.setdefault((i, parts[6]), {})[int(parts[5])] = bf16(t)
            continue
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            t = torch.from_numpy(permute_for_llamacpp(t.detach().float().numpy(), heads))
        if t.ndim == 1:   # norm weights stay float32, as llama.cpp's converter writes them
            w.add_tensor(gguf_name(name), t.float().numpy())
        else:
            w.add_tensor(gguf_name(name), bf16(t), raw_dtype=GGMLQuantizationType.BF16)
    for (i, which), per_expert in sorted(experts.items()):
        stacked = np.stack([per_expert[e] for e in range(len(per_expert))])
        kind = {"w1": "gate", "w3": "up", "w2": "down"}[which]
        w.add_tensor(f"blk.{i}.ffn_{kind}_exps.weight", stacked, raw_dtype=GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llamacpp_info() -> str:
    """llama.cpp's version and the instruction sets its build uses."""
    import llamacpp_util as lc

    return f"{lc.version()} ({lc.system_info().strip()})"


def llamacpp_rate(gguf: Path, args) -> dict:
    """llama.cpp's tgN on `gguf`, as llama-bench runs it: tokens/s mean and stddev over --reps."""
    import llamacpp_util as lc

    with lc.Model(gguf) as m:
        ctx = m.context(n_ctx=args.gen + 64, n_threads=args.threads or 2)
        try:
            rates = lc.bench(ctx, n_gen=args.gen, reps=args.reps)
        finally:
            ctx.close()
    mean, std = lc.mean_std(rates)
    return {"tokens_per_s": mean, "stddev": std}


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
    p.add_argument("--target", default=None, help="reft's cpu target (reftc compile --target) [default: the host's]")
    p.add_argument("--no-llamacpp", dest="llamacpp", action="store_false", help="do not measure llama.cpp too")
    args = p.parse_args(argv)
    if args.llamacpp:
        try:
            import llama_cpp  # noqa: F401
        except Exception as e:   # ImportError, or OSError from its shared library
            print(f"(llama.cpp not measured: llama-cpp-python does not load: {e})")
            args.llamacpp = False
    if args.llamacpp and not STORIES_GGUF.is_file():
        print(f"(llama.cpp not measured: {STORIES_GGUF} is absent)")
        args.llamacpp = False
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
            plans[kind] = compile_model(folder, work / f"{kind}.plan", backend="cpu", dtype=args.dtype, progress=False,
                                        target=args.target)
        engines = {"reft": lambda kind: decode_rate(plans[kind], args)}
        if args.llamacpp:
            engines["llama.cpp"] = lambda kind: llamacpp_rate(work / kind / "model.gguf", args)
        best: dict[tuple[str, str], dict] = {}
        for _ in range(args.rounds):
            for kind in ("dense", "moe"):
                for engine, rate in engines.items():
                    r = rate(kind)
                    if (engine, kind) not in best or r["tokens_per_s"] > best[engine, kind]["tokens_per_s"]:
                        best[engine, kind] = r
        params = {k: read_manifest(plans[k])["model"]["params"] for k in plans}
        threads = args.threads or best["reft", "dense"].get("threads")
        target = read_manifest(plans["moe"])["backend"]["target"]
        print(f"reft target {target}" + (f"; llama.cpp {llamacpp_info()}" if args.llamacpp else ""))
        print(f"{params['moe'] / 1e6:.1f} M params MoE ({args.experts} experts, top-{args.top_k}), {params['dense'] / 1e6:.1f} M"
              f" dense (active-size MLP); {args.dtype}, {threads} threads, tg{args.gen}, best of {args.rounds} rounds")
        print("| engine | MoE t/s | dense t/s | MoE / dense decode time |\n|---|---:|---:|---:|")
        for engine in engines:
            m, d = best[engine, "moe"], best[engine, "dense"]
            print(f"| {engine} | {m['tokens_per_s']:.2f} ± {m['stddev']:.2f} | {d['tokens_per_s']:.2f} ± {d['stddev']:.2f}"
                  f" | {d['tokens_per_s'] / m['tokens_per_s']:.2f}x |")
        if args.llamacpp:
            print("reft / llama.cpp: " + ", ".join(
                f"{kind} {best['reft', kind]['tokens_per_s'] / best['llama.cpp', kind]['tokens_per_s']:.2f}x"
                for kind in ("moe", "dense")))
        ratio = best["reft", "dense"]["tokens_per_s"] / best["reft", "moe"]["tokens_per_s"]
        print(f"decode time MoE / dense (reft): {ratio:.2f}x (total / active parameters: {params['moe'] / params['dense']:.2f}x;"
              f" target <= 1.3x)")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
