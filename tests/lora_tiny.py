"""Two PEFT LoRA adapters on a tiny random Llama, and the merged checkpoints they make: the fixtures
of the per-request LoRA tests (tests/runtime/test_lora_serving.py, tests/server/test_lora_server.py).
Made by peft itself (B nonzero: random, so the adapters change the output), with different ranks,
targets and alpha, one rsLoRA; merged with `merge_and_unload`, the independent reference."""
from __future__ import annotations

import copy
from pathlib import Path

from hf_tiny import make_model

ADAPTERS = {"alpha": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
            "beta": dict(r=8, lora_alpha=4, use_rslora=True,
                         target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"])}


def peft_adapter(hf, out: Path, seed: int, **cfg):
    import peft
    import torch

    model = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(out)
    return model


def build(d: Path) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    """(base HF folder, {adapter name: adapter folder}, {adapter name: merged HF folder}) under d."""
    base, hf = make_model("llama-gqa-llama3", d / "base")
    adapters, merged = {}, {}
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        model = peft_adapter(hf, d / name, seed=10 + i, **cfg)
        model.merge_and_unload().save_pretrained(d / f"{name}-merged")
        for f in base.iterdir():   # the tokenizer beside the merged weights
            if f.name.startswith("tokenizer") or f.name == "generation_config.json":
                (d / f"{name}-merged" / f.name).write_bytes(f.read_bytes())
        adapters[name], merged[name] = d / name, d / f"{name}-merged"
    return base, adapters, merged
