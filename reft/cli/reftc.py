"""reftc: the compiler CLI (compile a model into a plan; inspect a plan)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..backends.registry import names as backend_names
from .common import friendly_errors, show_progress


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="reft")
def main():
    """reftc — compile language models into runnable plans.

    \b
    Quick start:
      reftc compile path/to/hf-model -o plan/     # config.json + *.safetensors + tokenizer.json
      reftc compile model.gguf -o plan/            # or a llama.cpp GGUF file
      reftc inspect plan/                          # what the compiler did
      reftc compile path/to/hf-model -o emb/ --task embed   # an embedding plan (/v1/embeddings)
      reft run plan/ --prompt "Once upon a time"   # generate text
    """


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Plan directory to write (replaced atomically if it already holds a plan).")
@click.option("--backend", default=None, metavar="|".join(backend_names()) + "[,...]",
              help="Code generator: 'cpu' emits fused C++ kernels compiled by the host compiler; 'cuda' emits CUDA"
                   " kernels compiled by NVRTC into cubins for --arch (no GPU needed to compile); 'reference' runs"
                   " the IR with numpy (the oracle every other backend is tested against). Several, comma-separated"
                   " (cpu,cuda), make one plan for each device: the first runs by default, the others with"
                   " `reft run PLAN --device NAME`. [default: cpu]")
@click.option("--dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Storage dtype of weight matrices. cpu computes in float32 [default: float32]; cuda computes"
                   " in this dtype with float32 accumulation [default: bfloat16].")
@click.option("--dump", "dump_dir", type=click.Path(path_type=Path), default=None,
              help="Write the IR after every pass (NNN_<pass>.ir) and a .dot drawing of the final graph here.")
@click.option("--model-def", type=click.Path(path_type=Path), default=None,
              help="A model-definition .py file for an architecture reft does not ship (docs/adding-a-model.md).")
@click.option("--page-size", default=16, show_default=True, type=click.IntRange(1, 1024),
              help="Tokens per KV-cache page.")
@click.option("--max-batch-tokens", default=512, show_default=True, type=click.IntRange(1, 65536),
              help="Most tokens one forward step may hold (activation memory is planned for this many).")
@click.option("--quant", type=click.Choice(["int8", "int4"]), default=None,
              help="Weight-only quantization of the projection matmuls of a float checkpoint: int8 per output"
                   " channel, or int4 in groups of --group-size inputs (asymmetric, round to nearest).")
@click.option("--group-size", default=32, show_default=True, type=click.Choice(["32", "64", "128"]),
              help="Inputs per int4 scale/offset group.")
@click.option("--quant-head", is_flag=True, help="Quantize the LM head too (it stays float by default).")
@click.option("--calibrate", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="A text file: scale weight input channels by their activation size on it before --quant"
                   " (AWQ-style, folded into the RMSNorm weights).")
@click.option("--kv-dtype", default=None, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Storage dtype of the KV cache. [default: float32 on cpu, the weights' dtype on cuda]")
@click.option("--target", default=None, type=click.Choice(["avx512", "avx2", "neon", "generic"]),
              help="CPU instruction set the cpu backend compiles for: avx512 (x86-64-v4), avx2 (x86-64-v3: AVX2,"
                   " FMA, F16C), neon (aarch64; cross-compiled with aarch64-linux-gnu-g++ on other hosts), generic"
                   " (the architecture's baseline). [default: this machine's best]")
@click.option("--task", default="generate", show_default=True, type=click.Choice(["generate", "embed"]),
              help="What the plan's forward entry returns: 'generate' the logits of the requested rows (text"
                   " generation); 'embed' their hidden states, the final norm's output, with no LM head (serve"
                   " it with `reft run PLAN --serve` for POST /v1/embeddings).")
@click.option("--arch", default=None, type=click.Choice(["sm_80", "sm_89", "sm_90a"]),
              help="GPU architecture the cuda backend compiles for: sm_80 (A100), sm_89 (L4, L40, RTX 40), sm_90a"
                   " (H100, H200). [default: this machine's GPU, else sm_90a]")
@click.option("--deterministic", is_flag=True,
              help="Batch-invariant cpu kernels: a sequence's logits are bit-identical whatever else is in its batch,"
                   " whatever part of its prompt came from the prefix cache and however its prefill was chunked, so a"
                   " seeded request always reproduces. Prompt processing is slower (docs/serving.md).")
@click.option("--max-loras", default=0, show_default=True, type=click.IntRange(0, 64),
              help="LoRA adapter slots: the plan can serve this many PEFT adapters at once, chosen per request"
                   " (`reft run PLAN --serve --lora NAME=DIR`); 0 = none. Adapted projections run unfused.")
@click.option("--max-lora-rank", default=16, show_default=True, type=click.IntRange(1, 256),
              help="--max-loras: the largest adapter rank a slot holds.")
@click.option("--lora-targets", default=None, metavar="NAME[,NAME...]",
              help="--max-loras: the projections that get slots, by module name (q_proj,v_proj,...)."
                   " [default: every attention and MLP projection]")
@friendly_errors
def compile(model, out, backend, dtype, dump_dir, model_def, page_size, max_batch_tokens, quant, group_size,
            quant_head, calibrate, kv_dtype, target, task, arch, deterministic, max_loras, max_lora_rank, lora_targets):
    """Compile MODEL into a plan directory.

    MODEL is a Hugging Face model folder (config.json, *.safetensors, tokenizer.json), a llama.cpp
    .gguf file (block-quantized tensors stay quantized), or the name of a model bundled
    with reft: `stories260K`.
    """
    from ..compiler import CompileOptions, compile_model

    names = _backends(backend)
    targets = _targets(names, target, arch)
    compile_model(model, out, CompileOptions(
        backend=names[0] if names else None, dtype=dtype, dump_dir=dump_dir, model_def=model_def,
        page_size=page_size, max_batch_tokens=max_batch_tokens, progress=show_progress(), quant=quant,
        group_size=int(group_size), quant_head=quant_head, kv_dtype=kv_dtype, calibrate=calibrate,
        target=targets[0], task=task, deterministic=deterministic, max_loras=max_loras, max_lora_rank=max_lora_rank,
        lora_targets=tuple(t.strip() for t in lora_targets.split(",") if t.strip()) if lora_targets else None,
        devices=tuple(zip(names[1:], targets[1:]))))
    click.echo(f"wrote plan {out}" + (f" (devices {', '.join(names)})" if len(names) > 1 else ""))


def _device_kernels(be: dict) -> None:
    """Compiled device kernels (cuda): launches per step, then each kernel's tile and ptxas figures."""
    for entry, e in be.get("entries", {}).items():
        click.echo(f"kernels     {entry}: {len(e['steps'])} launch steps (a step runs the kernel whose token"
                   " range holds the batch)")
    click.echo(f"  {'kernel':<58} {'tile / launch':<34} {'regs':>4} {'smem':>9} {'spills':>6}")
    for name, k in sorted(be["kernels"].items()):
        r = k["resources"]
        smem = k["smem"] + r["smem"]
        click.echo(f"  {name:<58} {k['tile'][:34]:<34} {r['registers']:>4} {_human(smem):>9}"
                   f" {r['spill_stores'] + r['spill_loads']:>6}")


