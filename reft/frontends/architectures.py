"""The model registry: Hugging Face `architectures` name -> model-definition module.

A model-definition module (one per family, in the top-level models/ folder, installed as
`reft_models`) provides:
  ARCHITECTURES   tuple of HF architecture names it implements
  Config          a dataclass with `from_hf(config_dict) -> Config`
  build(cfg, b)   writes the forward graph with a `reft.ir.GraphBuilder`
`reftc compile --model-def FILE.py` loads such a module from a file instead.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path
from types import ModuleType

from ..errors import ModelError

REQUIRED = ("ARCHITECTURES", "Config", "build")


def shipped_families() -> dict[str, ModuleType]:
    import reft_models

    out: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(reft_models.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"reft_models.{info.name}")
        for arch in getattr(mod, "ARCHITECTURES", ()):
            out[arch] = mod
    return out


def load_model_def(path: str | Path) -> ModuleType:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"--model-def {path}: no such file")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
    name = f"reft_user_model_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # user code: report, don't crash
        raise ModelError(f"--model-def {path}: failed to import: {type(e).__name__}: {e}") from None
    missing = [a for a in REQUIRED if not hasattr(mod, a)]
    if not missing:
        missing = [f"{a} (not callable)" for a, obj in (("build", getattr(mod, "build")),
                                                         ("Config.from_hf", getattr(mod.Config, "from_hf", None)))
                   if not callable(obj)]
    if missing:
        raise ModelError(f"--model-def {path}: missing {', '.join(missing)} (see docs/adding-a-model.md)")
    return mod


def find_family(architectures: list[str] | None, model_def: str | Path | None = None) -> ModuleType:
    if model_def is not None:
        return load_model_def(model_def)
    families = shipped_families()
    for arch in architectures or []:
        if arch in families:
            return families[arch]
    got = ", ".join(architectures or []) or "none given"
    raise ModelError(f"unsupported architecture ({got}); supported: {', '.join(sorted(families))}"
                     " (or write a model definition and pass --model-def FILE.py)")
