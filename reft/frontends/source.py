"""One record for a model the compiler reads, whatever the file format.

`open_source(path, model_def)` returns a `ModelSource`: the normalised config.json dict, the model
family, a lazy weight mapping, the tokenizer, and where it all came from. Both frontends (a
Hugging Face folder, a llama.cpp .gguf file) produce it, so the compiler has no per-format branches.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import Callable

from ..errors import ModelError

ASSETS = Path(__file__).parent.parent / "assets"


@dataclass
class ModelSource:
    path: Path                      # the folder or file the user named
    config: dict                    # normalised config.json dict (frontends/config.py)
    family: ModuleType              # the model definition module (models/<family>.py or --model-def)
    open_weights: Callable          # () -> name -> array mapping, lazy (safetensors mmap or GGUF tensors)
    open_tokenizer: Callable        # () -> reft.frontends.tokenizer.Tokenizer
    format: str                     # "hf" | "gguf"
    where: Path                     # the file errors about the config name (config.json or the .gguf)
    provenance: dict = field(default_factory=dict)   # extra manifest facts (e.g. gguf_tensor_types)
    model_def: Path | None = None

    # weights and tokenizer are opened on first use, so a bad config is reported before them
    @cached_property
    def weights(self):
        return self.open_weights()

    @cached_property
    def tokenizer(self):
        return self.open_tokenizer()

    @property
    def family_name(self) -> str:
        return self.model_def.stem if self.model_def else self.family.__name__.split(".")[-1]

    @property
    def architecture(self) -> str:
        """The config's `architectures` entry the family matched (its first one otherwise)."""
        archs = self.config.get("architectures") or []
        return next((a for a in archs if a in self.family.ARCHITECTURES), self.family.ARCHITECTURES[0])


def bundled_models() -> list[str]:
    return sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file())


def resolve_model(model: str | Path) -> Path:
    """A path, or the name of a model shipped inside reft (e.g. `stories260K`)."""
    p = Path(model)
    if not p.exists() and str(model) in bundled_models():
        return ASSETS / str(model)
    return p


def open_source(model: str | Path, model_def: str | Path | None = None) -> ModelSource:
    model = resolve_model(model)
    mdef = Path(model_def) if model_def else None
    if not model.exists():
        raise ModelError(f"{model}: no such model directory (bundled models: {', '.join(bundled_models())})")
    if model.is_file() and model.suffix == ".gguf":
        return _gguf(model, mdef)
    if model.is_file():
        raise ModelError(f"{model}: expected a Hugging Face model directory (config.json, *.safetensors,"
                         " tokenizer.json) or a .gguf file")
    return _hf(model, mdef)


def _hf(model: Path, model_def: Path | None) -> ModelSource:
    from .architectures import find_family
    from .config import load_hf_config
    from .safetensors import open_weights
    from .tokenizer import Tokenizer

    hf = load_hf_config(model)
    family = find_family(hf.get("architectures"), model_def)
    return ModelSource(model, hf, family, lambda: open_weights(model), lambda: Tokenizer.from_dir(model, hf), "hf",
                       model / "config.json", model_def=model_def)


def _gguf(model: Path, model_def: Path | None) -> ModelSource:
    """A .gguf file read by frontends/gguf.py (block-quantized tensors can stay quantized)."""
    from .architectures import load_model_def
    from .gguf import open_gguf

    g = open_gguf(model, load_model_def(model_def) if model_def else None)
    return ModelSource(model, g.hf_config, g.family, lambda: g.weights, lambda: g.tokenizer, "gguf", model,
                       {"gguf_tensor_types": g.source_types}, model_def)
