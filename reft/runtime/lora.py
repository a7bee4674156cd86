"""LoRA adapters served per request: the runtime side of `reftc compile --max-loras N`.

A plan compiled with adapter slots (reft/passes/add_lora_slots.py, the manifest's `lora` record)
takes, besides its usual inputs, `lora.<module>.a` [N, R, in] and `lora.<module>.b` [N, R, out]
for every adapted projection and `lora_ids` [T]. `AdapterSlots` owns those arrays (zeros: every
slot empty) and loads PEFT adapters into them by name; the engine feeds each token's slot (-1 for
the base model), so one batch mixes requests for several adapters and for the base model.

Loading an adapter (the format `reft train --fine-tuning-type lora` writes and PEFT reads):
lora_A [r, in] goes into the slot's `a` rows 0..r-1; lora_B [out, r] transposed, times the
adapter's scale (alpha / r, rsLoRA alpha / sqrt(r)), into its `b` rows; the rows past r stay zero,
so the update is exactly B A x scale. An adapter whose rank exceeds the plan's --max-lora-rank,
that adapts a module the plan has no slot for, or whose shapes do not fit is a ReftError naming it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ReftError
from ..passes.add_lora_slots import IDS


class AdapterSlots:
    def __init__(self, layout: dict, zeros):
        self.max_loras, self.rank = int(layout["max_loras"]), int(layout["max_rank"])
        self.modules = {m: tuple(io) for m, io in layout["modules"].items()}
        self.arrays = {}
        for m, (n_in, n_out) in self.modules.items():
            self.arrays[f"lora.{m}.a"] = zeros((self.max_loras, self.rank, n_in), "float32")
            self.arrays[f"lora.{m}.b"] = zeros((self.max_loras, self.rank, n_out), "float32")
        self.names: dict[str, int] = {}     # adapter name -> slot

    def slot(self, name: str | None) -> int:
        """The slot of a loaded adapter; -1 for None (the base model)."""
        if name is None:
            return -1
        try:
            return self.names[name]
        except KeyError:
            raise ReftError(f"no LoRA adapter named {name!r} is loaded") from None

    def load(self, name: str, path: str | Path) -> int:
        """Read the PEFT adapter in folder `path` into a free slot under `name`; returns the slot."""
        from .train.lora_adapter import read_lora_adapter

        if name in self.names:
            raise ReftError(f"LoRA adapter {name!r} is already loaded")
        if len(self.names) == self.max_loras:
            raise ReftError(f"LoRA adapter {name!r}: all {self.max_loras} adapter slots are taken (compile with a"
                            " larger --max-loras)")
        spec, tensors = read_lora_adapter(path)
        if spec.r > self.rank:
            raise ReftError(f"LoRA adapter {name!r} ({path}): rank {spec.r} exceeds the plan's --max-lora-rank"
                            f" {self.rank}")
        mods = sorted({n[:-len(".lora_A.weight")] for n in tensors if n.endswith(".lora_A.weight")})
        for m in mods:
            if m not in self.modules:
                raise ReftError(f"LoRA adapter {name!r} ({path}) adapts {m}, which has no adapter slot in this plan"
                                f" (compiled for {', '.join(sorted({k.rsplit('.', 1)[-1] for k in self.modules}))})")
            a, b = tensors[m + ".lora_A.weight"], tensors[m + ".lora_B.weight"]
            if (a.shape[1], b.shape[0]) != self.modules[m]:
                raise ReftError(f"LoRA adapter {name!r} ({path}): {m} maps {a.shape[1]} -> {b.shape[0]} features, the"
                                f" model's projection {self.modules[m][0]} -> {self.modules[m][1]}")
        slot = next(s for s in range(self.max_loras) if s not in self.names.values())
        for m in self.modules:
            a, b = self.arrays[f"lora.{m}.a"], self.arrays[f"lora.{m}.b"]
            a[slot], b[slot] = 0, 0
            if m in mods:
                la, lb = tensors[m + ".lora_A.weight"], tensors[m + ".lora_B.weight"]
                a[slot, :spec.r] = la
                b[slot, :spec.r] = (lb.astype(np.float64).T * spec.scale).astype(np.float32)
        self.names[name] = slot
        return slot

    def feeds(self, token_slots: list[int]) -> dict:
        return {IDS: np.asarray(token_slots, np.int32), **self.arrays}


def load_adapters(engine, loras: dict[str, Path]) -> list[str]:
    """Load each `--lora NAME=DIR` adapter into the engine's adapter slots; returns their names."""
    if loras and engine.adapters is None:
        raise ReftError(f"--lora: {engine.plan.path} has no LoRA adapter slots; compile it with"
                        " `reftc compile MODEL -o PLAN --max-loras N`")
    for name, path in loras.items():
        engine.adapters.load(name, path)
    return list(loras)
