#!/usr/bin/env python3
"""llama-1b for tools/bench_models.py: random weights shaped like Llama-3.2-1B, as a Hugging Face
folder and GGUF files with the same values (split out of bench_models.py; run that script)."""
from __future__ import annotations

import gc
import json
import math
import os
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_models import BuildError, SafetensorsStream, compare_logits, fetch_smollm2_gguf, gb, gguf_name, hf_logits, permute_for_llamacpp, safetensors_get, safetensors_index, say  # noqa: E402

L1B = dict(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, ffn=8192, vocab=128256,
           rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                  high_freq_factor=4.0, original_max_position_embeddings=8192),
           rms_eps=1e-5, max_pos=131072)


def l1b_config() -> dict:
    c = L1B
    return {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "head_dim": c["head_dim"], "hidden_act": "silu",
        "hidden_size": c["hidden"], "initializer_range": 0.02, "intermediate_size": c["ffn"],
        "max_position_embeddings": c["max_pos"], "mlp_bias": False, "model_type": "llama",
        "num_attention_heads": c["heads"], "num_hidden_layers": c["layers"], "num_key_value_heads": c["kv_heads"],
        "pretraining_tp": 1, "rms_norm_eps": c["rms_eps"], "rope_scaling": dict(c["rope_scaling"]),
        "rope_theta": c["rope_theta"], "tie_word_embeddings": True, "torch_dtype": "float32", "use_cache": True,
        "vocab_size": c["vocab"],
    }


def l1b_specs() -> list[tuple[str, tuple[int, ...], np.dtype]]:
    c = L1B
    h, kv = c["hidden"], c["kv_heads"] * c["head_dim"]
    specs = [("model.embed_tokens.weight", (c["vocab"], h), np.float32)]
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (h,), np.float32),
                  (p + "self_attn.q_proj.weight", (c["heads"] * c["head_dim"], h), np.float32),
                  (p + "self_attn.k_proj.weight", (kv, h), np.float32),
                  (p + "self_attn.v_proj.weight", (kv, h), np.float32),
                  (p + "self_attn.o_proj.weight", (h, c["heads"] * c["head_dim"]), np.float32),
                  (p + "post_attention_layernorm.weight", (h,), np.float32),
                  (p + "mlp.gate_proj.weight", (c["ffn"], h), np.float32),
                  (p + "mlp.up_proj.weight", (c["ffn"], h), np.float32),
                  (p + "mlp.down_proj.weight", (h, c["ffn"]), np.float32)]
    specs.append(("model.norm.weight", (h,), np.float32))
    return specs


