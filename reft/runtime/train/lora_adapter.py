"""LoRA adapters in PEFT's format, so `peft.PeftModel.from_pretrained` loads them unchanged.

  adapter_config.json        peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha, lora_dropout,
                             target_modules, bias "none", base_model_name_or_path, ...
  adapter_model.safetensors  base_model.model.<module>.lora_A.weight [r, in]
                             base_model.model.<module>.lora_B.weight [out, r]

reft names an adapter's tensors `<module>.lora_A.weight` / `<module>.lora_B.weight`, where
<module> is the HF name of the adapted linear (its weight is `<module>.weight`, e.g.
`model.layers.0.self_attn.q_proj`). The adapted layer computes W x + (lora_alpha / r) B A x
(rsLoRA: lora_alpha / sqrt(r)); `merge_lora` folds that into W for `reft export --merge`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from ...frontends.safetensors import write_safetensors
from .checkpoint import CheckpointError, read_weights

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
A, B = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]      # short names: q_proj, v_proj, ...
    base_model: str = ""                 # base_model_name_or_path
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def config(self) -> dict:
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "target_modules": sorted(self.target_modules), "bias": "none",
                "base_model_name_or_path": self.base_model, "fan_in_fan_out": False, "inference_mode": True,
                "init_lora_weights": True, "modules_to_save": None, "use_rslora": self.use_rslora,
                "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
                "alpha_pattern": {}, "revision": None}


def adapter_modules(tensors: Mapping[str, np.ndarray], spec: LoraSpec) -> list[str]:
    """The adapted modules of reft-named tensors, checked: pairs, shapes, rank, target names."""
    mods = sorted({n[:-len(A)] for n in tensors if n.endswith(A)} | {n[:-len(B)] for n in tensors if n.endswith(B)})
    if not mods:
        raise CheckpointError("the adapter has no lora_A / lora_B tensors")
    for m in mods:
        if m + A not in tensors or m + B not in tensors:
            raise CheckpointError(f"LoRA module {m} lacks its lora_A or lora_B tensor")
        a, b = tensors[m + A], tensors[m + B]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != spec.r or b.shape[1] != spec.r:
            raise CheckpointError(f"LoRA module {m}: lora_A {list(a.shape)} / lora_B {list(b.shape)} are not"
                                  f" [r, in] / [out, r] with r = {spec.r}")
        if m.rsplit(".", 1)[-1] not in spec.target_modules:
            raise CheckpointError(f"LoRA module {m} is not one of the target modules {sorted(spec.target_modules)}")
    extra = [n for n in tensors if not n.endswith((A, B))]
    if extra:
        raise CheckpointError(f"not a LoRA tensor: {extra[0]}")
    return mods


def write_lora_adapter(out: Path, spec: LoraSpec, tensors: Mapping[str, np.ndarray]) -> None:
    """adapter_config.json and adapter_model.safetensors (float32) into `out`."""
    adapter_modules(tensors, spec)
    out.mkdir(parents=True, exist_ok=True)
    items = [(PEFT_PREFIX + n, "float32", tuple(a.shape), lambda a=a: np.asarray(a, np.float32))
             for n, a in sorted(tensors.items())]
    write_safetensors(out / WEIGHTS, items, metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(spec.config(), indent=2) + "\n")


def read_lora_adapter(path: str | Path) -> tuple[LoraSpec, dict[str, np.ndarray]]:
    """(spec, reft-named tensors) of a PEFT LoRA adapter folder."""
    path = Path(path)
    try:
        cfg = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG}: cannot read ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{path / CONFIG}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora") or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise CheckpointError(f"{path / CONFIG}: DoRA and per-layer rank/alpha patterns are not supported")
    targets = cfg.get("target_modules") or []
    spec = LoraSpec(int(cfg["r"]), float(cfg["lora_alpha"]), float(cfg.get("lora_dropout", 0.0)),
                    tuple([targets] if isinstance(targets, str) else targets),
                    cfg.get("base_model_name_or_path") or "", bool(cfg.get("use_rslora", False)))
    raw = read_weights(path / WEIGHTS)
    tensors = {}
    for n, a in raw.items():
        if not n.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{path / WEIGHTS}: tensor {n} is not named base_model.model.*")
        tensors[n[len(PEFT_PREFIX):].replace(".default.", ".")] = a.astype(np.float32)
    adapter_modules(tensors, spec)
    return spec, tensors


def merge_lora(weights: Mapping[str, np.ndarray], spec: LoraSpec, tensors: Mapping[str, np.ndarray]) -> dict:
    """The base weights with W += scale * B @ A for every adapted module (float32)."""
    out = dict(weights)
    for m in adapter_modules(tensors, spec):
        w = m + ".weight"
        if w not in weights:
            raise CheckpointError(f"the base model has no weight {w} for LoRA module {m}")
        delta = tensors[m + B].astype(np.float64) @ tensors[m + A].astype(np.float64) * spec.scale
        if delta.shape != weights[w].shape:
            raise CheckpointError(f"LoRA module {m}: B @ A is {list(delta.shape)}, the weight {list(weights[w].shape)}")
        out[w] = (weights[w].astype(np.float64) + delta).astype(np.float32)
    return out