def _backends(text: str | None) -> list[str]:
    """--backend cpu or cpu,cuda -> the names ([]: the default one); compile_model checks them."""
    return [n.strip() for n in text.split(",")] if text is not None else []


def _targets(names: list[str], target, arch) -> list:
    """Each backend's target: --target (cpu instruction set) and --arch (GPU architecture). With one
    backend either names its target, and the backend checks it; with several, --target goes to
    cpu and --arch to cuda."""
    from ..errors import ReftError

    if len(names) <= 1:
        if target and arch:
            raise ReftError("--target is the cpu backend's instruction set and --arch the cuda backend's GPU; give one")
        return [arch or target]
    for flag, value, owner in (("--target", target, "cpu"), ("--arch", arch, "cuda")):
        if value and owner not in names:
            raise ReftError(f"{flag} {value} is for the {owner} backend, which --backend {','.join(names)} does not name")
    return [{"cpu": target, "cuda": arch}.get(n) for n in names]


_TASKS = {"generate": "generate (forward returns logits)",
          "embed": "embed (forward returns hidden states; serve POST /v1/embeddings)",
          "train": "train"}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@main.command()
@click.argument("plan", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead.")
@friendly_errors
def inspect(plan, as_json):
    """Show what the compiler did: model, entry points, passes, ops, weights."""
    from ..errors import ReftError
    from ..plan import read_manifest

    m = read_manifest(plan)
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    model, kv = m["model"], m.get("kv_cache") or {}
    cfg = model.get("config", {})
    click.echo(f"plan        {plan}  (format v{m['format_version']}, reft {m.get('reft_version')})")
    click.echo(f"model       {model['architecture']} (family {model['family']}), {model['params']:,} params")
    click.echo(f"task        {_TASKS.get(m.get('task', 'generate'), m.get('task'))}")
    click.echo(f"shape       {cfg.get('num_hidden_layers')} layers, hidden {cfg.get('hidden_size')}, heads"
               f" {cfg.get('num_attention_heads')}/{cfg.get('num_key_value_heads')} kv, head_dim"
               f" {cfg.get('head_dim')}, vocab {m.get('vocab_size')}, context {m.get('context_length')}")
    if model.get("gguf_tensor_types"):
        types = ", ".join(f"{n} {t}" for t, n in sorted(model["gguf_tensor_types"].items()))
        kept = (m.get("quantization") or {}).get("method") == "gguf"
        click.echo(f"source      GGUF file with {types} tensors, "
                   + ("block types kept quantized" if kept else f"dequantized to {m['dtypes']['weights']}"))
    q = m.get("quantization")
    if q:
        mats = ", ".join(f"{n} {d}" for d, n in sorted(q["matrices"].items()))
        how = f"{q['method']}" + (f", groups of {q['group_size']}" if q.get("group_size") else "")
        click.echo(f"quantized   {how}: matrices {mats}; LM head {q['lm_head']}, embedding {q['embedding']}")
    click.echo(f"backend     {m['backend']['name']} ({m['backend']['target']})")
    for name, sub in (m.get("devices") or {}).items():
        try:
            target = read_manifest(plan / sub)["backend"]["target"]
        except ReftError as e:
            target = f"unreadable: {e}"
        click.echo(f"device      {name} ({target}): {sub}/, `reft run {plan} --device {name}`")
    if m["backend"].get("tuning"):
        click.echo("tuning      " + ", ".join(f"{k}={v}" for k, v in m["backend"]["tuning"].items()))
    click.echo(f"dtypes      weights {m['dtypes']['weights']}, compute {m['dtypes']['compute']}")
    click.echo(f"weights     {m['weights']['tensors']} tensors, {_human(m['weights']['bytes'])}")
    if kv.get("latent"):
        lat = kv["latent"]
        click.echo(f"kv cache    {kv['num_layers']} layers x one latent row of {kv['head_dim']} dims (latent"
                   f" {lat['kv_lora_rank']} + rope key {lat['rope_dim']}), {kv['dtype']}, pages of {kv['page_size']} tokens")
    elif kv:
        click.echo(f"kv cache    {kv['num_layers']} layers x {kv['kv_heads']} heads x {kv['head_dim']} dims,"
                   f" {kv['dtype']}, pages of {kv['page_size']} tokens")
    click.echo("entry points")
    for name, e in m["entry_points"].items():
        sig = ", ".join(f"{k}: {v['dtype']}[{','.join(map(str, v['shape']))}]" for k, v in e["inputs"].items()
                        if not k.startswith("kv_cache."))
        outs = ", ".join(f"{k}: {v['dtype']}[{','.join(map(str, v['shape']))}]" for k, v in e["outputs"].items())
        click.echo(f"  {name}({sig}, kv_cache.*) -> {outs}")
    click.echo("pass pipeline")
    for i, r in enumerate(m["passes"], 1):
        counts = ", ".join(f"{k}={v}" for k, v in sorted(r["counts"].items())) or "-"
        click.echo(f"  {i:2d}. {r['name']:<34} {r['nodes_before']:>5} -> {r['nodes_after']:<5} nodes"
                   f"  {r['seconds'] * 1000:7.1f} ms  {counts}")
    be = m["backend"]
    kernels = be.get("kernels", [])
    if not kernels:
        click.echo("kernels     none: the reference backend interprets the IR")
    elif isinstance(kernels, dict):
        _device_kernels(be)
    else:
        click.echo(f"kernels     {len(kernels)} calls per step in one generated function ({be['kernel']['source']})")
        counts: dict[str, int] = {}
        for k in kernels:
            counts[k["kernel"]] = counts.get(k["kernel"], 0) + 1
        fused = {"k_qkv_rope": "linear(q,k,v) + split + [q/k rms_norm] + rope",
                 "k_linear_glu": "linear(gate,up) + split + act + mul",
                 "k_add_rms_norm": "residual add + rms_norm",
                 "k_paged_attention": "online-softmax GQA attention over KV pages",
                 "k_expert_glu": "per expert: linear(gate,up) + split + act + mul",
                 "k_expert_linear_sum": "per expert: linear(down), weighted sum per token"}
        for name, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            click.echo(f"  {n:4d} x {name:<22} {fused.get(name, '')}")
    mem = m.get("memory")
    if mem:
        click.echo("activations peak arena bytes by tokens per step (without reuse in brackets)")
        for t, r in mem.items():
            click.echo(f"  T={t:<5} {_human(r['arena_bytes']):>10}  ({_human(r['without_reuse_bytes'])})")
    click.echo("ops         " + ", ".join(f"{k} {v}" for k, v in m.get("ops", {}).items()))


if __name__ == "__main__":
    main()