def l1b_tensor(name: str, shape: tuple[int, ...], seed: int, std: float) -> np.ndarray:
    """Deterministic per tensor: numpy PCG64 seeded with (seed, crc32(name))."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    a = rng.standard_normal(shape, dtype=np.float32)
    a *= np.float32(std)
    if len(shape) == 1:  # RMSNorm weights ~ 1
        a += np.float32(1.0)
    return a


def llama3_rope_factors() -> np.ndarray:
    """The rope_freqs tensor convert_hf_to_gguf.py writes for rope_type llama3 (divisors of each frequency)."""
    c, s = L1B, L1B["rope_scaling"]
    dim = c["head_dim"]
    freqs = 1.0 / (c["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    lo_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
    hi_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(s["factor"])
        else:
            sm = (s["original_max_position_embeddings"] / wl - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1.0 / ((1 - sm) / s["factor"] + sm))
    return np.array(out, dtype=np.float32)


def smol_vocab(smol_gguf: Path) -> dict:
    """Tokenizer fields of the SmolLM2 GGUF (gpt2 BPE, 49152 tokens)."""
    import gguf  # noqa: PLC0415

    r = gguf.GGUFReader(str(smol_gguf))
    f = r.fields
    return dict(model=f["tokenizer.ggml.model"].contents(), pre=f["tokenizer.ggml.pre"].contents(),
                tokens=f["tokenizer.ggml.tokens"].contents(), types=f["tokenizer.ggml.token_type"].contents(),
                merges=f["tokenizer.ggml.merges"].contents(),
                chat_template=f["tokenizer.chat_template"].contents())


def pad_token_name(i: int) -> str:
    return f"<|reserved_special_token_{i}|>"


def build_l1b_hf(d: Path, shared: Path, seed: int) -> dict:
    from tokenizers import AddedToken, Tokenizer  # noqa: PLC0415

    hf = d / "hf"
    tmp = d / "hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    specs = l1b_specs()
    n_params = sum(int(np.prod(s)) for _, s, _ in specs)
    say(f"llama-1b: generating {n_params:,} float32 parameters (seed {seed}) -> hf/model.safetensors "
        f"({gb(n_params * 4)}), one tensor at a time")
    w = SafetensorsStream(tmp / "model.safetensors", specs)
    done = 0
    for k, (name, shape, _) in enumerate(specs):
        a = l1b_tensor(name, shape, seed, 0.02)
        w.write(name, a)
        done += a.size
        del a
        if k % 18 == 0 or k == len(specs) - 1:
            say(f"  {done / n_params:6.1%}  {name}")
    w.close()
    (tmp / "config.json").write_text(json.dumps(l1b_config(), indent=2) + "\n")
    tok = Tokenizer.from_file(str(shared / "hf_tokenizer" / "tokenizer.json"))
    n0 = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(pad_token_name(i), special=True, normalized=False)
                            for i in range(L1B["vocab"] - n0)])
    if tok.get_vocab_size() != L1B["vocab"] or tok.token_to_id(pad_token_name(0)) != n0:
        raise BuildError("llama-1b: padded tokenizer has the wrong size or ids")
    tok.save(str(tmp / "tokenizer.json"))
    for f in ("tokenizer_config.json", "chat_template.jinja"):
        if (shared / "hf_tokenizer" / f).is_file():
            shutil.copyfile(shared / "hf_tokenizer" / f, tmp / f)
    shutil.rmtree(hf, ignore_errors=True)
    os.replace(tmp, hf)
    say(f"llama-1b: wrote {hf}")
    return dict(params=n_params, seed=seed,
                init=f"numpy default_rng([{seed}, crc32(hf_name)]).standard_normal(float32) * 0.02; "
                     f"1-D (RMSNorm) weights get +1",
                tokenizer=f"SmolLM2 byte-level BPE ({n0} tokens) + {L1B['vocab'] - n0} special tokens "
                          f"<|reserved_special_token_N|> (ids {n0}..{L1B['vocab'] - 1})")


def build_l1b_gguf(d: Path, fmt: str, vocab: dict) -> dict:
    import gguf  # noqa: PLC0415

    c = L1B
    st = d / "hf" / "model.safetensors"
    base, idx = safetensors_index(st)
    out = d / f"{fmt}.gguf"
    tmp = out.with_suffix(".tmp")
    wdt = np.float16 if fmt == "f16" else np.float32
    n0 = len(vocab["tokens"])
    tokens = list(vocab["tokens"]) + [pad_token_name(i) for i in range(c["vocab"] - n0)]
    types = list(vocab["types"]) + [int(gguf.TokenType.CONTROL)] * (c["vocab"] - n0)

    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name("Llama-3.2-1B-shaped random (reft bench)")
    w.add_size_label("1B")
    w.add_block_count(c["layers"])
    w.add_context_length(c["max_pos"])
    w.add_embedding_length(c["hidden"])
    w.add_feed_forward_length(c["ffn"])
    w.add_head_count(c["heads"])
    w.add_head_count_kv(c["kv_heads"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_eps"])
    w.add_key_length(c["head_dim"])
    w.add_value_length(c["head_dim"])
    w.add_file_type(1 if fmt == "f16" else 0)
    w.add_vocab_size(c["vocab"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(vocab["chat_template"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    plan = [("rope_freqs.weight", None)] + [(gguf_name(n), n) for n, _, _ in l1b_specs()]
    for gname, hname in plan:
        if hname is None:
            shape, dt = (c["head_dim"] // 2,), np.dtype(np.float32)
        else:
            shape = tuple(idx[hname]["shape"])
            dt = np.dtype(wdt if len(shape) == 2 else np.float32)
        w.add_tensor_info(gname, shape, dt, int(np.prod(shape)) * dt.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    say(f"llama-1b: writing {out.name} ({len(plan)} tensors, matrices {np.dtype(wdt).name})")
    for k, (gname, hname) in enumerate(plan):
        if hname is None:
            a = llama3_rope_factors()
        else:
            a = safetensors_get(st, base, idx[hname])
            if gname.endswith("attn_q.weight"):
                a = permute_for_llamacpp(np.asarray(a), c["heads"])
            elif gname.endswith("attn_k.weight"):
                a = permute_for_llamacpp(np.asarray(a), c["kv_heads"])
            a = np.ascontiguousarray(a, dtype=wdt if a.ndim == 2 else np.float32)
        w.write_tensor_data(a)
        del a
        if k % 36 == 0:
            say(f"  {k + 1}/{len(plan)} {gname}")
    w.close()
    os.replace(tmp, out)
    say(f"llama-1b: wrote {out} ({gb(out.stat().st_size)})")
    return dict(how=f"gguf-py GGUFWriter from hf/model.safetensors; q/k rows permuted like "
                    f"convert_hf_to_gguf.py; rope_freqs = llama3 factors; matrices {np.dtype(wdt).name}, "
                    f"norms float32", bytes=out.stat().st_size)


def check_l1b(d: Path, threads: int, formats: list[str]) -> dict:
    from tokenizers import Tokenizer  # noqa: PLC0415

    prompt = "Once upon a time, in a small village by the sea,"
    ids = Tokenizer.from_file(str(d / "hf" / "tokenizer.json")).encode(prompt).ids
    say(f"llama-1b: check: transformers (hf/) logits for a {len(ids)}-token prompt")
    ref = hf_logits(d / "hf", ids)
    result = {"prompt": prompt, "prompt_ids": ids}
    import llamacpp_util as lc  # noqa: PLC0415

    for fmt, tol in (("f32", 0.02), ("f16", 0.10)):
        path = d / f"{fmt}.gguf"
        if fmt not in formats or not path.is_file():
            continue
        say(f"llama-1b: check: llama.cpp ({path.name}) logits, same tokens")
        with lc.Model(path) as m:
            toks = m.tokenize(prompt)
            if m.n_params != sum(int(np.prod(s)) for _, s, _ in l1b_specs()) + L1B["head_dim"] // 2:
                say(f"  note: llama.cpp counts {m.n_params:,} parameters")
            ctx = m.context(n_ctx=64, n_batch=64, n_threads=threads)
            got = ctx.logits_all(ids)
            ctx.close()
        cmp = compare_logits(ref, got, f"llama.cpp {fmt} vs transformers", tol, need_argmax=(fmt == "f32"))
        say(f"  llama.cpp tokenizer {'agrees' if toks == ids else 'DIFFERS: ' + str(toks)}")
        result[f"llamacpp_{fmt}"] = dict(cmp, tokenizer_agrees=toks == ids)
        if not cmp["ok"]:
            raise BuildError(f"llama-1b: llama.cpp {path.name} disagrees with transformers on the HF folder "
                             f"(permutation / rope / metadata wrong?)")
    del ref
    gc.collect()
    return result


def build_l1b(out: Path, args) -> None:
    d = out / "llama-1b"
    d.mkdir(parents=True, exist_ok=True)
    prov_path = d / "PROVENANCE.json"
    prov = json.loads(prov_path.read_text()) if prov_path.is_file() and not args.force else {}
    prev_seed = prov.get("hf", {}).get("seed")
    built = False
    if args.force or not (d / "hf" / "model.safetensors").is_file() or prev_seed not in (None, args.seed):
        prov["hf"] = build_l1b_hf(d, args.shared, args.seed)
        built = True
    else:
        say("llama-1b: hf/ present")
    vocab = None
    # float files first: the quantized ones are llama.cpp's quantizations of f16.gguf (random weights
    # quantize to noise, so these are for speed only)
    formats = sorted(set(args.formats) | ({"f16"} if set(args.formats) - {"f32", "f16"} else set()),
                     key=lambda f: f not in ("f32", "f16"))
    for fmt in formats:
        path = d / f"{fmt}.gguf"
        if path.is_file() and not args.force and not built:
            say(f"llama-1b: {path.name} present")
            continue
        if fmt not in ("f32", "f16"):
            import llamacpp_util as lc  # noqa: PLC0415

            say(f"llama-1b: llama_model_quantize f16.gguf -> {path.name} (for speed benchmarks only)")
            tmp = path.with_suffix(".tmp")
            lc.quantize(d / "f16.gguf", tmp, fmt, nthread=args.threads)
            os.replace(tmp, path)
            prov.setdefault("gguf", {})[fmt] = dict(how=f"llama_model_quantize(ftype={fmt}) of f16.gguf by "
                                                        f"{lc.version()}", bytes=path.stat().st_size)
            continue
        if vocab is None:
            vocab = smol_vocab(fetch_smollm2_gguf(out / "smollm2-135m", args.smollm2_gguf, False))
        prov.setdefault("gguf", {})[fmt] = build_l1b_gguf(d, fmt, vocab)
        built = True
    if args.verify == "always" or (args.verify == "auto" and built):
        prov["checks"] = check_l1b(d, args.threads, args.formats)
    prov.update(shape="Llama-3.2-1B", config=l1b_config())
    prov_path.write_text(json.dumps(prov, indent=1) + "\n")
    say(f"llama-1b: done -> {d}")


