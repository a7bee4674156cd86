#!/usr/bin/env python3
"""Training speed: reft's cpu backend against PyTorch CPU eager, same model, batch, threads and optimizer.

  python tools/bench_train.py [--mode full|lora] [--layers N] [--batch 4] [--seq 256] [--steps 4]
                              [--threads 2] [--json out.json]

The model is SmolLM2-135M-Instruct's architecture (shared/models/.../hf_config; --layers keeps the
first N layers) with random float32 weights written once by transformers; the tokenizer is the
model's own. Data: this repository's docs and README, tokenized and packed into blocks of --seq
tokens (pretraining: every token is a target). Both sides run AdamW (betas 0.9/0.999, eps 1e-8, no
weight decay) with global-norm clipping at 1.0 and a constant learning rate; LoRA is rank 8, alpha 16
on q_proj and v_proj (reft's and PEFT's usual defaults).

Each side runs in its own process (so peak RSS is its own) for one warm-up step and --steps timed
steps; reported: tokens/s (median step), peak RSS, and the share of a step outside the forward
pass (backward + clipping + update; reft: 1 - eval_loss time / train_step time on same-shaped
batches; torch: timed around loss.backward() through optimizer.step()). The two processes
alternate --rounds times so drift on a shared machine hits both alike.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SMOLLM2 = ROOT.parent / "shared" / "models" / "smollm2-135m-instruct"
LR = 1e-5


def build_model(out: Path, layers: int | None) -> Path:
    """A random-weight float32 SmolLM2-135M-shaped folder (config, safetensors, tokenizer)."""
    import torch
    import transformers

    cfg = json.loads((SMOLLM2 / "hf_config" / "config.json").read_text())
    if layers:
        cfg["num_hidden_layers"] = layers
    cfg["torch_dtype"] = "float32"
    config = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    model.save_pretrained(out, safe_serialization=True)
    for f in (SMOLLM2 / "hf_tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    return out


def corpus(out: Path) -> Path:
    text = "\n\n".join(p.read_text() for p in sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")]))
    out.write_text(text)
    return out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- workers (one framework per process) ----------------------------------------------------------

def worker_reft(a) -> dict:
    from reft.runtime.train.options import TrainArgs
    from reft.runtime.train.trainer import Trainer

    ckpt = Path(tempfile.mkdtemp(prefix="bench-train-"))
    shutil.rmtree(ckpt)
    args = TrainArgs(model=a.model, datasets=(f"text@{a.data}",), checkpoint_dir=str(ckpt), stage="pretrain",
                     fine_tuning_type=a.mode, block_size=a.seq, cutoff_len=a.seq, batch_size=a.batch,
                     learning_rate=LR, lr_scheduler_type="constant", max_steps=a.steps + 1, threads=a.threads,
                     eval_split=0.2, backend="cpu", seed=0)
    t = Trainer(args)
    try:
        times, tokens = [], 0
        for i in range(a.steps + 1):
            t0 = time.perf_counter()
            rec = t.step_once()
            if i:
                times.append(time.perf_counter() - t0)
                tokens = rec["tokens"]
        b = t.eval_batches[0]
        if b.tokens != tokens:
            raise SystemExit(f"eval batch of {b.tokens} tokens, train batches of {tokens}: use more data")
        fwd = []
        for _ in range(max(2, a.steps // 2)):
            t0 = time.perf_counter()
            t.exe.run(t._feeds(b, 1.0 / b.target_tokens), "eval_loss")
            fwd.append(time.perf_counter() - t0)
    finally:
        t.close()
        shutil.rmtree(ckpt, ignore_errors=True)
    step = statistics.median(times)
    return {"tokens_per_s": tokens / step, "step_s": step, "beyond_forward_share": 1 - statistics.median(fwd) / step,
            "peak_rss_mib": peak_rss_mib(), "loss": rec["loss"]}


def worker_torch(a) -> dict:
    import torch
    import transformers
    from tokenizers import Tokenizer

    torch.set_num_threads(a.threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.train()
    if a.mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"]))
    elif a.mode != "full":
        raise SystemExit(f"unknown mode {a.mode}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = Tokenizer.from_file(str(Path(a.model) / "tokenizer.json")).encode(Path(a.data).read_text()).ids
    n = a.batch * a.seq
    if len(ids) < n * (a.steps + 1):
        raise SystemExit("not enough data for the steps asked")
    times, fwd = [], []
    for i in range(a.steps + 1):
        x = torch.tensor(ids[i * n:(i + 1) * n]).view(a.batch, a.seq)
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        t1 = time.perf_counter()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if i:
            times.append(t2 - t0)
            fwd.append(t1 - t0)
    step = statistics.median(times)
    return {"tokens_per_s": n / step, "step_s": step, "beyond_forward_share": 1 - statistics.median(fwd) / step,
            "peak_rss_mib": peak_rss_mib(), "loss": float(loss)}


# -- driver --------------------------------------------------------------------------------------

def run_worker(kind: str, a, model: Path, data: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--model", str(model), "--data", str(data),
           "--mode", a.mode, "--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps),
           "--threads", str(a.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", default="full", choices=["full", "lora"])
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers (default: all 30)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", choices=["reft", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps((worker_reft if a.worker == "reft" else worker_torch)(a)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "model", a.layers)
        data = corpus(Path(tmp) / "corpus.txt")
        rounds = [{k: run_worker(k, a, model, data) for k in ("torch", "reft")} for _ in range(a.rounds)]
    best = {k: max((r[k] for r in rounds), key=lambda x: x["tokens_per_s"]) for k in ("torch", "reft")}
    out = {"mode": a.mode, "layers": a.layers or 30, "batch": a.batch, "seq": a.seq, "threads": a.threads,
           "steps": a.steps, "rounds": rounds, "best": best,
           "ratio": best["reft"]["tokens_per_s"] / best["torch"]["tokens_per_s"]}
    for k in ("torch", "reft"):
        b = best[k]
        print(f"{k:<6} {b['tokens_per_s']:8.1f} tok/s  step {b['step_s']:.2f} s  beyond-forward share"
              f" {b['beyond_forward_share']:.0%}  peak RSS {b['peak_rss_mib']:.0f} MiB")
    print(f"reft / torch: {out['ratio']:.2f}x")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
